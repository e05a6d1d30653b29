package daemon

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.zx2c4.com/wireguard/tun/tuntest"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/node"
	"github.com/ute-project/ute/node/attest"
	"github.com/ute-project/ute/node/config"
	"github.com/ute-project/ute/node/membership"
	"github.com/ute-project/ute/node/state"
	"github.com/ute-project/ute/overlay/dtl"
	"github.com/ute-project/ute/overlay/wireguard"
)

// wgd is a daemon in WireGuard mode whose kernel side is a channel TUN: kernel(p) is a packet
// an agent sends, delivered receives what reaches the agents.
type wgd struct {
	*Daemon
	ch        *tuntest.ChannelTUN
	delivered chan []byte
	// refuseExe makes attestation refuse tuples from this source port (a different executable).
	refuseExe atomic.Uint32
}

func startWGDaemon(t *testing.T, ta *testAuthority, s spec) *wgd {
	t.Helper()
	return startWGDaemonWith(t, ta, s, nil)
}

// startWGDaemonWith is startWGDaemon with mod applied to the options (and the joined directory).
func startWGDaemonWith(t *testing.T, ta *testAuthority, s spec, mod func(o *Options)) *wgd {
	t.Helper()
	dir, pc := joinNode(t, ta, s)
	w := &wgd{ch: tuntest.NewChannelTUN(), delivered: make(chan []byte, 64)}
	cfg := netstackConfig() // the injected TUN carries the agents; no proxies
	cfg.Transport = config.TransportWireGuard
	ft := membership.FastTiming()
	lpc, err := netListenUDP()
	require.NoError(t, err)
	port := uint16(lpc.LocalAddr().(interface{ AddrPort() netip.AddrPort }).AddrPort().Port())
	require.NoError(t, lpc.Close())
	opts := Options{Dir: dir, Config: cfg, Logger: testLogger(s.name), PacketConn: pc, NoAuthority: true, Timing: &ft,
		WireGuard: WireGuardOptions{TUN: w.ch.TUN(), Port: port, Attest: func(tp wireguard.Tuple, wl node.Workload) (attest.Process, error) {
			if p := w.refuseExe.Load(); p != 0 && uint32(tp.SrcPort) == p {
				return attest.Process{PID: 4242, Exe: "/usr/bin/curl"}, fmt.Errorf("%w: pid 4242 runs /usr/bin/curl", attest.ErrMismatch)
			}
			return attest.Process{}, nil
		}}}
	if mod != nil {
		mod(&opts)
	}
	d, err := Start(context.Background(), opts)
	require.NoError(t, err)
	w.Daemon = d
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			select {
			case p := <-w.ch.Inbound:
				select {
				case w.delivered <- p:
				case <-stop:
					return
				}
			case <-stop:
				return
			}
		}
	})
	t.Cleanup(func() {
		_ = d.Close()
		close(stop)
		wg.Wait()
	})
	return w
}

func (w *wgd) agentIP(t *testing.T, name string) netip.Addr {
	t.Helper()
	for _, a := range w.Node().Snapshot().Agents {
		if a.Name == name {
			return a.IP
		}
	}
	t.Fatalf("no agent %s", name)
	return netip.Addr{}
}

// tcpPacket is a minimal IPv4 TCP packet (the filter and wireguard-go read addresses and ports
// only; the channel TUN has no kernel to check sums).
func tcpPacket(src, dst netip.AddrPort, payload int) []byte {
	p := make([]byte, 40+payload)
	p[0] = 0x45
	binary.BigEndian.PutUint16(p[2:4], uint16(len(p)))
	p[8] = 64
	p[9] = 6
	s, d := src.Addr().As4(), dst.Addr().As4()
	copy(p[12:16], s[:])
	copy(p[16:20], d[:])
	binary.BigEndian.PutUint16(p[20:22], src.Port())
	binary.BigEndian.PutUint16(p[22:24], dst.Port())
	p[32] = 5 << 4
	return p
}

func waitPacket(t *testing.T, c chan []byte, want []byte) {
	t.Helper()
	select {
	case p := <-c:
		require.Equal(t, want, p)
	case <-time.After(10 * time.Second):
		t.Fatal("the packet never arrived")
	}
}

func noPacket(t *testing.T, c chan []byte, within time.Duration) {
	t.Helper()
	select {
	case p := <-c:
		t.Fatalf("a packet passed: % x", p[:min(len(p), 40)])
	case <-time.After(within):
	}
}

