package tunnel

import (
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// idleNodes starts a and b with a short gossip idle timeout and control handlers on both sides
// (b's streams go to the returned channel) and dials a's tunnel to b.
func idleNodes(t *testing.T, idle time.Duration) (a, b *testNode, tun *Tunnel, streams chan controlStream) {
	t.Helper()
	pki := newPKI(t, testTD)
	streams = make(chan controlStream, 16)
	lim := fastLimits()
	lim.GossipIdleTimeout = idle
	lim.KeepAlivePeriod = 100 * time.Millisecond // keep-alives must not count as use
	opt := func(c *Config) {
		c.Limits = lim
		c.ControlHandler = func(t *Tunnel, ch byte, conn net.Conn) { streams <- controlStream{t, ch, conn} }
		c.ControlDatagram = func(*Tunnel, []byte) {}
	}
	a = startNode(t, pki, "a", pki.node(t, "a", "payments"), []string{"payments"}, "", opt)
	b = startNode(t, pki, "b", pki.node(t, "b", "payments"), []string{"payments"}, "", opt)
	tun, err := a.ep.Dial(ctxT(t), b.addr, b.id, "payments")
	require.NoError(t, err)
	require.Eventually(t, func() bool { return len(b.ep.Tunnels()) == 1 }, 2*time.Second, 5*time.Millisecond)
	return a, b, tun, streams
}

// A tunnel that only carries control traffic (gossip) stays up while that traffic flows, closes
// on both ends once it has been silent for the idle timeout (keep-alives do not count), and the
// next Dial handshakes a new one.
func TestGossipOnlyTunnelClosesWhenIdle(t *testing.T) {
	const idle = 400 * time.Millisecond
	a, b, tun, _ := idleNodes(t, idle)

	for range 8 { // 1.2 s of gossip, three idle timeouts
		require.NoError(t, tun.SendControlDatagram([]byte("gossip")))
		time.Sleep(150 * time.Millisecond)
	}
	require.True(t, tun.Alive(), "a tunnel in use is not idle")
	assert.Zero(t, a.ep.Stats().TunnelsIdleClosed)

	select {
	case <-tun.Done():
	case <-time.After(5 * idle):
		t.Fatal("the silent gossip-only tunnel was not closed")
	}
	require.Eventually(t, func() bool { return len(a.ep.Tunnels()) == 0 && len(b.ep.Tunnels()) == 0 }, 2*time.Second, 10*time.Millisecond)
	assert.Positive(t, a.ep.Stats().TunnelsIdleClosed+b.ep.Stats().TunnelsIdleClosed)
	_, ok := a.ep.LiveTunnel(b.id, "payments")
	assert.False(t, ok)

	again, err := a.ep.Dial(ctxT(t), b.addr, b.id, "payments")
	require.NoError(t, err)
	assert.NotSame(t, tun, again)
	require.NoError(t, again.SendControlDatagram([]byte("after the idle close")))
}

// An open agent flow keeps its tunnel however silent it is, on both ends; once the flow is
// closed the idle timeout runs again.
func TestOpenFlowHoldsTunnel(t *testing.T) {
	const idle = 300 * time.Millisecond
	a, b, tun, _ := idleNodes(t, idle)
	fc, err := tun.OpenFlow(ctxT(t), rec(t, testRecord{Agent: "billing", Flow: tun.NewFlowID()}), nil, nil)
	require.NoError(t, err)
	in := recvStream(t, b)

	time.Sleep(4 * idle)
	assert.True(t, tun.Alive(), "a silent but open flow keeps the tunnel")
	assert.Len(t, b.ep.Tunnels(), 1, "on the accepting side too")
	assert.Zero(t, a.ep.Stats().TunnelsIdleClosed+b.ep.Stats().TunnelsIdleClosed)

	require.NoError(t, fc.Close())
	require.NoError(t, in.Close())
	select {
	case <-tun.Done():
	case <-time.After(5 * idle):
		t.Fatal("the tunnel was not closed after its last flow")
	}
}

// An open packet flow keeps its tunnel too.
func TestOpenPacketFlowHoldsTunnel(t *testing.T) {
	const idle = 300 * time.Millisecond
	_, b, tun, _ := idleNodes(t, idle)
	id := tun.NewFlowID()
	pf, err := tun.OpenPacketFlow(ctxT(t), id, rec(t, testRecord{Agent: "dns", Kind: uint8(KindPacket), Flow: id}), nil, nil)
	require.NoError(t, err)
	var in *PacketFlow
	select {
	case in = <-b.packets:
	case <-time.After(5 * time.Second):
		t.Fatal("no packet flow delivered")
	}
	time.Sleep(4 * idle)
	assert.True(t, tun.Alive(), "a silent but open packet flow keeps the tunnel")
	require.NoError(t, pf.Close())
	require.NoError(t, in.Close())
	select {
	case <-tun.Done():
	case <-time.After(5 * idle):
		t.Fatal("the tunnel was not closed after its packet flow")
	}
}

// An open control stream (a push/pull, a WireGuard admission stream) holds the tunnel however
// long it is silent; once it is closed the idle timeout runs again.
func TestOpenControlStreamHoldsTunnel(t *testing.T) {
	const idle = 300 * time.Millisecond
	_, _, tun, streams := idleNodes(t, idle)
	c, err := tun.OpenControl(ctxT(t), 9)
	require.NoError(t, err)
	_, err = c.Write([]byte("x"))
	require.NoError(t, err)
	in := recvControl(t, streams)

	time.Sleep(4 * idle)
	require.True(t, tun.Alive(), "a silent but open control stream keeps the tunnel")

	require.NoError(t, c.Close())
	require.NoError(t, in.c.Close())
	select {
	case <-tun.Done():
	case <-time.After(5 * idle):
		t.Fatal("the tunnel was not closed after its last control stream")
	}
}

// A negative timeout turns the idle close off; SetGossipIdleTimeout changes it for tunnels that
// start afterwards.
func TestGossipIdleTimeoutOff(t *testing.T) {
	a, b, tun, _ := idleNodes(t, -1)
	time.Sleep(time.Second)
	assert.True(t, tun.Alive())

	a.ep.SetGossipIdleTimeout(200 * time.Millisecond)
	b.ep.SetGossipIdleTimeout(200 * time.Millisecond)
	require.NoError(t, tun.Close())
	require.Eventually(t, func() bool { return len(b.ep.Tunnels()) == 0 }, 2*time.Second, 10*time.Millisecond)
	again, err := a.ep.Dial(ctxT(t), b.addr, b.id, "payments")
	require.NoError(t, err)
	select {
	case <-again.Done():
	case <-time.After(2 * time.Second):
		t.Fatal("the timeout set afterwards did not apply to the new tunnel")
	}
}

func TestGossipIdleTimeoutDefault(t *testing.T) {
	assert.Equal(t, 60*time.Second, Limits{}.withDefaults().GossipIdleTimeout)
	assert.Equal(t, time.Duration(-1), Limits{GossipIdleTimeout: -1}.withDefaults().GossipIdleTimeout)
}

// A per-tunnel policy replaces the endpoint-wide timeout: a gossip-only tunnel it gives longer
// stays up past the endpoint's timeout, and when the policy shortens, the tunnel already up
// takes the new timeout at its next check and closes.
func TestGossipIdlePolicy(t *testing.T) {
	const idle = 200 * time.Millisecond
	a, b, tun, _ := idleNodes(t, idle)
	var long atomic.Bool
	long.Store(true)
	policy := func(zone, peer string) time.Duration {
		if zone == "payments" && long.Load() {
			return 1500 * time.Millisecond
		}
		return idle
	}
	a.ep.SetGossipIdlePolicy(policy)
	b.ep.SetGossipIdlePolicy(policy)
	tun = redial(t, a, b, tun) // armed by the policy from its start
	closed := a.ep.Stats().TunnelsIdleClosed + b.ep.Stats().TunnelsIdleClosed

	time.Sleep(5 * idle)
	require.True(t, tun.Alive(), "the policy's longer timeout holds the silent tunnel")
	assert.Equal(t, closed, a.ep.Stats().TunnelsIdleClosed+b.ep.Stats().TunnelsIdleClosed)

	long.Store(false)
	select {
	case <-tun.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the shortened timeout did not apply to the tunnel already up")
	}
	assert.Greater(t, a.ep.Stats().TunnelsIdleClosed+b.ep.Stats().TunnelsIdleClosed, closed)

	// nil restores the endpoint-wide timeout.
	a.ep.SetGossipIdlePolicy(nil)
	b.ep.SetGossipIdlePolicy(nil)
	again, err := a.ep.Dial(ctxT(t), b.addr, b.id, "payments")
	require.NoError(t, err)
	select {
	case <-again.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("without a policy the endpoint's timeout applies again")
	}
}

// A policy that turns the idle close off keeps the tunnel, and the endpoint still closes it at
// once when told to (as the node does for a revoked peer): a tunnel held for idleness is no
// shelter from ClosePeer.
func TestGossipIdlePolicyOffStillClosesPeer(t *testing.T) {
	a, b, tun, _ := idleNodes(t, 200*time.Millisecond)
	off := func(string, string) time.Duration { return -1 }
	a.ep.SetGossipIdlePolicy(off)
	b.ep.SetGossipIdlePolicy(off)
	tun = redial(t, a, b, tun)
	time.Sleep(time.Second)
	require.True(t, tun.Alive())

	assert.Equal(t, 1, b.ep.ClosePeer(a.id))
	select {
	case <-tun.Done():
	case <-time.After(2 * time.Second):
		t.Fatal("ClosePeer left the held tunnel up")
	}
}

// redial closes a's tunnel old to b and dials a new one, so that the new one is armed with
// whatever idle timeout or policy the endpoints hold now.
func redial(t *testing.T, a, b *testNode, old *Tunnel) *Tunnel {
	t.Helper()
	_ = old.Close() // it may have closed for idleness already
	require.Eventually(t, func() bool { return len(b.ep.Tunnels()) == 0 }, 2*time.Second, 10*time.Millisecond)
	tun, err := a.ep.Dial(ctxT(t), b.addr, b.id, "payments")
	require.NoError(t, err)
	require.Eventually(t, func() bool { return len(b.ep.Tunnels()) == 1 }, 2*time.Second, 5*time.Millisecond)
	return tun
}

// A shortened policy reaches a tunnel at its next idle check, which the old, long timeout puts
// far away; RecheckIdle makes tunnels already up check at once, so they close under the new
// timeout instead of the old one.
func TestRecheckIdleAppliesShortenedPolicy(t *testing.T) {
	a, b, tun, _ := idleNodes(t, 200*time.Millisecond)
	var long atomic.Bool
	long.Store(true)
	policy := func(string, string) time.Duration {
		if long.Load() {
			return time.Hour
		}
		return 200 * time.Millisecond
	}
	a.ep.SetGossipIdlePolicy(policy)
	b.ep.SetGossipIdlePolicy(policy)
	tun = redial(t, a, b, tun)
	time.Sleep(400 * time.Millisecond)

	long.Store(false)
	time.Sleep(time.Second)
	require.True(t, tun.Alive(), "without a recheck the hour-long check is still pending")

	a.ep.RecheckIdle()
	b.ep.RecheckIdle()
	select {
	case <-tun.Done():
	case <-time.After(2 * time.Second):
		t.Fatal("the recheck did not apply the shortened timeout")
	}
}

// Only the end that dialed a tunnel closes it for idleness: an accepting end with a short
// timeout keeps a silent tunnel the dialer holds (a node's gossip anchors are held at both ends
// this way), and the dialer's own timeout still closes it at both ends.
func TestOnlyTheDialerClosesIdle(t *testing.T) {
	const idle = 200 * time.Millisecond
	a, b, tun, _ := idleNodes(t, idle)
	var hold atomic.Bool
	hold.Store(true)
	a.ep.SetGossipIdlePolicy(func(string, string) time.Duration {
		if hold.Load() {
			return -1
		}
		return idle
	})
	b.ep.SetGossipIdlePolicy(func(string, string) time.Duration { return idle })
	tun = redial(t, a, b, tun)

	time.Sleep(6 * idle)
	require.True(t, tun.Alive(), "the accepting end closed a tunnel its dialer holds")
	require.Len(t, b.ep.Tunnels(), 1)
	assert.Zero(t, a.ep.Stats().TunnelsIdleClosed+b.ep.Stats().TunnelsIdleClosed)

	hold.Store(false)
	a.ep.RecheckIdle()
	select {
	case <-tun.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the dialer's timeout did not close the silent tunnel")
	}
	require.Eventually(t, func() bool { return len(b.ep.Tunnels()) == 0 }, 2*time.Second, 10*time.Millisecond)
	assert.Equal(t, uint64(1), a.ep.Stats().TunnelsIdleClosed)
	assert.Zero(t, b.ep.Stats().TunnelsIdleClosed, "the accepting end never closes for idleness")
}
