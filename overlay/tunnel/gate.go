package tunnel

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
)

// DialGate paces outbound handshakes. Acquire blocks until a handshake may start, or ctx ends,
// and returns the func that marks it finished. Without a gate (the default) every dial
// handshakes at once, which is right for one node per machine; the simulator runs hundreds of
// endpoints on a few cores, where unpaced first contacts all slow each other past the
// handshake timeout and are retried, so that none completes (a congestion collapse). A gate
// shared by those endpoints keeps the number of handshakes in progress near what the CPUs can
// finish in time.
//
// A dial whose context is marked Deferrable must not wait: a gate refuses it at once with an
// error wrapping ErrGateBusy when no slot is free, and the endpoint does not retry it.
type DialGate interface {
	Acquire(ctx context.Context) (release func(), err error)
}

// ErrGateBusy is a DialGate's refusal of a Deferrable dial when no handshake slot is free. It is
// no failure of the peer: a caller must not hold the peer as unreachable because of it.
var ErrGateBusy = errors.New("no handshake slot free for a deferrable dial")

type deferrableKey struct{}

// Deferrable marks the dials made with the returned context as worth a handshake only when one
// is to spare: under a DialGate they are refused at once (ErrGateBusy) rather than queued when
// every slot is taken. Without a gate it changes nothing. The gossip transport marks so the
// dial of a packet that is sent again anyway (memberlist's gossip of member state, a gossip
// round's record packet), so that under a starved CPU such packets do not take the slots of the
// probes that keep live members from being suspected (docs/simulator.md, "Deferrable dials").
func Deferrable(ctx context.Context) context.Context {
	return context.WithValue(ctx, deferrableKey{}, true)
}

type dialTargetKey struct{}

// DialTarget is the address a handshake is about to be tried with, in the context a DialGate's
// Acquire receives: a gate may pace by destination, or, in a simulation that knows its network,
// charge nothing for a handshake whose peer cannot answer.
func DialTarget(ctx context.Context) (netip.AddrPort, bool) {
	a, ok := ctx.Value(dialTargetKey{}).(netip.AddrPort)
	return a, ok
}

// WithDialTarget is the context the endpoint hands its gate for a handshake with addr (exported
// so that a gate can be exercised without an endpoint).
func WithDialTarget(ctx context.Context, addr netip.AddrPort) context.Context {
	return context.WithValue(ctx, dialTargetKey{}, addr)
}

// IsDeferrable reports whether ctx was marked by Deferrable.
func IsDeferrable(ctx context.Context) bool {
	v, _ := ctx.Value(deferrableKey{}).(bool)
	return v
}

// NewDialGate returns a gate that lets at most n handshakes run at once across every endpoint
// sharing it (n < 1 is taken as 1).
func NewDialGate(n int) DialGate { return semGate(make(chan struct{}, max(n, 1))) }

type semGate chan struct{}

func (g semGate) Acquire(ctx context.Context) (func(), error) {
	if IsDeferrable(ctx) {
		select {
		case g <- struct{}{}:
			return func() { <-g }, nil
		default:
			return nil, ErrGateBusy
		}
	}
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

// acquireDial waits for the gate, if any, before one handshake attempt with addr.
func (e *Endpoint) acquireDial(ctx context.Context, addr netip.AddrPort, nodeID, zone string) (func(), error) {
	h := e.gate.Load()
	if h == nil {
		return func() {}, nil
	}
	release, err := h.g.Acquire(WithDialTarget(ctx, addr))
	if errors.Is(err, ErrGateBusy) {
		return nil, err // a refusal without waiting, often thousands a second under overload: not formatted
	}
	if err != nil {
		return nil, fmt.Errorf("tunnel: dial %s zone %s: waiting for a handshake slot: %w", nodeID, zone, err)
	}
	return release, nil
}