// TestWireGuardTransport runs two daemons in WireGuard mode with real wireguard-go devices over
// loopback UDP (channel TUNs stand in for the kernel interface): peers come only from verified
// bindings, an admitted flow crosses at WireGuard speed, and every refusal — policy, cross-zone,
// spoofed source, wrong executable, revocation — keeps its packets off the other side.
func TestWireGuardTransport(t *testing.T) {
	ta := startAuthority(t)
	n1 := startWGDaemon(t, ta, spec{name: "n1", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "billing-1", Zone: "payments"}}})
	n2 := startWGDaemon(t, ta, spec{name: "n2", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "ledger", Zone: "payments"}}})
	require.NoError(t, n1.Node().AddPeer(node.Peer{Node: n2.Node().ID().String(), Addr: n2.Addr()}))
	require.NoError(t, n2.Node().AddPeer(node.Peer{Node: n1.Node().ID().String(), Addr: n1.Addr()}))
	billing, ledger := n1.agentIP(t, "billing-1"), n2.agentIP(t, "ledger")

	src, dst := netip.AddrPortFrom(billing, 40000), netip.AddrPortFrom(ledger, 8080)
	syn := tcpPacket(src, dst, 0)
	n1.ch.Outbound <- syn
	waitPacket(t, n2.delivered, syn)
	reply := tcpPacket(dst, src, 0)
	n2.ch.Outbound <- reply
	waitPacket(t, n1.delivered, reply)
	for i := range 20 {
		p := tcpPacket(src, dst, 100+i)
		n1.ch.Outbound <- p
		waitPacket(t, n2.delivered, p)
	}
	info1, ok := n1.WireGuard()
	require.True(t, ok)
	require.Len(t, info1.Peers, 1)
	require.Equal(t, n2.Node().ID().String(), info1.Peers[0].Node)
	require.Equal(t, []netip.Prefix{netip.PrefixFrom(ledger, 32)}, info1.Peers[0].AllowedIPs, "allowed IPs are exactly the agents' addresses")
	info2, _ := n2.WireGuard()
	require.Equal(t, []netip.Prefix{netip.PrefixFrom(billing, 32)}, info2.Peers[0].AllowedIPs)
	require.Equal(t, uint64(1), info1.Filter.Admissions)

	refusedAt := func(w *wgd, reason string) uint64 { i, _ := w.WireGuard(); return i.Refused[reason] }
	expectRefused := func(reason string, p []byte) {
		t.Helper()
		before := refusedAt(n1, reason)
		n1.ch.Outbound <- p
		require.Eventually(t, func() bool { return refusedAt(n1, reason) == before+1 }, 10*time.Second, 10*time.Millisecond, reason)
		noPacket(t, n2.delivered, 100*time.Millisecond)
	}
	// The policy allows billing-* to ledger on tcp/8080 only: n2 refuses port 9090.
	expectRefused("policy", tcpPacket(netip.AddrPortFrom(billing, 40001), netip.AddrPortFrom(ledger, 9090), 0))
	// An address of zone support: refused by n1 before any record is signed.
	expectRefused("resolve", tcpPacket(netip.AddrPortFrom(billing, 40002), netip.MustParseAddrPort("100.100.2.5:8080"), 0))
	// A source address that is not an agent of n1.
	expectRefused("spoofed", tcpPacket(netip.MustParseAddrPort("100.100.1.250:40003"), dst, 0))
	// Another executable behind billing-1's address.
	n1.refuseExe.Store(40004)
	expectRefused("workload", tcpPacket(netip.AddrPortFrom(billing, 40004), dst, 0))

	// Isolation (a local revocation at the receiver) of billing-1: before Revoke returns, n2
	// drops its admitted tuple, resets ledger's end of it and removes billing-1's address from
	// n1's allowed IPs, so that what n1 still sends is dropped by wireguard-go itself.
	subject := identity.AgentID("acme.internal", "payments", "billing-1").String()
	require.NoError(t, n2.Node().Revoke(context.Background(), subject, "isolated by test"))
	info2, _ = n2.WireGuard()
	require.Empty(t, info2.Peers[0].AllowedIPs, "billing-1's address is no allowed IP any more")
	require.Zero(t, info2.Filter.Flows)
	requireRST(t, n2.delivered, wireguard.Tuple{Src: billing, Dst: ledger, SrcPort: 40000, DstPort: 8080, Proto: wireguard.ProtoTCP}, "ledger's end was not reset")
	for i := range 5 {
		n1.ch.Outbound <- tcpPacket(src, dst, 200+i)
	}
	noPacket(t, n2.delivered, 300*time.Millisecond)

	// Revoking the peer node removes it from the device at once.
	require.NoError(t, n2.Node().Revoke(context.Background(), n1.Node().ID().String(), "node revoked by test"))
	info2, _ = n2.WireGuard()
	require.Empty(t, info2.Peers)
}

