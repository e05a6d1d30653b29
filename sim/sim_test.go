package sim

import (
	"context"
	"os"
	"path/filepath"
	"runtime"
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
	opts.Dir = t.TempDir()
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
