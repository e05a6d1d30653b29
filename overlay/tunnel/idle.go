package tunnel

import "time"

// Idle tunnels close.
//
// memberlist sooner or later contacts every member of a pool (probes, push/pull, gossip to
// random members), so if every tunnel stayed up on keep-alives every pair of nodes that ever
// gossiped would hold one: a full mesh of n(n−1)/2 tunnels, each holding QUIC state, session
// caches and several goroutines at both ends. A tunnel with no agent flow and no control stream
// open that has carried nothing for Limits.GossipIdleTimeout is closed by the end that dialed
// it (see idleTimeout); the next gossip message or flow dials again. Keep-alives do not count as use. A flow that is open, however silent,
// keeps its tunnel (a packet flow until it is closed, a stream flow until its FlowConn is closed
// or reset), and so does an open control stream (a push/pull, a WireGuard admission stream).
// The timeout can be set per tunnel (SetGossipIdlePolicy): a pool small enough to hold a tunnel
// per member keeps them across its probe rounds, where closing them cost a handshake per probe.

// touch records use of the tunnel now: control traffic, a flow opening or closing, or a caller
// about to use it.
func (t *Tunnel) touch() { t.lastUse.Store(int64(t.ep.mono())) }

// mono is the time since the endpoint started, from the monotonic clock: a wall-clock step must
// neither close busy tunnels nor keep idle ones.
func (e *Endpoint) mono() time.Duration { return time.Since(e.born) }

// flowBegin and flowEnd bracket a stream flow (opening, admission, and its FlowConn's life).
func (t *Tunnel) flowBegin() {
	t.openFlows.Add(1)
	t.touch()
}

func (t *Tunnel) flowEnd() {
	t.touch()
	t.openFlows.Add(-1)
}

// claim is how Dial and LiveTunnel take a live tunnel for a caller: it counts as use, and it
// fails when the idle close has already decided to close t. Either the idle check sees this use
// (and keeps the tunnel) or the caller sees the decision (and dials a new one), never neither:
// both sides store first and load second (sequentially consistent atomics).
func (t *Tunnel) claim() bool {
	t.touch()
	return !t.idleClosing.Load()
}

// busy reports whether a flow or a control stream is open on t.
func (t *Tunnel) busy() bool {
	if t.openFlows.Load() > 0 || t.openControl.Load() > 0 {
		return true
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.packets) > 0
}

// SetGossipIdleTimeout changes Limits.GossipIdleTimeout (d < 0 turns the idle close off; 0
// restores the default): for tunnels established from now on, and for those already up from
// their next idle check. The simulator injects a short one after the daemon has started its
// endpoint, as it injects a DialGate. A policy set with SetGossipIdlePolicy takes precedence.
func (e *Endpoint) SetGossipIdleTimeout(d time.Duration) {
	if d == 0 {
		d = defaultGossipIdle
	}
	e.gossipIdle.Store(int64(d))
}

// SetGossipIdlePolicy makes policy choose each tunnel's idle timeout from its zone and verified
// peer, in place of the endpoint-wide one: the node holds a tunnel per member across a whole
// probe round in a pool small enough to afford it, and closes them sooner in a large one
// (node/daemon). policy is asked when a tunnel is established and at each of its idle checks,
// so a changed answer applies to a tunnel already up from its next check on (at most its
// previous timeout later); an answer ≤ 0 keeps the tunnel and asks again after idleOffRecheck.
// It runs on the tunnel's timer goroutine and must not block. nil restores the endpoint-wide
// timeout.
func (e *Endpoint) SetGossipIdlePolicy(policy func(zone, peerNodeID string) time.Duration) {
	if policy == nil {
		e.idlePolicy.Store(nil)
		return
	}
	e.idlePolicy.Store(&policy)
}

// RecheckIdle makes every open tunnel check its idle timeout again now. A policy answer applies
// to a tunnel at its next check, which a long earlier timeout may put minutes away: after a
// change that shortens timeouts (a pool grown past what the node holds across probe rounds), the
// caller rechecks so that tunnels held under the old answer close under the new one.
func (e *Endpoint) RecheckIdle() {
	e.mu.Lock()
	tunnels := make([]*Tunnel, 0, len(e.tunnels))
	for t := range e.tunnels {
		tunnels = append(tunnels, t)
	}
	e.mu.Unlock()
	for _, t := range tunnels {
		if tm := t.idleTimer.Load(); tm != nil && t.Alive() {
			tm.Reset(0)
		}
	}
}

// idleOffRecheck is how often a tunnel whose idle close is off asks again whether it still is.
const idleOffRecheck = defaultGossipIdle

// idleTimeout is t's idle timeout now (≤ 0: off). Only the end that dialed a tunnel closes it
// for idleness (as only it sends QUIC's keep-alives): the accepting end keeps it until the
// dialer closes it, QUIC's idle timeout ends it (the dialer vanished), or the node closes it
// (revocation, leave, shutdown). So a node that chooses to hold a tunnel it dialed (the daemon's
// gossip anchors) holds it at both ends, and a tunnel is never closed and re-dialed because the
// two ends' policies disagreed. Traffic either way counts as use at the dialing end.
func (e *Endpoint) idleTimeout(t *Tunnel) time.Duration {
	if !t.outbound {
		return 0
	}
	if p := e.idlePolicy.Load(); p != nil {
		return (*p)(t.zone, t.peer.NodeID)
	}
	return time.Duration(e.gossipIdle.Load())
}

// armIdle starts t's idle check; newTunnel calls it before t is visible to anyone else.
func (e *Endpoint) armIdle(t *Tunnel) {
	d := e.idleTimeout(t)
	t.touch()
	if d <= 0 {
		d = idleOffRecheck
	}
	// Created far in the future and then reset, so that the callback can never run before the
	// timer is stored where it reads it.
	tm := time.AfterFunc(time.Hour, t.idleCheck)
	t.idleTimer.Store(tm)
	tm.Reset(d)
}

// idleCheck runs on t's timer: it closes t when nothing is open on it and it has carried nothing
// for its idle timeout; otherwise it looks again when that timeout may have passed.
func (t *Tunnel) idleCheck() {
	tm := t.idleTimer.Load()
	if !t.Alive() {
		return
	}
	d := t.ep.idleTimeout(t)
	if d <= 0 {
		tm.Reset(idleOffRecheck)
		return
	}
	if t.busy() {
		tm.Reset(d)
		return
	}
	if left := d - (t.ep.mono() - time.Duration(t.lastUse.Load())); left > 0 {
		tm.Reset(left)
		return
	}
	t.idleClosing.Store(true)
	// Re-check after publishing the decision (see claim): a caller that took the tunnel in
	// between keeps it.
	if left := d - (t.ep.mono() - time.Duration(t.lastUse.Load())); left > 0 || t.busy() {
		t.idleClosing.Store(false)
		tm.Reset(max(left, time.Millisecond))
		return
	}
	t.ep.stats.idleClosed.Add(1)
	t.ep.log.Debug("idle tunnel closed", "peer", t.peer.NodeID, "zone", t.zone, "idle", d)
	t.closeWith(codeNormal, "idle")
}

// stopIdle stops t's idle check (the tunnel has closed).
func (t *Tunnel) stopIdle() {
	if tm := t.idleTimer.Load(); tm != nil {
		tm.Stop()
	}
}