// TestWireGuardBindingFromOtherNodeRefused is the key binding from the attacker's side over a
// real tunnel: n2 presents n1's signed binding (a replay) and a binding it signs for n1's
// identity; both are refused with their sentinels and n3 never configures the key.
func TestWireGuardBindingFromOtherNodeRefused(t *testing.T) {
	ta := startAuthority(t)
	n1 := startWGDaemon(t, ta, spec{name: "n1", zones: []string{"payments"}})
	n2 := startWGDaemon(t, ta, spec{name: "n2", zones: []string{"payments"}})
	n3 := startWGDaemon(t, ta, spec{name: "n3", zones: []string{"payments"}})
	for _, d := range []*wgd{n1, n2} {
		require.NoError(t, n3.Node().AddPeer(node.Peer{Node: d.Node().ID().String(), Addr: d.Addr()}))
	}
	ctx := context.Background()
	n1raw, err := n1.wgt.ownBinding()
	require.NoError(t, err)
	// What n3 does with a hello arriving on its tunnel with n2: acceptBinding against the
	// certificate that tunnel's handshake verified.
	t32, err := n3.Node().Tunnel(ctx, n2.Node().ID().String(), "payments")
	require.NoError(t, err)
	err = n3.wgt.acceptBinding(t32, n1raw)
	require.ErrorIs(t, err, wireguard.ErrBindingSignature)

	_, key, err := n2.Node().Credentials()
	require.NoError(t, err)
	info1, _ := n1.WireGuard()
	forged, err := wireguard.SignBinding(wireguard.Binding{Node: n1.Node().ID().String(), Zones: []string{"payments"},
		Key: info1.Key, Endpoint: info1.Endpoint, IssuedAt: time.Now(), Expires: time.Now().Add(time.Hour)}, key)
	require.NoError(t, err)
	err = n3.wgt.acceptBinding(t32, forged)
	require.ErrorIs(t, err, wireguard.ErrBindingNode)
	for _, p := range n3.wgt.dev.Peers() {
		require.NotEqual(t, info1.Key, p.Key, "n1's key configured from n2's statements")
	}
	require.False(t, n3.wgt.hasBinding(n1.Node().ID().String(), "payments"))
}

// TestWireGuardRefusesQUICPeer: a node of the zone running the QUIC transport is refused with
// ErrTransportMismatch, never bridged.
func TestWireGuardRefusesQUICPeer(t *testing.T) {
	ta := startAuthority(t)
	n1 := startWGDaemon(t, ta, spec{name: "n1", zones: []string{"payments"}})
	dir, pc := joinNode(t, ta, spec{name: "q", zones: []string{"payments"}})
	q := startDaemon(t, "q", dir, pc, true)
	require.NoError(t, n1.Node().AddPeer(node.Peer{Node: q.Node().ID().String(), Addr: q.Addr()}))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := n1.wgt.exchange(ctx, q.Node().ID().String(), "payments")
	require.ErrorIs(t, err, ErrTransportMismatch)
}

func netListenUDP() (interface {
	Close() error
	LocalAddr() net.Addr
}, error) {
	return net.ListenPacket("udp", "127.0.0.1:0")
}

// TestWireGuardPolicyChangeCutsFlows: a policy release that no longer allows an admitted tuple
// removes it at the receiver while Accept applies the release; its packets stop at once.
func TestWireGuardPolicyChangeCutsFlows(t *testing.T) {
	ta := startAuthority(t)
	n1 := startWGDaemon(t, ta, spec{name: "n1", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "billing-1", Zone: "payments"}}})
	n2 := startWGDaemon(t, ta, spec{name: "n2", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "ledger", Zone: "payments"}}})
	require.NoError(t, n1.Node().AddPeer(node.Peer{Node: n2.Node().ID().String(), Addr: n2.Addr()}))
	src, dst := netip.AddrPortFrom(n1.agentIP(t, "billing-1"), 40000), netip.AddrPortFrom(n2.agentIP(t, "ledger"), 8080)
	syn := tcpSeg(src, dst, 100, 0, 0x02, 0)
	n1.ch.Outbound <- syn
	waitPacket(t, n2.delivered, syn)
	// The SYN-ACK, so that n1 knows the sequence number billing-1 expects (a RST needs it).
	synAck := tcpSeg(dst, src, 9000, 101, 0x12, 0)
	n2.ch.Outbound <- synAck
	waitPacket(t, n1.delivered, synAck)
	info, _ := n2.WireGuard()
	require.Equal(t, 1, info.Filter.Flows)

	_, err := ta.ApplyPolicy(context.Background(), "narrow.yaml", []byte(strings.Replace(testPolicy, "ports: [tcp/8080]", "ports: [tcp/8081]", 1)))
	require.NoError(t, err)
	_, rel, err := ta.PolicyRelease()
	require.NoError(t, err)
	_, err = n2.Accept(context.Background(), rel, FromAuthority)
	require.NoError(t, err)
	info, _ = n2.WireGuard()
	require.Zero(t, info.Filter.Flows, "the tuple the new policy refuses is gone when Accept returns")
	// ledger's end of the cut flow is reset at once.
	requireRST(t, n2.delivered, wireguard.Tuple{Src: src.Addr(), Dst: dst.Addr(), SrcPort: src.Port(), DstPort: dst.Port(), Proto: wireguard.ProtoTCP}, "ledger's end was not reset")
	// n1 never saw the policy change: n2's cut notice makes it reset billing-1's end and drop
	// its tuple, so what billing-1 still sends is answered by a RST at n1 and never reaches n2.
	requireRST(t, n1.delivered, wireguard.Tuple{Src: dst.Addr(), Dst: src.Addr(), SrcPort: dst.Port(), DstPort: src.Port(), Proto: wireguard.ProtoTCP}, "billing-1's end was not reset within 1 s by n2's cut notice")
	require.Eventually(t, func() bool { i, _ := n1.WireGuard(); return i.Filter.Flows == 0 }, time.Second, 5*time.Millisecond)
	n1.ch.Outbound <- tcpPacket(src, dst, 10)
	select {
	case p := <-n1.delivered:
		require.Equal(t, byte(0x04), p[33]&0x04, "a RST toward billing-1")
	case <-time.After(time.Second):
		t.Fatal("billing-1's segment on the cut tuple was not answered by a RST")
	}
	noPacket(t, n2.delivered, 100*time.Millisecond)
}

