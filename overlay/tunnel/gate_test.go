package tunnel

import (
	"context"
	"errors"
	"net/netip"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// A dial waits for the endpoint's gate: while every slot is taken no handshake starts and the
// dial fails with its context's error, and once a slot frees the same dial succeeds.
func TestDialGatePacesHandshakes(t *testing.T) {
	pki := newPKI(t, testTD)
	a := startNode(t, pki, "a", pki.node(t, "a", "z"), []string{"z"}, "")
	b := startNode(t, pki, "b", pki.node(t, "b", "z"), []string{"z"}, "")
	gate := NewDialGate(1)
	a.ep.SetDialGate(gate)

	hold, err := gate.Acquire(context.Background())
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 150*time.Millisecond)
	_, err = a.ep.Dial(ctx, b.addr, b.id, "z")
	cancel()
	require.ErrorIs(t, err, context.DeadlineExceeded)
	require.Contains(t, err.Error(), "waiting for a handshake slot")
	require.Zero(t, b.ep.Stats().Tunnels, "no handshake reached the peer")

	hold()
	tun, err := a.ep.Dial(ctxT(t), b.addr, b.id, "z")
	require.NoError(t, err)
	require.True(t, tun.Alive())

	// The slot is free again after the handshake.
	release, err := gate.Acquire(ctxT(t))
	require.NoError(t, err)
	release()

	// Removing the gate lets dials through regardless of it.
	a.ep.SetDialGate(nil)
	hold, err = gate.Acquire(context.Background())
	require.NoError(t, err)
	defer hold()
	c := startNode(t, pki, "c", pki.node(t, "c", "z"), []string{"z"}, "")
	_, err = a.ep.Dial(ctxT(t), c.addr, c.id, "z")
	require.NoError(t, err)
}

func TestNewDialGateBounds(t *testing.T) {
	g := NewDialGate(0) // taken as 1
	r1, err := g.Acquire(context.Background())
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err = g.Acquire(ctx)
	require.True(t, errors.Is(err, context.Canceled))
	r1()
	r2, err := g.Acquire(context.Background())
	require.NoError(t, err)
	r2()
}

// A deferrable dial does not wait for a slot: with every slot taken it is refused at once with
// ErrGateBusy, counted as no dial failure and not retried. With a slot free it handshakes.
func TestDeferrableDialRefusedAtOnceWhenGateIsFull(t *testing.T) {
	gate := NewDialGate(1)
	a, b := gatedNodes(t, gate)
	require.False(t, IsDeferrable(context.Background()))
	require.True(t, IsDeferrable(Deferrable(context.Background())))

	hold, err := gate.Acquire(context.Background())
	require.NoError(t, err)
	t0 := time.Now()
	_, err = a.ep.Dial(Deferrable(ctxT(t)), b.addr, b.id, "z")
	require.ErrorIs(t, err, ErrGateBusy)
	require.Less(t, time.Since(t0), time.Second, "refused at once, not after backoff")
	require.Zero(t, a.ep.Stats().DialFailures, "a refusal at the gate is no failed handshake")
	require.Zero(t, b.ep.Stats().Tunnels)

	hold()
	tun, err := a.ep.Dial(Deferrable(ctxT(t)), b.addr, b.id, "z")
	require.NoError(t, err)
	require.True(t, tun.Alive())
}

// refusingGate holds a deferrable dial until told, then refuses it; other dials pass.
type refusingGate struct{ entered, refuse chan struct{} }

func (g refusingGate) Acquire(ctx context.Context) (func(), error) {
	if IsDeferrable(ctx) {
		close(g.entered)
		<-g.refuse
		return nil, ErrGateBusy
	}
	return func() {}, nil
}

// A dial that may wait, sharing the handshake of a deferrable dial to the same peer, is not
// failed by the gate's refusal of that one: it dials itself.
func TestWaitingDialOutlivesDeferrableLeadersRefusal(t *testing.T) {
	g := refusingGate{entered: make(chan struct{}), refuse: make(chan struct{})}
	a, b := gatedNodes(t, g)

	leader := make(chan error, 1)
	go func() {
		_, err := a.ep.Dial(Deferrable(ctxT(t)), b.addr, b.id, "z")
		leader <- err
	}()
	<-g.entered
	follower := make(chan error, 1)
	go func() {
		_, err := a.ep.Dial(ctxT(t), b.addr, b.id, "z")
		follower <- err
	}()
	time.Sleep(100 * time.Millisecond) // the follower joins the leader's dial
	close(g.refuse)
	require.ErrorIs(t, <-leader, ErrGateBusy)
	require.NoError(t, <-follower)
	require.Equal(t, 1, b.ep.Stats().Tunnels)
}

// gatedNodes starts nodes a and b in zone z, a's dials under gate.
func gatedNodes(t *testing.T, gate DialGate) (a, b *testNode) {
	t.Helper()
	pki := newPKI(t, testTD)
	a = startNode(t, pki, "a", pki.node(t, "a", "z"), []string{"z"}, "")
	b = startNode(t, pki, "b", pki.node(t, "b", "z"), []string{"z"}, "")
	a.ep.SetDialGate(gate)
	return a, b
}

// targetGate records the dial target each Acquire sees.
type targetGate struct{ seen chan netip.AddrPort }

func (g targetGate) Acquire(ctx context.Context) (func(), error) {
	a, ok := DialTarget(ctx)
	if !ok {
		return nil, errors.New("no dial target in the gate's context")
	}
	g.seen <- a
	return func() {}, nil
}

// The gate is told which address the handshake is about to be tried with.
func TestDialGateSeesTheTarget(t *testing.T) {
	g := targetGate{seen: make(chan netip.AddrPort, 4)}
	a, b := gatedNodes(t, g)
	_, ok := DialTarget(context.Background())
	require.False(t, ok)
	_, err := a.ep.Dial(ctxT(t), b.addr, b.id, "z")
	require.NoError(t, err)
	require.Equal(t, b.addr, <-g.seen)
}
