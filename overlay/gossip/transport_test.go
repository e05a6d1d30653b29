package gossip_test

import (
	"bytes"
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/overlay/gossip"
	"github.com/ute-project/ute/overlay/gossip/gossiptest"
	"github.com/ute-project/ute/overlay/tunnel"
)

const td = "acme.internal"

func transport(t *testing.T, n *gossiptest.Node, zone string, mod ...func(*gossip.TransportConfig)) *gossip.Transport {
	t.Helper()
	cfg := gossip.TransportConfig{Zone: zone, Advertise: n.Addr, Dialer: n.Endpoint, Mux: n.Mux, Logger: gossiptest.QuietLogger()}
	for _, m := range mod {
		m(&cfg)
	}
	tr, err := gossip.NewTransport(cfg)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, tr.Shutdown()) })
	return tr
}

func addrOf(n *gossiptest.Node) memberlist.Address {
	return memberlist.Address{Addr: n.Addr.String(), Name: n.ID}
}

func recvPacket(t *testing.T, tr *gossip.Transport) *memberlist.Packet {
	t.Helper()
	select {
	case p := <-tr.PacketCh():
		return p
	case <-time.After(5 * time.Second):
		t.Fatal("no packet")
		return nil
	}
}

func recvStream(t *testing.T, tr *gossip.Transport) net.Conn {
	t.Helper()
	select {
	case c := <-tr.StreamCh():
		t.Cleanup(func() { _ = c.Close() })
		return c
	case <-time.After(5 * time.Second):
		t.Fatal("no stream")
		return nil
	}
}

func noPacket(t *testing.T, tr *gossip.Transport, within time.Duration) {
	t.Helper()
	select {
	case p := <-tr.PacketCh():
		t.Fatalf("unexpected packet from %s", p.From)
	case <-time.After(within):
	}
}

// TestTransportPacketsAndStreams: small packets travel as datagrams, large ones on a control
// stream, streams as control streams; From is the sender's underlay address.
func TestTransportPacketsAndStreams(t *testing.T) {
	auth := gossiptest.NewAuthority(t, td)
	a := gossiptest.StartNode(t, auth, "a", []string{"z"}, gossiptest.NodeOptions{})
	b := gossiptest.StartNode(t, auth, "b", []string{"z"}, gossiptest.NodeOptions{})
	ta, tb := transport(t, a, "z"), transport(t, b, "z")

	small := []byte("ping from a")
	_, err := ta.WriteToAddress(small, addrOf(b))
	require.NoError(t, err)
	p := recvPacket(t, tb)
	assert.Equal(t, small, p.Buf)
	assert.Equal(t, a.Addr.String(), p.From.String())

	large := bytes.Repeat([]byte{0xab}, 5000)
	_, err = ta.WriteToAddress(large, addrOf(b))
	require.NoError(t, err)
	p = recvPacket(t, tb)
	assert.Equal(t, large, p.Buf)
	require.Eventually(t, func() bool { return ta.Stats().PacketsOverStream == 1 }, 2*time.Second, 10*time.Millisecond)
	assert.Equal(t, uint64(2), ta.Stats().PacketsSent)

	// The answer rides the tunnel b already holds (inbound), no second handshake.
	_, err = tb.WriteToAddress([]byte("pong"), addrOf(a))
	require.NoError(t, err)
	assert.Equal(t, "pong", string(recvPacket(t, ta).Buf))
	assert.Equal(t, 1, a.Endpoint.Stats().Tunnels)

	c, err := ta.DialAddressTimeout(addrOf(b), 5*time.Second)
	require.NoError(t, err)
	defer func() { _ = c.Close() }()
	_, err = c.Write([]byte("push/pull"))
	require.NoError(t, err)
	s := recvStream(t, tb)
	buf := make([]byte, 9)
	_, err = io.ReadFull(s, buf)
	require.NoError(t, err)
	assert.Equal(t, "push/pull", string(buf))
	_, err = s.Write([]byte("ok"))
	require.NoError(t, err)
	_, err = io.ReadFull(c, buf[:2])
	require.NoError(t, err)
	assert.Equal(t, "ok", string(buf[:2]))
}