// admissionRig is two WireGuard-mode daemons with n1's admission stream to n2 open, for sending
// hand-made admission requests.
type admissionRig struct {
	n1, n2 *wgd
	c      *admitClient
	send   func(agent string, tp wireguard.Tuple) (rec []byte, err error)
}

func newAdmissionRig(t *testing.T, agents ...string) *admissionRig {
	ta := startAuthority(t)
	var specs []state.AgentSpec
	for _, a := range agents {
		specs = append(specs, state.AgentSpec{Name: a, Zone: "payments"})
	}
	r := &admissionRig{}
	r.n1 = startWGDaemon(t, ta, spec{name: "n1", zones: []string{"payments"}, agents: specs})
	r.n2 = startWGDaemon(t, ta, spec{name: "n2", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "ledger", Zone: "payments"}}})
	require.NoError(t, r.n1.Node().AddPeer(node.Peer{Node: r.n2.Node().ID().String(), Addr: r.n2.Addr()}))
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	peer := r.n2.Node().ID().String()
	require.NoError(t, r.n1.wgt.exchange(ctx, peer, "payments"))
	tn, err := r.n1.Node().Tunnel(ctx, peer, "payments")
	require.NoError(t, err)
	r.c, err = r.n1.wgt.client(ctx, tn)
	require.NoError(t, err)
	r.send = func(agent string, tp wireguard.Tuple) (last []byte, err error) {
		a, _, err := r.n1.Node().AgentByAddr(r.n1.agentIP(t, agent))
		require.NoError(t, err)
		err = a.OpenTuple(ctx, tn, dtl.Destination{Agent: "ledger", Port: 8080, Proto: dtl.ProtoTCP}, func(ctx context.Context, rec []byte) error {
			last = rec
			return r.c.request(ctx, tp, rec)
		})
		return last, err
	}
	return r
}

func tcpTuple(src, dst netip.Addr, dport uint16) wireguard.Tuple {
	return wireguard.Tuple{Src: src, Dst: dst, SrcPort: 40000, DstPort: dport, Proto: wireguard.ProtoTCP}
}

// TestWireGuardAdmissionRefusesMismatchedTuples is the receiver's check from the sender's side:
// a valid record sent with a 5-tuple that is not the record's is refused with the dtl sentinel
// and nothing is admitted. (Three such refusals are as many as the test makes: TrustFlow at the
// receiver lowers a node that keeps sending them, and later refusals would say "trust".)
func TestWireGuardAdmissionRefusesMismatchedTuples(t *testing.T) {
	r := newAdmissionRig(t, "billing-1", "billing-2", "billing-3")
	ledger := r.n2.agentIP(t, "ledger")
	_, err := r.send("billing-1", tcpTuple(netip.MustParseAddr("100.100.1.99"), ledger, 8080))
	require.ErrorIs(t, err, dtl.ErrClaimMismatch, "source is not the agent's address")
	_, err = r.send("billing-2", tcpTuple(r.n1.agentIP(t, "billing-2"), netip.MustParseAddr("100.100.1.200"), 8080))
	require.ErrorIs(t, err, dtl.ErrUnreachable, "destination is not the record's agent")
	_, err = r.send("billing-3", tcpTuple(r.n1.agentIP(t, "billing-3"), ledger, 9090))
	require.ErrorIs(t, err, dtl.ErrClaimMismatch, "port is not the record's")
	info, _ := r.n2.WireGuard()
	require.Zero(t, info.Filter.Flows)
	require.Empty(t, info.Peers[0].AllowedIPs, "no refused source became an allowed IP")
}

// TestWireGuardAdmissionRefusesReplay: the same record sent again is refused as a replay.
func TestWireGuardAdmissionRefusesReplay(t *testing.T) {
	r := newAdmissionRig(t, "billing-1")
	good := tcpTuple(r.n1.agentIP(t, "billing-1"), r.n2.agentIP(t, "ledger"), 8080)
	rec, err := r.send("billing-1", good)
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	require.ErrorIs(t, r.c.request(ctx, good, rec), dtl.ErrReplay)
	info, _ := r.n2.WireGuard()
	require.Equal(t, 1, info.Filter.Flows)
}

// tcpSeg is tcpPacket with sequence fields.
func tcpSeg(src, dst netip.AddrPort, seq, ack uint32, flags byte, payload int) []byte {
	p := tcpPacket(src, dst, payload)
	binary.BigEndian.PutUint32(p[24:28], seq)
	binary.BigEndian.PutUint32(p[28:32], ack)
	p[33] = flags
	return p
}

