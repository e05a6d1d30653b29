package membership

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/overlay/gossip/gossiptest"
	"github.com/ute-project/ute/overlay/tunnel"
)

func ctxT(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// TestDiscoveryFromOneSeed: three nodes that know only one seed find each other, and a record
// published at one reaches all within a second.
func TestDiscoveryFromOneSeed(t *testing.T) {
	auth := gossiptest.NewAuthority(t, td)
	sg := newSigner(t)
	var ms []*member
	for i := range 3 {
		ms = append(ms, startMember(t, auth, sg, fmt.Sprintf("n%d", i), []string{"z"}, gossiptest.NodeOptions{}, clusterOpts{}))
	}
	joinAll(t, ms)
	waitMembers(t, ms, "z", 3, 5*time.Second)
	// The third node learned the second from gossip, not from a seed.
	got := ms[2].m.Members("z")
	assert.Equal(t, []string{ms[0].ID, ms[1].ID, ms[2].ID}, []string{got[0].NodeID, got[1].NodeID, got[2].NodeID})
	assert.Equal(t, ms[1].Addr, got[1].Addr)
	assert.Equal(t, "alive", got[1].State)

	raw := sg.record(t, 200)
	ms[2].store.put("z", raw)
	start := time.Now()
	require.NoError(t, ms[2].m.Publish(raw, "z"))
	took := waitHeld(t, ms, raw, start, heldWithin)
	t.Logf("3 nodes: every member held the record %s after Publish", took)
	assert.Zero(t, ms[0].m.Stats().RecordsDropped)
}

// TestTwoZonesTwentyNodes: a record published in zone a reaches every zone-a member within a
// second and never a node that holds only zone b, and the reverse.
func TestTwoZonesTwentyNodes(t *testing.T) {
	if testing.Short() {
		t.Skip("20 nodes")
	}
	auth := gossiptest.NewAuthority(t, td)
	sg := newSigner(t)
	var ms []*member
	for i := range 20 {
		zones := []string{"a"}
		switch {
		case i >= 18:
			zones = []string{"a", "b"}
		case i >= 9:
			zones = []string{"b"}
		}
		ms = append(ms, startMember(t, auth, sg, fmt.Sprintf("n%02d", i), zones, gossiptest.NodeOptions{}, clusterOpts{}))
	}
	t0 := time.Now()
	joinAll(t, ms)
	t.Logf("joined in %s", time.Since(t0))
	za, zb := inZone(ms, "a"), inZone(ms, "b")
	require.Len(t, za, 11)
	require.Len(t, zb, 11)
	// Discovery of 20 nodes under -race on 2 cores shared with other packages: generous.
	waitMembers(t, ms[:9], "a", 11, 30*time.Second)
	waitMembers(t, ms[9:18], "b", 11, 30*time.Second)
	waitMembers(t, ms[18:], "a", 11, 30*time.Second)
	waitMembers(t, ms[18:], "b", 11, 30*time.Second)
	t.Logf("converged in %s", time.Since(t0))

	for _, tc := range []struct {
		zone      string
		publisher *member
		members   []*member
		others    []*member
	}{
		{"a", ms[0], za, ms[9:18]},
		{"b", ms[9], zb, ms[:9]},
	} {
		raw := sg.record(t, 150)
		tc.publisher.store.put(tc.zone, raw)
		start := time.Now()
		require.NoError(t, tc.publisher.m.Publish(raw, tc.zone))
		took := waitHeld(t, tc.members, raw, start, heldWithin)
		t.Logf("zone %s: all %d members held the record %s after Publish", tc.zone, len(tc.members), took)
		// Give stray gossip time to arrive anywhere it could.
		time.Sleep(300 * time.Millisecond)
		for _, o := range tc.others {
			assert.False(t, o.store.holds("", raw), "%s (not in zone %s) received its record", o.Name, tc.zone)
		}
		for _, m := range tc.members {
			assert.False(t, m.store.holds(otherZone(tc.zone), raw), "%s filed zone %s's record under another zone", m.Name, tc.zone)
		}
	}
	for _, o := range ms[:18] {
		assert.Zero(t, o.Mux.Stats().NoTransport, "%s got gossip for a zone it has no pool for", o.Name)
		assert.Zero(t, o.m.Stats().RecordsDropped)
	}
}

func otherZone(z string) string {
	if z == "a" {
		return "b"
	}
	return "a"
}

// TestPartitionCatchUp: a member that misses a record while partitioned gets it after the
// partition heals, once every broadcast queue has drained: from push/pull or a probe's sync.
func TestPartitionCatchUp(t *testing.T) {
	auth := gossiptest.NewAuthority(t, td)
	sg := newSigner(t)
	var ms []*member
	for i := range 4 {
		ms = append(ms, startMember(t, auth, sg, fmt.Sprintf("n%d", i), []string{"z"}, gossiptest.NodeOptions{}, clusterOpts{}))
	}
	joinAll(t, ms)
	waitMembers(t, ms, "z", 4, 5*time.Second)

	cut := ms[3]
	tr, err := cut.m.Transport("z")
	require.NoError(t, err)
	tr.SetPartitioned(true)

	raw := sg.record(t, 120)
	ms[0].store.put("z", raw)
	require.NoError(t, ms[0].m.Publish(raw, "z"))
	waitHeld(t, ms[:3], raw, time.Now(), 2*time.Second)
	// Long enough for every retransmission to be spent (4 × log(5) rounds of 20 ms).
	time.Sleep(600 * time.Millisecond)
	assert.False(t, cut.store.holds("z", raw), "the partitioned member must not have the record yet")

	tr.SetPartitioned(false)
	waitHeld(t, []*member{cut}, raw, time.Now(), 5*time.Second)
	// Repaired by push/pull or by a probe's record sync (TestProbeAckSyncsRecords), whichever
	// comes first: both run every second or faster here.
	var syncs uint64
	for _, m := range ms[:3] {
		syncs += m.m.Stats().RecordSyncs
	}
	assert.Positive(t, cut.m.Stats().RecordsViaState+syncs, "the record arrived by push/pull or a record sync")
}

// TestAttackersCannotJoin: a node of a foreign trust domain, a node whose certificate lacks the
// zone, and a revoked node are refused at the handshake when they try to join; the pool's member
// list never names them.
func TestAttackersCannotJoin(t *testing.T) {
	auth := gossiptest.NewAuthority(t, td)
	foreign := gossiptest.NewAuthority(t, "evil.internal")
	sg := newSigner(t)
	var pool []*member
	for i := range 2 {
		pool = append(pool, startMember(t, auth, sg, fmt.Sprintf("n%d", i), []string{"z"}, gossiptest.NodeOptions{}, clusterOpts{}))
	}
	joinAll(t, pool)
	waitMembers(t, pool, "z", 2, 5*time.Second)

	revoked := "mallory-revoked"
	for _, p := range pool {
		p.Verifier.Revoke(auth.NodeID(revoked))
	}
	cases := []struct {
		name string
		opt  gossiptest.NodeOptions
		want error // what the seed's verifier refused with
	}{
		// Each attacker trusts the real authority (its certificate is public), so it goes
		// through with the handshake and the pool's refusal is what stops it.
		{"mallory-foreign", gossiptest.NodeOptions{Authority: foreign}, identity.ErrTrustDomain},
		{"mallory-otherzone", gossiptest.NodeOptions{CertZones: []string{"y"}}, gossiptest.ErrNotInZone},
		{revoked, gossiptest.NodeOptions{}, gossiptest.ErrRevoked},
	}
	var attackers []string
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			m := startMember(t, auth, sg, tc.name, []string{"z"}, tc.opt, clusterOpts{})
			attackers = append(attackers, m.ID)
			n, err := m.m.Join(ctxT(t), "z", []Seed{seedOf(pool[0]), seedOf(pool[1])})
			require.ErrorIs(t, err, tunnel.ErrRefusedByPeer)
			assert.Zero(t, n)
			refusals := pool[0].Refusals()
			require.NotEmpty(t, refusals)
			require.ErrorIs(t, refusals[0].Err, tunnel.ErrPeerRefused)
			require.ErrorIs(t, refusals[0].Err, tc.want)
			assert.Len(t, m.m.Members("z"), 1, "the attacker learned no member")
		})
	}
	// Let gossip run a while: nobody ever names an attacker.
	deadline := time.Now().Add(500 * time.Millisecond)
	for time.Now().Before(deadline) {
		for _, p := range pool {
			for _, mem := range p.m.Members("z") {
				assert.NotContains(t, attackers, mem.NodeID)
			}
			assert.Len(t, p.m.Members("z"), 2)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestRevokedMemberLeavesList: a member revoked after it joined is no longer listed, and its
// alive claims are refused.
func TestRevokedMemberLeavesList(t *testing.T) {
	auth := gossiptest.NewAuthority(t, td)
	sg := newSigner(t)
	var ms []*member
	for i := range 3 {
		ms = append(ms, startMember(t, auth, sg, fmt.Sprintf("n%d", i), []string{"z"}, gossiptest.NodeOptions{}, clusterOpts{}))
	}
	joinAll(t, ms)
	waitMembers(t, ms, "z", 3, 5*time.Second)
	bad := ms[2]
	for _, m := range ms[:2] {
		m.Verifier.Revoke(bad.ID)
		m.Endpoint.ClosePeer(bad.ID)
	}
	waitMembers(t, ms[:2], "z", 2, 5*time.Second)
	require.Eventually(t, func() bool { return ms[0].m.Stats().NamesRefused+ms[1].m.Stats().NamesRefused > 0 }, 5*time.Second, 10*time.Millisecond)
}

// TestBadRecordsDroppedAndCounted: unsigned, truncated and wrongly signed records gossiped by a
// member are refused by every receiver's store, counted, and never re-broadcast.
func TestBadRecordsDroppedAndCounted(t *testing.T) {
	auth := gossiptest.NewAuthority(t, td)
	sg := newSigner(t)
	var ms []*member
	for i := range 3 {
		ms = append(ms, startMember(t, auth, sg, fmt.Sprintf("n%d", i), []string{"z"}, gossiptest.NodeOptions{}, clusterOpts{}))
	}
	joinAll(t, ms)
	waitMembers(t, ms, "z", 3, 5*time.Second)

	other := newSigner(t)
	bad := [][]byte{
		[]byte("not signed at all"),
		other.record(t, 100),                       // signed by a key the store does not trust
		append(sg.record(t, 100)[:80], 0xff, 0xfe), // a good record with its body rewritten
	}
	for _, b := range bad {
		// A misbehaving member publishes without storing (its store would refuse).
		require.NoError(t, ms[0].m.Publish(b, "z"))
	}
	good := sg.record(t, 100)
	ms[0].store.put("z", good)
	require.NoError(t, ms[0].m.Publish(good, "z"))
	waitHeld(t, ms, good, time.Now(), 2*time.Second)
	require.Eventually(t, func() bool {
		return ms[1].m.Stats().RecordsDropped >= 3 && ms[2].m.Stats().RecordsDropped >= 3
	}, 3*time.Second, 10*time.Millisecond)
	for _, m := range ms[1:] {
		st := m.m.Stats()
		assert.Equal(t, uint64(1), st.Rebroadcasts, "%s re-broadcast only the good record", m.Name)
		assert.Equal(t, 1, m.store.total())
	}
}

// TestLargeRecordSpreads: a record too large for a gossip packet reaches every member by direct
// push, and a member that joins later gets it by push/pull.
func TestLargeRecordSpreads(t *testing.T) {
	auth := gossiptest.NewAuthority(t, td)
	sg := newSigner(t)
	var ms []*member
	for i := range 3 {
		ms = append(ms, startMember(t, auth, sg, fmt.Sprintf("n%d", i), []string{"z"}, gossiptest.NodeOptions{}, clusterOpts{}))
	}
	joinAll(t, ms)
	waitMembers(t, ms, "z", 3, 5*time.Second)

	raw := sg.record(t, 8000)
	ms[0].store.put("z", raw)
	start := time.Now()
	require.NoError(t, ms[0].m.Publish(raw, "z"))
	took := waitHeld(t, ms, raw, start, heldWithin)
	t.Logf("8 KB record pushed to every member in %s", took)
	require.Eventually(t, func() bool { return ms[0].m.Stats().DirectPushes == 2 }, 2*time.Second, 10*time.Millisecond)

	late := startMember(t, auth, sg, "late", []string{"z"}, gossiptest.NodeOptions{}, clusterOpts{})
	_, err := late.m.Join(ctxT(t), "z", []Seed{seedOf(ms[1])})
	require.NoError(t, err)
	waitHeld(t, []*member{late}, raw, time.Now(), 3*time.Second)
	assert.Equal(t, uint64(1), late.m.Stats().RecordsViaState)
}

// TestNamesRefused: alive and merge claims for names that are not nodes of this trust domain,
// or that are revoked, are refused.
func TestNamesRefused(t *testing.T) {
	auth := gossiptest.NewAuthority(t, td)
	m := startMember(t, auth, newSigner(t), "n0", []string{"z"}, gossiptest.NodeOptions{}, clusterOpts{})
	m.Verifier.Revoke(auth.NodeID("gone"))
	p, err := m.m.pool("z")
	require.NoError(t, err)
	for name, want := range map[string]error{
		"spiffe://evil.internal/node/x":            ErrName,
		"spiffe://acme.internal/zone/z/agent/x":    ErrName,
		"spiffe://acme.internal":                   ErrName,
		"127.0.0.1:7946":                           ErrName,
		"":                                         ErrName,
		auth.NodeID("gone"):                        ErrRevokedMember,
		"spiffe://acme.internal/node/UPPER":        ErrName,
		"spiffe://acme.internal/node/x?query=true": ErrName,
	} {
		require.ErrorIs(t, p.NotifyAlive(mlNode(name)), want, name)
	}
	require.NoError(t, p.NotifyAlive(mlNode(auth.NodeID("fine"))))
	require.ErrorIs(t, p.NotifyMerge(nodes(auth.NodeID("fine"), "spiffe://evil.internal/node/x")), ErrName)
	// A revoked name in a peer's list does not block the join; NotifyAlive drops it alone.
	require.NoError(t, p.NotifyMerge(nodes(auth.NodeID("fine"), auth.NodeID("gone"))))
}

// TestMalformedGossipCounted: gossip messages and states that do not parse are counted and
// reach no store.
func TestMalformedGossipCounted(t *testing.T) {
	auth := gossiptest.NewAuthority(t, td)
	m := startMember(t, auth, newSigner(t), "n0", []string{"z"}, gossiptest.NodeOptions{}, clusterOpts{})
	p, err := m.m.pool("z")
	require.NoError(t, err)
	p.NotifyMsg(nil)
	p.NotifyMsg([]byte{9, 1, 2})
	p.NotifyMsg(append([]byte{msgRecord}, make([]byte, 70<<10)...))
	p.MergeRemoteState([]byte{1, 0, 0, 0, 9}, false)
	p.MergeRemoteState([]byte{2, 0, 0, 0, 0}, false)
	assert.Equal(t, uint64(5), m.m.Stats().MessagesMalformed)
	assert.Zero(t, m.store.total())
}

// TestRecordPacketsTakenBeforeMemberlist: a packet that is a record message goes straight to the
// pool (seen-set, verification, store), not into memberlist's handler queue, where user messages
// wait behind member-state messages and are dropped when it is full; every other packet, a user
// message that is not a record included, is left to memberlist. A forged record taken this way is
// refused by the store like any other.
func TestRecordPacketsTakenBeforeMemberlist(t *testing.T) {
	auth := gossiptest.NewAuthority(t, td)
	sg := newSigner(t)
	m := startMember(t, auth, sg, "n0", []string{"z"}, gossiptest.NodeOptions{}, clusterOpts{})
	p, err := m.m.pool("z")
	require.NoError(t, err)

	raw := sg.record(t, 200)
	pkt := userMessage(encodeMessage(raw))
	assert.True(t, p.take(pkt), "a record message is the pool's")
	clear(pkt) // the pool keeps a copy, not the tunnel's buffer
	require.Eventually(t, func() bool { return m.store.total() == 1 }, 5*time.Second, 10*time.Millisecond)
	assert.Equal(t, uint64(1), m.m.Stats().RecordsAccepted)

	for _, other := range [][]byte{
		nil,
		{userMsg},
		{userMsg, 9, 1, 2},                // a user message that is not a record: memberlist's, as before
		{2, 0, 0, 0},                      // an alive message
		{7, 1, 2},                         // a compound message
		append([]byte{msgRecord}, raw...), // a record message without memberlist's user header
	} {
		assert.False(t, p.take(other), "%x is memberlist's", other)
	}

	forged := sg.record(t, 200)
	forged[len(forged)-1] ^= 1
	assert.True(t, p.take(userMessage(encodeMessage(forged))))
	require.Eventually(t, func() bool { return m.m.Stats().RecordsDropped == 1 }, 5*time.Second, 10*time.Millisecond)
	assert.Equal(t, 1, m.store.total(), "the forged record was refused")
}

// TestStateBounded: a record set over MaxStateBytes is sent in parts, each within the cap, and
// successive states cover the whole set.
func TestStateBounded(t *testing.T) {
	sg := newSigner(t)
	var recs [][]byte
	for range 40 {
		recs = append(recs, sg.record(t, 100))
	}
	seen := map[string]bool{}
	for start := range 40 {
		b, skipped := encodeState(recs, start, 1000)
		require.LessOrEqual(t, len(b), 1000)
		require.Positive(t, skipped)
		got, err := parseState(b, 1000, 64<<10)
		require.NoError(t, err)
		for _, r := range got {
			seen[string(r)] = true
		}
	}
	assert.Len(t, seen, 40)
}

func mlNode(name string) *memberlist.Node { return &memberlist.Node{Name: name} }

func nodes(names ...string) []*memberlist.Node {
	out := make([]*memberlist.Node, len(names))
	for i, n := range names {
		out[i] = mlNode(n)
	}
	return out
}

// TestChangesNotifiesJoinAndLeave: a member joining and a member leaving each post a notice on
// Changes, and a pool at rest posts none (a caller waiting on it does no work).
func TestChangesNotifiesJoinAndLeave(t *testing.T) {
	auth := gossiptest.NewAuthority(t, td)
	sg := newSigner(t)
	a := startMember(t, auth, sg, "n0", []string{"z"}, gossiptest.NodeOptions{}, clusterOpts{})
	b := startMember(t, auth, sg, "n1", []string{"z"}, gossiptest.NodeOptions{}, clusterOpts{})
	drain := func() {
		for {
			select {
			case <-a.m.Changes():
			default:
				return
			}
		}
	}
	drain()
	_, err := b.m.Join(ctxT(t), "z", []Seed{seedOf(a)})
	require.NoError(t, err)
	select {
	case <-a.m.Changes():
	case <-time.After(5 * time.Second):
		t.Fatal("no notice after a member joined")
	}
	waitMembers(t, []*member{a, b}, "z", 2, 5*time.Second)
	drain()
	// At rest: probes and acks change nothing, so nothing is posted.
	select {
	case <-a.m.Changes():
		t.Fatal("a notice without a membership change")
	case <-time.After(3 * FastTiming().ProbeInterval):
	}
	require.NoError(t, b.m.RemoveZone("z")) // b leaves the pool
	select {
	case <-a.m.Changes():
	case <-time.After(5 * time.Second):
		t.Fatal("no notice after a member left")
	}
	require.Eventually(t, func() bool { return len(a.m.Members("z")) == 1 }, 5*time.Second, 10*time.Millisecond)
}

// TestRecordsKeepTheirPaceWhenMemberlistGossipIsSlow: queued records are gossiped every
// GossipInterval by the pool's own rounds, however rarely memberlist's own gossip ticker fires
// (MemberGossipInterval, which wakes an idle node whether or not anything is queued).
// Here memberlist's round and its probes (which piggyback queued messages) come every minute,
// push/pull every hour, and re-broadcast and the publisher's direct sends are off: only the pool's
// rounds can carry the record within a second (20 ms here, 320 ms under -race on a loaded
// machine; without them it waits for memberlist's first round or probe).
func TestRecordsKeepTheirPaceWhenMemberlistGossipIsSlow(t *testing.T) {
	auth := gossiptest.NewAuthority(t, td)
	sg := newSigner(t)
	timing := FastTiming()
	timing.MemberGossipInterval = time.Minute
	timing.ProbeInterval, timing.ProbeTimeout = time.Minute, time.Second
	timing.PushPullInterval = time.Hour
	var ms []*member
	for i := range 3 {
		ms = append(ms, startMember(t, auth, sg, fmt.Sprintf("n%d", i), []string{"z"}, gossiptest.NodeOptions{},
			clusterOpts{timing: timing, noRequeue: true}))
	}
	// Each joins through every member before it: memberlist's slow rounds would take a minute to
	// spread the joins.
	for i := 1; i < len(ms); i++ {
		var seeds []Seed
		for _, s := range ms[:i] {
			seeds = append(seeds, seedOf(s))
		}
		_, err := ms[i].m.Join(ctxT(t), "z", seeds)
		require.NoError(t, err)
	}
	waitMembers(t, ms, "z", 3, 5*time.Second)
	assert.Equal(t, time.Minute, timing.memberGossip())

	raw := sg.record(t, 200)
	ms[0].store.put("z", raw)
	start := time.Now()
	require.NoError(t, ms[0].m.Publish(raw, "z"))
	took := waitHeld(t, ms, raw, start, time.Second)
	t.Logf("every member held the record %s after Publish", took)
	assert.Zero(t, ms[0].m.Stats().DirectSends, "no direct send: the pool's gossip round carried it")
}

// memberlist's own gossip period: never shorter than the records' pace.
func TestMemberGossipInterval(t *testing.T) {
	assert.Equal(t, 200*time.Millisecond, LANTiming().memberGossip(), "the LAN profile keeps memberlist's 200 ms")
	assert.Equal(t, 200*time.Millisecond, LANTiming().GossipInterval)
	lazy := LANTiming()
	lazy.MemberGossipInterval = 500 * time.Millisecond
	assert.Equal(t, 500*time.Millisecond, lazy.memberGossip())
	assert.Equal(t, FastTiming().GossipInterval, FastTiming().memberGossip(), "unset: the records' pace")
	slow := LANTiming()
	slow.GossipInterval = time.Second
	assert.Equal(t, time.Second, slow.memberGossip())
}
