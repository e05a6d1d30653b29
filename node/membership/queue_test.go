package membership

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/overlay/gossip"
	"github.com/ute-project/ute/overlay/gossip/gossiptest"
	"github.com/ute-project/ute/overlay/tunnel"
)

var errInjected = errors.New("test: dial failed (injected)")

// flakyDialer is a node's endpoint as its Membership sees it, with faults injected: while cold is
// set no tunnel is live (every packet needs a dial), and the next `fail` dials fail.
type flakyDialer struct {
	*tunnel.Endpoint
	cold  atomic.Bool
	fail  atomic.Int32
	dials atomic.Int32
}

func (d *flakyDialer) LiveTunnel(nodeID, zone string) (*tunnel.Tunnel, bool) {
	if d.cold.Load() {
		return nil, false
	}
	return d.Endpoint.LiveTunnel(nodeID, zone)
}

func (d *flakyDialer) Dial(ctx context.Context, addr netip.AddrPort, nodeID, zone string) (*tunnel.Tunnel, error) {
	if d.cold.Load() {
		d.dials.Add(1)
		if d.fail.Add(-1) >= 0 {
			return nil, errInjected
		}
	}
	return d.Endpoint.Dial(ctx, addr, nodeID, zone)
}

// quietTiming leaves the pool's own record rounds (20 ms) as the only way a record travels within
// seconds: memberlist's gossip and probes every minute, push/pull every hour.
func quietTiming() Timing {
	t := FastTiming()
	t.MemberGossipInterval = time.Minute
	t.ProbeInterval, t.ProbeTimeout = time.Minute, time.Second
	t.PushPullInterval = time.Hour
	return t
}

// joinChain joins each member through every member before it (memberlist's own gossip is too slow
// in quietTiming to spread joins).
func joinChain(t *testing.T, ms []*member, zone string) {
	t.Helper()
	for i := 1; i < len(ms); i++ {
		var seeds []Seed
		for _, s := range ms[:i] {
			seeds = append(seeds, seedOf(s))
		}
		_, err := ms[i].m.Join(ctxT(t), zone, seeds)
		require.NoError(t, err)
	}
	waitMembers(t, ms, zone, len(ms), 5*time.Second)
}

// TestDroppedPacketsDoNotSpendRetransmits: the publisher's first packets are dropped before they
// leave it (their dials fail), and the record still reaches every member by gossip. With
// memberlist's queue the two transmissions the record is allowed here (RetransmitMult 2 at 3
// members) were spent on the two dropped packets, and with push/pull an hour away and no
// re-broadcast, no member ever got it (the 1,000-node simulation's stall in miniature: most
// record packets lost to dials that got no handshake slot, the epidemic died out).
func TestDroppedPacketsDoNotSpendRetransmits(t *testing.T) {
	auth := gossiptest.NewAuthority(t, td)
	sg := newSigner(t)
	timing := quietTiming()
	timing.RetransmitMult = 2 // 2 · ⌈log10(3+1)⌉ = 2 transmissions: one per other member
	pub, ms := flakyPublisher(t, auth, sg, timing)
	require.Equal(t, 2, retransmitLimit(timing.RetransmitMult, 3))

	pub.cold.Store(true)
	pub.fail.Store(2)
	raw := sg.record(t, 200)
	ms[0].store.put("z", raw)
	start := time.Now()
	require.NoError(t, ms[0].m.Publish(raw, "z"))
	// The failed dials hold their members back for the transport's RedialAfter (1 s).
	took := waitHeld(t, ms, raw, start, 5*time.Second)
	t.Logf("every member held the record %s after Publish, past 2 failed dials", took)
	tr, err := ms[0].m.Transport("z")
	require.NoError(t, err)
	st := tr.Stats()
	assert.GreaterOrEqual(t, st.DialFailures, uint64(2), "the first packets were dropped at their dials")
	assert.GreaterOrEqual(t, st.PacketsDropped, uint64(2))
	for _, m := range ms[1:] {
		assert.Zero(t, m.m.Stats().RecordsViaState, "%s got it by gossip, not push/pull", m.Name)
	}
	require.Eventually(t, func() bool { return ms[0].m.Queued("z") == 0 }, 2*time.Second, 10*time.Millisecond,
		"delivered to every member: nothing left to send")
}

