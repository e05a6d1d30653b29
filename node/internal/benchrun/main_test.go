package main

import (
	"bytes"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// sample is the shape of a real `make bench` run (lines trimmed; the node/membership and cmd/ute
// rows illustrate their format, their numbers are not a measurement).
const sample = `goos: linux
goarch: amd64
pkg: github.com/ute-project/ute/node
cpu: AMD EPYC
BenchmarkThroughput-2     	      12	 209524034 ns/op	       338.6 agent-MB/s	         1.001 agent/quic	       338.1 quic-MB/s	         0.1126 quic/tcp	      3002 tcp-MB/s
--- BENCH: BenchmarkThroughput-2
    bench_test.go:326: blocks=12×32 MiB per path; bare QUIC cipher suite TLS_AES_128_GCM_SHA256
BenchmarkDialAdmitted-2   	    9181	    243260 ns/op	       252.9 cpu-µs/flow	       158.0 p50-over-rtt-µs	       177.9 p50-µs	      1228 p99-µs	        19.98 rtt-µs
BenchmarkNewFlows/workers=8-2         	   10000	    201565 ns/op	       201.6 cpu-µs/flow	      4960 flows/cpu-s	      4958 flows/s	         1.455 others-cores
BenchmarkNewFlows/workers=32-2        	   12705	    170993 ns/op	       191.0 cpu-µs/flow	      5841 flows/s
BenchmarkRecordSize/chain-2           	  106099	     23027 ns/op	      1251 bytes/record
BenchmarkRecordSize/chain-hash-2      	  122760	     19022 ns/op	       291.0 bytes/record
PASS
ok  	github.com/ute-project/ute/node	14.732s
pkg: github.com/ute-project/ute/overlay/tunnel
BenchmarkNewFlows-2   	   30000	     40000 ns/op	     25000 flows/s
BenchmarkFlowThroughput-2   	   10	     40000 ns/op	     400.0 flow-MB/s	     410.0 bare-MB/s	     0.9756 flow/bare
ok  	github.com/ute-project/ute/overlay/tunnel	4.1s
pkg: github.com/ute-project/ute/node/membership
BenchmarkRevocationConvergence/nodes=10/requeue-2         	      10	       199.4 max-ms	        22.51 ms/converge	       100.0 reached-%
BenchmarkRevocationConvergence/nodes=10/memberlist-only-2 	      10	      3001 max-ms	      3000 ms/converge	        66.00 reached-%
BenchmarkRevocationConvergence/nodes=50/requeue-2         	      10	       222.6 max-ms	        87.22 ms/converge	       100.0 reached-%
BenchmarkRevocationConvergence/nodes=50/memberlist-only-2 	      10	      3011 max-ms	      3002 ms/converge	        17.60 reached-%
BenchmarkRevocationConvergence/nodes=100/requeue-2         	      10	       422.6 max-ms	        187.2 ms/converge	       100.0 reached-%
BenchmarkRevocationConvergence/nodes=100/memberlist-only-2 	      10	      3011 max-ms	      3002 ms/converge	        12.20 reached-%
ok  	github.com/ute-project/ute/node/membership	289.2s
pkg: github.com/ute-project/ute/cmd/ute
BenchmarkNodeAtRest-2   	       1	 10000000000 ns/op	         0.8 cpu-%	        30.0 rss-MiB	        99.0 tunnels	       100.0 members
ok  	github.com/ute-project/ute/cmd/ute	90.1s
`

func find(t *testing.T, checks []Check, measure string) Check {
	t.Helper()
	for _, c := range checks {
		if c.Measure == measure {
			return c
		}
	}
	require.Failf(t, "row not found", "%q", measure)
	return Check{}
}

func TestEvaluateSample(t *testing.T) {
	rs, err := Parse(strings.NewReader(sample), &bytes.Buffer{})
	require.NoError(t, err)
	require.Empty(t, rs.Failures)
	checks := Evaluate(rs)

	thr := find(t, checks, "Agent→agent TCP through two nodes")
	assert.Equal(t, "1.00×", thr.Ratio)
	assert.Equal(t, MetYes, thr.Met)

	p50 := find(t, checks, "Flow admission latency p50")
	assert.Equal(t, "RTT + 158 µs", p50.Ratio)
	assert.Equal(t, MetNo, p50.Met, "158 µs over the RTT is over the 150 µs budget")

	cpu := find(t, checks, "CPU per admitted flow (sender+receiver)")
	assert.Equal(t, MetNo, cpu.Met)
	assert.Equal(t, "1.69×", cpu.Ratio)

	w8 := find(t, checks, "New flows/s, 8 concurrent dialers")
	assert.Equal(t, MetNo, w8.Met)
	assert.Equal(t, "0.20×", w8.Ratio, "against the tunnel-only figure of the same run")
	assert.Equal(t, "1.5 cores", w8.Load)
	assert.Equal(t, "4960 flows per CPU-second", find(t, checks, "New flows/s, 8 concurrent dialers, CPU-bound (context)").Result)
	w32 := find(t, checks, "New flows/s, 32 concurrent dialers")
	assert.Equal(t, MetYes, w32.Met)
	assert.Empty(t, w32.Load, "no others-cores metric in that line")

	hash := find(t, checks, "DTL record, chain-hash form")
	assert.Equal(t, "291 B", hash.Result)
	assert.Equal(t, "0.23×", hash.Ratio)

	tun := find(t, checks, "Tunnel flow, no node (context)")
	assert.Equal(t, "0.98×", tun.Ratio)

	// The dtl benchmarks were not in the sample: their context rows say so without failing.
	assert.Equal(t, MetNA, find(t, checks, "Admit one record, full chain (receiver, dtl)").Met)
	for _, c := range checks {
		assert.NotEqual(t, MetMissing, c.Met, c.Measure)
	}
}

func TestParseLine(t *testing.T) {
	for _, tc := range []struct {
		line  string
		name  string
		iters int64
		unit  string
		value float64
		ok    bool
	}{
		{"BenchmarkX-2   10   5 ns/op", "BenchmarkX", 10, "ns/op", 5, true},
		{"BenchmarkX/sub-case-16 1 2.5 MB/s", "BenchmarkX/sub-case", 1, "MB/s", 2.5, true},
		{"BenchmarkX/chain-hash 1 7 bytes/record", "BenchmarkX/chain-hash", 1, "bytes/record", 7, true}, // GOMAXPROCS=1: no suffix
		{"BenchmarkX/workers=8 3 1 flows/s", "BenchmarkX/workers=8", 3, "flows/s", 1, true},
		{"BenchmarkX-2 10 5", "", 0, "", 0, false},                 // value without unit
		{"BenchmarkX-2 ten 5 ns/op", "", 0, "", 0, false},          // iterations not a number
		{"BenchmarkX-2 0 5 ns/op", "", 0, "", 0, false},            // no iterations
		{"BenchmarkX-2 10 fast ns/op", "", 0, "", 0, false},        // value not a number
		{"--- BENCH: BenchmarkX-2", "", 0, "", 0, false},           // log header
		{"ok  \tpkg\t1.0s", "", 0, "", 0, false},                   // package summary
		{"Benchmark", "", 0, "", 0, false},                         // truncated
		{"    BenchmarkX-2 10 5 ns/op extra", "", 0, "", 0, false}, // odd field count
	} {
		t.Run(tc.line, func(t *testing.T) {
			name, iters, m, ok := ParseLine(tc.line)
			require.Equal(t, tc.ok, ok)
			if !ok {
				return
			}
			assert.Equal(t, tc.name, name)
			assert.Equal(t, tc.iters, iters)
			assert.InDelta(t, tc.value, m[tc.unit], 1e-9)
		})
	}
}

func TestMetricMedianOverCount(t *testing.T) {
	in := "pkg: example.com/m/node\nBenchmarkA-2 1 1 x\nBenchmarkA-2 1 9 x\nBenchmarkA-2 1 3 x\n"
	rs, err := Parse(strings.NewReader(in), &bytes.Buffer{})
	require.NoError(t, err)
	v, ok := rs.Metric("node", "BenchmarkA", "x")
	require.True(t, ok)
	assert.InDelta(t, 3.0, v, 1e-9)
	_, ok = rs.Metric("de", "BenchmarkA", "x") // a suffix that is not a whole path element
	assert.False(t, ok)
}

func TestRunExitCodes(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		require.NoError(t, os.WriteFile(p, []byte(content), 0o644))
		return p
	}
	good := write("good.txt", sample)
	failed := write("failed.txt", sample+"--- FAIL: BenchmarkDialAdmitted\nFAIL\tgithub.com/ute-project/ute/node\t1s\n")
	partial := write("partial.txt", "pkg: github.com/ute-project/ute/zones\nBenchmarkParseExample-2 10 5 ns/op\n")

	for _, tc := range []struct {
		name   string
		args   []string
		code   int
		stderr string
	}{
		{"all reported", []string{"-quiet", good}, exitOK, ""},
		{"targets missed are only reported", []string{good}, exitOK, ""},
		{"strict fails on a missed target", []string{"-strict", "-quiet", good}, exitFail, "target(s) missed"},
		{"a failed benchmark fails the run", []string{"-quiet", failed}, exitFail, "failure line"},
		{"missing results fail the run", []string{"-quiet", partial}, exitFail, "missing"},
		{"unreadable input", []string{filepath.Join(dir, "absent.txt")}, exitFail, "no such file"},
		{"unknown format", []string{"-format", "html", good}, exitUsage, "unknown -format"},
		{"unknown flag", []string{"-nope"}, exitUsage, "flag provided but not defined"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			code := run(tc.args, strings.NewReader(""), &stdout, &stderr)
			assert.Equal(t, tc.code, code, "stderr: %s", stderr.String())
			assert.Contains(t, stderr.String(), tc.stderr)
		})
	}
}

