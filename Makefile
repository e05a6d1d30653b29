# UTE build, test and measurement entry points. See README.md.
GO          ?= go
BIN         := bin/ute
STATICCHECK_VERSION := v0.8.2
# Built once into bin/tools under its version's name, so lint never downloads or rebuilds it again.
STATICCHECK := bin/tools/staticcheck-$(STATICCHECK_VERSION)
FUZZTIME    ?= 10s
TEST_TIMEOUT ?= 14m

.PHONY: build test check test-deps bench-deps lint fuzz bench demo clean

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

# The inner loop: build, vet and the unit tests without the long end-to-end suites (-short skips
# them) and without the race detector.
check:
	$(GO) build ./...
	$(GO) vet ./...
	$(GO) test -short -count=1 -timeout 5m ./...

# The network-namespace suite (cmd/ute netns_test.go) runs ip, python3 and curl; the root part
# of make bench also runs iperf3.
test-deps:
	@$(call apt_install,ip:iproute2 python3:python3 curl:curl)

bench-deps:
	@$(call apt_install,ip:iproute2 python3:python3 curl:curl iperf3:iperf3)

# apt_install installs, as root on a Debian-like machine, the package of each COMMAND:PACKAGE pair
# whose command is missing; otherwise the tests that need them skip with a message.
apt_install = if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		missing=""; for p in $(1); do command -v $${p%%:*} >/dev/null 2>&1 || missing="$$missing $${p\#*:}"; done; \
		if [ -n "$$missing" ]; then echo "installing$$missing"; apt-get update -qq && apt-get install -y -qq $$missing >/dev/null; fi; \
	fi

$(STATICCHECK):
	@mkdir -p bin/tools
	GOBIN=$(CURDIR)/bin/tools $(GO) install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION)
	mv bin/tools/staticcheck $@

lint: $(STATICCHECK)
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) mod tidy -diff
	$(GO) vet ./...
	$(STATICCHECK) ./...

# Every fuzz target, each for FUZZTIME. A failing target does not stop the others; a run that
# fails only with the Go toolchain's coordinator error ("context deadline exceeded") is retried
# once. The exit status is 1 when a target found a crasher, and the reproducer files are named.
fuzz:
	@failed=""; for f in $$(grep -rl --include='*_test.go' '^func Fuzz' .); do \
		pkg=$$(dirname $$f); \
		for t in $$(grep -oE '^func Fuzz[A-Za-z0-9_]*' $$f | sed 's/^func //'); do \
			echo "== $$pkg $$t"; \
			for try in 1 2; do \
				out=$$($(GO) test -run='^$$' -fuzz="^$$t$$" -fuzztime=$(FUZZTIME) $$pkg 2>&1); rc=$$?; \
				echo "$$out" | tail -n 3; \
				if [ $$rc = 0 ]; then break; fi; \
				if [ $$try = 1 ] && echo "$$out" | grep -q 'context deadline exceeded' && ! echo "$$out" | grep -q 'Failing input written'; then \
					echo "   (coordinator timeout; retrying once)"; continue; fi; \
				failed="$$failed $$pkg:$$t"; \
				echo "$$out" | grep -E 'Failing input written|testdata/fuzz' | sed 's/^/   reproducer: /'; \
				break; \
			done; \
		done; \
	done; \
	if [ -n "$$failed" ]; then echo "fuzz: crashers in:$$failed"; exit 1; fi; echo "fuzz: no crasher"

# Every package's benchmarks in one run (about 2 minutes on 2 cores), echoed as they run and kept in
# BENCH_OUT, then the results table of node/internal/benchrun: each performance target of DESIGN.md
# §7 beside its same-run baseline, as ratios. docs/benchmarks.md records a run. The pipe's status is
# benchrun's, which fails on any FAIL line and on missing results.
BENCHTIME ?= 2s
BENCH_OUT ?= bin/bench.txt
bench: bench-deps
	@mkdir -p bin $(dir $(BENCH_OUT))
	$(GO) build -o bin/benchrun ./node/internal/benchrun
	$(GO) test -run='^$$' -bench=. -benchmem -benchtime=$(BENCHTIME) -timeout 30m ./... 2>&1 | bin/benchrun -out $(BENCH_OUT)

# The whole story in one process, no root, under a minute (cmd/ute/demo.go).
demo: build
	./$(BIN) demo

clean:
	rm -rf bin
