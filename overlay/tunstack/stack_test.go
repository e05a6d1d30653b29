package tunstack

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.zx2c4.com/wireguard/tun"
	"golang.zx2c4.com/wireguard/tun/netstack"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

var (
	agentA  = netip.MustParseAddr("100.80.1.2")  // a local agent
	spoofIP = netip.MustParseAddr("100.80.1.66") // an address the "kernel" has but no agent holds
	remote  = netip.MustParseAddr("100.80.2.9")  // a remote agent
)

// errRefused is what the test handler answers for refused destinations.
var errRefused = errors.New("test: refused")

// handler dials real loopback servers for allowed destinations and records every call.
type handler struct {
	mu     sync.Mutex
	calls  []call
	tcp    string // loopback TCP server address to splice to
	udp    string // loopback UDP server address to splice to
	refuse bool
}

type call struct {
	proto    string
	src, dst netip.AddrPort
}

func (h *handler) Outbound(ctx context.Context, proto string, src, dst netip.AddrPort) (net.Conn, error) {
	h.mu.Lock()
	h.calls = append(h.calls, call{proto, src, dst})
	refuse := h.refuse
	h.mu.Unlock()
	if refuse {
		return nil, errRefused
	}
	var d net.Dialer
	if proto == UDP {
		return d.DialContext(ctx, "udp", h.udp)
	}
	return d.DialContext(ctx, "tcp", h.tcp)
}

func (h *handler) Calls() []call {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]call(nil), h.calls...)
}

// kernel is the other side of the device: a second gVisor stack standing in for the kernel and
// the local programs (no root needed), plus a way to inject raw packets as if a program had
// written them.
type kernel struct {
	net *netstack.Net
	dev *muxDev
}

// muxDev is the device the Stack reads: packets from the kernel stand-in, or injected raw.
type muxDev struct {
	tun.Device
	in     chan []byte
	once   sync.Once
	closed chan struct{}
	pumpWG sync.WaitGroup
}

func (m *muxDev) pump() {
	defer m.pumpWG.Done()
	bufs, sizes := [][]byte{make([]byte, 65535)}, []int{0}
	for {
		n, err := m.Device.Read(bufs, sizes, 0)
		if err != nil {
			return
		}
		for i := range n {
			select {
			case m.in <- append([]byte(nil), bufs[i][:sizes[i]]...):
			case <-m.closed:
				return
			}
		}
	}
}

func (m *muxDev) Read(bufs [][]byte, sizes []int, off int) (int, error) {
	select {
	case p := <-m.in:
		sizes[0] = copy(bufs[0][off:], p)
		return 1, nil
	case <-m.closed:
		return 0, os.ErrClosed
	}
}

func (m *muxDev) Write(bufs [][]byte, off int) (int, error) {
	select {
	case <-m.closed:
		return 0, os.ErrClosed
	default:
	}
	return m.Device.Write(bufs, off)
}

func (m *muxDev) Close() error {
	m.once.Do(func() {
		close(m.closed)
		_ = m.Device.Close()
		m.pumpWG.Wait()
	})
	return nil
}

func (m *muxDev) BatchSize() int { return 1 }

func (m *muxDev) inject(t *testing.T, pkt []byte) {
	t.Helper()
	select {
	case m.in <- pkt:
	case <-time.After(5 * time.Second):
		t.Fatal("inject: stack not reading")
	}
}

const mtu = 1420

func newKernel(t *testing.T) *kernel { return newKernelTB(t) }

func newKernelTB(t testing.TB) *kernel { return newKernelMTU(t, mtu) }

// newKernelMTU is a kernel stand-in whose interface has the given MTU.
func newKernelMTU(t testing.TB, mtu int) *kernel {
	t.Helper()
	dev, n, err := netstack.CreateNetTUN([]netip.Addr{agentA, spoofIP}, nil, mtu)
	require.NoError(t, err)
	m := &muxDev{Device: dev, in: make(chan []byte, 64), closed: make(chan struct{})}
	m.pumpWG.Add(1)
	go m.pump()
	return &kernel{net: n, dev: m}
}

func newStack(t *testing.T, h Handler, opts ...Options) (*Stack, *kernel) {
	t.Helper()
	k := newKernel(t)
	st, err := New(k.dev, mtu, h, nil, opts...)
	require.NoError(t, err)
	st.SetLocal([]netip.Addr{agentA})
	t.Cleanup(func() { require.NoError(t, st.Close()) })
	return st, k
}

// echoTCP is a real loopback TCP echo server; accepted counts its connections.
func echoTCP(t *testing.T) (string, *atomic.Int32) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	var accepted atomic.Int32
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			accepted.Add(1)
			wg.Go(func() { _, _ = io.Copy(c, c); _ = c.Close() })
		}
	})
	t.Cleanup(func() { _ = l.Close(); wg.Wait() })
	return l.Addr().String(), &accepted
}