// TestTransportVerifiesNamedPeer: an address that answers with another node's certificate is
// refused at the handshake (ErrPeerMismatch), and nothing reaches that node's pool.
func TestTransportVerifiesNamedPeer(t *testing.T) {
	auth := gossiptest.NewAuthority(t, td)
	a := gossiptest.StartNode(t, auth, "a", []string{"z"}, gossiptest.NodeOptions{})
	b := gossiptest.StartNode(t, auth, "b", []string{"z"}, gossiptest.NodeOptions{})
	ta, tb := transport(t, a, "z"), transport(t, b, "z")

	wrong := memberlist.Address{Addr: b.Addr.String(), Name: auth.NodeID("c")}
	_, err := ta.DialAddressTimeout(wrong, 5*time.Second)
	require.ErrorIs(t, err, tunnel.ErrPeerMismatch)

	_, err = ta.WriteToAddress([]byte("for c"), wrong)
	require.NoError(t, err, "packets are best effort")
	require.Eventually(t, func() bool { return ta.Stats().DialFailures == 2 }, 5*time.Second, 10*time.Millisecond)
	noPacket(t, tb, 100*time.Millisecond)
	assert.Equal(t, uint64(1), ta.Stats().PacketsDropped)
	// Within RedialAfter, packets for the refused peer are dropped without a new handshake.
	_, err = ta.WriteToAddress([]byte("again"), wrong)
	require.NoError(t, err)
	assert.Equal(t, uint64(2), ta.Stats().PacketsDropped)
	assert.Equal(t, uint64(2), ta.Stats().DialFailures)
}

// TestTransportNeedsNodeName: an address alone is refused unless a join hint names the node.
func TestTransportNeedsNodeName(t *testing.T) {
	auth := gossiptest.NewAuthority(t, td)
	a := gossiptest.StartNode(t, auth, "a", []string{"z"}, gossiptest.NodeOptions{})
	b := gossiptest.StartNode(t, auth, "b", []string{"z"}, gossiptest.NodeOptions{})
	ta, tb := transport(t, a, "z"), transport(t, b, "z")

	_, err := ta.DialTimeout(b.Addr.String(), time.Second)
	require.ErrorIs(t, err, gossip.ErrNoNodeName)
	_, err = ta.WriteTo([]byte("x"), b.Addr.String())
	require.ErrorIs(t, err, gossip.ErrNoNodeName)

	release := ta.Hint(b.Addr, b.ID)
	c, err := ta.DialTimeout(b.Addr.String(), 5*time.Second)
	require.NoError(t, err)
	_ = c.Close()
	recvStream(t, tb)
	release()
	_, err = ta.DialTimeout(b.Addr.String(), time.Second)
	require.ErrorIs(t, err, gossip.ErrNoNodeName)
}

// TestMuxZoneIsolation: a node in two zones hands each zone's gossip to that zone's transport
// only; a node without a zone cannot reach its pool.
func TestMuxZoneIsolation(t *testing.T) {
	auth := gossiptest.NewAuthority(t, td)
	a := gossiptest.StartNode(t, auth, "a", []string{"z1"}, gossiptest.NodeOptions{})
	b := gossiptest.StartNode(t, auth, "b", []string{"z1", "z2"}, gossiptest.NodeOptions{})
	c := gossiptest.StartNode(t, auth, "c", []string{"z2"}, gossiptest.NodeOptions{})
	ta := transport(t, a, "z1")
	tb1, tb2 := transport(t, b, "z1"), transport(t, b, "z2")
	tc := transport(t, c, "z2")

	_, err := ta.WriteToAddress([]byte("z1 only"), addrOf(b))
	require.NoError(t, err)
	assert.Equal(t, "z1 only", string(recvPacket(t, tb1).Buf))
	_, err = tc.WriteToAddress([]byte("z2 only"), addrOf(b))
	require.NoError(t, err)
	assert.Equal(t, "z2 only", string(recvPacket(t, tb2).Buf))
	noPacket(t, tb1, 50*time.Millisecond)
	noPacket(t, tb2, 50*time.Millisecond)

	// c does not serve z1: its node refuses locally; a does not hold z2: ALPN fails.
	_, err = tc.DialAddressTimeout(addrOf(a), 5*time.Second)
	require.ErrorIs(t, err, tunnel.ErrZoneNotOffered)

	// A mux hands a zone's gossip to exactly one transport.
	_, err = gossip.NewTransport(gossip.TransportConfig{Zone: "z1", Advertise: b.Addr, Dialer: b.Endpoint, Mux: b.Mux})
	require.ErrorIs(t, err, gossip.ErrZoneTaken)
}

