package tunnel

import (
	"context"
	"fmt"
)

// DialGate paces outbound handshakes. Acquire blocks until a handshake may start, or ctx ends,
// and returns the func that marks it finished. Without a gate (the default) every dial
// handshakes at once, which is right for one node per machine; the simulator runs hundreds of
// endpoints on a few cores, where unpaced first contacts all slow each other past the
// handshake timeout and are retried, so that none completes (a congestion collapse). A gate
// shared by those endpoints keeps the number of handshakes in progress near what the CPUs can
// finish in time.
type DialGate interface {
	Acquire(ctx context.Context) (release func(), err error)
}

// NewDialGate returns a gate that lets at most n handshakes run at once across every endpoint
// sharing it (n < 1 is taken as 1).
func NewDialGate(n int) DialGate { return semGate(make(chan struct{}, max(n, 1))) }

type semGate chan struct{}

func (g semGate) Acquire(ctx context.Context) (func(), error) {
	select {
	case g <- struct{}{}:
		return func() { <-g }, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// gateHolder boxes a DialGate for an atomic pointer.
type gateHolder struct{ g DialGate }

// SetDialGate installs g for handshakes that start from now on; nil removes it.
func (e *Endpoint) SetDialGate(g DialGate) {
	if g == nil {
		e.gate.Store(nil)
		return
	}
	e.gate.Store(&gateHolder{g})
}

// acquireDial waits for the gate, if any, before one handshake attempt.
func (e *Endpoint) acquireDial(ctx context.Context, nodeID, zone string) (func(), error) {
	h := e.gate.Load()
	if h == nil {
		return func() {}, nil
	}
	release, err := h.g.Acquire(ctx)
	if err != nil {
		return nil, fmt.Errorf("tunnel: dial %s zone %s: waiting for a handshake slot: %w", nodeID, zone, err)
	}
	return release, nil
}
