package membership

import (
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sync"
	"testing"

	"github.com/hashicorp/memberlist"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/overlay/gossip/gossiptest"
)

// event is a memberlist node as the pool's delegates receive it.
func event(name string, last byte) *memberlist.Node {
	return &memberlist.Node{Name: name, Addr: net.IPv4(10, 0, 0, last), Port: 7946}
}

func ids(ms []Member) []string {
	out := make([]string, 0, len(ms))
	for _, m := range ms {
		out = append(out, m.NodeID)
	}
	return out
}

// TestMemberSnapshotFollowsChanges: the pool's shared member snapshot is rebuilt after a join, an
// address change and a leave (memberlist's events, as discovery and failure detection raise them),
// never lists a name that is not a node of this trust domain, drops a revoked member at once from
// everything callers see (Members, EachMember, NumMembers, LookupMember, the gossip round), and is
// shared unchanged between reads while nothing changes.
func TestMemberSnapshotFollowsChanges(t *testing.T) {
	auth := gossiptest.NewAuthority(t, td)
	self := startMember(t, auth, newSigner(t), "self", []string{"z"}, gossiptest.NodeOptions{}, clusterOpts{})
	m := self.m
	p, err := m.pool("z")
	require.NoError(t, err)
	before := p.snapshot()
	require.Equal(t, []string{self.ID}, ids(before))

	a, b, c := auth.NodeID("a"), auth.NodeID("b"), auth.NodeID("c")
	for i, n := range []string{c, a, b,
		"spiffe://evil.internal/node/x", // another trust domain
		"spiffe://" + td + "/agent/z/w", // an agent, not a node
		"not a spiffe id",               // not an ID at all
	} {
		p.NotifyJoin(event(n, byte(i+1)))
	}
	want := []string{a, b, c, self.ID}
	slices.Sort(want)
	assert.Equal(t, want, ids(m.Members("z")), "joined, sorted, foreign names left out")
	assert.Equal(t, []string{self.ID}, ids(before), "a snapshot already read is never changed")

	s1, s2 := p.snapshot(), p.snapshot()
	require.Len(t, s1, 4)
	assert.Same(t, &s1[0], &s2[0], "no change: the same snapshot is shared")
	assert.Equal(t, len(s1), cap(s1), "an append by a reader copies instead of writing into the snapshot")

	p.NotifyUpdate(&memberlist.Node{Name: b, Addr: net.IPv4(10, 9, 9, 9), Port: 7000})
	got, ok := m.LookupMember("z", b)
	require.True(t, ok)
	assert.Equal(t, netip.MustParseAddrPort("10.9.9.9:7000"), got.Addr, "a new address is in the next snapshot")
	assert.Equal(t, netip.MustParseAddrPort("10.0.0.3:7946"), s1[slices.IndexFunc(s1, func(x Member) bool { return x.NodeID == b })].Addr,
		"the snapshot read before the update still says what it said")
	s3 := p.snapshot()
	assert.NotSame(t, &s1[0], &s3[0], "an update rebuilt the snapshot")

	// A revocation raises no memberlist event: readers filter, so it counts at once.
	self.Verifier.Revoke(a)
	assert.NotContains(t, ids(m.Members("z")), a)
	assert.Equal(t, 3, m.NumMembers("z"))
	_, ok = m.LookupMember("z", a)
	assert.False(t, ok, "a revoked member is not found")
	var each []string
	for mem := range m.EachMember("z") {
		each = append(each, mem.NodeID)
	}
	assert.Equal(t, ids(m.Members("z")), each, "EachMember yields what Members returns")

	// The gossip round never plans a packet to this node or a revoked member.
	p.stopPump() // the round is planned here, not sent
	p.recs.add(encodeMessage([]byte("record")))
	var planned []string
	for _, s := range p.planRound() {
		planned = append(planned, s.member.NodeID)
	}
	assert.ElementsMatch(t, []string{b, c}, planned)

	p.NotifyLeave(event(b, 0))
	assert.Equal(t, []string{c, self.ID}, ids(m.Members("z")), "a member that left is gone from the next snapshot")
	_, ok = m.LookupMember("z", b)
	assert.False(t, ok)

	_, ok = m.LookupMember("nope", self.ID)
	assert.False(t, ok)
	assert.Nil(t, m.Members("nope"))
	assert.Zero(t, m.NumMembers("nope"))
}