// TestTransportAttackers: a node of another trust domain, a node whose certificate lacks the
// zone, and a revoked node are refused inside the handshake; the pool never sees their bytes.
func TestTransportAttackers(t *testing.T) {
	auth := gossiptest.NewAuthority(t, td)
	seed := gossiptest.StartNode(t, auth, "seed", []string{"z"}, gossiptest.NodeOptions{})
	ts := transport(t, seed, "z")

	foreign := gossiptest.NewAuthority(t, "evil.internal")
	cases := []struct {
		name   string
		opt    gossiptest.NodeOptions
		revoke bool
		want   error // what the seed's verifier refused with
	}{
		{"foreign trust domain", gossiptest.NodeOptions{Authority: foreign}, false, identity.ErrTrustDomain},
		{"other zone", gossiptest.NodeOptions{CertZones: []string{"other"}}, false, gossiptest.ErrNotInZone},
		{"revoked", gossiptest.NodeOptions{}, true, gossiptest.ErrRevoked},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			m := gossiptest.StartNode(t, auth, "m-"+tc.name[:5], []string{"z"}, tc.opt)
			if tc.revoke {
				seed.Verifier.Revoke(m.ID)
			}
			tm := transport(t, m, "z")
			_, err := tm.DialAddressTimeout(addrOf(seed), 5*time.Second)
			require.ErrorIs(t, err, tunnel.ErrRefusedByPeer)
			_, err = tm.WriteToAddress([]byte("inject"), addrOf(seed))
			require.NoError(t, err)
			require.Eventually(t, func() bool { return tm.Stats().DialFailures >= 2 }, 5*time.Second, 10*time.Millisecond)
			noPacket(t, ts, 50*time.Millisecond)

			var refusals []tunnel.Refusal
			require.Eventually(t, func() bool {
				refusals = append(refusals, seed.Refusals()...)
				return len(refusals) >= 1
			}, 2*time.Second, 10*time.Millisecond)
			require.ErrorIs(t, refusals[0].Err, tunnel.ErrPeerRefused)
			require.ErrorIs(t, refusals[0].Err, tc.want)
		})
	}
}

// TestTransportNeverBlocks: with memberlist not reading, inbound packets over the queue are
// dropped and counted while the tunnel keeps delivering.
func TestTransportNeverBlocks(t *testing.T) {
	auth := gossiptest.NewAuthority(t, td)
	a := gossiptest.StartNode(t, auth, "a", []string{"z"}, gossiptest.NodeOptions{})
	b := gossiptest.StartNode(t, auth, "b", []string{"z"}, gossiptest.NodeOptions{})
	ta := transport(t, a, "z")
	tb := transport(t, b, "z", func(c *gossip.TransportConfig) { c.PacketQueue = 2; c.StreamQueue = 1 })

	for range 20 {
		_, err := ta.WriteToAddress([]byte("flood"), addrOf(b))
		require.NoError(t, err)
	}
	require.Eventually(t, func() bool { return tb.Stats().PacketsReceived == 2 && tb.Stats().PacketsDropped > 0 }, 5*time.Second, 10*time.Millisecond)

	for range 3 {
		c, err := ta.DialAddressTimeout(addrOf(b), 5*time.Second)
		require.NoError(t, err)
		t.Cleanup(func() { _ = c.Close() })
		_, _ = c.Write([]byte{1})
	}
	require.Eventually(t, func() bool { return tb.Stats().StreamsDropped == 2 }, 5*time.Second, 10*time.Millisecond)
}