// flakyPublisher starts three joined members of zone z, the first (the publisher) dialing
// through a flakyDialer the test controls.
func flakyPublisher(t *testing.T, auth *gossiptest.Authority, sg signer, timing Timing) (*flakyDialer, []*member) {
	t.Helper()
	var pub *flakyDialer
	var ms []*member
	for i := range 3 {
		opt := clusterOpts{timing: timing, noRequeue: true}
		if i == 0 {
			opt.dialer = func(e *tunnel.Endpoint) gossip.Dialer { pub = &flakyDialer{Endpoint: e}; return pub }
		}
		ms = append(ms, startMember(t, auth, sg, fmt.Sprintf("n%d", i), []string{"z"}, gossiptest.NodeOptions{}, opt))
	}
	joinChain(t, ms, "z")
	return pub, ms
}

// TestRecordGivenUpWhenUnreachable: a publisher whose every dial fails stops after a bounded
// number of lost packets (push/pull reconciles later) instead of dialing forever.
func TestRecordGivenUpWhenUnreachable(t *testing.T) {
	auth := gossiptest.NewAuthority(t, td)
	sg := newSigner(t)
	timing := quietTiming()
	timing.RetransmitMult = 1 // given up after 4 lost packets, 2 a second (RedialAfter)
	pub, ms := flakyPublisher(t, auth, sg, timing)

	pub.cold.Store(true)
	pub.fail.Store(1 << 30)
	raw := sg.record(t, 200)
	ms[0].store.put("z", raw)
	require.NoError(t, ms[0].m.Publish(raw, "z"))
	limit := retransmitLimit(timing.RetransmitMult, 3)
	// Each failed dial holds its member back for a second; the record is given up after
	// limit·maxTriesMult lost packets.
	require.Eventually(t, func() bool { return ms[0].m.Queued("z") == 0 }, time.Duration(limit*maxTriesMult+2)*time.Second,
		20*time.Millisecond, "the record is given up")
	assert.LessOrEqual(t, int(pub.dials.Load()), limit*maxTriesMult, "at most limit·maxTriesMult dials")
	assert.False(t, ms[1].store.holds("z", raw))
}

// TestForgedRecordsByPushPullRefused: a member whose push/pull state carries records that are
// not signed, signed by another authority, or altered: the joining node's store refuses each of
// them (the same Records.Add a gossiped record goes through), counts them, keeps none and
// re-broadcasts none; a good record in the same state is taken and counted as catch-up. Pushed
// as a record sync pushes them, they are refused the same way.
func TestForgedRecordsByPushPullRefused(t *testing.T) {
	auth := gossiptest.NewAuthority(t, td)
	sg := newSigner(t)
	attacker := startMember(t, auth, sg, "attacker", []string{"z"}, gossiptest.NodeOptions{}, clusterOpts{timing: quietTiming()})
	victim := startMember(t, auth, sg, "victim", []string{"z"}, gossiptest.NodeOptions{}, clusterOpts{timing: quietTiming()})
	other := newSigner(t)
	forged := [][]byte{
		[]byte("not signed at all, and long enough to pass for a signature and a body................"),
		other.record(t, 100),
		append(sg.record(t, 100)[:80], 0xff, 0xfe),
	}
	for _, b := range forged {
		attacker.store.put("z", b) // put keeps it unverified: the attacker's state carries it
	}
	good := sg.record(t, 100)
	attacker.store.put("z", good)

	_, err := victim.m.Join(ctxT(t), "z", []Seed{seedOf(attacker)}) // a join is a push/pull
	require.NoError(t, err)
	require.Eventually(t, func() bool { return victim.store.holds("z", good) }, 5*time.Second, 10*time.Millisecond)
	st := victim.m.Stats()
	assert.Equal(t, uint64(len(forged)), st.RecordsDropped)
	assert.Equal(t, uint64(1), st.RecordsViaState)
	assert.Equal(t, uint64(1), st.Rebroadcasts, "only the good record is passed on")
	assert.Equal(t, 1, victim.store.total())
	for _, b := range forged {
		assert.False(t, victim.store.holds("", b))
	}
	victim.store.mu.Lock()
	assert.Equal(t, len(forged), victim.store.refused)
	victim.store.mu.Unlock()

	// The same records pushed as a probe's record sync pushes them (record-push streams): refused
	// again by the same Records.Add, none kept.
	for i := range forged {
		forged[i] = append(forged[i], byte(i)) // new bytes: past the seen-set, to the store
	}
	to := Member{NodeID: victim.ID, Addr: victim.Addr}
	require.NoError(t, attacker.m.pushAll("z", to, forged))
	assert.Equal(t, uint64(2*len(forged)), victim.m.Stats().RecordsDropped)
	assert.Equal(t, 1, victim.store.total())
}

