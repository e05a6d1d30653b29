package sim

import (
	"context"
	"encoding/json"
	"html"
	"os"
	"path/filepath"
	"runtime"
	"runtime/metrics"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/sim/scenario"
)

func runFile(t *testing.T, file string, opts Options) *Result {
	t.Helper()
	sc, err := scenario.Load(filepath.Join("scenarios", file))
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if testing.Verbose() {
		opts.Progress = os.Stderr
	}
	// The run keeps its directories under /dev/shm (when there is one) and removes them.
	res, err := Run(ctx, sc, opts)
	require.NoError(t, err)
	return res
}

func requireAllPass(t *testing.T, res *Result) {
	t.Helper()
	for _, e := range res.Events {
		require.True(t, e.Pass, "event %d %q: %s; observed: %s", e.Index, e.Name, e.Failure, e.Observed)
	}
	require.Zero(t, res.Failed)
}

func TestLateralMovement(t *testing.T) {
	res := runFile(t, "lateral-movement.yaml", Options{})
	requireAllPass(t, res)
}

func TestStolenSessionReplay(t *testing.T) {
	res := runFile(t, "stolen-session-replay.yaml", Options{})
	requireAllPass(t, res)
	require.Len(t, res.Events[0].Steps, 3)
}

func TestTokenReuse(t *testing.T) {
	requireAllPass(t, runFile(t, "token-reuse.yaml", Options{}))
}

func TestForgedProvenance(t *testing.T) {
	requireAllPass(t, runFile(t, "forged-provenance.yaml", Options{}))
}

func TestPartitionHeal(t *testing.T) {
	requireAllPass(t, runFile(t, "partition-heal.yaml", Options{}))
}

func TestRevocationConvergence(t *testing.T) {
	res := runFile(t, "revocation-convergence.yaml", Options{MaxNodes: 12})
	requireAllPass(t, res)
	require.NotEmpty(t, res.Events[0].Curve)
	require.NotEmpty(t, res.Events[0].Model)
}

// The simulator can fail: a block expected where the policy allows the flow is reported as a
// failed expectation, with what was observed, and counted in Failed (the CLI exits 1 on it).
func TestWrongExpectationFails(t *testing.T) {
	sc, err := scenario.Load("testdata/wrong-expectation.yaml")
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	res, err := Run(ctx, sc, Options{Dir: t.TempDir()})
	require.NoError(t, err)
	require.Equal(t, 1, res.Failed)
	bad := res.Events[0]
	require.False(t, bad.Pass)
	require.Equal(t, "allowed", bad.Outcome)
	require.Contains(t, bad.Failure, "expected blocked, was allowed")
	require.Positive(t, bad.LeakedBytes, "the wrongly allowed flow's bytes are counted as leaked")
	// A flow with no rule is refused by policy at the receiving node, with nothing delivered.
	good := res.Events[1]
	require.True(t, good.Pass, good.Observed)
	require.Equal(t, "peer rejected: policy", good.Reason)
	require.Zero(t, good.LeakedBytes)
}

// A run stops everything it started: daemons, traffic, servers, the network's scheduler and the
// authority leave no goroutine behind.
func TestRunLeavesNoGoroutines(t *testing.T) {
	before := runtime.NumGoroutine()
	requireAllPass(t, runFile(t, "token-reuse.yaml", Options{}))
	require.Eventually(t, func() bool { return runtime.NumGoroutine() <= before+2 }, 10*time.Second, 50*time.Millisecond,
		"goroutines: %d before, %d after", before, runtime.NumGoroutine())
}

// --real runs the same scenario over real UDP sockets on loopback; the partition is applied at
// the sockets, and the heal and the rejoin still converge.
func TestPartitionHealRealUDP(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: real UDP scenario")
	}
	res := runFile(t, "partition-heal.yaml", Options{Real: true})
	requireAllPass(t, res)
	require.Equal(t, "udp-loopback", res.Underlay)
	require.Positive(t, res.NetworkStats.Partitioned, "the partition dropped packets at the sockets")
	for _, n := range res.Topology.Nodes {
		require.Contains(t, n.Addr, "127.0.0.1:")
	}
}

func TestTrustSignals(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: a trust scenario of real daemons")
	}
	res := runFile(t, "trust-signals.yaml", Options{})
	requireAllPass(t, res)
}

func TestChurnPartitionSoak(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: a soak scenario")
	}
	res := runFile(t, "churn-partition-soak.yaml", Options{})
	requireAllPass(t, res)
	require.Zero(t, res.Traffic.FalseDenials, "%+v", res.Traffic.Denials)
	require.Positive(t, res.Traffic.OK)
}

