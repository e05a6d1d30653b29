package daemon

import (
	"context"
	"maps"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/overlay/tunnel"
)

// anchorOf is d's one anchor in payments, or "".
func anchorOf(d *testDaemon) string {
	a := d.anchors.Load()
	if a == nil || len((*a)["payments"]) != 1 {
		return ""
	}
	return slices.Collect(maps.Keys((*a)["payments"]))[0]
}

// liveTo is d's live payments tunnel to the node ID peer, or nil. A tunnel to an anchor is one
// d dialed, or one the anchor dialed because d is its anchor too (one tunnel serves both).
func liveTo(d *testDaemon, peer string) *tunnel.Tunnel {
	for _, t := range d.Node().Endpoint().Tunnels() {
		if t.Alive() && t.Zone() == "payments" && t.Peer().NodeID == peer {
			return t
		}
	}
	return nil
}

// In a pool whose gossip tunnels close after 300 ms of silence (the node does not hold them
// across probe rounds), each node still holds a tunnel to its anchor, at both ends, while the
// others close and reopen; when the anchor leaves the pool the node draws another
// member and holds a tunnel to it.
func TestAnchorTunnelsOutliveTheIdleClose(t *testing.T) {
	ta := startAuthority(t)
	ds := map[string]*testDaemon{}
	names := []string{"a", "b", "c", "e"}
	for _, name := range names {
		dir, pc := joinNode(t, ta, spec{name: name, zones: []string{"payments"}})
		ft := slowProbes()
		cfg := netstackConfig()
		cfg.Gossip.TunnelIdle = 300 * time.Millisecond
		opts := Options{Dir: dir, Config: cfg, Logger: testLogger(name), PacketConn: pc, Timing: &ft, anchors: 1, meshTunnels: -1}
		d, err := Start(context.Background(), opts)
		require.NoError(t, err)
		t.Cleanup(func() { _ = d.Close() })
		ds[name] = &testDaemon{Daemon: d, name: name, dir: dir, pc: pc, opts: opts}
	}
	all := []*testDaemon{ds["a"], ds["b"], ds["c"], ds["e"]}
	waitMembers(t, "payments", 4, all...)
	a := ds["a"]
	byID := map[string]*testDaemon{}
	for _, d := range all {
		byID[d.Node().ID().String()] = d
	}
	// held is d's tunnel to its anchor when it is one that stays: d dialed it, or the anchor
	// did and anchors d in turn (a tunnel the anchor dialed for a probe closes when idle, and d
	// then dials its own).
	held := func(d *testDaemon) *tunnel.Tunnel {
		id := anchorOf(d)
		if id == "" || id == d.Node().ID().String() || byID[id] == nil {
			return nil
		}
		t := liveTo(d, id)
		if t == nil || !t.Outbound() && !byID[id].anchored("payments", d.Node().ID().String()) {
			return nil
		}
		return t
	}
	require.Eventually(t, func() bool {
		for _, d := range all {
			if held(d) == nil {
				return false
			}
		}
		return true
	}, 20*time.Second, 20*time.Millisecond, "every node anchors one other member and holds a tunnel to it")
	first := anchorOf(a)
	tun := held(a)
	closed := idleClosed(all...)

	time.Sleep(3 * time.Second) // ten idle timeouts, three probe intervals
	assert.True(t, tun.Alive(), "the anchor's tunnel outlived the idle close")
	assert.Same(t, tun, liveTo(a, first), "the same tunnel, not a new one")
	assert.Greater(t, idleClosed(all...), closed, "the other gossip tunnels did close for idleness (the control)")

	var leaving *testDaemon
	for _, d := range all {
		if d.Node().ID().String() == first {
			leaving = d
		}
	}
	require.NotNil(t, leaving)
	require.NoError(t, leaving.Close())
	require.Eventually(t, func() bool {
		id := anchorOf(a)
		return id != "" && id != first && liveTo(a, id) != nil
	}, 20*time.Second, 20*time.Millisecond, "a replaced the anchor that left and holds a tunnel to the new one")
	assert.False(t, a.anchored("payments", first))

	// The attacker's side: an anchor that is revoked keeps no held tunnel and is never dialed
	// again as an anchor (a revoked node must not be able to count on a's idle exemption).
	second := anchorOf(a)
	_, err := ta.RevokeSubject(context.Background(), second, "compromised host")
	require.NoError(t, err)
	require.Eventually(t, func() bool { return a.Store().Revoked(second) }, 5*time.Second, 5*time.Millisecond)
	require.Eventually(t, func() bool {
		return !a.anchored("payments", second) && liveTo(a, second) == nil
	}, 20*time.Second, 20*time.Millisecond, "a dropped the revoked anchor and its tunnel")
	assert.Never(t, func() bool { return liveTo(a, second) != nil || a.anchored("payments", second) }, 6*time.Second, 50*time.Millisecond,
		"a re-anchored or re-dialed the revoked node over a pool-loop tick")
}

// Without anchors the same pool holds no tunnel for long: the test above would fail there.
func TestNoAnchorsWhenTurnedOff(t *testing.T) {
	d := &Daemon{opts: Options{anchors: -1}}
	assert.Zero(t, d.anchorsWanted())
	d.keepAnchors() // no pools, no anchors: nothing to do, no panic
	assert.False(t, d.anchored("payments", "spiffe://example.org/node/b"))
	d = &Daemon{}
	assert.Equal(t, anchorsPerPool, d.anchorsWanted())
}