// TestRecordQueue: a transmission counts only when handed on; a member that got a copy is not
// sent another; a dropped packet frees its member for a later round; a record is done at its
// limit, after limit·maxTriesMult drops, or once every member has it.
func TestRecordQueue(t *testing.T) {
	members := []Member{{NodeID: "a"}, {NodeID: "b"}, {NodeID: "c"}, {NodeID: "d"}}
	first := func(c []Member, k int) []Member { return c[:min(k, len(c))] }
	var q recordQueue
	q.add([]byte("r"))
	plan := q.round(members, nil, 3, 2, first)
	require.Len(t, plan, 2)
	assert.Equal(t, "a", plan[0].member.NodeID)
	q.done(plan[0], true)
	q.done(plan[1], false) // b's packet dropped here
	plan = q.round(members, nil, 3, 2, first)
	require.Len(t, plan, 2)
	assert.Equal(t, []string{"b", "c"}, []string{plan[0].member.NodeID, plan[1].member.NodeID}, "a has it; b may be tried again")
	q.done(plan[0], true)
	// One in flight (c) and two delivered: the budget of 3 is covered, nothing new is planned.
	assert.Empty(t, q.round(members, nil, 3, 2, first))
	q.done(plan[1], true)
	assert.Empty(t, q.round(members, nil, 3, 2, first))
	assert.Zero(t, q.len(), "delivered 3 times: done")

	q.add([]byte("s"))
	for range 2 * maxTriesMult {
		for _, s := range q.round(members, nil, 2, 1, first) {
			q.done(s, false)
		}
	}
	assert.Empty(t, q.round(members, nil, 2, 1, first))
	assert.Zero(t, q.len(), "dropped limit·maxTriesMult times: given up")

	q.add([]byte("t"))
	for _, s := range q.round(members[:1], nil, 9, 3, first) {
		q.done(s, true)
	}
	assert.Empty(t, q.round(members[:1], nil, 9, 3, first))
	assert.Zero(t, q.len(), "every member has it: done below the limit")

	// Members named in skip (this node, revoked ones) are never candidates, and the members
	// passed in (the pool's shared snapshot) are left as they were.
	q.add([]byte("u"))
	shared := slices.Clone(members)
	plan = q.round(shared, []string{"a", "c"}, 9, 3, func(c []Member, k int) []Member {
		slices.Reverse(c) // pick may reorder its scratch list
		return c[:min(k, len(c))]
	})
	require.Len(t, plan, 2)
	assert.Equal(t, []string{"d", "b"}, []string{plan[0].member.NodeID, plan[1].member.NodeID})
	assert.Equal(t, members, shared)
}

// TestProbeAckSyncsRecords: a member that missed every gossip copy of a record (its transport was
// partitioned while the record spread; push/pull an hour away) gets it within a few probe
// intervals: a member that holds it probes it, sees a different record digest in the ack and
// pushes its records, or it probes a holder, sees a digest counting more records than its own and
// pulls them by a push/pull with that member.
func TestProbeAckSyncsRecords(t *testing.T) {
	auth := gossiptest.NewAuthority(t, td)
	sg := newSigner(t)
	timing := FastTiming()
	timing.ProbeInterval, timing.ProbeTimeout = 200*time.Millisecond, 100*time.Millisecond
	timing.PushPullInterval = time.Hour
	var ms []*member
	for i := range 3 {
		ms = append(ms, startMember(t, auth, sg, fmt.Sprintf("n%d", i), []string{"z"}, gossiptest.NodeOptions{}, clusterOpts{timing: timing}))
	}
	joinChain(t, ms, "z")
	cut := ms[2]
	tr, err := cut.m.Transport("z")
	require.NoError(t, err)
	tr.SetPartitioned(true)
	raw := sg.record(t, 200)
	ms[0].store.put("z", raw)
	require.NoError(t, ms[0].m.Publish(raw, "z"))
	waitHeld(t, ms[:2], raw, time.Now(), 2*time.Second)
	require.Eventually(t, func() bool { return ms[0].m.Queued("z") == 0 && ms[1].m.Queued("z") == 0 }, 3*time.Second, 10*time.Millisecond)
	// The sends over open tunnels are not queued: one may still be in flight, or wait for a dial,
	// when the queues are empty. Let them land (and be dropped) while the member is still cut off.
	time.Sleep(500 * time.Millisecond)
	require.False(t, cut.store.holds("z", raw), "gossip never reached the partitioned member")

	tr.SetPartitioned(false)
	start := time.Now()
	took := waitHeld(t, []*member{cut}, raw, start, 3*time.Second)
	t.Logf("the partitioned member held the record %s after the heal", took)
	assert.Positive(t, ms[0].m.Stats().RecordSyncs+ms[1].m.Stats().RecordSyncs+cut.m.Stats().RecordSyncs,
		"a probe's ack triggered a sync (push/pull is an hour away)")
}

