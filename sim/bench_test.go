package sim

import (
	"context"
	"fmt"
	"os"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/sim/scenario"
)

// BenchmarkSimRevocationConvergence runs the shipped 1,000-node revocation-convergence scenario
// (LAN dissemination: 200 ms gossip, fan-out 3; 500 µs ± 500 µs links) at several sizes: 100 by
// default, UTE_SIM_BENCH_NODES=200,1000 overrides the list and UTE_SIM_BENCH_SETUP=20m the time
// allowed for discovery. It reports the time until every live member held the record
// (ms-to-100%: wall-clock time of a run whose network delays are simulated) and to 50, 90 and
// 99 % of them (ms-to-50% and so on: a late last member after an early 99 % is a straggler, a
// late 50 % a slow flood), the model's time
// to 99.9% and to the last member (1 − 1/(2n)), the setup's wall-clock time, the peak Go heap
// and the process's peak RSS (VmHWM: the peak so far in this process, so sizes run in
// increasing order). UTE_SIM_BENCH_START, _DILATION, _WARMUP, _IDLE and _GOSSIP override the
// scenario's start, dilation, warmup, tunnel_idle and gossip profile; UTE_SIM_BENCH_WITHIN the
// revocation's expected time (the run waits 1.5 × it + 1 s for 100 %). The benchmark fails only
// when a live member never got the record; a time over the expectation is logged.
func BenchmarkSimRevocationConvergence(b *testing.B) {
	sizes := []int{100}
	if env := os.Getenv("UTE_SIM_BENCH_NODES"); env != "" {
		sizes = nil
		for _, f := range strings.Split(env, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(f))
			require.NoError(b, err)
			sizes = append(sizes, n)
		}
	}
	sc, err := scenario.Load("scenarios/revocation-convergence-1000.yaml")
	require.NoError(b, err)
	if env := os.Getenv("UTE_SIM_BENCH_SETUP"); env != "" {
		d, err := time.ParseDuration(env)
		require.NoError(b, err)
		sc.Limits.Gossip = scenario.Duration(d)
	}
	if g := os.Getenv("UTE_SIM_BENCH_GOSSIP"); g != "" {
		sc.Gossip = g
	}
	if s := os.Getenv("UTE_SIM_BENCH_START"); s != "" {
		sc.Start = s
	}
	if env := os.Getenv("UTE_SIM_BENCH_IDLE"); env != "" {
		d, err := time.ParseDuration(env)
		require.NoError(b, err)
		sc.TunnelIdle = scenario.Duration(d)
	}
	if env := os.Getenv("UTE_SIM_BENCH_WARMUP"); env != "" {
		d, err := time.ParseDuration(env)
		require.NoError(b, err)
		sc.Warmup = scenario.Duration(d)
	}
	if env := os.Getenv("UTE_SIM_BENCH_WITHIN"); env != "" {
		// The revocation's expectation: the run waits 1.5 × this + 1 s (simulated) for 100 %.
		d, err := time.ParseDuration(env)
		require.NoError(b, err)
		sc.Timeline[0].Expect.Within = scenario.Duration(d)
	}
	if env := os.Getenv("UTE_SIM_BENCH_DILATION"); env != "" {
		k, err := strconv.Atoi(env)
		require.NoError(b, err)
		sc.Dilation = k
	}
	// UTE_SIM_BENCH_HEAPPROFILE names a file that receives a heap profile (pprof) taken when
	// the heap reached its peak, within 5 % (the heap is sampled once a second).
	heapProfile := os.Getenv("UTE_SIM_BENCH_HEAPPROFILE")
	// UTE_SIM_BENCH_GOROUTINES=PREFIX writes every goroutine's stack, grouped (pprof debug=1),
	// to PREFIX.<unix seconds> every 10 s of the run: what the nodes wait on at each moment.
	goroutineDump := os.Getenv("UTE_SIM_BENCH_GOROUTINES")
	// UTE_SIM_BENCH_MUTEX=PREFIX samples contended locks (one in 20 contention events) and writes
	// the cumulative mutex profile to PREFIX.<unix seconds> every 10 s: two files taken either side
	// of the revocation, compared with `go tool pprof -base`, show which locks the spread waits on.
	mutexProfile := os.Getenv("UTE_SIM_BENCH_MUTEX")
	// UTE_SIM_BENCH_CPUPROFILE=PREFIX profiles the CPU for the whole run in windows of 60 s of
	// wall time, each written to PREFIX.<unix seconds at its start>: the window that covers the
	// zone at rest, or the spread, is read on its own.
	cpuProfile := os.Getenv("UTE_SIM_BENCH_CPUPROFILE")
	if mutexProfile != "" {
		prev := runtime.SetMutexProfileFraction(20)
		b.Cleanup(func() { runtime.SetMutexProfileFraction(prev) })
	}
	for _, n := range sizes {
		b.Run(fmt.Sprintf("nodes=%d", n), func(b *testing.B) {
			for b.Loop() {
				var peak atomic.Uint64
				stop := make(chan struct{})
				done := make(chan struct{})
				cpuDone := make(chan struct{})
				if cpuProfile == "" {
					close(cpuDone)
				} else {
					go func() {
						defer close(cpuDone)
						profileCPU(b, cpuProfile, stop)
					}()
				}
				go func() {
					defer close(done)
					var ms runtime.MemStats
					var profiled uint64
					for tick := 0; ; tick++ {
						runtime.ReadMemStats(&ms)
						if ms.HeapInuse > peak.Load() {
							peak.Store(ms.HeapInuse)
						}
						// A new peak 5 % over the last profiled one rewrites the profile, so the
						// file ends as the heap near the run's peak.
						if heapProfile != "" && ms.HeapInuse > profiled+profiled/20 {
							profiled = ms.HeapInuse
							if err := writeHeapProfile(heapProfile); err != nil {
								b.Logf("heap profile: %v", err)
							}
						}
						if mutexProfile != "" && tick%10 == 0 {
							if err := writeProfile("mutex", fmt.Sprintf("%s.%d", mutexProfile, time.Now().Unix())); err != nil {
								b.Logf("mutex profile: %v", err)
							}
						}
						if goroutineDump != "" && tick%10 == 0 {
							if err := writeGoroutines(fmt.Sprintf("%s.%d", goroutineDump, time.Now().Unix())); err != nil {
								b.Logf("goroutine dump: %v", err)
							}
						}
						select {
						case <-stop:
							return
						case <-time.After(time.Second):
						}
					}
				}()
				ctx, cancel := context.WithTimeout(context.Background(), time.Hour)
				sized := *sc
				sized.Nodes = slices.Clone(sc.Nodes)
				sized.Nodes[1].Count = n - sized.Nodes[0].Count // the workers' group
				opts := Options{}
				if testing.Verbose() {
					opts.Progress = os.Stderr
				}
				res, err := Run(ctx, &sized, opts)
				cancel()
				close(stop)
				<-done
				<-cpuDone
				require.NoError(b, err)
				ev := res.Events[0]
				last := ev.Curve[len(ev.Curve)-1]
				// The time to 100 % is the measurement: reported when every live member got the
				// record, whether or not within the scenario's expectation (the log says which).
				require.Equal(b, 1.0, last.Fraction, ev.Observed)
				if !ev.Pass {
					b.Logf("expectation not met: %s", ev.Failure)
				}
				m := ev.Members
				b.ReportMetric(float64(last.T.Microseconds())/1000, "ms-to-100%")
				// The curve's body and tail apart: a late 100 % with an early 99 % is a straggler,
				// a late 50 % a slow flood.
				for _, q := range []float64{0.5, 0.9, 0.99} {
					t, _ := reachedAt(ev.Curve, q) // reached: the last point is 100 %
					b.ReportMetric(float64(t.Microseconds())/1000, fmt.Sprintf("ms-to-%g%%", q*100))
				}
				b.ReportMetric(float64(PredictTime(m, res.Fanout, res.GossipInterval, 0.999).Milliseconds()), "model-ms-to-99.9%")
				b.ReportMetric(float64(PredictTime(m, res.Fanout, res.GossipInterval, 1-1/(2*float64(m))).Milliseconds()), "model-ms-to-100%")
				b.ReportMetric((res.JoinTime + res.GossipTime).Seconds(), "setup-s")
				b.ReportMetric(float64(peak.Load())/(1<<20), "peak-heap-MiB")
				if rss, ok := peakRSS(); ok {
					b.ReportMetric(float64(rss)/(1<<20), "peak-rss-MiB")
				}
				b.Logf("%d nodes: %s; setup %s join + %s gossip discovery", res.Nodes, ev.Observed, res.JoinTime.Round(time.Millisecond), res.GossipTime.Round(time.Millisecond))
			}
		})
	}
}

