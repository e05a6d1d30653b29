package daemon

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"time"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/identity/record"
	"github.com/ute-project/ute/node"
	"github.com/ute-project/ute/node/config"
	"github.com/ute-project/ute/node/membership"
)

// pools runs the node's gossip: one memberlist pool per zone over the node's tunnels.
type pools struct {
	m *membership.Membership
}

func (p *pools) close() error { return p.m.Close() }

// timing maps the config's gossip section onto memberlist's LAN profile.
func timing(g config.Gossip) membership.Timing {
	t := membership.LANTiming()
	if g.Interval > 0 {
		t.GossipInterval = g.Interval
	}
	if g.ProbeInterval > 0 {
		t.ProbeInterval = g.ProbeInterval
		t.ProbeTimeout = min(t.ProbeTimeout, g.ProbeInterval/2)
	}
	if g.PushPullInterval > 0 {
		t.PushPullInterval = g.PushPullInterval
	}
	if g.RetransmitMult > 0 {
		t.RetransmitMult = g.RetransmitMult
	}
	return t
}

// startPools creates the pools of the node's zones and starts joining them.
func (d *Daemon) startPools() error {
	adv, ok := d.cfg.AdvertiseAddr(d.node.Addr())
	if !ok {
		return fmt.Errorf("daemon: the node listens on %s, which other hosts cannot dial: set advertise (or --advertise) to an address they reach", d.node.Addr())
	}
	d.advertise = adv
	m, err := membership.New(membership.Config{
		NodeID: d.node.ID().String(), Advertise: adv, Endpoint: d.node.Endpoint(), Mux: d.mux,
		Records: poolRecords{d}, Revoked: func(id string) bool { return d.node.Revoked(id) },
		Timing: d.timing(), Logger: d.log, MaxRecordSize: maxGossipRecord,
	})
	if err != nil {
		return err
	}
	d.mu.Lock()
	d.pools = &pools{m: m}
	d.mu.Unlock()
	for _, z := range d.node.Endpoint().Zones() {
		if err := m.AddZone(z); err != nil {
			return err
		}
	}
	d.wg.Go(d.poolLoop)
	return nil
}

// maxGossipRecord bounds a record in gossip: revocation records are well under it; a policy
// release larger than this reaches nodes through the authority watch only.
const maxGossipRecord = 256 << 10

func (d *Daemon) timing() membership.Timing {
	if d.opts.Timing != nil {
		return *d.opts.Timing
	}
	return timing(d.cfg.Gossip)
}

// syncPools makes the pools match the zones the node serves (after a policy release).
func (d *Daemon) syncPools(zones []string) {
	p := d.currentPools()
	if p == nil {
		return
	}
	have := p.m.Zones()
	for _, z := range have {
		if !slices.Contains(zones, z) {
			if err := p.m.RemoveZone(z); err != nil {
				d.log.Warn("leave zone pool", "zone", z, "err", err)
			}
			d.metrics.ForgetZone(z)
		}
	}
	for _, z := range zones {
		if !slices.Contains(have, z) {
			if err := p.m.AddZone(z); err != nil {
				d.log.Warn("join zone pool", "zone", z, "err", err)
			}
		}
	}
}

// currentPools is the daemon's gossip pools, nil before they start or after they stop.
func (d *Daemon) currentPools() *pools {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.pools
}

// members is zone's live gossip members (this node included); nil without a pool.
func (d *Daemon) members(zone string) []membership.Member {
	p := d.currentPools()
	if p == nil {
		return nil
	}
	return p.m.Members(zone)
}

// isMember reports whether node is one of zone's live gossip members, without copying the list.
func (d *Daemon) isMember(zone, node string) bool {
	p := d.currentPools()
	if p == nil {
		return false
	}
	_, ok := p.m.LookupMember(zone, node)
	return ok
}

// poolLoop joins each zone's pool through the bootstrap members until it has a peer, and feeds
// the members gossip discovers to the node as peers (the node still verifies each one at the
// handshake: a member is only a hint of where a node ID can be reached). It hands members over
// when membership reports a change, not on a timer: polling every member of a 100-node zone
// four times a second was most of an idle node's CPU.
//
// Its periodic work shares one timer, because at rest each wake-up costs more than the work it
// does (docs/benchmarks.md, "A node at rest"): the join check (every 200 ms to 1 s while a pool
// is alone, backing off to 5 s once every pool has a peer), the gauges on each of those wake-ups
// (member and tunnel counts only), and on each of them too a member sync, which compares the
// node's peer table with the members and so repairs, within one interval, an entry something
// else overwrote (see syncMembers) or a notice coalesced away while a pool was being replaced.
func (d *Daemon) poolLoop() {
	const restEvery = 5 * time.Second
	p := d.currentPools()
	var changes <-chan struct{}
	if p != nil {
		changes = p.m.Changes()
	}
	wait := 200 * time.Millisecond
	tick := time.NewTimer(0)
	defer tick.Stop()
	reconnectEvery := d.opts.ReconnectInterval
	if reconnectEvery <= 0 {
		reconnectEvery = 30 * time.Second
	}
	reconnected := time.Now()
	for {
		select {
		case <-d.ctx.Done():
			return
		case <-changes:
			d.syncMembers()
		case <-tick.C:
			d.syncMembers()
			d.keepAnchors()
			reconnect := time.Since(reconnected) >= reconnectEvery
			if reconnect {
				reconnected = time.Now()
			}
			if d.joinPools(reconnect) {
				wait = time.Second
			} else {
				wait = min(wait*2, restEvery)
			}
			d.syncGauges()
			tick.Reset(wait + time.Duration(rand.Int64N(int64(wait)/4)))
		}
	}
}

