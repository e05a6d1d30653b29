package membership

import (
	"crypto/sha256"
	"encoding/binary"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/hashicorp/memberlist"
)

// Record anti-entropy on probes. memberlist's push/pull carries the records (LocalState), but at
// scale it is rare: memberlist stretches its interval with the pool's size (×6 at 1,000
// members: once a minute per node with a 10 s interval, three minutes with the LAN profile's
// 30 s), so a member that every gossip copy of a record missed waited that long. Probes are
// frequent (every ProbeInterval each member probes one other) and run on a tunnel that is open
// at that moment. So every probe's ack carries a digest of the acking member's record set
// (AckPayload: 13 bytes), and a prober whose own digest differs pushes its records to that
// member over a record-push stream (the direct push's channel and format, and the receiver's
// ordinary path: seen-set, Records.Add, re-broadcast of what is new). A member that lacks a
// record gets it the next time a member that holds it probes it: within a few probe intervals,
// whatever the gossip lost. A digest never makes a member take anything: what arrives is
// verified by Records.Add exactly as gossip is.

// digestLen is an ack payload: [version u8 = 1][count u32 BE][first 8 bytes of the set's hash].
const digestLen = 13

const digestVersion byte = 1

// recordDigest summarises a record set independently of its order.
func recordDigest(recs [][]byte) []byte {
	hs := make([][sha256.Size]byte, len(recs))
	for i, r := range recs {
		hs[i] = sha256.Sum256(r)
	}
	slices.SortFunc(hs, func(a, b [sha256.Size]byte) int { return slices.Compare(a[:], b[:]) })
	h := sha256.New()
	for _, x := range hs {
		h.Write(x[:])
	}
	out := make([]byte, 5, digestLen+sha256.Size)
	out[0] = digestVersion
	binary.BigEndian.PutUint32(out[1:5], uint32(len(recs)))
	return h.Sum(out)[:digestLen]
}

// digestCache holds a pool's digest for a while: Snapshot can cost the store a scan, and every
// ack and every completed probe needs it. A record this pool takes or publishes invalidates it.
type digestCache struct {
	mu    sync.Mutex
	b     []byte
	at    time.Time
	dirty bool
	// pulled is when the last sync pull (a push/pull with a member that acked more records) ran.
	pulled time.Time
}

func (p *pool) digest() []byte {
	c := &p.dig
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.b == nil || c.dirty || time.Since(c.at) > p.m.cfg.Timing.ProbeInterval {
		c.b, c.at, c.dirty = recordDigest(p.m.cfg.Records.Snapshot(p.zone)), time.Now(), false
	}
	return c.b
}

func (p *pool) recordsChanged() {
	p.dig.mu.Lock()
	p.dig.dirty = true
	p.dig.mu.Unlock()
}

// AckPayload puts the pool's record digest in every ack it sends.
func (p *pool) AckPayload() []byte { return p.digest() }

// NotifyPingComplete compares the digest a probed member acked with this pool's, and pushes this
// pool's records to that member when they differ (one such push at a time per pool). It runs on
// memberlist's probe goroutine: the push runs on a Membership-owned one.
func (p *pool) NotifyPingComplete(other *memberlist.Node, _ time.Duration, payload []byte) {
	if len(payload) != digestLen || payload[0] != digestVersion || slices.Equal(payload, p.digest()) {
		return
	}
	mine := p.digest()
	if p.m.checkName(other.Name) != nil {
		return // a name this pool would not gossip with
	}
	// The acking member holds more records than this one: pull them too, by a push/pull with it
	// (at most one per PushPullInterval: memberlist's own exchange, without its scaling), which
	// also re-announces this member there — a member that every other one had dropped from its
	// list is probed by none and would otherwise never get the record.
	pull := binary.BigEndian.Uint32(payload[1:5]) > binary.BigEndian.Uint32(mine[1:5])
	if !p.syncing.CompareAndSwap(false, true) {
		return
	}
	to := p.memberFrom(other)
	if !to.Addr.IsValid() {
		if a, ok := netip.AddrFromSlice(other.Addr); ok {
			to.Addr = netip.AddrPortFrom(a.Unmap(), other.Port)
		}
	}
	if !p.m.spawn(func() {
		defer p.syncing.Store(false)
		p.m.st.syncs.Add(1)
		if binary.BigEndian.Uint32(mine[1:5]) > 0 {
			if err := p.m.pushAll(p.zone, to, p.m.cfg.Records.Snapshot(p.zone)); err != nil {
				p.m.st.pushFailures.Add(1)
				p.m.log.Debug("record sync push failed", "peer", to.NodeID, "zone", p.zone, "err", err)
			}
		}
		if pull && to.Addr.IsValid() && p.pullDue() {
			release := p.tr.Hint(to.Addr, to.NodeID)
			defer release()
			if _, err := p.ml().Join([]string{to.Addr.String()}); err != nil {
				p.m.log.Debug("record sync pull failed", "peer", to.NodeID, "zone", p.zone, "err", err)
			}
		}
	}) {
		p.syncing.Store(false)
	}
}

// pullDue reports whether a sync pull may run now, and if so starts its interval.
func (p *pool) pullDue() bool {
	p.dig.mu.Lock()
	defer p.dig.mu.Unlock()
	if time.Since(p.dig.pulled) < p.m.cfg.Timing.PushPullInterval {
		return false
	}
	p.dig.pulled = time.Now()
	return true
}

// memberFrom reads a memberlist node handed to a delegate.
func (p *pool) memberFrom(n *memberlist.Node) Member {
	mem := Member{NodeID: n.Name, State: stateName(memberlist.StateAlive)}
	p.mu.Lock()
	if known, ok := p.members[n.Name]; ok {
		mem = known.Member
	}
	p.mu.Unlock()
	return mem
}

// pushAll pushes recs to one member over record-push streams of the zone's tunnel, at most
// maxPushRecords per stream.
func (m *Membership) pushAll(zone string, to Member, recs [][]byte) error {
	for chunk := range slices.Chunk(recs, maxPushRecords) {
		if err := m.pushTo(zone, to, chunk...); err != nil {
			return err
		}
	}
	return nil
}
