package membership

import (
	"fmt"
	"net"
	"testing"

	"github.com/hashicorp/memberlist"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/overlay/gossip/gossiptest"
)

// benchPool starts one member with a pool of zone "z" and gives the pool n-1 more members through
// memberlist's join event, as discovery would (memberlist itself knows only this node, so nothing
// probes or dials them). The pump is stopped: a round must not dial the invented members.
func benchPool(b *testing.B, n int) (*member, *pool) {
	b.Helper()
	auth := gossiptest.NewAuthority(b, td)
	mb := startMember(b, auth, newSigner(b), "self", []string{"z"}, gossiptest.NodeOptions{}, clusterOpts{})
	p, err := mb.m.pool("z")
	require.NoError(b, err)
	p.stopPump()
	for i := range n - 1 {
		p.NotifyJoin(&memberlist.Node{
			Name: identity.NodeID(td, fmt.Sprintf("n%04d", i)).String(),
			Addr: net.IPv4(10, 0, byte(i>>8), byte(i)),
			Port: 7946,
		})
	}
	require.Len(b, mb.m.Members("z"), n)
	return mb, p
}

// BenchmarkMembers is one Members call in a pool of 1,000 members: the daemon's loops make it on
// every change notice and timer tick (docs/benchmarks.md, "member snapshots").
//
//	go test -run '^$' -bench 'Members$' -benchmem ./node/membership/
func BenchmarkMembers(b *testing.B) {
	mb, _ := benchPool(b, 1000)
	b.ReportAllocs()
	for b.Loop() {
		if got := len(mb.m.Members("z")); got != 1000 {
			b.Fatalf("%d members, want 1000", got)
		}
	}
}

// BenchmarkRecordRound plans one gossip round (everything gossipRound does but hand the packets
// to the transport) in a pool of 1,000 members with 1 and 4 records queued. Each iteration
// undoes its plan, so that every one plans the same round.
//
//	go test -run '^$' -bench 'RecordRound$' -benchmem ./node/membership/
func BenchmarkRecordRound(b *testing.B) {
	for _, recs := range []int{1, 4} {
		b.Run(fmt.Sprintf("records=%d", recs), func(b *testing.B) {
			_, p := benchPool(b, 1000)
			sg := newSigner(b)
			for range recs {
				p.recs.add(encodeMessage(sg.record(b, 130)))
			}
			want := recs * p.m.cfg.Timing.GossipNodes
			b.ReportAllocs()
			for b.Loop() {
				plan := p.planRound()
				if len(plan) != want {
					b.Fatalf("%d packets planned, want %d", len(plan), want)
				}
				p.recs.mu.Lock()
				for _, s := range plan {
					s.rec.inflight--
					delete(s.rec.to, s.member.NodeID)
				}
				p.recs.mu.Unlock()
			}
		})
	}
}

// BenchmarkEachMember is what the daemon's loops (node/daemon/pools.go) now do instead of
// Members: walk the 1,000 members without a copy.
//
//	go test -run '^$' -bench 'EachMember$' -benchmem ./node/membership/
func BenchmarkEachMember(b *testing.B) {
	mb, _ := benchPool(b, 1000)
	b.ReportAllocs()
	for b.Loop() {
		n := 0
		for range mb.m.EachMember("z") {
			n++
		}
		if n != 1000 {
			b.Fatalf("%d members, want 1000", n)
		}
	}
}