// joinPools tries to join every zone pool that has no other member yet and, with reconnect, also
// every pool that lacks some of its bootstrap members, through up to two of those (as Serf's
// reconnect does). Without that, nodes that found each other while the rest was unreachable (a
// partition at start-up, seeds that answered late) stay a pool of their own for good: gossip only
// reaches members a node already knows, and a pool with a member never asked its seeds again.
// memberlist's join is a push/pull state exchange, so one contact merges the two member lists.
// It reports whether it tried and failed to join a pool that has no other member (so the caller
// retries soon); a failed reconnect waits for the next interval.
func (d *Daemon) joinPools(reconnect bool) (failed bool) {
	d.mu.Lock()
	p, cfg := d.pools, d.cfg
	d.mu.Unlock()
	if p == nil {
		return false
	}
	var zones []string
	// Pools that have members: a reconnect joins only through bootstrap members they lack, looked
	// up one by one (a sorted snapshot), not by a set of all members built on every call (at 1,000
	// members a tenth of a simulated zone's CPU at rest, with the staggered start's 5 s interval).
	hasMembers := map[string]bool{}
	for _, z := range p.m.Zones() {
		switch {
		case p.m.NumMembers(z) <= 1:
			zones = append(zones, z)
		case reconnect:
			zones = append(zones, z)
			hasMembers[z] = true
		}
	}
	if len(zones) == 0 {
		return false // every pool has a peer and no reconnect is due: no need to read the bootstrap members
	}
	stored, err := d.dir.Members()
	if err != nil {
		d.log.Warn("bootstrap members", "err", err)
	}
	td := d.node.ID().TrustDomain
	for _, z := range zones {
		var seeds []membership.Seed
		for _, s := range stored {
			if len(s.Zones) > 0 && !slices.Contains(s.Zones, z) {
				continue
			}
			ap, err := netip.ParseAddrPort(s.Addr)
			if err != nil {
				continue
			}
			seeds = append(seeds, membership.Seed{NodeID: s.ID, Addr: ap})
		}
		for _, peer := range cfg.Peers {
			id := peer.Node
			if pid, err := identity.ParseID(peer.Node); err != nil || pid.Kind != identity.KindNode {
				id = identity.NodeID(td, peer.Node).String()
			}
			seeds = append(seeds, membership.Seed{NodeID: id, Addr: peer.Addr})
		}
		if hasMembers[z] {
			self := d.node.ID().String()
			seeds = slices.DeleteFunc(seeds, func(s membership.Seed) bool {
				if s.NodeID == self {
					return true
				}
				_, listed := p.m.LookupMember(z, s.NodeID)
				return listed
			})
			rand.Shuffle(len(seeds), func(i, j int) { seeds[i], seeds[j] = seeds[j], seeds[i] })
			seeds = seeds[:min(len(seeds), 2)]
		}
		if len(seeds) == 0 {
			continue
		}
		// One attempt's deadline. Join dials the seeds concurrently, each address for at most
		// its per-seed timeout, and tries the seeds that failed last time after the others, so
		// a dead or black-holed member listed first no longer spends the whole attempt.
		ctx, cancel := context.WithTimeout(d.ctx, 5*time.Second)
		n, err := p.m.Join(ctx, z, seeds)
		cancel()
		if err != nil {
			if !hasMembers[z] {
				failed = true
			}
			d.log.Debug("join zone pool", "zone", z, "reconnect", hasMembers[z], "err", err)
			continue
		}
		d.log.Info("joined zone pool", "zone", z, "through", n)
	}
	return failed
}

