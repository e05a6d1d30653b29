package sim

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/overlay/tunnel"
)

// A deferrable dial takes a free slot, but with none free it is refused at once (never queued),
// while a dial that may wait queues as before and is served first when the slot frees.
func TestDialGateRefusesDeferrableWhenFull(t *testing.T) {
	g := newDialGate(1, 100*time.Millisecond)
	ctx := context.Background()
	def := tunnel.Deferrable(ctx)
	rel, err := g.Acquire(def)
	require.NoError(t, err, "a free slot is a deferrable dial's too")

	waited := make(chan error, 1)
	go func() {
		r, err := g.Acquire(ctx)
		if err == nil {
			r()
		}
		waited <- err
	}()
	require.Eventually(t, func() bool { return g.waiting() == 1 }, time.Second, time.Millisecond)
	_, err = g.Acquire(def)
	require.ErrorIs(t, err, tunnel.ErrGateBusy)
	assert.Equal(t, 1, g.waiting(), "the refused dial did not queue")
	assert.Equal(t, uint64(1), g.deferred.Load())
	rel()
	require.NoError(t, <-waited)
	assert.Equal(t, uint64(0), g.gaveUp.Load())
}

// The gate holds at most its slots, serves the newest waiter first, drops a waiter whose
// context ends, and refuses to start a handshake with too little time left.
func TestDialGateNewestFirst(t *testing.T) {
	g := newDialGate(1, 100*time.Millisecond)
	ctx := context.Background()
	hold, err := g.Acquire(ctx)
	require.NoError(t, err)

	got := make(chan int, 3)
	gone, cancelGone := context.WithCancel(ctx)
	for i := range 3 {
		c := ctx
		if i == 1 {
			c = gone
		}
		go func() {
			rel, err := g.Acquire(c)
			if err != nil {
				got <- -i
				return
			}
			got <- i
			time.Sleep(10 * time.Millisecond)
			rel()
		}()
		require.Eventually(t, func() bool { g.mu.Lock(); defer g.mu.Unlock(); return len(g.waiters) == i+1 }, time.Second, time.Millisecond)
	}
	cancelGone()
	assert.Equal(t, -1, <-got, "a waiter whose context ended leaves the queue")
	hold()
	hold() // releasing twice frees one slot only
	assert.Equal(t, 2, <-got, "the newest waiter is served first")
	assert.Equal(t, 0, <-got)

	short, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	_, err = g.Acquire(short)
	require.ErrorIs(t, err, errNoTimeLeft)
	rel, err := g.Acquire(ctx)
	require.NoError(t, err, "the refused caller gave its slot back")
	rel()
	g.mu.Lock()
	assert.Equal(t, 1, g.free)
	g.mu.Unlock()
}

// At setup the gate refuses the background dials of gossip packets (their deadline is the
// transport's 5 s) at once, and their retries on the same context too; join dials (3 s) and
// memberlist's streams (longer) pass; after setup nothing is refused.
func TestDialGateDropsGossipPacketsAtSetup(t *testing.T) {
	g := newDialGate(4, 100*time.Millisecond)
	g.setup.Store(true)
	acquire := func(ctx context.Context) error {
		rel, err := g.Acquire(ctx)
		if err == nil {
			rel()
		}
		return err
	}
	packet, cancel := context.WithTimeout(context.Background(), packetDial)
	defer cancel()
	require.ErrorIs(t, acquire(packet), errSetupDrop)
	time.Sleep(packetDial / 5) // a retry after backoff: less left, same deadline
	require.ErrorIs(t, acquire(packet), errSetupDrop)

	for _, d := range []time.Duration{3 * time.Second, 10 * time.Second} {
		ctx, cancel := context.WithTimeout(context.Background(), d)
		require.NoError(t, acquire(ctx), "a %s dial", d)
		cancel()
	}
	require.NoError(t, acquire(context.Background()), "no deadline")

	g.setup.Store(false)
	fresh, cancel2 := context.WithTimeout(context.Background(), packetDial)
	defer cancel2()
	require.NoError(t, acquire(fresh))

	cancel()
	require.Eventually(t, func() bool {
		g.mu.Lock()
		defer g.mu.Unlock()
		return len(g.dropped) == 0
	}, time.Second, 10*time.Millisecond, "a refused deadline is forgotten once its context ends")
}

// The gate sums how long its slots were held, once per handshake however often it is released.
func TestDialGateCountsHoldTime(t *testing.T) {
	g := newDialGate(2, 0)
	rel, err := g.Acquire(context.Background())
	require.NoError(t, err)
	time.Sleep(20 * time.Millisecond)
	rel()
	rel()
	held := time.Duration(g.held.Load())
	assert.GreaterOrEqual(t, held, 20*time.Millisecond)
	assert.Less(t, held, 2*time.Second)
	assert.Equal(t, uint64(1), g.granted.Load())
	assert.Equal(t, 2, g.slots)
}

// Deferrable dials hold at most their share of the slots: the rest stay free for dials that
// may wait, and a deferrable dial's release gives its share back.
func TestDialGateCapsDeferrableShare(t *testing.T) {
	g := newDialGate(4, 0).withDeferrable(2)
	ctx := context.Background()
	def := tunnel.Deferrable(ctx)
	d1, err := g.Acquire(def)
	require.NoError(t, err)
	d2, err := g.Acquire(def)
	require.NoError(t, err)
	_, err = g.Acquire(def)
	require.ErrorIs(t, err, tunnel.ErrGateBusy, "two free slots, but deferrable dials hold their share")
	assert.Equal(t, uint64(1), g.deferred.Load())

	w1, err := g.Acquire(ctx)
	require.NoError(t, err, "a dial that may wait takes a slot deferrable dials may not")
	w2, err := g.Acquire(ctx)
	require.NoError(t, err)

	d1()
	d1() // releasing twice frees one slot only
	d3, err := g.Acquire(def)
	require.NoError(t, err, "the released share is a deferrable dial's again")
	_, err = g.Acquire(def)
	require.ErrorIs(t, err, tunnel.ErrGateBusy)
	for _, r := range []func(){d2, d3, w1, w2} {
		r()
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	assert.Equal(t, 4, g.free)
	assert.Equal(t, 0, g.deferHeld)
	assert.Equal(t, 4, newDialGate(4, 0).withDeferrable(9).deferMax, "never more than the slots")
	assert.Equal(t, 1, newDialGate(4, 0).withDeferrable(0).deferMax, "never fewer than one")
}

// A node's handshake with a peer it cannot reach takes no slot: with every slot held it still
// starts at once, while a reachable peer's dial waits.
func TestNodeGateLetsUnreachablePeersThrough(t *testing.T) {
	g := newDialGate(1, 0)
	self, near, far := netip.MustParseAddrPort("10.0.0.1:1"), netip.MustParseAddrPort("10.0.0.2:1"), netip.MustParseAddrPort("10.0.0.3:1")
	ng := nodeGate{g, self, func(from, to netip.AddrPort) bool { return from == self && to == near }}
	hold, err := g.Acquire(context.Background())
	require.NoError(t, err)
	defer hold()

	rel, err := ng.Acquire(tunnel.WithDialTarget(context.Background(), far))
	require.NoError(t, err, "an unreachable peer's handshake waits for no slot")
	rel()
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	_, err = ng.Acquire(tunnel.WithDialTarget(ctx, near))
	require.ErrorIs(t, err, context.DeadlineExceeded, "a reachable peer's handshake waits for the slot")
	g.mu.Lock()
	defer g.mu.Unlock()
	assert.Equal(t, 0, g.free)
}