// TestWireGuardDestinationRevokedResetsAndUnroutes: n1 revokes ledger, the destination agent of
// an established flow of its billing-1 (not ledger's node). When Revoke returns, ledger's address
// is gone from n2's allowed IPs in n1's wireguard-go device, the tuple is cut and billing-1's end
// has been sent a RST with the sequence number it expects; what billing-1 still sends is reset,
// never carried, and a new flow to ledger is refused.
func TestWireGuardDestinationRevokedResetsAndUnroutes(t *testing.T) {
	ta := startAuthority(t)
	n1 := startWGDaemon(t, ta, spec{name: "n1", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "billing-1", Zone: "payments"}}})
	n2 := startWGDaemon(t, ta, spec{name: "n2", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "ledger", Zone: "payments"}}})
	require.NoError(t, n1.Node().AddPeer(node.Peer{Node: n2.Node().ID().String(), Addr: n2.Addr()}))
	billing, ledger := n1.agentIP(t, "billing-1"), n2.agentIP(t, "ledger")
	src, dst := netip.AddrPortFrom(billing, 40000), netip.AddrPortFrom(ledger, 8080)
	const syn, ack, rst = 0x02, 0x10, 0x04
	steps := []struct {
		out bool
		p   []byte
	}{
		{true, tcpSeg(src, dst, 100, 0, syn, 0)},
		{false, tcpSeg(dst, src, 9000, 101, syn|ack, 0)},
		{true, tcpSeg(src, dst, 101, 9001, ack, 50)},
		{false, tcpSeg(dst, src, 9001, 151, ack, 1000)},
	}
	for _, s := range steps {
		if s.out {
			n1.ch.Outbound <- s.p
			waitPacket(t, n2.delivered, s.p)
		} else {
			n2.ch.Outbound <- s.p
			waitPacket(t, n1.delivered, s.p)
		}
	}
	pfx := netip.PrefixFrom(ledger, 32)
	uapi, err := n1.wgt.dev.UAPI()
	require.NoError(t, err)
	require.Contains(t, uapi, "allowed_ip="+pfx.String()+"\n")

	ledgerID := identity.AgentID("acme.internal", "payments", "ledger").String()
	require.NoError(t, n1.Node().Revoke(context.Background(), ledgerID, "destination revoked by test"))
	uapi, err = n1.wgt.dev.UAPI()
	require.NoError(t, err)
	require.NotContains(t, uapi, "allowed_ip="+pfx.String()+"\n", "ledger's address is still an allowed IP")
	info, _ := n1.WireGuard()
	require.Len(t, info.Peers, 1, "ledger's node stays a peer")
	require.NotContains(t, info.Peers[0].AllowedIPs, pfx)
	require.Zero(t, info.Filter.Flows)

	expectRST := func(seq uint32) {
		t.Helper()
		select {
		case p := <-n1.delivered:
			tp, ok := wireguard.ParseTuple(p)
			require.True(t, ok)
			require.Equal(t, wireguard.Tuple{Src: ledger, Dst: billing, SrcPort: 8080, DstPort: 40000, Proto: wireguard.ProtoTCP}, tp)
			require.NotZero(t, p[33]&rst, "flags %#x", p[33])
			require.Equal(t, seq, binary.BigEndian.Uint32(p[24:28]))
		case <-time.After(time.Second):
			t.Fatal("billing-1 was not reset within 1 s")
		}
	}
	// Already written when Revoke returned: billing-1 expects ledger's byte 10001 next.
	expectRST(10001)
	// n2 never applied the revocation; n1's cut notice makes it reset ledger's end too, at the
	// sequence number ledger expects (billing-1's byte 151).
	select {
	case p := <-n2.delivered:
		tp, ok := wireguard.ParseTuple(p)
		require.True(t, ok)
		require.Equal(t, wireguard.Tuple{Src: billing, Dst: ledger, SrcPort: 40000, DstPort: 8080, Proto: wireguard.ProtoTCP}, tp)
		require.NotZero(t, p[33]&rst, "flags %#x", p[33])
		require.Equal(t, uint32(151), binary.BigEndian.Uint32(p[24:28]))
	case <-time.After(time.Second):
		t.Fatal("ledger was not reset within 1 s of n1's cut")
	}
	// A segment billing-1 still sends is answered by a RST, and never reaches n2.
	n1.ch.Outbound <- tcpSeg(src, dst, 151, 10001, ack, 20)
	expectRST(10001)
	noPacket(t, n2.delivered, 200*time.Millisecond)
	// A new flow to the revoked destination is refused at n1.
	total := func() (n uint64) {
		i, _ := n1.WireGuard()
		for _, v := range i.Refused {
			n += v
		}
		return n
	}
	before := total()
	n1.ch.Outbound <- tcpSeg(netip.AddrPortFrom(billing, 40001), dst, 500, 0, syn, 0)
	require.Eventually(t, func() bool { return total() > before }, 10*time.Second, 10*time.Millisecond)
	info, _ = n1.WireGuard()
	t.Logf("refusals at n1: %v", info.Refused)
	noPacket(t, n2.delivered, 100*time.Millisecond)
}

