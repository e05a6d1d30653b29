package daemon

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/node/membership"
	"github.com/ute-project/ute/overlay/tunnel"
)

func TestRoundIdle(t *testing.T) {
	// The LAN profile (1 s probes) in a pool of 100: two 100 s rounds.
	assert.Equal(t, 200*time.Second, roundIdle(time.Minute, time.Second, 100))
	// A small pool's rounds are shorter than the configured timeout, which stays.
	assert.Equal(t, time.Minute, roundIdle(time.Minute, time.Second, 10))
}

func TestUpdateIdle(t *testing.T) {
	cfg := netstackConfig()
	d := &Daemon{cfg: cfg}
	d.idle.Store(&idlePolicy{fixed: fixedIdle(cfg.Gossip)})
	assert.Equal(t, time.Minute, d.tunnelIdle("payments", "n1"), "before the pools report: the configured timeout")

	d.updateIdle(map[string]int{"payments": 100, "support": 20})
	assert.Equal(t, 200*time.Second, d.tunnelIdle("payments", "n1"), "two probe rounds of 100 members")
	assert.Equal(t, time.Minute, d.tunnelIdle("support", "n1"), "rounds shorter than the configured timeout")
	assert.Equal(t, time.Minute, d.tunnelIdle("research", "n1"), "a zone without a pool")

	// 99 + 30 tunnels: more than meshTunnels, so no pool holds its tunnels across rounds.
	d.updateIdle(map[string]int{"payments": 100, "support": 31})
	assert.Equal(t, time.Minute, d.tunnelIdle("payments", "n1"))
	d.updateIdle(map[string]int{"payments": meshTunnels + 1})
	assert.Equal(t, 2*time.Duration(meshTunnels+1)*time.Second, d.tunnelIdle("payments", "n1"), "exactly meshTunnels tunnels")
	d.updateIdle(map[string]int{"payments": meshTunnels + 2})
	assert.Equal(t, time.Minute, d.tunnelIdle("payments", "n1"))

	// An idle close turned off (negative) stays off whatever the pools.
	d.cfg.Gossip.TunnelIdle = -1
	d.updateIdle(map[string]int{"payments": 100})
	assert.Negative(t, d.tunnelIdle("payments", "n1"))
}

// slowProbes is a timing whose pool traffic leaves gaps longer than the configured idle timeout
// of idleCluster: probes a second apart, no push/pull within the test.
func slowProbes() membership.Timing {
	ft := membership.FastTiming()
	ft.ProbeInterval = time.Second
	ft.ProbeTimeout = 500 * time.Millisecond
	ft.PushPullInterval = time.Minute
	return ft
}

// idleCluster starts a, b and c in payments with slowProbes and a configured idle timeout of
// 300 ms, and waits until a holds a tunnel to b and to c.
func idleCluster(t *testing.T, ta *testAuthority) (a, b, c *testDaemon) {
	t.Helper()
	ds := map[string]*testDaemon{}
	for _, name := range []string{"a", "b", "c"} {
		dir, pc := joinNode(t, ta, spec{name: name, zones: []string{"payments"}})
		ft := slowProbes()
		cfg := netstackConfig()
		cfg.Gossip.TunnelIdle = 300 * time.Millisecond
		opts := Options{Dir: dir, Config: cfg, Logger: testLogger(name), PacketConn: pc, Timing: &ft}
		d, err := Start(context.Background(), opts)
		require.NoError(t, err)
		t.Cleanup(func() { _ = d.Close() })
		ds[name] = &testDaemon{Daemon: d, name: name, dir: dir, pc: pc, opts: opts}
	}
	a, b, c = ds["a"], ds["b"], ds["c"]
	waitMembers(t, "payments", 3, a, b, c)
	require.Eventually(t, func() bool { return tunnelTo(a, b) != nil && tunnelTo(a, c) != nil }, 20*time.Second, 20*time.Millisecond)
	for _, d := range []*testDaemon{a, b, c} {
		require.Eventually(t, func() bool { return d.tunnelIdle("payments", "") == 6*time.Second }, 10*time.Second, 20*time.Millisecond,
			"%s: two rounds of 3 members probed a second apart", d.name)
	}
	return a, b, c
}

// tunnelTo is d's live payments tunnel to peer, or nil.
func tunnelTo(d, peer *testDaemon) *tunnel.Tunnel {
	for _, t := range d.Node().Endpoint().Tunnels() {
		if t.Alive() && t.Zone() == "payments" && t.Peer().NodeID == peer.Node().ID().String() {
			return t
		}
	}
	return nil
}

func idleClosed(ds ...*testDaemon) (n uint64) {
	for _, d := range ds {
		n += d.Node().Endpoint().Stats().TunnelsIdleClosed
	}
	return n
}

