package sim

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ute-project/ute/overlay/tunnel"
)

// dialGate paces the tunnel handshakes of every node of a run (tunnel.DialGate): at most
// `slots` at once, and none started with less than minLeft of its caller's deadline left, since
// a handshake that cannot finish in time is CPU taken from the ones that can. Without it,
// hundreds of simultaneous first contacts on two cores all pass the handshake timeout, are
// retried, and discovery never completes (measured: 100 nodes stuck at 50–80 members each).
//
// Waiters are served newest first. When more dials arrive than the CPUs can handshake (a
// large pool whose gossip-only tunnels close when idle asks for thousands a second), a
// first-come queue hands every slot to the dial that has waited longest, which by then is
// seconds late: a probe behind it misses its timeout and live members are declared failed,
// which makes more gossip and more dials. Serving the newest keeps the dials that are served
// on time; the oldest run out of deadline in the queue and are dropped, as on any failed dial.
//
// A deferrable dial (tunnel.Deferrable: a packet of memberlist's member-state gossip or of a
// gossip round's record, both sent again anyway) is never queued, and deferrable dials hold at
// most their share of the slots (deferSlots): with no slot free, or their share held, one is
// refused at once (tunnel.ErrGateBusy), so that under overload the slots go to the dials that
// may wait (probes, pushes and pulls, record syncs), and no goroutine
// and deadline timer waits for a slot it would mostly not get in time.
type dialGate struct {
	minLeft time.Duration
	// setup, while set, refuses at once the background dials of gossip packets (see
	// dropsAtSetup): a staggered start's discovery goes by joins and push/pull only.
	setup atomic.Bool

	mu      sync.Mutex
	free    int
	waiters []*gateWaiter // a stack: the last is served first
	// deferMax is how many slots deferrable dials may hold at once, deferHeld how many they
	// hold: the rest stay free for the dials that may wait (see deferSlots).
	deferMax, deferHeld int
	// dropped is the deadlines of the dials refused at setup, until they pass: the endpoint
	// retries a failed dial on the same context, which the refusal must cover too.
	dropped map[time.Time]struct{}

	// Counters, for the spread's progress lines: handshakes started, dials whose caller gave up
	// waiting for a slot, dials refused for too little time left, dials refused at setup,
	// deferrable dials refused for want of a free slot, and
	// the wall time slots were held, summed (nanoseconds): held ÷ granted is how long one
	// handshake keeps its slot, which at dilation k grows with the k-times-longer round trips.
	granted, gaveUp, late, setupDrops, deferred, held atomic.Uint64
	// slots is the gate's size, for the progress lines.
	slots int
}

// nodeGate is one node's view of the run's dial gate: a handshake with a peer the underlay
// cannot reach now (across a partition, or nothing listening at its address: a crashed node)
// takes no slot. Such a handshake spends its timeout waiting for an answer, not CPU (its Initial
// packets are all it sends), while in a slot it kept the dials of reachable peers waiting: in a
// 14-node run with a third of the zone cut off, a node restarted on the small side waited 6-13 s
// for a slot to dial the members beside it, with the slots held by handshakes across the
// partition (a deployed node has no shared gate, and rejoined in 0.3 s here without that wait).
type nodeGate struct {
	g     *dialGate
	self  netip.AddrPort
	reach func(from, to netip.AddrPort) bool
}

func (n nodeGate) Acquire(ctx context.Context) (func(), error) {
	if to, ok := tunnel.DialTarget(ctx); ok && !n.reach(n.self, to) {
		return func() {}, nil
	}
	return n.g.Acquire(ctx)
}

type gateWaiter struct {
	ready chan struct{} // closed when the waiter holds a slot
}

func newDialGate(slots int, minLeft time.Duration) *dialGate {
	slots = max(slots, 1)
	return &dialGate{free: slots, slots: slots, deferMax: slots, minLeft: minLeft}
}

// withDeferrable caps the slots deferrable dials may hold at once at n (at least 1, at most
// all of them).
func (g *dialGate) withDeferrable(n int) *dialGate {
	g.deferMax = min(max(n, 1), g.slots)
	return g
}

var errNoTimeLeft = fmt.Errorf("too little time left for a handshake")

func (g *dialGate) Acquire(ctx context.Context) (func(), error) {
	if g.setup.Load() && g.dropAtSetup(ctx) {
		g.setupDrops.Add(1)
		return nil, errSetupDrop
	}
	deferrable := tunnel.IsDeferrable(ctx)
	g.mu.Lock()
	if deferrable {
		if g.free == 0 || g.deferHeld >= g.deferMax {
			g.mu.Unlock()
			g.deferred.Add(1)
			return nil, tunnel.ErrGateBusy
		}
		g.free--
		g.deferHeld++
		g.mu.Unlock()
	} else if g.free > 0 {
		g.free--
		g.mu.Unlock()
	} else {
		w := &gateWaiter{ready: make(chan struct{})}
		g.waiters = append(g.waiters, w)
		g.mu.Unlock()
		select {
		case <-w.ready:
		case <-ctx.Done():
			g.mu.Lock()
			select {
			case <-w.ready: // handed a slot just now: pass it on
				g.mu.Unlock()
				g.release()
			default:
				for i, o := range g.waiters {
					if o == w {
						g.waiters = append(g.waiters[:i], g.waiters[i+1:]...)
						break
					}
				}
				g.mu.Unlock()
			}
			g.gaveUp.Add(1)
			return nil, ctx.Err()
		}
	}
	release := g.release
	if deferrable {
		release = g.releaseDeferrable
	}
	if dl, ok := ctx.Deadline(); ok && time.Until(dl) < g.minLeft {
		release()
		g.late.Add(1)
		return nil, fmt.Errorf("%w: %w", errNoTimeLeft, context.DeadlineExceeded)
	}
	g.granted.Add(1)
	t0 := time.Now()
	return sync.OnceFunc(func() {
		g.held.Add(uint64(time.Since(t0)))
		release()
	}), nil
}