// TestWireGuardCutNoticeResetsPeerEnd: a cut only n1 decides (its filter cuts the tuple, as a
// trust isolation local to n1 does) reaches n2 as a cut notice, which resets ledger's end within
// 1 s and removes n2's tuple. A notice n3 sends for the same tuple, from the attacker's side,
// cuts nothing: n3 is not the node at the tuple's other end.
func TestWireGuardCutNoticeResetsPeerEnd(t *testing.T) {
	ta := startAuthority(t)
	n1 := startWGDaemon(t, ta, spec{name: "n1", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "billing-1", Zone: "payments"}}})
	n2 := startWGDaemon(t, ta, spec{name: "n2", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "ledger", Zone: "payments"}}})
	n3 := startWGDaemon(t, ta, spec{name: "n3", zones: []string{"payments"}})
	require.NoError(t, n1.Node().AddPeer(node.Peer{Node: n2.Node().ID().String(), Addr: n2.Addr()}))
	require.NoError(t, n3.Node().AddPeer(node.Peer{Node: n2.Node().ID().String(), Addr: n2.Addr()}))
	billing, ledger := n1.agentIP(t, "billing-1"), n2.agentIP(t, "ledger")
	const syn, ack, rst = 0x02, 0x10, 0x04
	open := func(sport uint16) wireguard.Tuple {
		src, dst := netip.AddrPortFrom(billing, sport), netip.AddrPortFrom(ledger, 8080)
		for _, s := range []struct {
			out bool
			p   []byte
		}{
			{true, tcpSeg(src, dst, 100, 0, syn, 0)},
			{false, tcpSeg(dst, src, 9000, 101, syn|ack, 0)},
			{true, tcpSeg(src, dst, 101, 9001, ack, 50)},
		} {
			if s.out {
				n1.ch.Outbound <- s.p
				waitPacket(t, n2.delivered, s.p)
			} else {
				n2.ch.Outbound <- s.p
				waitPacket(t, n1.delivered, s.p)
			}
		}
		return wireguard.Tuple{Src: billing, Dst: ledger, SrcPort: sport, DstPort: 8080, Proto: wireguard.ProtoTCP}
	}
	forged := open(40000)
	cutByN1 := open(40001)
	cuts := func(w *wgd) CutNoticeStats { i, _ := w.WireGuard(); return i.Cuts }

	// The forgery: n3 holds a valid identity and a tunnel with n2 in the zone, but the tuple
	// was admitted with n1.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	require.NoError(t, n3.wgt.sendCuts(ctx, n2.Node().ID().String(), "payments", []wireguard.Tuple{forged}))
	require.Equal(t, CutNoticeStats{Refused: 1}, cuts(n2), "the notice is read and refused before sendCuts returns")
	info, _ := n2.WireGuard()
	require.Equal(t, 2, info.Filter.Flows, "n3's notice cut nothing")
	noPacket(t, n2.delivered, 100*time.Millisecond)
	p := tcpSeg(netip.AddrPortFrom(billing, 40000), netip.AddrPortFrom(ledger, 8080), 151, 9001, ack, 10)
	n1.ch.Outbound <- p
	waitPacket(t, n2.delivered, p)

	// The cut decided on n1 alone: n1 resets billing-1's end at once, n2 resets ledger's.
	n1.wgt.cut(cutByN1)
	start := time.Now()
	select {
	case p := <-n1.delivered:
		require.NotZero(t, p[33]&rst, "billing-1's end is reset by n1 itself")
	case <-time.After(time.Second):
		t.Fatal("billing-1 was not reset")
	}
	select {
	case p := <-n2.delivered:
		tp, ok := wireguard.ParseTuple(p)
		require.True(t, ok)
		require.Equal(t, cutByN1, tp)
		require.NotZero(t, p[33]&rst, "flags %#x", p[33])
		require.Equal(t, uint32(151), binary.BigEndian.Uint32(p[24:28]), "the RST carries the sequence number ledger expects")
		t.Logf("ledger reset %v after n1's cut", time.Since(start))
	case <-time.After(time.Second):
		t.Fatal("ledger was not reset within 1 s of n1's cut")
	}
	require.Eventually(t, func() bool { return cuts(n2).Applied == 1 }, time.Second, 5*time.Millisecond)
	require.Equal(t, CutNoticeStats{Applied: 1, Refused: 1}, cuts(n2))
	require.Eventually(t, func() bool { return cuts(n1).Sent == 1 }, time.Second, 5*time.Millisecond)
	info, _ = n2.WireGuard()
	require.Equal(t, 1, info.Filter.Flows, "only the tuple n1 cut is gone at n2")
	// The untouched tuple still carries.
	p = tcpSeg(netip.AddrPortFrom(billing, 40000), netip.AddrPortFrom(ledger, 8080), 161, 9001, ack, 10)
	n1.ch.Outbound <- p
	waitPacket(t, n2.delivered, p)

	// Many tuples cut one by one, as a revocation's per-flow watches do: every notice arrives
	// and resets its tuple's end at n2.
	const many = 24
	var batch []wireguard.Tuple
	for i := range many {
		tp := wireguard.Tuple{Src: billing, Dst: ledger, SrcPort: uint16(41000 + i), DstPort: 8080, Proto: wireguard.ProtoTCP}
		p := tcpSeg(tp.Source(), tp.Destination(), 100, 0, syn, 0)
		n1.ch.Outbound <- p
		waitPacket(t, n2.delivered, p)
		batch = append(batch, tp)
	}
	for _, tp := range batch {
		n1.wgt.cut(tp)
	}
	resets := 0
	deadline := time.After(2 * time.Second)
	for resets < many {
		select {
		case p := <-n2.delivered:
			require.NotZero(t, p[33]&rst, "flags %#x", p[33])
			resets++
		case <-n1.delivered: // n1's own resets of billing-1's ends
		case <-deadline:
			t.Fatalf("%d of %d ledger ends reset; notices at n2: %+v", resets, many, cuts(n2))
		}
	}
	require.Eventually(t, func() bool { return cuts(n2).Applied == 1+many }, time.Second, 5*time.Millisecond)
	info, _ = n2.WireGuard()
	require.Equal(t, 1, info.Filter.Flows)
}