// In a small pool the gossip tunnels stay up from one probe to the next, although the gaps
// between probes exceed the configured idle timeout; with the configured timeout alone
// (the policy removed) the same pool closes and reopens them between probes.
func TestGossipTunnelsOutliveProbeGapsInSmallPool(t *testing.T) {
	ta := startAuthority(t)
	a, b, c := idleCluster(t, ta)
	ab, ac := tunnelTo(a, b), tunnelTo(a, c)
	before := idleClosed(a, b, c)
	time.Sleep(5 * time.Second) // five probe intervals: each member probed about twice by each other
	assert.Equal(t, before, idleClosed(a, b, c), "no gossip tunnel was closed between probes")
	assert.True(t, ab.Alive() && ac.Alive(), "a's tunnels to b and c are the ones it opened")

	for _, d := range []*testDaemon{a, b, c} {
		d.Node().Endpoint().SetGossipIdlePolicy(nil) // the configured 300 ms alone
	}
	require.Eventually(t, func() bool { return idleClosed(a, b, c) > before }, 10*time.Second, 20*time.Millisecond,
		"with the configured timeout alone, tunnels close between probes (the control)")
}

// A tunnel held across probe rounds still ends at once when its member leaves or is revoked:
// the attacker's side is a revoked node that keeps its idle tunnel to a member open, which the
// member must cut on the revocation, then refuse at the handshake.
func TestHeldGossipTunnelClosesOnLeaveAndRevocation(t *testing.T) {
	ta := startAuthority(t)
	a, b, c := idleCluster(t, ta)
	ab, ac := tunnelTo(a, b), tunnelTo(a, c)

	require.NoError(t, c.Close()) // leaves the pool and closes its endpoint
	select {
	case <-ac.Done():
	case <-time.After(2 * time.Second):
		t.Fatal("a kept its tunnel to c after c left")
	}

	// b: its tunnel with a is held (6 s policy) and kept in use besides; the revocation
	// cuts it anyway, within a second of reaching a.
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		for {
			select {
			case <-stop:
				return
			case <-time.After(100 * time.Millisecond):
				_ = ab.SendControlDatagram([]byte{0xff}) // an unknown channel: dropped and counted, but use
			}
		}
	}()
	bid := b.Node().ID().String()
	_, err := ta.RevokeSubject(context.Background(), bid, "compromised host")
	require.NoError(t, err)
	require.Eventually(t, func() bool { return a.Store().Revoked(bid) }, 2*time.Second, 5*time.Millisecond)
	select {
	case <-ab.Done():
	case <-time.After(time.Second):
		t.Fatal("a kept the revoked node's tunnel")
	}
	assert.Nil(t, tunnelTo(a, b), "no tunnel of a's is left to the revoked node")

	// b dials a again with its own (revoked) certificate once the close has reached it (until
	// then b's Dial would hand back the tunnel it still believes up): refused at the handshake.
	require.Eventually(t, func() bool { return tunnelTo(b, a) == nil }, 2*time.Second, 5*time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	refused := a.Node().Endpoint().Stats().HandshakesRefused
	_, err = b.Node().Endpoint().Dial(ctx, a.Addr(), a.Node().ID().String(), "payments")
	require.Error(t, err)
	assert.Greater(t, a.Node().Endpoint().Stats().HandshakesRefused, refused, "a refused the revoked node's handshake")
	assert.Nil(t, tunnelTo(a, b))
}

// A pool that outgrows meshTunnels, or a shorter configured timeout, shrinks the policy (and
// makes the tunnels already up check again); a pool that grows within it does not.
func TestIdlePolicyShrank(t *testing.T) {
	m := time.Minute
	small := &idlePolicy{fixed: m, pools: map[string]time.Duration{"payments": 200 * time.Second}}
	for _, tc := range []struct {
		name string
		next *idlePolicy
		want bool
	}{
		{"unchanged", &idlePolicy{fixed: m, pools: map[string]time.Duration{"payments": 200 * time.Second}}, false},
		{"pool grew within the mesh bound", &idlePolicy{fixed: m, pools: map[string]time.Duration{"payments": 240 * time.Second}}, false},
		{"pool left the mesh bound", &idlePolicy{fixed: m, pools: map[string]time.Duration{}}, true},
		{"pool shrank", &idlePolicy{fixed: m, pools: map[string]time.Duration{"payments": 100 * time.Second}}, true},
		{"configured timeout shortened", &idlePolicy{fixed: 30 * time.Second, pools: map[string]time.Duration{"payments": 200 * time.Second}}, true},
	} {
		assert.Equal(t, tc.want, shrank(small, tc.next), tc.name)
	}
}
