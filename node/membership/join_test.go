package membership

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/overlay/gossip/gossiptest"
)

// blackHole is a seed whose address takes UDP datagrams and never answers, as a dead host behind
// a firewall that drops (or a partition) looks: a QUIC dial to it waits for its handshake
// timeout (5 s with gossiptest's limits).
func blackHole(t *testing.T, name string) Seed {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { _ = pc.Close() })
	ap, err := netip.ParseAddrPort(pc.LocalAddr().String())
	require.NoError(t, err)
	return Seed{NodeID: identity.NodeID(td, name).String(), Addr: ap}
}

// joinCtx is the deadline the daemon gives one join attempt (node/daemon's joinPools).
func joinCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// A node whose stored members name a black-holed address before a live member joins through the
// live one within the daemon's 5 s join deadline, without waiting for the black hole's dial to
// time out. Dialed one after another, the black hole took the whole deadline, the live seed was
// never tried, and every retry repeated that order: the node never joined.
func TestJoinPastBlackHoledSeed(t *testing.T) {
	auth := gossiptest.NewAuthority(t, td)
	sg := newSigner(t)
	live := startMember(t, auth, sg, "live", []string{"z"}, gossiptest.NodeOptions{}, clusterOpts{})
	j := startMember(t, auth, sg, "restarted", []string{"z"}, gossiptest.NodeOptions{}, clusterOpts{})

	start := time.Now()
	n, err := j.m.Join(joinCtx(t), "z", []Seed{blackHole(t, "dead"), seedOf(live)})
	took := time.Since(start)
	require.NoError(t, err)
	assert.Equal(t, 1, n, "joined through the live seed only")
	// The bound is the default per-seed dial timeout: a join that waited for the black hole
	// would take at least that.
	assert.Less(t, took, 3*time.Second, "the join waited for the black-holed seed")
	t.Logf("joined past a black-holed seed in %s", took)
	waitMembers(t, []*member{live, j}, "z", 2, 5*time.Second)
}

// More black-holed seeds than Join dials at once: each holds a slot only for the per-seed
// timeout, so the live seed is still reached inside the 5 s deadline wherever the shuffle puts it.
func TestJoinMoreDeadSeedsThanParallel(t *testing.T) {
	auth := gossiptest.NewAuthority(t, td)
	sg := newSigner(t)
	live := startMember(t, auth, sg, "live", []string{"z"}, gossiptest.NodeOptions{}, clusterOpts{})
	j := startMember(t, auth, sg, "restarted", []string{"z"}, gossiptest.NodeOptions{},
		clusterOpts{joinParallel: 2, joinSeedTimeout: 500 * time.Millisecond})
	var seeds []Seed
	for i := range 5 {
		seeds = append(seeds, blackHole(t, fmt.Sprintf("dead%d", i)))
	}
	seeds = append(seeds, seedOf(live))

	start := time.Now()
	n, err := j.m.Join(joinCtx(t), "z", seeds)
	require.NoError(t, err)
	assert.Equal(t, 1, n)
	t.Logf("joined past 5 black-holed seeds, 2 at a time, in %s", time.Since(start))
	waitMembers(t, []*member{live, j}, "z", 2, 5*time.Second)
}

// A seed whose dial failed is tried after the seeds that have not failed: the retry after a
// failed join does not spend its deadline on the same dead seeds again. With one dial at a time
// and a deadline that fits a single seed's timeout, only the live seed first can succeed.
func TestJoinTriesFailedSeedsLast(t *testing.T) {
	auth := gossiptest.NewAuthority(t, td)
	sg := newSigner(t)
	live := startMember(t, auth, sg, "live", []string{"z"}, gossiptest.NodeOptions{}, clusterOpts{})
	j := startMember(t, auth, sg, "restarted", []string{"z"}, gossiptest.NodeOptions{},
		clusterOpts{joinParallel: 1, joinSeedTimeout: time.Second})
	dead := []Seed{blackHole(t, "dead0"), blackHole(t, "dead1")}

	n, err := j.m.Join(ctxT(t), "z", dead)
	require.ErrorIs(t, err, context.DeadlineExceeded, "each dead seed times out on its own")
	require.Zero(t, n)
	assert.Len(t, j.m.Members("z"), 1)

	ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
	defer cancel()
	n, err = j.m.Join(ctx, "z", append(dead, seedOf(live)))
	require.NoError(t, err, "the live seed, never failed, is dialed before the two that did")
	assert.Equal(t, 1, n)
	waitMembers(t, []*member{live, j}, "z", 2, 5*time.Second)
}

// A seed listed twice, and this node itself among the seeds, cost no extra dial: the node is
// skipped and the duplicate dialed once.
func TestJoinSkipsSelfAndDuplicates(t *testing.T) {
	auth := gossiptest.NewAuthority(t, td)
	sg := newSigner(t)
	live := startMember(t, auth, sg, "live", []string{"z"}, gossiptest.NodeOptions{}, clusterOpts{})
	j := startMember(t, auth, sg, "joiner", []string{"z"}, gossiptest.NodeOptions{}, clusterOpts{})
	n, err := j.m.Join(ctxT(t), "z", []Seed{seedOf(j), seedOf(live), seedOf(live)})
	require.NoError(t, err)
	assert.Equal(t, 1, n, "one seed joined through, once")

	_, err = j.m.Join(ctxT(t), "z", []Seed{seedOf(j)})
	require.ErrorContains(t, err, "no seeds to join")
}
