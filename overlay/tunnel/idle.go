package tunnel

import "time"

// Idle tunnels close.
//
// memberlist sooner or later contacts every member of a pool (probes, push/pull, gossip to
// random members), so if every tunnel stayed up on keep-alives every pair of nodes that ever
// gossiped would hold one: a full mesh of n(n−1)/2 tunnels, each holding QUIC state, session
// caches and several goroutines at both ends. A tunnel with no agent flow and no control stream
// open that has carried nothing for Limits.GossipIdleTimeout is closed; the next gossip message
// or flow dials again. Keep-alives do not count as use. A flow that is open, however silent,
// keeps its tunnel (a packet flow until it is closed, a stream flow until its FlowConn is closed
// or reset), and so does an open control stream (a push/pull, a WireGuard admission stream).

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

// SetGossipIdleTimeout changes Limits.GossipIdleTimeout for tunnels established from now on (d
// < 0 turns the idle close off for them; 0 restores the default). The simulator injects a short
// one after the daemon has started its endpoint, as it injects a DialGate.
func (e *Endpoint) SetGossipIdleTimeout(d time.Duration) {
	if d == 0 {
		d = defaultGossipIdle
	}
	e.gossipIdle.Store(int64(d))
}

// armIdle starts t's idle check; newTunnel calls it before t is visible to anyone else.
func (e *Endpoint) armIdle(t *Tunnel) {
	d := time.Duration(e.gossipIdle.Load())
	t.touch()
	if d <= 0 {
		return
	}
	// Created far in the future and then reset, so that the callback can never run before the
	// timer is stored where it reads it.
	tm := time.AfterFunc(time.Hour, func() { t.idleCheck(d) })
	t.idleTimer.Store(tm)
	tm.Reset(d)
}

// idleCheck runs on t's timer: it closes t when nothing is open on it and it has carried nothing
// for d; otherwise it looks again when d may have passed.
func (t *Tunnel) idleCheck(d time.Duration) {
	tm := t.idleTimer.Load()
	if !t.Alive() {
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
