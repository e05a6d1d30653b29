package main

import (
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
)

// Values of Check.Met.
const (
	MetYes     = "yes"
	MetNo      = "NO"
	MetContext = "-"       // a context row: no target
	MetMissing = "missing" // a target row whose benchmark did not report
	MetNA      = "n/a"     // a context row whose benchmark did not report
)

// Check is one row of the results table.
type Check struct {
	Measure  string
	Result   string
	Baseline string
	Ratio    string
	Target   string
	Met      string
	// Load is the average number of cores other processes kept busy while the benchmark ran
	// (its others-cores metric): wall-clock results on a shared machine need it beside them.
	Load string
}

// Targets of docs/design.md (performance targets) that the table checks.
const (
	targetThroughputRatio = 0.8
	targetAdmitCPUus      = 150.0
	targetFlowsPerSec     = 5000.0
	targetConvergenceMs   = 1000.0
	targetRestRSSMiB      = 60.0
	targetRestCPUPct      = 1.0
)

// metricGetter is Results.Metric.
type metricGetter func(pkg, name, unit string) (float64, bool)

// Evaluate builds the results table from a run. Ratios are only ever taken between metrics of the
// same run (most between metrics of the same benchmark, measured side by side).
func Evaluate(rs *Results) []Check {
	m := metricGetter(rs.Metric)
	var out []Check
	add := func(c Check) { out = append(out, c) }

	// loadOf annotates the rows added since start with the load metric of benchmark name.
	loadOf := func(start int, name string) {
		v, ok := m("node", name, "others-cores")
		if !ok {
			return
		}
		for i := start; i < len(out); i++ {
			if out[i].Met != MetMissing {
				out[i].Load = fmt.Sprintf("%.1f cores", v)
			}
		}
	}

	// 1. Agent-to-agent TCP throughput vs one bare quic-go stream, loopback TCP for context.
	const thr = "BenchmarkThroughput"
	start := len(out)
	if agent, ok1 := m("node", thr, "agent-MB/s"); ok1 {
		bare, ok2 := m("node", thr, "quic-MB/s")
		ratio, ok3 := m("node", thr, "agent/quic")
		if ok2 && ok3 {
			add(Check{"Agent→agent TCP through two nodes", mbps(agent), "bare quic-go stream " + mbps(bare),
				fmt.Sprintf("%.2f×", ratio), fmt.Sprintf("≥ %.1f×", targetThroughputRatio), met(ratio >= targetThroughputRatio), ""})
		} else {
			add(missing("Agent→agent TCP through two nodes", "≥ 0.8×"))
		}
	} else {
		add(missing("Agent→agent TCP through two nodes", "≥ 0.8×"))
	}
	if bare, ok := m("node", thr, "quic-MB/s"); ok {
		tcp, ok2 := m("node", thr, "tcp-MB/s")
		agent, ok3 := m("node", thr, "agent-MB/s")
		if ok2 && ok3 && tcp > 0 {
			add(Check{"Bare quic-go stream (context)", mbps(bare), "loopback TCP " + mbps(tcp), fmt.Sprintf("%.2f×", bare/tcp), "", MetContext, ""})
			add(Check{"Agent→agent TCP (context)", mbps(agent), "loopback TCP " + mbps(tcp), fmt.Sprintf("%.2f×", agent/tcp), "", MetContext, ""})
		}
	}

	loadOf(start, thr)

	// 2. Admission latency and CPU.
	const dial = "BenchmarkDialAdmitted"
	start = len(out)
	p50, ok1 := m("node", dial, "p50-µs")
	p99, ok2 := m("node", dial, "p99-µs")
	rtt, ok3 := m("node", dial, "rtt-µs")
	cpu, ok4 := m("node", dial, "cpu-µs/flow")
	if ok1 && ok2 && ok3 {
		budget := rtt + targetAdmitCPUus
		add(Check{"Flow admission latency p50", usec(p50), "bare QUIC RTT " + usec(rtt),
			fmt.Sprintf("RTT + %s", usec(p50-rtt)), fmt.Sprintf("≤ RTT + %s (%s)", usec(targetAdmitCPUus), usec(budget)), met(p50 <= budget), ""})
		add(Check{"Flow admission latency p99", usec(p99), "bare QUIC RTT " + usec(rtt),
			fmt.Sprintf("RTT + %s", usec(p99-rtt)), "", MetContext, ""})
	} else {
		add(missing("Flow admission latency p50", "≤ RTT + 150 µs"))
	}
	if ok4 {
		add(Check{"CPU per admitted flow (sender+receiver)", usec(cpu), "budget " + usec(targetAdmitCPUus),
			fmt.Sprintf("%.2f×", cpu/targetAdmitCPUus), "≤ " + usec(targetAdmitCPUus), met(cpu <= targetAdmitCPUus), ""})
	} else {
		add(missing("CPU per admitted flow (sender+receiver)", "≤ 150 µs"))
	}
	loadOf(start, dial)
	contextRow(&out, m, "Sign one record, full chain (sender)", "node", "BenchmarkRecordSize/chain", "ns/op", nsAsUsec)
	contextRow(&out, m, "Admit one record, full chain (receiver, dtl)", "overlay/dtl", "BenchmarkAdmit/full-chain", "ns/op", nsAsUsec)
	contextRow(&out, m, "Admit one record, cached chain (receiver, dtl)", "overlay/dtl", "BenchmarkAdmit/cached-chain", "ns/op", nsAsUsec)

	// 3. New flows per second.
	tunnelOnly, tok := m("overlay/tunnel", "BenchmarkNewFlows", "flows/s")
	for _, w := range []string{"8", "32"} {
		name := "BenchmarkNewFlows/workers=" + w
		label := "New flows/s, " + w + " concurrent dialers"
		fps, ok := m("node", name, "flows/s")
		if !ok {
			add(missing(label, "≥ 5,000/s"))
			continue
		}
		c := Check{Measure: label, Result: fmt.Sprintf("%.0f/s", fps), Target: fmt.Sprintf("≥ %.0f/s", targetFlowsPerSec), Met: met(fps >= targetFlowsPerSec)}
		if cpu, ok := m("node", name, "cpu-µs/flow"); ok {
			c.Result += fmt.Sprintf(" (%s CPU/flow)", usec(cpu))
		}
		if tok && tunnelOnly > 0 {
			c.Baseline = fmt.Sprintf("tunnel, no-crypto admitter %.0f/s", tunnelOnly)
			c.Ratio = fmt.Sprintf("%.2f×", fps/tunnelOnly)
		}
		start := len(out)
		add(c)
		if perCPU, ok := m("node", name, "flows/cpu-s"); ok {
			add(Check{Measure: label + ", CPU-bound (context)", Result: fmt.Sprintf("%.0f flows per CPU-second", perCPU),
				Baseline: "both nodes' work on one CPU", Met: MetContext})
		}
		loadOf(start, name)
	}

	// 4. DTL record size.
	full, ok1 := m("node", "BenchmarkRecordSize/chain", "bytes/record")
	hash, ok2 := m("node", "BenchmarkRecordSize/chain-hash", "bytes/record")
	switch {
	case ok1 && ok2 && full > 0:
		add(Check{"DTL record, full chain", fmt.Sprintf("%.0f B", full), "", "", "", MetContext, ""})
		add(Check{"DTL record, chain-hash form", fmt.Sprintf("%.0f B", hash), fmt.Sprintf("full chain %.0f B", full), fmt.Sprintf("%.2f×", hash/full), "", MetContext, ""})
	default:
		add(missing("DTL record size", "reported"))
	}

	// 5. Revocation convergence over real QUIC on loopback (node/membership), beside memberlist's
	// own broadcast measured in the same run.
	for _, n := range []string{"10", "50", "100"} {
		name := "BenchmarkRevocationConvergence/nodes=" + n
		label := "Revocation reaches all " + n + " nodes (gossip)"
		worst, ok := m("node/membership", name+"/requeue", "max-ms")
		if !ok {
			add(missing(label, "≤ 1.0 s"))
			continue
		}
		mean, _ := m("node/membership", name+"/requeue", "ms/converge")
		reached, _ := m("node/membership", name+"/requeue", "reached-%")
		c := Check{Measure: label, Result: fmt.Sprintf("mean %.0f ms, worst %.0f ms, %.0f%% reached", mean, worst, reached),
			Target: "100% ≤ 1.0 s", Met: met(reached >= 100 && worst <= targetConvergenceMs)}
		if base, ok := m("node/membership", name+"/memberlist-only", "reached-%"); ok {
			c.Baseline = fmt.Sprintf("memberlist broadcast alone: %.0f%% reached in 3 s", base)
		}
		add(c)
	}

	// 6. A node process at rest with 100 peers (cmd/ute, a `ute node run` subprocess).
	if rss, ok := m("cmd/ute", "BenchmarkNodeAtRest", "rss-MiB"); ok {
		cpu, _ := m("cmd/ute", "BenchmarkNodeAtRest", "cpu-%")
		add(Check{"Node at rest, 100 peers: RSS", fmt.Sprintf("%.1f MiB", rss), "", "", fmt.Sprintf("≤ %.0f MiB", targetRestRSSMiB), met(rss <= targetRestRSSMiB), ""})
		add(Check{"Node at rest, 100 peers: CPU", fmt.Sprintf("%.2f%% of a core", cpu), "", "", fmt.Sprintf("≤ %.0f%%", targetRestCPUPct), met(cpu <= targetRestCPUPct), ""})
	} else {
		add(missing("Node at rest, 100 peers", "≤ 60 MiB, ≤ 1% CPU"))
	}

	// Tunnel layer alone, for context: the cost of the node and crypto is the gap to these.
	if r, ok := m("overlay/tunnel", "BenchmarkFlowThroughput", "flow/bare"); ok {
		f, _ := m("overlay/tunnel", "BenchmarkFlowThroughput", "flow-MB/s")
		bb, _ := m("overlay/tunnel", "BenchmarkFlowThroughput", "bare-MB/s")
		add(Check{"Tunnel flow, no node (context)", mbps(f), "bare quic-go " + mbps(bb), fmt.Sprintf("%.2f×", r), "", MetContext, ""})
	}
	return out
}