// syncMembers hands the node every member of every pool whose gossiped address its peer table
// does not hold: a new member, a member that moved, and a member whose entry something else
// overwrote since (an SDK caller's or a configured peer's AddPeer at another address). It
// compares with the table itself, by node ID and without parsing, rather than with what it
// handed before: a record of its own hand-overs could not see such an overwrite, which then
// masked the gossiped address until a periodic full hand-over. During discovery membership
// reports a change many times a second, and handing every member each time was a quarter of
// the CPU of a 1,000-node simulation (O(n) peer parses per change); a member the table already
// holds at its gossiped address costs one map lookup. A refused member is tried again on the
// next sync. Gossip wins as in resolve: a gossiped address comes before a bootstrap or
// configured one, and the handshake proves the identity at whichever address is dialed.
func (d *Daemon) syncMembers() {
	p := d.currentPools()
	if p == nil {
		return
	}
	self := d.node.ID().String()
	for _, z := range p.m.Zones() {
		for m := range p.m.EachMember(z) {
			if m.NodeID == self || !m.Addr.IsValid() {
				continue
			}
			if a, ok := d.node.PeerAddr(m.NodeID); ok && a == m.Addr {
				continue
			}
			if err := d.node.AddPeer(node.Peer{Node: m.NodeID, Addr: m.Addr}); err != nil {
				d.log.Debug("gossiped member refused", "member", m.NodeID, "err", err)
			}
		}
	}
}

// syncGauges sets the member and tunnel gauges of every pool. It counts live tunnels on the
// endpoint directly: a node snapshot formats every tunnel and agent, which the gauges never use.
func (d *Daemon) syncGauges() {
	p := d.currentPools()
	if p == nil {
		return
	}
	tunnels := map[string]int{}
	for _, t := range d.node.Endpoint().Tunnels() {
		if t.Alive() {
			tunnels[t.Zone()]++
		}
	}
	members := map[string]int{}
	for _, z := range p.m.Zones() {
		members[z] = p.m.NumMembers(z)
		d.metrics.SetGossipMembers(z, members[z])
		d.metrics.SetTunnels(z, tunnels[z])
	}
	d.updateIdle(members)
}

// spread publishes a record that just changed the store in the pools it concerns: an agent's
// revocation only in the agent's zone (zone; so that members of other zones never receive it),
// everything else (nodes, serials, policy releases: zone "") in every pool. A record gossip
// brought is re-broadcast by its pool already; it still crosses into this node's other pools that
// it concerns (a node revoked in two zones).
func (d *Daemon) spread(raw []byte, zone string, from Origin, arrivedOn ...string) {
	p := d.currentPools()
	if p == nil {
		return
	}
	var zones []string
	for _, z := range p.m.Zones() {
		if !slices.Contains(arrivedOn, z) && (zone == "" || zone == z) {
			zones = append(zones, z)
		}
	}
	if len(zones) == 0 {
		return
	}
	if err := p.m.Publish(raw, zones...); err != nil {
		d.log.Warn("publish record", "from", string(from), "err", err)
	}
}

// recordZone is the zone of an agent revocation's subject, or "" for any other subject.
func recordZone(rev *record.Revocation) string {
	id, err := identity.ParseID(rev.Claims.Subject)
	if err != nil || id.Kind != identity.KindAgent {
		return ""
	}
	return id.Zone
}

// poolRecords is the store as the gossip pools see it.
type poolRecords struct{ d *Daemon }

func (r poolRecords) Add(zone string, raw []byte) (bool, error) {
	return r.d.accept(r.d.ctx, raw, FromGossip, zone)
}

func (r poolRecords) Snapshot(zone string) [][]byte {
	d := r.d
	var out [][]byte
	for _, e := range d.store.All() {
		if z := recordZone(e.Record); z == "" || z == zone {
			out = append(out, e.Record.Raw())
		}
	}
	if rel := d.store.PolicyRelease(); rel != nil && len(rel.Raw()) <= maxGossipRecord {
		out = append(out, rel.Raw())
	}
	return append(out, d.trustEventsSnapshot(zone)...)
}

// resolve names an address for a node ID: a gossip member first, then a bootstrap member, then a
// configured peer. Every answer is only a hint: the tunnel handshake proves the identity.
func (d *Daemon) resolve(nodeID string) (netip.AddrPort, bool) {
	d.mu.Lock()
	p, cfg := d.pools, d.cfg
	d.mu.Unlock()
	if p != nil {
		for _, z := range p.m.Zones() {
			if m, ok := p.m.LookupMember(z, nodeID); ok && m.Addr.IsValid() {
				return m.Addr, true
			}
		}
	}
	if stored, err := d.dir.Members(); err == nil {
		for _, s := range stored {
			if s.ID == nodeID {
				if ap, err := netip.ParseAddrPort(s.Addr); err == nil {
					return ap, true
				}
			}
		}
	}
	td := d.node.ID().TrustDomain
	for _, peer := range cfg.Peers {
		if peer.Node == nodeID || identity.NodeID(td, peer.Node).String() == nodeID {
			return peer.Addr, true
		}
	}
	return netip.AddrPort{}, false
}

// Members is zone's live gossip members, this node included (empty without a pool for zone).
func (d *Daemon) Members(zone string) []membership.Member { return d.members(zone) }

// Gossip is the node's gossip pools, for their counters and queues (the simulator reads them);
// nil before they start or after Close.
func (d *Daemon) Gossip() *membership.Membership {
	if p := d.currentPools(); p != nil {
		return p.m
	}
	return nil
}
