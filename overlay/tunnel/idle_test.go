package tunnel

import (
	"net"
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