func echoUDP(t *testing.T) string {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	require.NoError(t, err)
	var wg sync.WaitGroup
	wg.Go(func() {
		buf := make([]byte, 65535)
		for {
			n, a, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			_, _ = pc.WriteTo(buf[:n], a)
		}
	})
	t.Cleanup(func() { _ = pc.Close(); wg.Wait() })
	return pc.LocalAddr().String()
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return c
}

func TestOutboundTCPIsSplicedToTheHandlersConn(t *testing.T) {
	addr, accepted := echoTCP(t)
	h := &handler{tcp: addr}
	st, k := newStack(t, h)

	c, err := k.net.DialContextTCPAddrPort(ctx(t), netip.AddrPortFrom(remote, 80))
	require.NoError(t, err)
	msg := make([]byte, 256<<10)
	for i := range msg {
		msg[i] = byte(i)
	}
	go func() { _, _ = c.Write(msg) }()
	got := make([]byte, len(msg))
	_, err = io.ReadFull(c, got)
	require.NoError(t, err)
	assert.Equal(t, msg, got)
	require.NoError(t, c.Close())

	calls := h.Calls()
	require.Len(t, calls, 1)
	assert.Equal(t, TCP, calls[0].proto)
	assert.Equal(t, agentA, calls[0].src.Addr())
	assert.Equal(t, netip.AddrPortFrom(remote, 80), calls[0].dst)
	assert.EqualValues(t, 1, accepted.Load())
	assert.EqualValues(t, 1, st.Stats().Outbound)
	assert.Zero(t, st.Stats().Spoofed)
}

func TestRefusedTCPIsResetBeforeAnythingIsDialed(t *testing.T) {
	addr, accepted := echoTCP(t)
	h := &handler{tcp: addr, refuse: true}
	st, k := newStack(t, h)

	start := time.Now()
	_, err := k.net.DialContextTCPAddrPort(ctx(t), netip.AddrPortFrom(remote, 80))
	require.Error(t, err)
	assert.Contains(t, err.Error(), "connection was refused")
	assert.Less(t, time.Since(start), 5*time.Second, "a reset, not a timeout")
	assert.Len(t, h.Calls(), 1)
	assert.EqualValues(t, 1, st.Stats().Refused)
	assert.Zero(t, st.Stats().Outbound)
	assert.Zero(t, accepted.Load(), "the handler's refusal reached no server")
}

// synFrom builds a TCP SYN from src to dst.
func synFrom(src, dst netip.AddrPort) []byte {
	pkt := make([]byte, header.IPv4MinimumSize+header.TCPMinimumSize)
	ip := header.IPv4(pkt)
	ip.Encode(&header.IPv4Fields{
		TotalLength: uint16(len(pkt)), TTL: 64, Protocol: uint8(header.TCPProtocolNumber),
		SrcAddr: tcpip.AddrFrom4(src.Addr().As4()), DstAddr: tcpip.AddrFrom4(dst.Addr().As4()),
	})
	ip.SetChecksum(^ip.CalculateChecksum())
	tc := header.TCP(pkt[header.IPv4MinimumSize:])
	tc.Encode(&header.TCPFields{SrcPort: src.Port(), DstPort: dst.Port(), SeqNum: 1, DataOffset: header.TCPMinimumSize,
		Flags: header.TCPFlagSyn, WindowSize: 65535})
	xsum := header.PseudoHeaderChecksum(header.TCPProtocolNumber, ip.SourceAddress(), ip.DestinationAddress(), uint16(len(tc)))
	tc.SetChecksum(^tc.CalculateChecksum(xsum))
	return pkt
}