// The 1,000-node convergence scenario, scaled down to what the suite can afford. make test runs
// tests named *Large a second time without the race detector and with UTE_LONG=1: then it runs
// at 200 nodes (UTE_SIM_NODES overrides; with the scenario's staggered start, discovery took 21–25 s
// and the whole test 25–29 s on the idle 2-core machine of 7 December 2026; started all at once it
// had not finished discovery after 4 minutes there). Under the race detector (several times
// slower, and the first pass of make test) it runs at 20: at 32 nodes discovery alone took
// 1–2.5 minutes under the race detector on the loaded machine.
func TestRevocationConvergenceAtScaleLarge(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: the at-scale scenario")
	}
	n := 20
	if !raceEnabled && os.Getenv("UTE_LONG") == "1" {
		n = 200
	}
	if v, err := strconv.Atoi(os.Getenv("UTE_SIM_NODES")); err == nil && v > 0 {
		n = v
	}
	sc, err := scenario.Load("scenarios/revocation-convergence-1000.yaml")
	require.NoError(t, err)
	require.Equal(t, 1000, sc.NodeCount())
	// Under the race detector on a shared CPU a gossip message to a member without a tunnel
	// can wait past its dial deadline and be dropped; the record then arrives by push/pull
	// (every 10-30 s at these sizes). The bench measures the time; the suite checks that
	// every member gets it.
	sc.Timeline[0].Expect.Within = scenario.Duration(45 * time.Second)
	require.Equal(t, "staggered", sc.Start, "all at once, 200 nodes did not finish discovery in 4 minutes")
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	opts := Options{MaxNodes: n} // directories under /dev/shm: a disk fsync per node and audit entry slows setup
	if testing.Verbose() {
		opts.Progress = os.Stderr
	}
	res, err := Run(ctx, sc, opts)
	require.NoError(t, err)
	requireAllPass(t, res)
	ev := res.Events[0]
	require.Equal(t, res.Nodes, ev.Members, "every live member must hold the record")
	require.Equal(t, 3, res.Fanout)
	require.Equal(t, 200*time.Millisecond, res.GossipInterval)
	t.Logf("%d nodes: setup %s + %s; %s", res.Nodes, res.JoinTime.Round(time.Millisecond), res.GossipTime.Round(time.Millisecond), ev.Observed)
}

// A dilated run slows the network's timers by k and reports simulated time: the gossip interval
// and the model are the scenario's, the measured times are wall ÷ k, and the table, the JSON and
// the report say so and list what was not dilated.
func TestDilatedRunReportsSimulatedTime(t *testing.T) {
	res := runFile(t, "revocation-convergence.yaml", Options{MaxNodes: 8, Dilation: 3})
	requireAllPass(t, res)
	require.Equal(t, 3, res.Dilation)
	require.NotEmpty(t, res.Undilated)
	require.Equal(t, 20*time.Millisecond, res.GossipInterval, "the scenario's interval, not the dilated one")
	ev := res.Events[0]
	require.Equal(t, 500*time.Millisecond, ev.At.Round(100*time.Millisecond), "the timeline in simulated time")
	require.Less(t, ev.TimeToBlock, 3*time.Second)
	// The run's own clock: the timeline started after 1.5 s of wall time and the run lasted
	// longer than its simulated timeline times k.
	require.Greater(t, res.Duration, res.JoinTime+res.GossipTime+3*ev.At)

	var table, page strings.Builder
	require.NoError(t, WriteTable(&table, res))
	require.Contains(t, table.String(), "time dilation k = 3")
	require.NoError(t, WriteHTML(&page, res))
	require.Contains(t, page.String(), "Time dilation k = 3")
	require.Contains(t, page.String(), html.EscapeString(res.Undilated[0]))
	raw, err := json.Marshal(res)
	require.NoError(t, err)
	require.Contains(t, string(raw), `"dilation":3`)
	require.Contains(t, string(raw), `"undilated":[`)
}

// What cannot be dilated is refused rather than reported wrongly: the kernel's loopback, and
// events that wait on TrustFlow's fixed check.
func TestDilationRefusedWhereItCannotHold(t *testing.T) {
	ctx := context.Background()
	sc, err := scenario.Load("scenarios/partition-heal.yaml")
	require.NoError(t, err)
	_, err = Run(ctx, sc, Options{Real: true, Dilation: 2, Dir: t.TempDir()})
	require.ErrorContains(t, err, "loopback")
	sc, err = scenario.Load("scenarios/trust-signals.yaml")
	require.NoError(t, err)
	_, err = Run(ctx, sc, Options{Dilation: 2, Dir: t.TempDir()})
	require.ErrorContains(t, err, "TrustFlow's evidence")
}

// forcedGCs is how many collections runtime.GC has forced in this process.
func forcedGCs() uint64 {
	s := []metrics.Sample{{Name: "/gc/cycles/forced:gc-cycles"}}
	metrics.Read(s)
	return s[0].Value.Uint64()
}

// A spread's last-members line says, from the in-memory network's trace, how many packets each
// last member's socket read and the longest any waited in its queue. And the runner collects the
// process's garbage before each event, so that the simulator's own collection stays out of it.
func TestSpreadDiagnosticsAndCollectionBeforeEvents(t *testing.T) {
	var out strings.Builder // the runner writes progress from the goroutine that called Run
	sc, err := scenario.Load(filepath.Join("scenarios", "revocation-convergence.yaml"))
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	before := forcedGCs()
	res, err := Run(ctx, sc, Options{MaxNodes: 8, Progress: &out})
	require.NoError(t, err)
	requireAllPass(t, res)
	require.GreaterOrEqual(t, forcedGCs()-before, uint64(len(sc.Timeline)), "a collection before each of the %d events", len(sc.Timeline))
	var last string
	for line := range strings.Lines(out.String()) {
		if strings.HasPrefix(strings.TrimSpace(line), "last: ") {
			last = line
		}
	}
	require.NotEmpty(t, last, "no last-members line in:\n%s", out.String())
	require.Regexp(t, `its socket read [1-9][0-9]* packets by then, the longest after [0-9.]+[µm]?s in its queue`, last)
}