func TestRunEchoesAndKeepsCopy(t *testing.T) {
	out := filepath.Join(t.TempDir(), "bench.txt")
	var stdout, stderr bytes.Buffer
	require.Equal(t, exitOK, run([]string{"-out", out, "-format", "markdown"}, strings.NewReader(sample), &stdout, &stderr), stderr.String())
	raw, err := os.ReadFile(out)
	require.NoError(t, err)
	assert.Equal(t, sample, string(raw))
	assert.True(t, strings.HasPrefix(stdout.String(), sample), "the input is echoed before the table")
	assert.Contains(t, stdout.String(), "| Agent→agent TCP through two nodes | 339 MB/s (2.71 Gbit/s) | bare quic-go stream 338 MB/s (2.70 Gbit/s) | 1.00× | ≥ 0.8× | yes |  |")
}

func FuzzParse(f *testing.F) {
	f.Add(sample)
	f.Add("BenchmarkX-2 10 5 ns/op 1e309 MB/s\n")
	f.Add("pkg: \nBenchmark- 1 NaN x\n")
	f.Add("BenchmarkX-2 10 5 ns/op") // no final newline
	f.Fuzz(func(t *testing.T, in string) {
		var echo bytes.Buffer
		rs, err := Parse(strings.NewReader(in), &echo)
		require.NoError(t, err)
		// Every byte read is echoed; only a final newline may be added.
		require.True(t, strings.HasPrefix(echo.String(), in))
		require.LessOrEqual(t, echo.Len(), len(in)+1)
		checks := Evaluate(rs)
		require.NoError(t, WriteText(&bytes.Buffer{}, checks))
		require.NoError(t, WriteMarkdown(&bytes.Buffer{}, checks))
	})
}

func TestConvergenceAndRestRows(t *testing.T) {
	rs, err := Parse(strings.NewReader(sample), io.Discard)
	require.NoError(t, err)
	checks := Evaluate(rs)
	c := find(t, checks, "Revocation reaches all 100 nodes (gossip)")
	assert.Equal(t, MetYes, c.Met)
	assert.Contains(t, c.Baseline, "12% reached")
	assert.Equal(t, MetYes, find(t, checks, "Node at rest, 100 peers: RSS").Met)
	assert.Equal(t, MetYes, find(t, checks, "Node at rest, 100 peers: CPU").Met)

	slow := strings.Replace(sample, "422.6 max-ms", "1422.6 max-ms", 1)
	rs, err = Parse(strings.NewReader(slow), io.Discard)
	require.NoError(t, err)
	assert.Equal(t, MetNo, find(t, Evaluate(rs), "Revocation reaches all 100 nodes (gossip)").Met, "a worst case over 1 s misses the target")
}