func TestSpoofedSourceIsDroppedAndCounted(t *testing.T) {
	addr, accepted := echoTCP(t)
	h := &handler{tcp: addr, udp: echoUDP(t)}
	st, k := newStack(t, h)

	// A raw SYN whose source is no local agent, and one from the agent (the control).
	k.dev.inject(t, synFrom(netip.AddrPortFrom(spoofIP, 40000), netip.AddrPortFrom(remote, 80)))
	k.dev.inject(t, synFrom(netip.AddrPortFrom(netip.MustParseAddr("100.80.2.10"), 40000), netip.AddrPortFrom(remote, 80)))
	// A UDP datagram from a program bound to the spoofed address.
	uc, err := k.net.DialUDPAddrPort(netip.AddrPortFrom(spoofIP, 5000), netip.AddrPortFrom(remote, 53))
	require.NoError(t, err)
	_, err = uc.Write([]byte("spoofed"))
	require.NoError(t, err)
	require.Eventually(t, func() bool { return st.Stats().Spoofed == 3 }, 5*time.Second, 10*time.Millisecond)

	k.dev.inject(t, synFrom(netip.AddrPortFrom(agentA, 40001), netip.AddrPortFrom(remote, 80)))
	require.Eventually(t, func() bool { return len(h.Calls()) == 1 }, 5*time.Second, 10*time.Millisecond)
	assert.Equal(t, netip.AddrPortFrom(agentA, 40001), h.Calls()[0].src, "only the agent's SYN reached the handler")
	assert.EqualValues(t, 3, st.Stats().Spoofed)
	_ = accepted

	// After SetLocal drops the agent, its packets are spoofed too (an agent revoked at run time).
	// At least one more: packets of the connection the agent opened above count too, once its
	// address is no longer local.
	st.SetLocal(nil)
	k.dev.inject(t, synFrom(netip.AddrPortFrom(agentA, 40002), netip.AddrPortFrom(remote, 80)))
	require.Eventually(t, func() bool { return st.Stats().Spoofed >= 4 }, 5*time.Second, 10*time.Millisecond)
	assert.Len(t, h.Calls(), 1, "the dropped agent's SYN never reached the handler")
}

func TestNonTCPUDPAndGarbageAreDropped(t *testing.T) {
	h := &handler{}
	st, k := newStack(t, h)
	ping := synFrom(netip.AddrPortFrom(agentA, 1), netip.AddrPortFrom(remote, 1))
	ping[9] = 1 // ICMP
	k.dev.inject(t, ping)
	k.dev.inject(t, []byte{0x45, 0, 0})
	k.dev.inject(t, []byte{0x99})
	require.Eventually(t, func() bool {
		s := st.Stats()
		return s.Unsupported == 1 && s.Malformed == 2
	}, 5*time.Second, 10*time.Millisecond)
	assert.Empty(t, h.Calls())
}

func TestDialFromShowsTheRemoteAgentAsPeer(t *testing.T) {
	st, k := newStack(t, &handler{})
	l, err := k.net.ListenTCPAddrPort(netip.AddrPortFrom(agentA, 8080))
	require.NoError(t, err)
	defer l.Close()
	type accepted struct {
		peer net.Addr
		line string
	}
	got := make(chan accepted, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		b := make([]byte, 5)
		_, _ = io.ReadFull(c, b)
		_, _ = c.Write([]byte("world"))
		got <- accepted{c.RemoteAddr(), string(b)}
	}()
	src := netip.AddrPortFrom(remote, 40000)
	c, err := st.DialFrom(ctx(t), TCP, src, netip.AddrPortFrom(agentA, 8080))
	require.NoError(t, err)
	_, err = c.Write([]byte("hello"))
	require.NoError(t, err)
	b := make([]byte, 5)
	_, err = io.ReadFull(c, b)
	require.NoError(t, err)
	assert.Equal(t, "world", string(b))
	a := <-got
	assert.Equal(t, "hello", a.line)
	assert.Equal(t, src.String(), a.peer.String(), "the local program sees the remote agent's overlay address")
	require.NoError(t, c.Close())
	assert.EqualValues(t, 1, st.Stats().Inbound)

	_, err = st.DialFrom(ctx(t), TCP, src, netip.AddrPortFrom(spoofIP, 8080))
	require.ErrorIs(t, err, ErrNotLocal, "never toward an address that is not a local agent's")
	_, err = st.DialFrom(ctx(t), TCP, netip.AddrPortFrom(agentA, 1), netip.AddrPortFrom(agentA, 8080))
	require.Error(t, err, "never from a local agent's address")
	_, err = st.DialFrom(ctx(t), TCP, src, netip.AddrPortFrom(agentA, 8081))
	require.ErrorIs(t, err, ErrDial, "nothing listens there")
	_, err = st.DialFrom(ctx(t), "sctp", src, netip.AddrPortFrom(agentA, 8080))
	require.ErrorIs(t, err, ErrProto)
}