// TestTransportTakeBeforeMemberlist: Take sees each inbound packet before memberlist's queue, so
// a packet it consumes arrives even while that queue is full, and memberlist never sees it; a
// partitioned transport hands Take nothing.
func TestTransportTakeBeforeMemberlist(t *testing.T) {
	auth := gossiptest.NewAuthority(t, td)
	a := gossiptest.StartNode(t, auth, "a", []string{"z"}, gossiptest.NodeOptions{})
	b := gossiptest.StartNode(t, auth, "b", []string{"z"}, gossiptest.NodeOptions{})
	ta := transport(t, a, "z")
	took := make(chan []byte, 16)
	tb := transport(t, b, "z", func(c *gossip.TransportConfig) {
		c.PacketQueue = 1 // nobody reads it: memberlist is stalled
		c.Take = func(p []byte) bool {
			if len(p) == 0 || p[0] != 0x01 {
				return false
			}
			took <- bytes.Clone(p)
			return true
		}
	})

	for _, p := range [][]byte{[]byte("m1"), []byte("m2"), []byte("m3")} {
		_, err := ta.WriteToAddress(p, addrOf(b))
		require.NoError(t, err)
	}
	require.Eventually(t, func() bool { return tb.Stats().PacketsReceived == 1 && tb.Stats().PacketsDropped == 2 }, 5*time.Second, 10*time.Millisecond)
	for i := range 5 {
		_, err := ta.WriteToAddress([]byte{0x01, byte(i)}, addrOf(b))
		require.NoError(t, err)
	}
	var want, got [][]byte
	for i := range 5 {
		want = append(want, []byte{0x01, byte(i)})
		select {
		case p := <-took:
			got = append(got, p)
		case <-time.After(5 * time.Second):
			t.Fatalf("only %d of 5 packets taken", i)
		}
	}
	assert.ElementsMatch(t, want, got)
	st := tb.Stats()
	assert.Equal(t, uint64(5), st.PacketsTaken)
	assert.Equal(t, uint64(1), st.PacketsReceived, "memberlist saw none of them")
	assert.Equal(t, "m1", string(recvPacket(t, tb).Buf))

	tb.SetPartitioned(true)
	_, _ = ta.WriteToAddress([]byte{0x01, 9}, addrOf(b))
	select {
	case p := <-took:
		t.Fatalf("a partitioned transport handed %x to Take", p)
	case <-time.After(300 * time.Millisecond):
	}
	assert.Equal(t, uint64(5), tb.Stats().PacketsTaken)
}

// TestTransportPartitionAndShutdown: a partitioned transport neither sends nor receives; after
// Shutdown it refuses work and closes the streams it handed out.
func TestTransportPartitionAndShutdown(t *testing.T) {
	auth := gossiptest.NewAuthority(t, td)
	a := gossiptest.StartNode(t, auth, "a", []string{"z"}, gossiptest.NodeOptions{})
	b := gossiptest.StartNode(t, auth, "b", []string{"z"}, gossiptest.NodeOptions{})
	ta, tb := transport(t, a, "z"), transport(t, b, "z")

	tb.SetPartitioned(true)
	_, err := ta.WriteToAddress([]byte("lost"), addrOf(b))
	require.NoError(t, err)
	noPacket(t, tb, 200*time.Millisecond)
	_, err = tb.DialAddressTimeout(addrOf(a), time.Second)
	require.ErrorIs(t, err, gossip.ErrPartitioned)
	tb.SetPartitioned(false)
	_, err = ta.WriteToAddress([]byte("found"), addrOf(b))
	require.NoError(t, err)
	assert.Equal(t, "found", string(recvPacket(t, tb).Buf))

	c, err := ta.DialAddressTimeout(addrOf(b), 5*time.Second)
	require.NoError(t, err)
	require.NoError(t, ta.Shutdown())
	_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
	_, err = c.Read(make([]byte, 1))
	require.Error(t, err, "Shutdown closed the stream it handed out")
	_, err = ta.WriteToAddress([]byte("late"), addrOf(b))
	require.ErrorIs(t, err, gossip.ErrShutdown)

	// a's zone has no transport now: its gossip is dropped and counted by the mux.
	tb2 := tb
	_, err = tb2.WriteToAddress([]byte("to nobody"), addrOf(a))
	require.NoError(t, err)
	require.Eventually(t, func() bool { return a.Mux.Stats().NoTransport == 1 }, 5*time.Second, 10*time.Millisecond)
}