// TestWireGuardBindingResignedAfterRenewal: n1's clock reaches its certificate's half-life a few
// seconds into the test, and its credential scheduler renews it with the authority (new serial,
// new node key). The binding n1 signed before is refused under the new certificate; the next
// exchange carries a binding re-signed with the new key, which n2 verifies against the
// certificate the new tunnel proved. (n2's clock runs 4 min behind n1's: within the 5 min a
// binding may be issued ahead, and far from n2's own half-life.)
func TestWireGuardBindingResignedAfterRenewal(t *testing.T) {
	ta := startAuthority(t)
	const margin = 8 * time.Second
	n1 := startWGDaemonWith(t, ta, spec{name: "n1", zones: []string{"payments"}}, renewsIn(t, margin))
	n2 := startWGDaemonWith(t, ta, spec{name: "n2", zones: []string{"payments"}}, renewsIn(t, margin+4*time.Minute))
	require.NoError(t, n1.Node().AddPeer(node.Peer{Node: n2.Node().ID().String(), Addr: n2.Addr()}))
	peer, self := n2.Node().ID().String(), n1.Node().ID().String()
	exchange := func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		return n1.wgt.exchange(ctx, peer, "payments")
	}
	old, _, err := n1.Node().Credentials()
	require.NoError(t, err)
	require.NoError(t, exchange())
	oldRaw, err := n1.wgt.ownBinding()
	require.NoError(t, err)
	now1 := n1.now
	_, err = wireguard.VerifyBinding(oldRaw, old, "payments", now1())
	require.NoError(t, err)
	cur, _, err := n1.Node().Credentials()
	require.NoError(t, err)
	require.Same(t, old, cur, "n1 renewed before the first exchange; the margin is too short for this machine")

	require.Eventually(t, func() bool {
		c, _, err := n1.Node().Credentials()
		return err == nil && c.Serial().Cmp(old.Serial()) != 0
	}, margin+20*time.Second, 50*time.Millisecond, "n1 never renewed")
	renewed, _, err := n1.Node().Credentials()
	require.NoError(t, err)
	require.False(t, renewed.PublicKey().Equal(old.PublicKey()), "renewal rotates the node key")
	// The binding signed before the renewal is refused under the new certificate: this is what
	// n2 would see if n1 kept sending its cached binding.
	_, err = wireguard.VerifyBinding(oldRaw, renewed, "payments", now1())
	require.ErrorIs(t, err, wireguard.ErrBindingSignature)

	require.NoError(t, exchange(), "the binding exchange after the renewal")
	newRaw, err := n1.wgt.ownBinding()
	require.NoError(t, err)
	require.NotEqual(t, oldRaw, newRaw)
	_, err = wireguard.VerifyBinding(newRaw, renewed, "payments", now1())
	require.NoError(t, err)
	n2.wgt.mu.Lock()
	p, ok := n2.wgt.bindings[wgKey{self, "payments"}]
	n2.wgt.mu.Unlock()
	require.True(t, ok)
	require.Equal(t, 0, p.cert.Serial().Cmp(renewed.Serial()), "n2 holds the binding verified against n1's renewed certificate")
}

// requireRST waits up to a second for a packet on delivered and requires it to be a TCP RST on
// tuple want; fatal names what was not reset.
func requireRST(t *testing.T, delivered <-chan []byte, want wireguard.Tuple, fatal string) {
	t.Helper()
	select {
	case p := <-delivered:
		tp, ok := wireguard.ParseTuple(p)
		require.True(t, ok)
		require.Equal(t, want, tp)
		require.Equal(t, byte(0x04), p[33]&0x04, "a RST: flags %#x", p[33])
	case <-time.After(time.Second):
		t.Fatal(fatal)
	}
}