// TestRecordDigest: the digest is the set's, not the order's, and tells sets apart.
func TestRecordDigest(t *testing.T) {
	a, b, c := []byte("a"), []byte("b"), []byte("c")
	d := recordDigest([][]byte{a, b})
	require.Len(t, d, digestLen)
	assert.Equal(t, d, recordDigest([][]byte{b, a}))
	assert.NotEqual(t, d, recordDigest([][]byte{a, c}))
	assert.NotEqual(t, d, recordDigest([][]byte{a, b, c}))
	assert.Equal(t, []byte{digestVersion, 0, 0, 0, 2}, d[:5])
}

// linkDialer is a node's endpoint limited, while on is set, to the tunnels of the members in
// links: others look tunnel-less and every dial to them fails, so a record reaches them only
// through a member that holds a tunnel with them.
type linkDialer struct {
	*tunnel.Endpoint
	on    atomic.Bool
	links map[string]bool
}

func (d *linkDialer) LiveTunnel(nodeID, zone string) (*tunnel.Tunnel, bool) {
	if d.on.Load() && !d.links[nodeID] {
		return nil, false
	}
	return d.Endpoint.LiveTunnel(nodeID, zone)
}

func (d *linkDialer) Dial(ctx context.Context, addr netip.AddrPort, nodeID, zone string) (*tunnel.Tunnel, error) {
	if d.on.Load() && !d.links[nodeID] {
		return nil, errInjected
	}
	return d.Endpoint.Dial(ctx, addr, nodeID, zone)
}

// TestNewRecordFloodsOpenTunnels: a member that takes a record for the first time sends it at
// once over every tunnel it holds, not only the publisher. The publisher n0 holds a tunnel with
// n1 only; n1 holds tunnels with n2 and n3; every other dial fails. Each gossip round sends to one
// member, and the next round is a minute away: without the relay's sends over its open tunnels,
// n1's round reaches at most one of n2 and n3 in that minute.
func TestNewRecordFloodsOpenTunnels(t *testing.T) {
	auth := gossiptest.NewAuthority(t, td)
	sg := newSigner(t)
	timing := quietTiming()
	timing.GossipInterval = time.Minute
	timing.GossipNodes = 1
	names := []string{"n0", "n1", "n2", "n3"}
	links := map[string][]string{"n0": {"n1"}, "n1": {"n0", "n2", "n3"}, "n2": {"n1"}, "n3": {"n1"}}
	var ms []*member
	var ds []*linkDialer
	for _, name := range names {
		d := &linkDialer{links: map[string]bool{}}
		ds = append(ds, d)
		opt := clusterOpts{timing: timing, dialer: func(e *tunnel.Endpoint) gossip.Dialer { d.Endpoint = e; return d }}
		ms = append(ms, startMember(t, auth, sg, name, []string{"z"}, gossiptest.NodeOptions{}, opt))
	}
	joinChain(t, ms, "z")
	byName := map[string]*member{}
	for _, m := range ms {
		byName[m.Name] = m
	}
	for i, name := range names {
		for _, l := range links[name] {
			peer := byName[l]
			// The tunnel the link stands for is open (joins opened them; reopen if one closed).
			_, err := ds[i].Endpoint.Dial(ctxT(t), peer.Addr, peer.ID, "z")
			require.NoError(t, err)
			ds[i].links[peer.ID] = true
		}
	}
	for _, d := range ds {
		d.on.Store(true)
	}

	raw := sg.record(t, 200)
	ms[0].store.put("z", raw)
	start := time.Now()
	require.NoError(t, ms[0].m.Publish(raw, "z"))
	took := waitHeld(t, ms, raw, start, 5*time.Second)
	t.Logf("every member held the record %s after Publish, through n1's open tunnels", took)
	assert.GreaterOrEqual(t, ms[1].m.Stats().DirectSends, uint64(2), "n1 sent it to n2 and n3 over their tunnels")
	for _, m := range ms[2:] {
		assert.Zero(t, m.m.Stats().RecordsViaState, "%s got it by gossip, not push/pull", m.Name)
		tr, err := m.m.Transport("z")
		require.NoError(t, err)
		assert.NotZero(t, tr.Stats().PacketsTaken, "%s took the record before memberlist's handler queue", m.Name)
		// A member may have taken the record from a direct push first (then no gossip time).
		if st := m.m.Stats(); !st.LastGossipArrival.IsZero() {
			arrived, dequeued := st.LastGossipArrival, st.LastGossipDequeued
			assert.True(t, arrived.After(start) && !arrived.After(time.Now()), "%s: the record's packet arrived at %v, after Publish", m.Name, arrived)
			assert.False(t, dequeued.Before(arrived) || dequeued.After(time.Now()), "%s: taken from the worker's queue at %v, after its arrival", m.Name, dequeued)
		}
	}
	assert.Zero(t, ms[0].m.Stats().LastGossipArrival, "the publisher took no record from a gossip packet")
}

