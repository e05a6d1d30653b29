package sim

import (
	"context"
	"fmt"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/sim/scenario"
)

// BenchmarkRevocationConvergence runs the shipped revocation-convergence scenario at several
// sizes (UTE_SIM_BENCH_NODES=24,50,100 overrides the list; UTE_SIM_BENCH_GOSSIP=lan uses the
// node's default gossip timings instead of the fast test profile) and reports the time until every live
// member held the record (ms-to-100%), the model's time to 99.9%, the setup's wall-clock time
// and the peak Go heap.
func BenchmarkRevocationConvergence(b *testing.B) {
	sizes := []int{24, 50}
	if env := os.Getenv("UTE_SIM_BENCH_NODES"); env != "" {
		sizes = nil
		for _, f := range strings.Split(env, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(f))
			require.NoError(b, err)
			sizes = append(sizes, n)
		}
	}
	sc, err := scenario.Load("scenarios/revocation-convergence.yaml")
	require.NoError(b, err)
	sc.Limits.Gossip = scenario.Duration(3 * time.Minute)
	if g := os.Getenv("UTE_SIM_BENCH_GOSSIP"); g != "" {
		sc.Gossip = g // lan: memberlist's LAN profile, the node default
	}
	for _, n := range sizes {
		b.Run(fmt.Sprintf("nodes=%d", n), func(b *testing.B) {
			for b.Loop() {
				var peak atomic.Uint64
				stop := make(chan struct{})
				done := make(chan struct{})
				go func() {
					defer close(done)
					var ms runtime.MemStats
					for {
						runtime.ReadMemStats(&ms)
						if ms.HeapInuse > peak.Load() {
							peak.Store(ms.HeapInuse)
						}
						select {
						case <-stop:
							return
						case <-time.After(250 * time.Millisecond):
						}
					}
				}()
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
				sized := *sc
				sized.Nodes = slices.Clone(sc.Nodes)
				sized.Nodes[1].Count = n - sized.Nodes[0].Count // the workers' group
				res, err := Run(ctx, &sized, Options{Dir: b.TempDir()})
				cancel()
				close(stop)
				<-done
				require.NoError(b, err)
				ev := res.Events[0]
				require.True(b, ev.Pass, ev.Observed)
				last := ev.Curve[len(ev.Curve)-1]
				b.ReportMetric(float64(last.T.Microseconds())/1000, "ms-to-100%")
				b.ReportMetric(float64(PredictTime(ev.Members, res.Fanout, res.GossipInterval, 0.999).Milliseconds()), "model-ms-to-99.9%")
				b.ReportMetric((res.JoinTime + res.GossipTime).Seconds(), "setup-s")
				b.ReportMetric(float64(peak.Load())/(1<<20), "peak-heap-MiB")
				b.Logf("%d nodes: %s; setup %s join + %s gossip discovery", res.Nodes, ev.Observed, res.JoinTime.Round(time.Millisecond), res.GossipTime.Round(time.Millisecond))
			}
		})
	}
}

func TestModelMatchesSerfOrder(t *testing.T) {
	// Serf's model with LAN defaults (200 ms, fan-out 3) gives 1.54 s for 99.9% of 100 nodes and
	// 1.84 s for 1,000; the push model without loss is in the same range and grows with log n.
	t100 := PredictTime(100, 3, 200*time.Millisecond, 0.999)
	t1000 := PredictTime(1000, 3, 200*time.Millisecond, 0.999)
	require.Greater(t, t1000, t100)
	require.InDelta(t, 1.54, t100.Seconds(), 0.6)
	require.InDelta(t, 1.84, t1000.Seconds(), 0.7)
	p := predict(10, 3, time.Second, time.Hour)
	require.InDelta(t, 0.1, p[0].Fraction, 1e-9)
	for i := 1; i < len(p); i++ {
		require.GreaterOrEqual(t, p[i].Fraction, p[i-1].Fraction)
	}
}
