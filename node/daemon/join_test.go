package daemon

import (
	"context"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/node/membership"
	"github.com/ute-project/ute/node/state"
)

// A node restarting with stored bootstrap members whose first entry is dead and black-holed
// (its UDP socket takes datagrams and never answers, as a dead host behind a dropping firewall or
// a partition does) still joins its zone's pool through the live member listed after it, well
// inside one join attempt. Before the seeds were dialed concurrently with a per-seed bound, the
// dead member's QUIC dial took the whole 5 s attempt, the live one was never tried, and each
// retry repeated the same order: the node never rejoined.
func TestRejoinPastDeadStoredMember(t *testing.T) {
	ta := startAuthority(t)
	a := cluster(t, ta, spec{name: "a", zones: []string{"payments"}})["a"]
	// "dead" joined the authority but never runs: its socket stays open and unread.
	_, deadPC := joinNode(t, ta, spec{name: "dead", zones: []string{"payments"}})
	cdir, cpc := joinNode(t, ta, spec{name: "c", zones: []string{"payments"}})
	sd, err := state.Open(cdir)
	require.NoError(t, err)
	require.NoError(t, sd.SaveBootstrap([]state.Member{
		{ID: "spiffe://acme.internal/node/dead", Addr: deadPC.LocalAddr().String(), Zones: []string{"payments"}},
		{ID: a.Node().ID().String(), Addr: a.Addr().String(), Zones: []string{"payments"}},
	}, nil))

	start := time.Now()
	c := startDaemon(t, "c", cdir, cpc, true)
	// Under one join attempt's 5 s: a join that waited for the dead member could not make it.
	require.Eventually(t, func() bool { return len(c.members("payments")) == 2 && len(a.members("payments")) == 2 },
		4*time.Second, 20*time.Millisecond, "c never joined a's pool past its dead stored member")
	t.Logf("c joined the pool %s after start", time.Since(start))
}

// Two pools of one zone that formed apart (here: c knew only b when it started, and a knew
// nobody) merge once a node learns of a member outside its pool: with a pool that already has a
// member, the node still joins, at the reconnect interval, through bootstrap members missing
// from it. Before, a pool with a member never asked its seeds again, and the split was for good
// (the simulator's 200-node runs ended with two-node pools that never rejoined the zone).
func TestSplitPoolsMergeThroughMissingBootstrapMember(t *testing.T) {
	ta := startAuthority(t)
	a := cluster(t, ta, spec{name: "a", zones: []string{"payments"}})["a"]
	bdir, bpc := joinNode(t, ta, spec{name: "b", zones: []string{"payments"}})
	cdir, cpc := joinNode(t, ta, spec{name: "c", zones: []string{"payments"}})
	saveMembers := func(dir string, ms ...state.Member) {
		sd, err := state.Open(dir)
		require.NoError(t, err)
		require.NoError(t, sd.SaveBootstrap(ms, nil))
	}
	saveMembers(bdir) // b knows nobody
	bpeer := state.Member{ID: "spiffe://acme.internal/node/b", Addr: bpc.LocalAddr().String(), Zones: []string{"payments"}}
	saveMembers(cdir, bpeer)

	start := func(name, dir string, pc net.PacketConn) *testDaemon {
		ft := membership.FastTiming()
		opts := Options{Dir: dir, Config: netstackConfig(), Logger: testLogger(name), PacketConn: pc, NoAuthority: true,
			Timing: &ft, ReconnectInterval: time.Second}
		d, err := Start(context.Background(), opts)
		require.NoError(t, err)
		t.Cleanup(func() { _ = d.Close() })
		return &testDaemon{Daemon: d, name: name, dir: dir, pc: pc, opts: opts}
	}
	b := start("b", bdir, bpc)
	c := start("c", cdir, cpc)
	waitMembers(t, "payments", 2, b, c)
	require.Len(t, a.members("payments"), 1, "a must start in a pool of its own")

	// c learns of a (as a renewal response would tell it); c's pool already has b.
	saveMembers(cdir, bpeer, state.Member{ID: a.Node().ID().String(), Addr: a.Addr().String(), Zones: []string{"payments"}})
	require.Eventually(t, func() bool {
		return len(a.members("payments")) == 3 && len(b.members("payments")) == 3 && len(c.members("payments")) == 3
	}, 10*time.Second, 50*time.Millisecond, "the two pools never merged")
}