// FuzzParseDatagram: any control datagram payload parses or fails with ErrMalformed, and a
// parsed one re-encodes to the same bytes.
func FuzzParseDatagram(f *testing.F) {
	f.Add([]byte{gossip.ChannelPacket, 1, 2, 3})
	f.Add([]byte{})
	f.Add([]byte{0xff})
	f.Fuzz(func(t *testing.T, in []byte) {
		ch, body, err := gossip.ParseDatagram(in)
		if err != nil {
			if !errors.Is(err, gossip.ErrMalformed) {
				t.Fatalf("unexpected error %v", err)
			}
			return
		}
		if !bytes.Equal(gossip.AppendDatagram(nil, ch, body), in) {
			t.Fatal("round trip changed the bytes")
		}
	})
}

// TestTransportDeferrablePacketsDoNotWaitForTheGate: a packet TransportConfig.Deferrable marks,
// to a member without a tunnel while every handshake slot of the endpoint's gate is taken, is
// dropped at once and the member is not held as unreachable: the next packet, one that may
// wait, waits for the slot and arrives.
func TestTransportDeferrablePacketsDoNotWaitForTheGate(t *testing.T) {
	auth := gossiptest.NewAuthority(t, td)
	a := gossiptest.StartNode(t, auth, "a", []string{"z"}, gossiptest.NodeOptions{})
	b := gossiptest.StartNode(t, auth, "b", []string{"z"}, gossiptest.NodeOptions{})
	var (
		mu   sync.Mutex
		seen [][]byte
	)
	ta := transport(t, a, "z", func(c *gossip.TransportConfig) {
		c.Deferrable = func(p []byte) bool {
			mu.Lock()
			defer mu.Unlock()
			seen = append(seen, bytes.Clone(p))
			return len(p) > 0 && p[0] == 0x03
		}
	})
	tb := transport(t, b, "z")
	gate := tunnel.NewDialGate(1)
	a.Endpoint.SetDialGate(gate)
	hold, err := gate.Acquire(t.Context())
	require.NoError(t, err)

	_, err = ta.WriteToAddress([]byte{0x03, 'd'}, addrOf(b))
	require.NoError(t, err)
	require.Eventually(t, func() bool { return ta.Stats().DialsDeferred == 1 }, 2*time.Second, 5*time.Millisecond)
	st := ta.Stats()
	assert.Equal(t, uint64(1), st.PacketsDropped)
	assert.Zero(t, st.DialFailures)
	assert.False(t, ta.Held(b.ID), "a refusal at the gate does not hold the member")

	_, err = ta.WriteToAddress([]byte{0x00, 'p'}, addrOf(b))
	require.NoError(t, err)
	noPacket(t, tb, 200*time.Millisecond) // waiting for the slot
	hold()
	assert.Equal(t, []byte{0x00, 'p'}, recvPacket(t, tb).Buf)
	assert.Equal(t, uint64(1), ta.Stats().DialsDeferred)
	mu.Lock()
	defer mu.Unlock()
	assert.Equal(t, [][]byte{{0x03, 'd'}, {0x00, 'p'}}, seen, "asked once per dial, of the packet that started it")
}
