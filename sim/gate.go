package sim

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
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
// The queue can be bounded (maxWaiting, UTE_SIM_GATE_WAITING): a waiter pushed below the newest
// maxWaiting is then refused at once (shed), with its retries on the same context. Unbounded by
// default: at 32 waiters per slot a 1,000-node discovery took 16.5 minutes against 1.5–2 before
// (docs/simulator.md).
type dialGate struct {
	minLeft time.Duration
	// setup, while set, refuses at once the background dials of gossip packets (see
	// dropsAtSetup): a staggered start's discovery goes by joins and push/pull only.
	setup atomic.Bool

	// maxWaiting, when positive, bounds the waiters; the oldest beyond it is shed.
	maxWaiting int

	mu      sync.Mutex
	free    int
	waiters []*gateWaiter // a stack: the last is served first
	// dropped is the deadlines of the dials refused at setup or shed, with the error their
	// retries get, until they pass: the endpoint retries a failed dial on the same context,
	// which the refusal must cover too.
	dropped map[time.Time]error

	// Counters, for the spread's progress lines: handshakes started, dials whose caller gave up
	// waiting for a slot, dials refused for too little time left, dials refused at setup, dials
	// shed from a full queue, and the wall time slots were held, summed (nanoseconds): held ÷
	// granted is how long one handshake keeps its slot, which at dilation k grows with the
	// k-times-longer round trips.
	granted, gaveUp, late, setupDrops, shed, held atomic.Uint64
	// slots is the gate's size, for the progress lines.
	slots int
}

type gateWaiter struct {
	ready chan struct{} // closed when the waiter holds a slot or is shed
	shed  bool          // set before ready is closed: refused, holds no slot
}

// newDialGate returns a gate of slots handshakes at once that keeps at most waitPerSlot × slots
// dials waiting, or any number when waitPerSlot is 0.
func newDialGate(slots, waitPerSlot int, minLeft time.Duration) *dialGate {
	slots = max(slots, 1)
	return &dialGate{free: slots, slots: slots, maxWaiting: slots * max(waitPerSlot, 0), minLeft: minLeft}
}

var (
	errNoTimeLeft = fmt.Errorf("too little time left for a handshake")
	errShed       = errors.New("sim: dial shed from the gate's full queue")
)

func (g *dialGate) Acquire(ctx context.Context) (func(), error) {
	if err := g.refused(ctx); err != nil {
		return nil, err
	}
	g.mu.Lock()
	if g.free > 0 {
		g.free--
		g.mu.Unlock()
	} else {
		w := &gateWaiter{ready: make(chan struct{})}
		if g.maxWaiting > 0 && len(g.waiters) >= g.maxWaiting {
			old := g.waiters[0]
			copy(g.waiters, g.waiters[1:])
			g.waiters[len(g.waiters)-1] = nil
			g.waiters = g.waiters[:len(g.waiters)-1]
			old.shed = true
			close(old.ready)
		}
		g.waiters = append(g.waiters, w)
		g.mu.Unlock()
		select {
		case <-w.ready:
			if w.shed {
				g.shed.Add(1)
				g.remember(ctx, errShed)
				return nil, errShed
			}
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
	if dl, ok := ctx.Deadline(); ok && time.Until(dl) < g.minLeft {
		g.release()
		g.late.Add(1)
		return nil, fmt.Errorf("%w: %w", errNoTimeLeft, context.DeadlineExceeded)
	}
	g.granted.Add(1)
	t0 := time.Now()
	return sync.OnceFunc(func() {
		g.held.Add(uint64(time.Since(t0)))
		g.release()
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

// refused returns the error for a dial refused before it waits: the retry of a dial refused
// before (the same deadline), or at setup a gossip packet's dial (dropsAtSetup).
func (g *dialGate) refused(ctx context.Context) error {
	dl, ok := ctx.Deadline()
	if !ok {
		return nil
	}
	g.mu.Lock()
	err, again := g.dropped[dl]
	g.mu.Unlock()
	switch {
	case again && errors.Is(err, errSetupDrop):
		g.setupDrops.Add(1)
	case again:
		g.shed.Add(1)
	case g.setup.Load() && dropsAtSetup(time.Until(dl)):
		g.setupDrops.Add(1)
		err = errSetupDrop
		g.remember(ctx, err)
	default:
		return nil
	}
	return err
}

// remember refuses with err the retries of the dial of ctx until its deadline passes.
func (g *dialGate) remember(ctx context.Context, err error) {
	dl, ok := ctx.Deadline()
	if !ok {
		return
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if _, ok := g.dropped[dl]; ok {
		return
	}
	if g.dropped == nil {
		g.dropped = map[time.Time]error{}
	}
	g.dropped[dl] = err
	context.AfterFunc(ctx, func() {
		g.mu.Lock()
		delete(g.dropped, dl)
		g.mu.Unlock()
	})
}

// waiting is how many dials wait for a slot now.
func (g *dialGate) waiting() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return len(g.waiters)
}

// release frees a slot: to the newest waiter if there is one.
func (g *dialGate) release() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if n := len(g.waiters); n > 0 {
		w := g.waiters[n-1]
		g.waiters[n-1] = nil
		g.waiters = g.waiters[:n-1]
		close(w.ready)
		return
	}
	g.free++
}

// dialSlots is how many tunnel handshakes may run at once in the whole run: a few per CPU, so
// that each finishes well inside the handshake timeout. UTE_SIM_DIAL_SLOTS overrides it. Not
// scaled with the dilation: at 1,000 nodes and k = 10, ten times the slots (80) made no more
// handshakes (104 a second of wall time at rest, against 129 with 8: the CPUs, not the slots,
// bound them) and each held its slot ten times longer (0.8 s; docs/benchmarks.md, "Session of
// 7 December 2026, 1,000-node memory and tail").
func dialSlots() int {
	if n, _ := strconv.Atoi(os.Getenv("UTE_SIM_DIAL_SLOTS")); n > 0 {
		return n
	}
	return 4 * runtime.GOMAXPROCS(0)
}

// gateWaitPerSlot is how many dials may wait per slot, 0 for any number (the default):
// UTE_SIM_GATE_WAITING sets it. Bounded at 32 per slot (256 on two cores, about 2 s of the ~110
// handshakes a second two cores serve at 1,000 nodes), a 1,000-node discovery slowed from 1.5–2
// to 16.5 minutes of wall time in one run (pools stayed a dozen members short for minutes:
// probably the dials shed included memberlist's push/pull and fallback-probe streams, whose
// dilated deadlines would have let them be served later; not measured).
func gateWaitPerSlot() int {
	if n, _ := strconv.Atoi(os.Getenv("UTE_SIM_GATE_WAITING")); n > 0 {
		return n
	}
	return 0
}
