# UTE build, test and measurement entry points. See README.md.
GO          ?= go
BIN         := bin/ute
STATICCHECK := honnef.co/go/tools/cmd/staticcheck@v0.8.2
FUZZTIME    ?= 10s
TEST_TIMEOUT ?= 14m

.PHONY: build test test-deps lint fuzz bench demo clean

VERSION     ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
COMMIT      ?= $(shell git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)

build:
	$(GO) build -ldflags "-X main.version=$(VERSION) -X main.commit=$(COMMIT)" -o $(BIN) ./cmd/ute

# Root-only tests (TUN devices, network namespaces) run automatically when this is run as root and
# skip with a message otherwise; test-deps installs what they need on a fresh Debian machine.
# The 1 GiB transfers (tests named *Large) run a second time without the race detector, which would
# make them take minutes, with UTE_LONG=1 selecting their full size.
test: test-deps
	$(GO) test -race -timeout $(TEST_TIMEOUT) ./...
	UTE_LONG=1 $(GO) test -count=1 -timeout 5m -run 'Large$$' ./...

test-deps:
	@if [ "$$(id -u)" = 0 ] && ! command -v ip >/dev/null 2>&1; then \
		apt-get update -qq && apt-get install -y -qq iproute2 >/dev/null; \
	fi

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) mod tidy -diff
	$(GO) vet ./...
	$(GO) run $(STATICCHECK) ./...

# Every fuzz target, each for FUZZTIME.
fuzz:
	@set -e; for f in $$(grep -rl --include='*_test.go' '^func Fuzz' .); do \
		pkg=$$(dirname $$f); \
		for t in $$(grep -oE '^func Fuzz[A-Za-z0-9_]*' $$f | sed 's/^func //'); do \
			echo "== $$pkg $$t"; \
			$(GO) test -run='^$$' -fuzz="^$$t$$" -fuzztime=$(FUZZTIME) $$pkg; \
		done; \
	done

# Every package's benchmarks in one run (about 2 minutes on 2 cores), echoed as they run and kept in
# BENCH_OUT, then the results table of node/internal/benchrun: each performance target of DESIGN.md
# §7 beside its same-run baseline, as ratios. docs/benchmarks.md records a run. The pipe's status is
# benchrun's, which fails on any FAIL line and on missing results.
BENCHTIME ?= 2s
BENCH_OUT ?= bin/bench.txt
bench:
	@mkdir -p bin $(dir $(BENCH_OUT))
	$(GO) build -o bin/benchrun ./node/internal/benchrun
	$(GO) test -run='^$$' -bench=. -benchmem -benchtime=$(BENCHTIME) -timeout 30m ./... 2>&1 | bin/benchrun -out $(BENCH_OUT)

# The whole story in one process, no root, under a minute (cmd/ute/demo.go).
demo: build
	./$(BIN) demo

clean:
	rm -rf bin