// TestWireGuardBindingAfterAcceptorRenewal is the renewal seen from the initiator's side, and
// from an attacker's: n2, the accepting end of n1's tunnel, renews its certificate (new serial,
// new node key) while that tunnel, which proved n2's old certificate, stays n1's. A binding of n2
// is accepted only when it verifies against the certificate a tunnel's handshake proved: over the
// old tunnel, n2's binding signed with its new key (by a genuinely issued certificate, just not
// the one that tunnel proved) is refused, and so is one signed by a key n2 was never issued. The
// exchange n1 runs on the old tunnel still succeeds: n2 pushes its binding over a fresh tunnel,
// and n1 then holds it with the renewed certificate that tunnel proved.
func TestWireGuardBindingAfterAcceptorRenewal(t *testing.T) {
	ta := startAuthority(t)
	const margin = 8 * time.Second
	// n2 renews a few seconds in; n1's clock runs 4 min behind (within the 5 min a binding may be
	// issued ahead, and far from n1's own half-life).
	n2 := startWGDaemonWith(t, ta, spec{name: "n2", zones: []string{"payments"}}, renewsIn(t, margin))
	n1 := startWGDaemonWith(t, ta, spec{name: "n1", zones: []string{"payments"}}, renewsIn(t, margin+4*time.Minute))
	require.NoError(t, n1.Node().AddPeer(node.Peer{Node: n2.Node().ID().String(), Addr: n2.Addr()}))
	require.NoError(t, n2.Node().AddPeer(node.Peer{Node: n1.Node().ID().String(), Addr: n1.Addr()}))
	peer := n2.Node().ID().String()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	stored := func() wgPeer {
		n1.wgt.mu.Lock()
		defer n1.wgt.mu.Unlock()
		return n1.wgt.bindings[wgKey{peer, "payments"}]
	}

	old, _, err := n2.Node().Credentials()
	require.NoError(t, err)
	oldTunnel, err := n1.Node().Tunnel(ctx, peer, "payments")
	require.NoError(t, err)
	require.NoError(t, n1.wgt.exchangeOn(ctx, oldTunnel))
	proved, _ := oldTunnel.Peer().Info.(*identity.Certificate)
	require.NotNil(t, proved)
	require.Equal(t, 0, proved.Serial().Cmp(old.Serial()), "the tunnel proved n2's certificate from before the renewal")
	require.Equal(t, 0, stored().cert.Serial().Cmp(old.Serial()))

	require.Eventually(t, func() bool {
		c, _, err := n2.Node().Credentials()
		return err == nil && c.Serial().Cmp(old.Serial()) != 0
	}, margin+20*time.Second, 50*time.Millisecond, "n2 never renewed")
	renewed, _, err := n2.Node().Credentials()
	require.NoError(t, err)
	require.False(t, renewed.PublicKey().Equal(old.PublicKey()), "renewal rotates the node key")

	// n2's current binding, signed with the renewed key, offered on the tunnel that proved the old
	// certificate: refused, and n1 keeps the binding it verified before.
	newRaw, err := n2.wgt.ownBinding()
	require.NoError(t, err)
	_, err = wireguard.VerifyBinding(newRaw, renewed, "payments", n1.now())
	require.NoError(t, err, "the binding is valid under the renewed certificate")
	err = n1.wgt.acceptBinding(oldTunnel, newRaw)
	require.ErrorIs(t, err, wireguard.ErrBindingSignature)
	require.Equal(t, 0, stored().cert.Serial().Cmp(old.Serial()), "a refused binding replaced nothing")
	// A key n2 was never issued, claiming n2 with another WireGuard key: refused the same way.
	_, forger, err := ed25519.GenerateKey(rand.Reader)
	require.NoError(t, err)
	forged, err := wireguard.SignBinding(wireguard.Binding{Node: peer, Zones: []string{"payments"}, Key: wireguard.Key{7},
		Endpoint: netip.MustParseAddrPort("127.0.0.1:51820"), IssuedAt: n1.now(), Expires: n1.now().Add(time.Hour)}, forger)
	require.NoError(t, err)
	require.ErrorIs(t, n1.wgt.acceptBinding(oldTunnel, forged), wireguard.ErrBindingSignature)
	require.NotEqual(t, wireguard.Key{7}, stored().b.Key)

	// The exchange on the old tunnel: n2 cannot answer there with anything n1 would accept, so it
	// pushes its binding over a tunnel that proves the renewed certificate.
	require.NoError(t, n1.wgt.exchangeOn(ctx, oldTunnel), "the binding exchange on a tunnel from before the peer's renewal")
	got := stored()
	require.NotNil(t, got.b)
	require.Equal(t, 0, got.cert.Serial().Cmp(renewed.Serial()), "n1 holds the binding verified against n2's renewed certificate")
	_, err = wireguard.VerifyBinding(got.b.Raw(), got.cert, "payments", n1.now())
	require.NoError(t, err, "the stored binding verifies against the certificate stored with it")
	_, err = wireguard.VerifyBinding(got.b.Raw(), proved, "payments", n1.now())
	require.ErrorIs(t, err, wireguard.ErrBindingSignature, "and not against the one the old tunnel proved")
	cur, err := n1.Node().Tunnel(ctx, peer, "payments")
	require.NoError(t, err)
	require.NotSame(t, oldTunnel, cur)
	curCert, _ := cur.Peer().Info.(*identity.Certificate)
	require.NotNil(t, curCert)
	require.Equal(t, curCert.X509.Raw, got.cert.X509.Raw, "the stored certificate is the one n1's current tunnel to n2 proved")
}

// renewsIn sets a daemon's clock so that its node certificate reaches its half-life, and is
// renewed by the credential scheduler, margin after the daemon starts.
func renewsIn(t *testing.T, margin time.Duration) func(o *Options) {
	return func(o *Options) {
		st, err := state.Open(o.Dir)
		require.NoError(t, err)
		cert, err := st.NodeCert()
		require.NoError(t, err)
		skew := time.Until(cert.RenewAt()) - margin
		o.Clock = func() time.Time { return time.Now().Add(skew) }
	}
}