// TestQueuedRecordGoesOverANewTunnel: a record still queued for gossip is sent at once over a
// tunnel that opens after the record was taken, whichever end dialed it. The publisher n0 holds no
// tunnel with n1 and its first round's dial to n1 fails; then n1 dials n0. The next round is a
// minute away and memberlist's probes and push/pull further still: without the send on tunnel up,
// n1 would wait that minute with a tunnel to a holder of the record open all along.
func TestQueuedRecordGoesOverANewTunnel(t *testing.T) {
	auth := gossiptest.NewAuthority(t, td)
	sg := newSigner(t)
	timing := quietTiming()
	timing.GossipInterval = time.Minute
	timing.GossipNodes = 1
	var ms []*member
	var ds []*flakyDialer
	for _, name := range []string{"n0", "n1"} {
		d := &flakyDialer{}
		ds = append(ds, d)
		opt := clusterOpts{timing: timing, dialer: func(e *tunnel.Endpoint) gossip.Dialer { d.Endpoint = e; return d }}
		ms = append(ms, startMember(t, auth, sg, name, []string{"z"}, gossiptest.NodeOptions{}, opt))
	}
	joinChain(t, ms, "z")
	n0, n1 := ms[0], ms[1]
	// The join's tunnels are closed: no tunnel between them when the record is published.
	for _, pair := range [][2]*member{{n0, n1}, {n1, n0}} {
		if tun, ok := pair[0].Endpoint.LiveTunnel(pair[1].ID, "z"); ok {
			require.NoError(t, tun.Close())
		}
	}
	require.Eventually(t, func() bool {
		_, a := n0.Endpoint.LiveTunnel(n1.ID, "z")
		_, b := n1.Endpoint.LiveTunnel(n0.ID, "z")
		return !a && !b
	}, 5*time.Second, 5*time.Millisecond, "the join's tunnels close")

	ds[0].fail.Store(1)
	ds[0].cold.Store(true)
	raw := sg.record(t, 200)
	n0.store.put("z", raw)
	require.NoError(t, n0.m.Publish(raw, "z"))
	tr, err := n0.m.Transport("z")
	require.NoError(t, err)
	require.Eventually(t, func() bool { return tr.Stats().DialFailures == 1 }, 5*time.Second, 5*time.Millisecond,
		"the first round's packet to n1 is dropped at its failed dial")
	require.Equal(t, 1, n0.m.Queued("z"), "the record stays queued for the next round, a minute away")
	ds[0].cold.Store(false)

	start := time.Now()
	_, err = n1.Endpoint.Dial(ctxT(t), n0.Addr, n0.ID, "z")
	require.NoError(t, err)
	took := waitHeld(t, ms, raw, start, 5*time.Second)
	t.Logf("n1 held the record %s after it dialed n0", took)
	assert.Equal(t, uint64(1), n0.m.Stats().TunnelUpSends, "n0 sent its queued record over the new tunnel")
	assert.Zero(t, n1.m.Stats().RecordsViaState, "n1 got it by gossip, not push/pull")
	assert.Zero(t, n1.m.Stats().TunnelUpSends, "n1 had nothing queued to send")

	// A node of the zone that is not a member of n0's pool (it never joined) dials n0: the record,
	// still queued at n0, is not sent to it.
	n2 := startMember(t, auth, sg, "n2", []string{"z"}, gossiptest.NodeOptions{}, clusterOpts{timing: timing})
	_, err = n2.Endpoint.Dial(ctxT(t), n0.Addr, n0.ID, "z")
	require.NoError(t, err)
	require.Equal(t, 1, n0.m.Queued("z"), "the record is still queued at n0")
	time.Sleep(200 * time.Millisecond) // n1 held it within tens of milliseconds of its dial
	assert.Equal(t, uint64(1), n0.m.Stats().TunnelUpSends, "nothing sent to a non-member")
	assert.False(t, n2.store.holds("z", raw), "n2 did not get the record")
}
