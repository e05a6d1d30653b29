package daemon

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"

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