// TestMembersCannotBeCorruptedByCallers: what Members returns is the caller's own; writing to it,
// appending to it, changing a value EachMember yields, or appending to the internal snapshot
// changes nothing another caller sees.
func TestMembersCannotBeCorruptedByCallers(t *testing.T) {
	auth := gossiptest.NewAuthority(t, td)
	self := startMember(t, auth, newSigner(t), "self", []string{"z"}, gossiptest.NodeOptions{}, clusterOpts{})
	m := self.m
	p, err := m.pool("z")
	require.NoError(t, err)
	for i := range 5 {
		p.NotifyJoin(event(auth.NodeID(fmt.Sprintf("n%d", i)), byte(i+1)))
	}
	want := m.Members("z")
	require.Len(t, want, 6)

	mine := m.Members("z")
	mine[0].NodeID, mine[0].Addr = auth.NodeID("mallory"), netip.MustParseAddrPort("203.0.113.7:1")
	slices.Reverse(mine)
	_ = append(mine[:2], Member{NodeID: auth.NodeID("mallory")})
	for mem := range m.EachMember("z") {
		mem.NodeID = auth.NodeID("mallory") // a copy
	}
	// Inside the package the snapshot itself is read-only by rule (pool.snapshot); an append to
	// the whole of it, the one write a careless reader might make, copies (its capacity is its
	// length).
	snap := p.snapshot()
	_ = append(snap, Member{NodeID: auth.NodeID("mallory")})

	assert.Equal(t, want, m.Members("z"))
	assert.Equal(t, want, p.snapshot()[:len(want)])
}

// TestMemberSnapshotUnderConcurrentChanges: readers of every kind race memberlist's events (run
// with -race); each read is sorted and names this node.
func TestMemberSnapshotUnderConcurrentChanges(t *testing.T) {
	auth := gossiptest.NewAuthority(t, td)
	self := startMember(t, auth, newSigner(t), "self", []string{"z"}, gossiptest.NodeOptions{}, clusterOpts{})
	m := self.m
	p, err := m.pool("z")
	require.NoError(t, err)
	var wg sync.WaitGroup
	wg.Go(func() {
		for i := range 2000 {
			n := event(auth.NodeID(fmt.Sprintf("n%d", i%50)), byte(i))
			if i%3 == 2 {
				p.NotifyLeave(n)
			} else {
				p.NotifyJoin(n)
			}
		}
	})
	for range 2 {
		wg.Go(func() {
			for range 500 {
				ms := m.Members("z")
				if !assert.True(t, slices.IsSortedFunc(ms, func(a, b Member) int { return cmpID(a, b) })) ||
					!assert.Contains(t, ids(ms), self.ID) {
					return
				}
				n := 0
				for range m.EachMember("z") {
					n++
				}
				assert.Positive(t, n)
				_, ok := m.LookupMember("z", self.ID)
				assert.True(t, ok)
			}
		})
	}
	wg.Wait()
	// After the last event, the snapshot is exactly the pool's map.
	p.mu.Lock()
	var inMap []string
	for name := range p.members {
		inMap = append(inMap, name)
	}
	p.mu.Unlock()
	slices.Sort(inMap)
	assert.Equal(t, inMap, ids(m.Members("z")))
}

func cmpID(a, b Member) int {
	switch {
	case a.NodeID < b.NodeID:
		return -1
	case a.NodeID > b.NodeID:
		return 1
	}
	return 0
}
