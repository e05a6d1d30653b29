package daemon

import (
	"context"
	"math/rand/v2"
	"time"
)

// Gossip anchors.
//
// In a pool larger than meshTunnels a gossip tunnel closes after gossip.tunnel_idle of silence,
// so at rest a node holds only the tunnels its recent probes and rounds opened, and some nodes
// hold none. A new record floods the graph of open tunnels in a few link delays (membership's
// sendOpen); a member outside that graph waits for a gossip round to pick it and for a
// handshake, which is what the last members of a 1,000-node pool waited for (docs/benchmarks.md,
// "gossip anchors"). So each node holds a few tunnels open whatever the idle close: to
// anchorsPerPool members of each pool, drawn at random and kept while they stay members. The
// tunnels are ones this node dialed, and only the dialing end closes a tunnel for idleness
// (overlay/tunnel, idleTimeout), so both ends hold them. Every node's random anchors make a
// random 3-out graph of open tunnels, connected with high probability, over which a record
// reaches every member without a handshake. The cost is three held tunnels per pool: a
// keep-alive each every 15 s and about 140 KiB of memory each.

// anchorsPerPool is how many members of each pool a node holds a tunnel to at all times.
const anchorsPerPool = 3

// anchorDial bounds one anchor dial; the pool loop tries again at its next tick.
const anchorDial = 10 * time.Second

// anchorSet is the anchors of every pool: zone → node ID. Stored whole and never changed after,
// so the idle policy reads it on tunnels' timer goroutines without a lock.
type anchorSet map[string]map[string]bool

// anchored reports whether peer is one of this node's anchors in zone.
func (d *Daemon) anchored(zone, peer string) bool {
	a := d.anchors.Load()
	return a != nil && (*a)[zone][peer]
}

// anchorsWanted is the number of anchors per pool (Options.anchors overrides it for tests; < 0
// turns them off).
func (d *Daemon) anchorsWanted() int {
	switch {
	case d.opts.anchors < 0:
		return 0
	case d.opts.anchors > 0:
		return d.opts.anchors
	}
	return anchorsPerPool
}

// keepAnchors runs on the pool loop: it keeps each pool's anchors that are still members (not
// revoked, with an address), draws new ones at random to replace those that left, and dials
// every anchor this node holds no live tunnel to, in the background. A dial that fails is tried
// again at the next tick.
func (d *Daemon) keepAnchors() {
	p := d.currentPools()
	want := d.anchorsWanted()
	if p == nil || want == 0 {
		return
	}
	self := d.node.ID().String()
	cur := d.anchors.Load()
	next := anchorSet{}
	ep := d.node.Endpoint()
	for _, z := range p.m.Zones() {
		keep := map[string]bool{}
		if cur != nil {
			for id := range (*cur)[z] {
				if m, ok := p.m.LookupMember(z, id); ok && m.Addr.IsValid() {
					keep[id] = true
				}
			}
		}
		// Draw the missing ones uniformly from the other members (reservoir sampling over one
		// pass of the shared member list).
		var drawn []string
		seen := 0
		need := want - len(keep)
		for m := range p.m.EachMember(z) {
			if need <= 0 {
				break
			}
			if m.NodeID == self || keep[m.NodeID] || !m.Addr.IsValid() {
				continue
			}
			seen++
			if len(drawn) < need {
				drawn = append(drawn, m.NodeID)
			} else if j := rand.IntN(seen); j < need {
				drawn[j] = m.NodeID
			}
		}
		for _, id := range drawn {
			keep[id] = true
		}
		next[z] = keep
		for id := range keep {
			if _, ok := ep.LiveTunnel(id, z); ok {
				continue
			}
			m, ok := p.m.LookupMember(z, id)
			if !ok || !d.startAnchorDial(z, id) {
				continue
			}
			d.wg.Go(func() {
				defer d.endAnchorDial(z, id)
				ctx, cancel := context.WithTimeout(d.ctx, anchorDial)
				defer cancel()
				if _, err := ep.Dial(ctx, m.Addr, id, z); err != nil {
					d.log.Debug("anchor dial", "zone", z, "member", id, "err", err)
				}
			})
		}
	}
	d.anchors.Store(&next)
}

// startAnchorDial claims the one dial in flight to an anchor; false when one already is.
func (d *Daemon) startAnchorDial(zone, id string) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return false
	}
	k := zone + "\x00" + id
	if d.anchorDials[k] {
		return false
	}
	if d.anchorDials == nil {
		d.anchorDials = map[string]bool{}
	}
	d.anchorDials[k] = true
	return true
}

func (d *Daemon) endAnchorDial(zone, id string) {
	d.mu.Lock()
	delete(d.anchorDials, zone+"\x00"+id)
	d.mu.Unlock()
}
