package daemon

import (
	"maps"
	"time"

	"github.com/ute-project/ute/node/config"
)

// Gossip tunnels at rest.
//
// memberlist probes the members of a pool one at a time, Timing.ProbeInterval apart, in an order
// it shuffles every round, so each member is probed once a round (members × ProbeInterval: 100 s
// in a pool of 100 at the LAN profile's 1 s), and two probes of the same member are up to two
// rounds apart. A gossip-only tunnel that closes after gossip.tunnel_idle (60 s by default) of
// silence is therefore gone when the next probe comes, in any pool of more than about 60: at rest
// each probe then costs a handshake, and a node of a 100-member pool held only 55–71 of its 99
// tunnels. In a pool small enough to hold a tunnel per member, the idle close instead waits two
// probe rounds, so that a tunnel at rest is never closed and reopened between probes; an open
// idle tunnel costs one keep-alive PING and its acknowledgement every 15 s and about 140 KiB
// (docs/benchmarks.md, "A node at rest"), which measured cheaper than the handshakes. In larger
// pools the configured timeout stays: holding a tunnel per member there would grow to a full
// mesh of the pool (docs/architecture.md, "Idle tunnels close").

// meshTunnels is how many gossip tunnels, summed over the node's pools, the node holds across
// probe rounds; above it every pool uses the configured idle timeout.
const meshTunnels = 128

// roundIdle is the idle timeout of a gossip-only tunnel in a pool of members members probed
// every probe: two probe rounds, and never less than the configured fixed timeout.
func roundIdle(fixed, probe time.Duration, members int) time.Duration {
	return max(fixed, 2*time.Duration(members)*probe)
}

// idlePolicy is a snapshot of the idle timeouts: fixed is the configured one
// (gossip.tunnel_idle), pools the round-covering one of each pool while the node's pools are
// small enough (empty otherwise).
type idlePolicy struct {
	fixed time.Duration
	pools map[string]time.Duration
}

// fixedIdle is the configured idle timeout (the configuration's default when unset).
func fixedIdle(g config.Gossip) time.Duration {
	if g.TunnelIdle == 0 {
		return config.Default().Gossip.TunnelIdle
	}
	return g.TunnelIdle
}

// tunnelIdle is the endpoint's idle policy (tunnel.Endpoint.SetGossipIdlePolicy): off for the
// pool's anchors, the pool's round-covering timeout while the node's pools are small enough, the
// configured one otherwise and for zones without a pool. It runs on tunnels' timer goroutines, so it only loads the
// snapshot updateIdle stores.
func (d *Daemon) tunnelIdle(zone, peer string) time.Duration {
	if d.anchored(zone, peer) {
		return -1 // held (anchors.go)
	}
	p := d.idle.Load()
	if v, ok := p.pools[zone]; ok {
		return v
	}
	return p.fixed
}

// updateIdle recomputes the idle policy from the member count of each pool (this node
// included). A tunnel already up takes a changed timeout at its next idle check.
func (d *Daemon) updateIdle(members map[string]int) {
	d.mu.Lock()
	g := d.cfg.Gossip
	d.mu.Unlock()
	tm := timing(g)
	if d.opts.Timing != nil {
		tm = *d.opts.Timing
	}
	fixed, probe := fixedIdle(g), tm.ProbeInterval
	held := 0
	for _, n := range members {
		held += max(n-1, 0)
	}
	next := idlePolicy{fixed: fixed, pools: map[string]time.Duration{}}
	mesh := meshTunnels
	if d.opts.meshTunnels != 0 {
		mesh = d.opts.meshTunnels
	}
	if fixed > 0 && held <= mesh {
		for z, n := range members {
			next.pools[z] = roundIdle(fixed, probe, n)
		}
	}
	cur := d.idle.Load()
	if cur.fixed == next.fixed && maps.Equal(cur.pools, next.pools) {
		return
	}
	d.idle.Store(&next)
	// A tunnel takes a new timeout at its next check, which the old one may put minutes away
	// (two probe rounds): when any timeout shrank, every tunnel checks again now, so that a pool
	// grown past meshTunnels does not keep the near-mesh it held while it was small.
	if shrank(cur, &next) && d.node != nil {
		d.node.Endpoint().RecheckIdle()
	}
}

// shrank reports whether any timeout of next is shorter than the one before it in cur.
func shrank(cur, next *idlePolicy) bool {
	if next.fixed < cur.fixed {
		return true
	}
	for z, v := range cur.pools {
		if w, ok := next.pools[z]; !ok && next.fixed < v || ok && w < v {
			return true
		}
	}
	return false
}