func TestUDPBothWays(t *testing.T) {
	h := &handler{udp: echoUDP(t)}
	st, k := newStack(t, h, Options{UDPIdle: 500 * time.Millisecond})

	// Outbound: a program's datagram goes to the handler's conn and the echo comes back.
	uc, err := k.net.DialUDPAddrPort(netip.AddrPortFrom(agentA, 5000), netip.AddrPortFrom(remote, 53))
	require.NoError(t, err)
	defer uc.Close()
	for _, m := range []string{"one", "two"} {
		_, err = uc.Write([]byte(m))
		require.NoError(t, err)
		require.NoError(t, uc.SetReadDeadline(time.Now().Add(5*time.Second)))
		b := make([]byte, 100)
		n, err := uc.Read(b)
		require.NoError(t, err)
		assert.Equal(t, m, string(b[:n]))
	}
	assert.Len(t, h.Calls(), 1, "one flow, one admission")

	// Inbound: DialFrom a remote agent's address to a local program's port.
	pc, err := k.net.ListenUDPAddrPort(netip.AddrPortFrom(agentA, 5353))
	require.NoError(t, err)
	defer pc.Close()
	src := netip.AddrPortFrom(remote, 49999)
	c, err := st.DialFrom(ctx(t), UDP, src, netip.AddrPortFrom(agentA, 5353))
	require.NoError(t, err)
	defer c.Close()
	_, err = c.Write([]byte("query"))
	require.NoError(t, err)
	b := make([]byte, 100)
	require.NoError(t, pc.SetReadDeadline(time.Now().Add(5*time.Second)))
	n, from, err := pc.ReadFrom(b)
	require.NoError(t, err)
	assert.Equal(t, "query", string(b[:n]))
	assert.Equal(t, src.String(), from.String())
	_, err = pc.WriteTo([]byte("answer"), from)
	require.NoError(t, err)
	require.NoError(t, c.SetReadDeadline(time.Now().Add(5*time.Second)))
	n, err = c.Read(b)
	require.NoError(t, err)
	assert.Equal(t, "answer", string(b[:n]))
}

func TestRefusedUDPFlowIsHeldNotAskedPerDatagram(t *testing.T) {
	h := &handler{refuse: true}
	st, k := newStack(t, h, Options{RefusedHold: time.Hour})
	uc, err := k.net.DialUDPAddrPort(netip.AddrPortFrom(agentA, 5001), netip.AddrPortFrom(remote, 53))
	require.NoError(t, err)
	defer uc.Close()
	_, _ = uc.Write([]byte("a"))
	require.Eventually(t, func() bool { return st.Stats().Refused == 1 }, 5*time.Second, 10*time.Millisecond)
	for range 5 {
		_, _ = uc.Write([]byte("b"))
	}
	time.Sleep(100 * time.Millisecond)
	assert.Len(t, h.Calls(), 1)
}

func TestCloseEndsSplicesAndRefusesDialFrom(t *testing.T) {
	addr, _ := echoTCP(t)
	h := &handler{tcp: addr}
	k := newKernel(t)
	st, err := New(k.dev, mtu, h, nil)
	require.NoError(t, err)
	st.SetLocal([]netip.Addr{agentA})
	c, err := k.net.DialContextTCPAddrPort(ctx(t), netip.AddrPortFrom(remote, 80))
	require.NoError(t, err)
	_, err = c.Write([]byte("x"))
	require.NoError(t, err)
	b := make([]byte, 1)
	_, err = io.ReadFull(c, b)
	require.NoError(t, err)
	require.NoError(t, st.Close())
	require.NoError(t, st.Close())
	_, err = st.DialFrom(ctx(t), TCP, netip.AddrPortFrom(remote, 1), netip.AddrPortFrom(agentA, 1))
	require.ErrorIs(t, err, ErrClosed)
}

func TestNewRefusesBadMTU(t *testing.T) {
	_, err := New(nil, 100, &handler{}, nil)
	require.Error(t, err)
}

// SpliceHere copies both ways on the caller's goroutine until the stack closes, which ends it;
// once closed it refuses at once and closes both conns.
func TestSpliceHereEndsWithTheStack(t *testing.T) {
	k := newKernel(t)
	st, err := New(k.dev, mtu, &handler{}, nil)
	require.NoError(t, err)
	local, localPeer := net.Pipe()
	overlay, overlayPeer := net.Pipe()
	returned := make(chan bool, 1)
	go func() { returned <- st.SpliceHere(TCP, local, overlay) }()
	go func() { _, _ = localPeer.Write([]byte("ping")) }()
	b := make([]byte, 4)
	_, err = io.ReadFull(overlayPeer, b)
	require.NoError(t, err)
	assert.Equal(t, "ping", string(b))
	go func() { _, _ = overlayPeer.Write([]byte("pong")) }()
	_, err = io.ReadFull(localPeer, b)
	require.NoError(t, err)
	assert.Equal(t, "pong", string(b))

	require.NoError(t, st.Close())
	select {
	case ok := <-returned:
		assert.True(t, ok)
	case <-time.After(5 * time.Second):
		t.Fatal("the stack's Close did not end the splice on the caller's goroutine")
	}
	_, err = localPeer.Read(b)
	require.Error(t, err, "the local conn was closed")

	l2, l2Peer := net.Pipe()
	o2, o2Peer := net.Pipe()
	require.False(t, st.SpliceHere(TCP, l2, o2))
	_, err = l2Peer.Write([]byte("x"))
	require.ErrorIs(t, err, io.ErrClosedPipe)
	_, err = o2Peer.Write([]byte("x"))
	require.ErrorIs(t, err, io.ErrClosedPipe)
}