// writeHeapProfile writes the heap profile to path (replacing it).
func writeHeapProfile(path string) error {
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("heap profile: %w", err)
	}
	if err := pprof.WriteHeapProfile(f); err != nil {
		f.Close()
		return fmt.Errorf("heap profile: %w", err)
	}
	return f.Close()
}

// writeProfile writes the named runtime profile (pprof's binary format) to path.
func writeProfile(name, path string) error {
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("%s profile: %w", name, err)
	}
	if err := pprof.Lookup(name).WriteTo(f, 0); err != nil {
		f.Close()
		return fmt.Errorf("%s profile: %w", name, err)
	}
	return f.Close()
}

// profileCPU writes CPU profiles of 60 s each to PREFIX.<unix seconds> until stop is closed.
func profileCPU(b *testing.B, prefix string, stop <-chan struct{}) {
	for {
		f, err := os.Create(fmt.Sprintf("%s.%d", prefix, time.Now().Unix()))
		if err != nil {
			b.Logf("cpu profile: %v", err)
			return
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			f.Close()
			b.Logf("cpu profile: %v", err)
			return
		}
		stopped := false
		select {
		case <-stop:
			stopped = true
		case <-time.After(time.Minute):
		}
		pprof.StopCPUProfile()
		if err := f.Close(); err != nil {
			b.Logf("cpu profile: %v", err)
		}
		if stopped {
			return
		}
	}
}

// writeGoroutines writes the goroutine profile, stacks grouped, to path.
func writeGoroutines(path string) error {
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("goroutine dump: %w", err)
	}
	if err := pprof.Lookup("goroutine").WriteTo(f, 1); err != nil {
		f.Close()
		return fmt.Errorf("goroutine dump: %w", err)
	}
	return f.Close()
}

// peakRSS is the process's peak resident set (VmHWM in /proc/self/status), in bytes.
func peakRSS() (uint64, bool) {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0, false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			kb, err := strconv.ParseUint(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return kb << 10, err == nil
		}
	}
	return 0, false
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
