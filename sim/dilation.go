package sim

import (
	"fmt"
	"runtime"
	"time"

	"github.com/ute-project/ute/node/membership"
	"github.com/ute-project/ute/sim/scenario"
)

// Time dilation. On two cores a thousand nodes cannot do in one second what a thousand
// machines do: every first contact is a QUIC handshake, and during a revocation's spread
// thousands of them are due at once. With a factor k the run makes every timer it can reach
// k times slower (memberlist's gossip, probe, push/pull and stream timings, the links' latency
// and jitter, the tunnels' idle close, the daemon's reconnect and duplicate confirmation, the
// timeline, traffic and the runner's own waits) and divides every time it measures by k: the
// network behaves as it would, and each node gets k times the CPU per simulated second.
// Honest only as far as every timer that matters is dilated; `undilated` lists the ones that
// are not, and the report carries it.

// wall is a simulated duration as the run's clock counts it.
func (r *runner) wall(d time.Duration) time.Duration { return d * r.k }

// since is the simulated time since t0.
func (r *runner) since(t0 time.Time) time.Duration { return time.Since(t0) / r.k }

// dilate returns t with every duration k times longer; counts (fan-out, multipliers) unchanged.
func dilate(t membership.Timing, k time.Duration) membership.Timing {
	t.GossipInterval *= k
	t.ProbeInterval *= k
	t.ProbeTimeout *= k
	t.PushPullInterval *= k
	t.TCPTimeout *= k
	t.GossipToTheDeadTime *= k
	return t
}

// trustTick is the daemons' TrustFlow period in a dilated run: the node default (250 ms)
// dilated, or, in a scenario without trust events (region drift, another executable, a copied
// directory), 2 s dilated: the loop checks each node's region file and duplicate evidence, which
// only those events use, and at 250 ms the checks of a few hundred nodes took 10–19 % of a large
// run's CPU (perf). Undilated runs keep the daemon's default (0), as before dilation existed.
func (r *runner) trustTick() time.Duration {
	if r.k <= 1 {
		return 0
	}
	tick := 250 * time.Millisecond
	if !r.trustEvents() {
		tick = 2 * time.Second
	}
	return r.wall(tick)
}

// trustEvents reports whether the timeline has an event that TrustFlow decides.
func (r *runner) trustEvents() bool {
	for _, e := range r.sc.Timeline {
		switch e.Kind {
		case scenario.KindRegionDrift, scenario.KindExeSwap, scenario.KindDirCopy:
			return true
		}
	}
	return false
}

func (r *runner) dilationNote() string {
	if r.k <= 1 {
		return ""
	}
	return fmt.Sprintf(", time dilated ×%d", int(r.k))
}

// procsNote names the process's schedulers and CPUs (Procs says why they differ).
func procsNote() string {
	return fmt.Sprintf(", GOMAXPROCS %d on %d CPU(s)", runtime.GOMAXPROCS(0), runtime.NumCPU())
}

// undilated is what a run with dilation does not slow down: timers in node, overlay and
// memberlist that no option reaches, and the CPU itself (which is the point).
var undilated = []string{
	"CPU time: every node's computation (handshakes, signatures, gossip encoding) counts 1/k of its wall time — the purpose of dilation",
	"QUIC (overlay/tunnel defaults): handshake timeout 3 s, idle timeout 30 s, keep-alive 15 s, flow admission and first-frame timeouts 5 s",
	"gossip transport (overlay/gossip): background dial timeout 5 s, redial hold-off 1 s, packet stream timeout 2 s",
	"membership: push timeout 5 s, join timeout per seed 3 s, join grace 250 ms",
	"node daemon: pool loop (join check 200 ms–5 s, member resync 30 s, join attempt 5 s), retire grace 2 s; TrustFlow's evidence timers (presence 2 s, give-up 10 s), its duplicate check's 2 s cap and region-file settle time (1 s) — which is why region drift and directory copy are not run dilated (TrustFlow's own tick is dilated)",
	"the simulator's dial gate (1 s of deadline left to start a handshake: it paces CPU, which is wall time) and its 2 ms convergence poll",
	"the authority link (real QUIC on loopback: joins at setup only)",
}