// packetDial is overlay/gossip's background dial timeout for a packet to a member without a
// tunnel (TransportConfig.DialTimeout's default); the gate recognises those dials by it.
const packetDial = 5 * time.Second

var errSetupDrop = errors.New("sim: gossip packet to a member without a tunnel dropped during setup")

// dropsAtSetup reports whether a dial with left of its deadline is a gossip packet's background
// dial (its deadline is packetDial from the moment it is queued). Join dials (3 s per seed),
// memberlist's streams (push/pull, TCP-fallback probes: TCPTimeout and what is left of the
// probe interval, both dilated) and the runner's own dials have other deadlines. Why drop them
// at setup: every member a node learns it re-broadcasts (memberlist), so a zone of n nodes
// coming up sends about n² gossip packets, at 1,000 nodes nearly each a QUIC handshake, hours
// of CPU on two cores; joins and push/pull hand over the whole member list in one exchange.
// Probes still work: a failed packet probe is followed by memberlist's TCP-fallback probe.
func dropsAtSetup(left time.Duration) bool {
	return left > packetDial*9/10 && left <= packetDial
}

// dropAtSetup reports whether the dial of ctx is to be refused at setup: a gossip packet's dial
// (dropsAtSetup), first seen now or refused before (the same deadline: a retry).
func (g *dialGate) dropAtSetup(ctx context.Context) bool {
	dl, ok := ctx.Deadline()
	if !ok {
		return false
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if _, ok := g.dropped[dl]; ok {
		return true
	}
	if !dropsAtSetup(time.Until(dl)) {
		return false
	}
	if g.dropped == nil {
		g.dropped = map[time.Time]struct{}{}
	}
	g.dropped[dl] = struct{}{}
	context.AfterFunc(ctx, func() {
		g.mu.Lock()
		delete(g.dropped, dl)
		g.mu.Unlock()
	})
	return true
}

// waiting is how many dials wait for a slot now.
func (g *dialGate) waiting() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return len(g.waiters)
}

// releaseDeferrable frees a slot a deferrable dial held.
func (g *dialGate) releaseDeferrable() {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.deferHeld--
	g.releaseLocked()
}

// release frees a slot: to the newest waiter if there is one.
func (g *dialGate) release() {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.releaseLocked()
}

func (g *dialGate) releaseLocked() {
	if n := len(g.waiters); n > 0 {
		w := g.waiters[n-1]
		g.waiters[n-1] = nil
		g.waiters = g.waiters[:n-1]
		close(w.ready)
		return
	}
	g.free++
}

// dialSlots is how many tunnel handshakes may run at once in the whole run: a few per CPU (the
// machine's CPUs, not GOMAXPROCS, which a simulation raises: Procs), so that each finishes well
// inside the handshake timeout. UTE_SIM_DIAL_SLOTS overrides it. Not
// scaled with the dilation: at 1,000 nodes and k = 10, ten times the slots (80) made no more
// handshakes (104 a second of wall time at rest, against 129 with 8: the CPUs, not the slots,
// bound them) and each held its slot ten times longer (0.8 s; docs/benchmarks.md, "Session of
// 7 December 2026, 1,000-node memory and tail").
func dialSlots() int {
	if n, _ := strconv.Atoi(os.Getenv("UTE_SIM_DIAL_SLOTS")); n > 0 {
		return n
	}
	return 4 * runtime.NumCPU()
}

// deferSlots is how many of the gate's slots deferrable dials may hold at once: a quarter
// (UTE_SIM_DEFER_SLOTS overrides). With every slot theirs, a 1,000-node zone at rest spent
// 1.6-1.9 of the 2 cores on handshakes for member-state gossip packets (the storm: each packet
// to a member without a tunnel is a dial, and gossip of member state never stops at that size
// on two cores), and a revocation's packets then waited 0.3-0.7 s of simulated time in their
// receivers' socket queues for a CPU. Capped at 2 of 8 slots: 1.04 cores at rest, the spread
// 390 ms against 779 ms in the run before it (docs/benchmarks.md, "The deferrable share").
// The packets refused are sent again anyway (tunnel.Deferrable); a deployed node, with a CPU of
// its own, has no such gate.
func deferSlots(slots int) int {
	if n, _ := strconv.Atoi(os.Getenv("UTE_SIM_DEFER_SLOTS")); n > 0 {
		return n
	}
	return max(slots/4, 1)
}
