package gossip_test

import (
	"context"
	"fmt"
	"io"
	"log"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/overlay/gossip"
	"github.com/ute-project/ute/overlay/gossip/gossiptest"
	"github.com/ute-project/ute/overlay/tunnel"
)

// idleNode starts a node whose gossip-only tunnels close after idle.
func idleNode(t *testing.T, auth *gossiptest.Authority, name string, idle time.Duration) *gossiptest.Node {
	t.Helper()
	lim := gossiptest.FastLimits()
	lim.GossipIdleTimeout = idle
	return gossiptest.StartNode(t, auth, name, []string{"z"}, gossiptest.NodeOptions{Limits: &lim})
}

// closedOnce hands out an already closed tunnel on the first lookup: the tunnel a transport found
// live and that closed (idle, or the peer went away) before the packet or stream was sent on it.
type closedOnce struct {
	*tunnel.Endpoint
	dead *tunnel.Tunnel
}

func (d *closedOnce) LiveTunnel(nodeID, zone string) (*tunnel.Tunnel, bool) {
	if t := d.dead; t != nil {
		d.dead = nil
		return t, true
	}
	return d.Endpoint.LiveTunnel(nodeID, zone)
}

// Gossip over tunnels that close when idle: each packet or stream after a close dials again, in
// both directions, and a tunnel that closes between the lookup and the send costs a handshake,
// not the packet.
func TestTransportRedialsAfterIdleClose(t *testing.T) {
	const idle = 200 * time.Millisecond
	auth := gossiptest.NewAuthority(t, td)
	a, b := idleNode(t, auth, "a", idle), idleNode(t, auth, "b", idle)
	ta, tb := transport(t, a, "z"), transport(t, b, "z")

	for i := range 3 {
		msg := fmt.Appendf(nil, "round %d", i)
		_, err := ta.WriteToAddress(msg, addrOf(b))
		require.NoError(t, err)
		assert.Equal(t, msg, recvPacket(t, tb).Buf)
		_, err = tb.WriteToAddress(append(msg, " back"...), addrOf(a))
		require.NoError(t, err)
		assert.Equal(t, string(msg)+" back", string(recvPacket(t, ta).Buf))
		require.Eventually(t, func() bool { return a.Endpoint.Stats().Tunnels == 0 && b.Endpoint.Stats().Tunnels == 0 },
			5*time.Second, 10*time.Millisecond, "round %d: the gossip-only tunnel closes when idle", i)
	}
	assert.Equal(t, uint64(3), a.Endpoint.Stats().TunnelsOpened, "one handshake per round")
	assert.Zero(t, ta.Stats().PacketsDropped)

}

// A tunnel the transport found live but that closed before the packet or the stream went out on
// it: the transport dials again and delivers.
func TestTransportSurvivesTunnelClosedBeforeSend(t *testing.T) {
	auth := gossiptest.NewAuthority(t, td)
	a := gossiptest.StartNode(t, auth, "a", []string{"z"}, gossiptest.NodeOptions{})
	b := gossiptest.StartNode(t, auth, "b", []string{"z"}, gossiptest.NodeOptions{})
	tb := transport(t, b, "z")
	deadTunnel := func() *tunnel.Tunnel {
		dead, err := a.Endpoint.Dial(context.Background(), b.Addr, b.ID, "z")
		require.NoError(t, err)
		require.NoError(t, dead.Close())
		<-dead.Done()
		return dead
	}
	d := &closedOnce{Endpoint: a.Endpoint, dead: deadTunnel()}
	ta := transport(t, a, "z", func(c *gossip.TransportConfig) { c.Dialer = d })

	_, err := ta.WriteToAddress([]byte("after the close"), addrOf(b))
	require.NoError(t, err)
	assert.Equal(t, "after the close", string(recvPacket(t, tb).Buf))
	assert.Zero(t, ta.Stats().PacketsDropped)

	d.dead = deadTunnel()
	c, err := ta.DialAddressTimeout(addrOf(b), 5*time.Second)
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Close() })
	_, err = c.Write([]byte("stream"))
	require.NoError(t, err)
	s := recvStream(t, tb)
	buf := make([]byte, 6)
	_, err = io.ReadFull(s, buf)
	require.NoError(t, err)
	assert.Equal(t, "stream", string(buf))
}

// memberlist over transports whose tunnels close when idle: the pool converges, the tunnels do
// close and are dialed again, and no member is declared failed for it.
func TestMemberlistConvergesOverIdleClosingTunnels(t *testing.T) {
	const n, idle = 5, 150 * time.Millisecond
	auth := gossiptest.NewAuthority(t, td)
	nodes := make([]*gossiptest.Node, n)
	lists := make([]*memberlist.Memberlist, n)
	trs := make([]*gossip.Transport, n)
	for i := range n {
		nodes[i] = idleNode(t, auth, fmt.Sprintf("m%d", i), idle)
		trs[i] = transport(t, nodes[i], "z")
		conf := memberlist.DefaultLocalConfig()
		conf.Name = nodes[i].ID
		conf.Transport = trs[i]
		conf.GossipInterval = 50 * time.Millisecond
		conf.ProbeInterval = 300 * time.Millisecond
		conf.ProbeTimeout = 250 * time.Millisecond
		conf.PushPullInterval = time.Second
		conf.TCPTimeout = 2 * time.Second
		conf.SuspicionMult = 6
		conf.LogOutput, conf.Logger = nil, log.New(io.Discard, "", 0)
		ml, err := memberlist.Create(conf)
		require.NoError(t, err)
		t.Cleanup(func() { _ = ml.Shutdown() })
		lists[i] = ml
	}
	for i := 1; i < n; i++ {
		release := trs[i].Hint(nodes[0].Addr, nodes[0].ID)
		_, err := lists[i].Join([]string{nodes[0].Addr.String()})
		release()
		require.NoError(t, err)
	}
	converged := func() bool {
		for _, ml := range lists {
			if ml.NumMembers() != n {
				return false
			}
		}
		return true
	}
	require.Eventually(t, converged, 20*time.Second, 20*time.Millisecond)
	var closed uint64
	for range 30 { // 3 s: many idle timeouts, several probe rounds of every member
		time.Sleep(100 * time.Millisecond)
		require.True(t, converged(), "a member was declared failed over a closed tunnel")
	}
	for _, nd := range nodes {
		closed += nd.Endpoint.Stats().TunnelsIdleClosed
	}
	assert.Positive(t, closed, "gossip-only tunnels were closed when idle and dialed again")
}
