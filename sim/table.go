package sim

import (
	"fmt"
	"io"
	"text/tabwriter"
	"time"
)

// WriteTable prints the run as a table: event, expectation, observed, time to block, bytes
// leaked, false denials; then the legitimate traffic and the verdict.
func WriteTable(w io.Writer, res *Result) error {
	link := fmt.Sprintf("link %s ± %s, loss %.1f%%", fmtDur(res.Network.Latency), fmtDur(res.Network.Jitter), res.Network.Loss*100)
	if res.Underlay == "udp-loopback" {
		link = "real UDP on loopback"
	}
	fmt.Fprintf(w, "\n%s: %d node(s), %d zone(s), seed %d, gossip %s (every %s, fan-out %d), %s\n",
		res.Scenario, res.Nodes, res.Zones, res.Seed, res.Gossip, res.GossipInterval, res.Fanout, link)
	if res.Dilation > 1 {
		fmt.Fprintf(w, "time dilation k = %d: the network's timers and delays ran %d× slower; every time below except setup and run is simulated time (wall ÷ %d); not dilated: %d item(s), see --json or the report\n",
			res.Dilation, res.Dilation, res.Dilation, len(res.Undilated))
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "\tAT\tEVENT\tEXPECTATION\tOBSERVED\tTIME TO BLOCK\tLEAKED\tFALSE DENIALS")
	for _, e := range res.Events {
		mark := "ok"
		if !e.Pass {
			mark = "FAIL"
		}
		ttb := "—"
		if e.TimeToBlock > 0 && (e.Outcome == "blocked" || e.Outcome == "converged") {
			ttb = fmtDur(e.TimeToBlock)
		}
		obs := e.Outcome
		if e.Reason != "" {
			obs += " (" + e.Reason + ")"
		}
		if e.Members > 0 {
			obs = fmt.Sprintf("%s, %d members", e.Outcome, e.Members)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%d B\t%d\n", mark, fmtDur(e.At), trunc(e.Name, 48), e.Expectation, obs, ttb, e.LeakedBytes, e.FalseDenials)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, e := range res.Events {
		if !e.Pass {
			fmt.Fprintf(w, "  FAIL %s: %s\n       observed: %s\n", e.Name, e.Failure, e.Observed)
		}
	}
	t := res.Traffic
	fmt.Fprintf(w, "legitimate traffic: %d flow(s), %d ok, %d excused (an end revoked, down or partitioned away), %d false denial(s)\n",
		t.Flows, t.OK, t.Excused, t.FalseDenials)
	for i, d := range t.Denials {
		if i == 5 {
			fmt.Fprintf(w, "  … %d more\n", len(t.Denials)-5)
			break
		}
		fmt.Fprintf(w, "  denied at %s: %s: %s\n", fmtDur(d.At), d.Flow, d.Error)
	}
	ns := res.NetworkStats
	fmt.Fprintf(w, "network: %d packet(s) sent, %d delivered, %d lost, %d dropped at partitions; setup %s (join) + %s (gossip discovery); run %s (wall-clock)\n",
		ns.Sent, ns.Delivered, ns.Lost, ns.Partitioned, res.JoinTime.Round(time.Millisecond), res.GossipTime.Round(time.Millisecond), res.Duration.Round(time.Millisecond))
	if res.Failed > 0 {
		fmt.Fprintf(w, "%d of %d expectation(s) failed\n", res.Failed, len(res.Events))
	} else {
		fmt.Fprintf(w, "every expectation held (%d event(s))\n", len(res.Events))
	}
	return nil
}

func trunc(s string, n int) string {
	if len([]rune(s)) <= n {
		return s
	}
	return string([]rune(s)[:n-1]) + "…"
}