func contextRow(out *[]Check, m metricGetter, label, pkg, name, unit string, format func(float64) string) {
	v, ok := m(pkg, name, unit)
	if !ok {
		*out = append(*out, Check{Measure: label, Met: MetNA})
		return
	}
	*out = append(*out, Check{Measure: label, Result: format(v), Met: MetContext})
}

func missing(label, target string) Check {
	return Check{Measure: label, Result: "not reported", Target: target, Met: MetMissing}
}

func met(ok bool) string {
	if ok {
		return MetYes
	}
	return MetNo
}

func mbps(v float64) string {
	return fmt.Sprintf("%.0f MB/s (%.2f Gbit/s)", v, v*8/1000)
}

func usec(v float64) string { return fmt.Sprintf("%.0f µs", v) }

func nsAsUsec(v float64) string { return fmt.Sprintf("%.1f µs", v/1000) }

var header = Check{"Measure", "Result", "Same-run baseline", "Ratio", "Target", "Met", "Other load"}

func (c Check) cells() []string {
	return []string{c.Measure, c.Result, c.Baseline, c.Ratio, c.Target, c.Met, c.Load}
}

// WriteText prints the table aligned in columns.
func WriteText(w io.Writer, checks []Check) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	for _, c := range append([]Check{header}, checks...) {
		if _, err := fmt.Fprintln(tw, strings.Join(c.cells(), "\t")); err != nil {
			return err
		}
	}
	return tw.Flush()
}

// WriteMarkdown prints the table as a Markdown table.
func WriteMarkdown(w io.Writer, checks []Check) error {
	row := func(cells []string) error {
		for i, s := range cells {
			cells[i] = strings.ReplaceAll(s, "|", `\|`)
		}
		_, err := fmt.Fprintf(w, "| %s |\n", strings.Join(cells, " | "))
		return err
	}
	if err := row(header.cells()); err != nil {
		return err
	}
	if err := row([]string{"---", "---", "---", "---", "---", "---", "---"}); err != nil {
		return err
	}
	for _, c := range checks {
		if err := row(c.cells()); err != nil {
			return err
		}
	}
	return nil
}
