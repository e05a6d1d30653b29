package daemon

import (
	"net/netip"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/node"
)

// A gossiped member's address wins over an address something else wrote into the node's peer
// table afterwards (an SDK caller's AddPeer, a configured peer applied by hand): the pool loop
// compares the table with the members on each of its wake-ups (at most 6.25 s apart) instead of
// trusting a record of what it handed before, which let the stale entry mask the gossiped address
// until the next full hand-over 30 s later. The stale address is a port nothing answers on, so a
// dial that took it would fail until the hand-over.
func TestGossipedAddressWinsOverOverwrittenPeer(t *testing.T) {
	ta := startAuthority(t)
	ds := cluster(t, ta, spec{name: "a", zones: []string{"payments"}}, spec{name: "b", zones: []string{"payments"}})
	a, b := ds["a"], ds["b"]
	waitMembers(t, "payments", 2, a, b)
	bID := b.Node().ID().String()
	held := func() netip.AddrPort {
		addr, _ := a.Node().PeerAddr(bID)
		return addr
	}
	require.Eventually(t, func() bool { return held() == b.Addr() }, 10*time.Second, 10*time.Millisecond,
		"a's table holds b at its gossiped address")

	for range 2 { // once right after the join, once with the pool loop backed off to its rest interval
		stale := netip.MustParseAddrPort("127.0.0.1:9")
		require.NoError(t, a.Node().AddPeer(node.Peer{Node: bID, Addr: stale}))
		require.Equal(t, stale, held())
		start := time.Now()
		require.Eventually(t, func() bool { return held() == b.Addr() }, 12*time.Second, 10*time.Millisecond,
			"the gossiped address is restored within one pool-loop interval, not at a 30 s hand-over")
		t.Logf("gossiped address restored after %v", time.Since(start).Round(time.Millisecond))
		time.Sleep(6 * time.Second)
	}
}
