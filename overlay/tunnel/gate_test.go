package tunnel

import (
	"context"
	"errors"
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
