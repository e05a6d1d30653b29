package tunstack

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.zx2c4.com/wireguard/tun"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/link/channel"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
	"gvisor.dev/gvisor/pkg/waiter"
)

// Protocols, as Handler.Outbound and DialFrom name them.
const (
	TCP = "tcp"
	UDP = "udp"
)

// Sentinel errors, checked with errors.Is.
var (
	// ErrClosed: the stack was closed.
	ErrClosed = errors.New("tunstack: closed")
	// ErrNotLocal: DialFrom was asked to reach an address that is not a local agent's.
	ErrNotLocal = errors.New("tunstack: destination is not a local agent address")
	// ErrProto: a protocol other than "tcp" or "udp".
	ErrProto = errors.New("tunstack: protocol must be tcp or udp")
	// ErrDial: the local program did not accept the connection (nothing listens, or it reset it).
	ErrDial = errors.New("tunstack: the local program did not accept the connection")
)

// Handler decides the fate of each new flow that a local program opens through the interface.
type Handler interface {
	// Outbound is called once per new TCP connection (on its SYN, before the local program's
	// connect completes) or UDP flow (on its first datagram): src is the local program's address
	// (a local agent IP, checked), dst the remote overlay address. It returns the admitted overlay
	// conn to splice to (for UDP, one Read or Write is one datagram), or an error: the stack then
	// resets the TCP connection, or drops the UDP flow's datagrams for a while.
	Outbound(ctx context.Context, proto string, src, dst netip.AddrPort) (net.Conn, error)
}

// Stats counts what the stack did. Spoofed is the anti-spoofing counter.
type Stats struct {
	Spoofed     uint64 // packets dropped: source address not a local agent's
	Unsupported uint64 // packets dropped: neither TCP nor UDP (ICMP, fragments, other protocols)
	Malformed   uint64 // packets dropped: not a parseable IPv4 or IPv6 header
	Refused     uint64 // flows the Handler refused
	Outbound    uint64 // flows spliced to an overlay flow (TCP and UDP)
	Inbound     uint64 // connections DialFrom originated
	// UDPDropped counts UDP datagrams from local programs that the overlay flow refused to carry
	// (a write error other than its end): the flow's send queue stayed full (the peer was not
	// taking its control stream's bytes, tunnel.ErrSendQueueFull). A datagram too large for a
	// QUIC datagram is no reason: the flow carries any UDP datagram whole, up to 65,535 bytes
	// (the largest one over IPv4 is 65,507), on its control stream if need be.
	UDPDropped uint64
}

type counters struct {
	spoofed, unsupported, malformed, refused, outbound, inbound, udpDropped atomic.Uint64
}

// Options tune a Stack; the zero value is the default.
type Options struct {
	// UDPIdle ends a UDP flow after this long without a datagram either way; default 60 s.
	UDPIdle time.Duration
	// RefusedHold is how long datagrams of a refused UDP flow are dropped before the Handler is
	// asked again; default 2 s.
	RefusedHold time.Duration
	// MaxInFlight bounds TCP connections waiting for the Handler; default 1024.
	MaxInFlight int
}

// DefaultMTU is the MTU the interface should have for this carriage. Its packets never leave
// the host as they are (TCP and UDP are terminated here and carried over QUIC), so the MTU is a
// local choice, and loopback's: the kernel then hands over 64 KiB TCP segments and the stack
// processes 45 times fewer packets than at 1,500 (measured: 2.1–2.6× the throughput,
// docs/architecture.md). It also bounds UDP: a datagram must fit one IP packet of this size
// (65,492 payload bytes over IPv4, 65,472 over IPv6), since the filter drops IP fragments.
const DefaultMTU = 65520

const nicID tcpip.NICID = 1

// offset is the headroom before each packet in the buffers exchanged with the device: the
// kernel TUN device writes a virtio-net header there.
const offset = 16

// Stack is a userspace TCP/IP stack attached to a TUN device.
type Stack struct {
	dev  tun.Device
	mtu  int
	h    Handler
	log  *slog.Logger
	opts Options
	s    *stack.Stack
	ep   *channel.Endpoint
	c    counters

	// copyBufs and datagramBufs are the splices' copy buffers, reused across flows: two fresh
	// buffers per connection were a tenth of the CPU of a new connection through the interface.
	copyBufs, datagramBufs sync.Pool

	local atomic.Pointer[map[netip.Addr]struct{}]

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup // the stack's own loops, splices and handler calls

	mu     sync.Mutex
	closed bool
	held   map[stack.TransportEndpointID]time.Time // refused UDP flows, until the time given
}

// New attaches a stack to dev. Nothing passes until SetLocal names the local agent addresses.
func New(dev tun.Device, mtu int, h Handler, log *slog.Logger, opts ...Options) (*Stack, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if mtu < 576 || mtu > 65535 {
		return nil, fmt.Errorf("tunstack: MTU %d (576-65535)", mtu)
	}
	var o Options
	if len(opts) > 0 {
		o = opts[0]
	}
	if o.UDPIdle <= 0 {
		o.UDPIdle = 60 * time.Second
	}
	if o.RefusedHold <= 0 {
		o.RefusedHold = 2 * time.Second
	}
	if o.MaxInFlight <= 0 {
		o.MaxInFlight = 1024
	}
	st := &Stack{dev: dev, mtu: mtu, h: h, log: log, opts: o, held: map[stack.TransportEndpointID]time.Time{}}
	st.copyBufs.New = func() any { b := make([]byte, 32<<10); return &b }
	st.datagramBufs.New = func() any { b := make([]byte, 65535); return &b }
	empty := map[netip.Addr]struct{}{}
	st.local.Store(&empty)
	st.s = stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, ipv6.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol},
	})
	fail := func(what string, err tcpip.Error) (*Stack, error) {
		st.s.Destroy()
		return nil, fmt.Errorf("tunstack: %s: %s", what, err)
	}
	sack := tcpip.TCPSACKEnabled(true)
	if err := st.s.SetTransportProtocolOption(tcp.ProtocolNumber, &sack); err != nil {
		return fail("SACK", err)
	}
	// Buffers sized for a fast local link: the interface is on this host, so its round trip is
	// microseconds and loss only comes from full queues.
	rcv := tcpip.TCPReceiveBufferSizeRangeOption{Min: 4 << 10, Default: 1 << 20, Max: 8 << 20}
	if err := st.s.SetTransportProtocolOption(tcp.ProtocolNumber, &rcv); err != nil {
		return fail("receive buffer", err)
	}
	snd := tcpip.TCPSendBufferSizeRangeOption{Min: 4 << 10, Default: 1 << 20, Max: 8 << 20}
	if err := st.s.SetTransportProtocolOption(tcp.ProtocolNumber, &snd); err != nil {
		return fail("send buffer", err)
	}
	mod := tcpip.TCPModerateReceiveBufferOption(true)
	if err := st.s.SetTransportProtocolOption(tcp.ProtocolNumber, &mod); err != nil {
		return fail("receive buffer moderation", err)
	}
	st.ep = channel.New(4096, uint32(mtu), "")
	// The kernel hands over packets whose checksums it computed (or wireguard-go's offload code
	// completed), on an interface of this host: verifying them again only costs CPU.
	st.ep.LinkEPCapabilities = stack.CapabilityRXChecksumOffload
	if err := st.s.CreateNIC(nicID, st.ep); err != nil {
		return fail("create NIC", err)
	}
	// Promiscuous: accept packets for any destination (every remote overlay address). Spoofing:
	// send from any source (DialFrom originates from remote agents' addresses). The filter in
	// readLoop is what keeps a local program from using either.
	if err := st.s.SetPromiscuousMode(nicID, true); err != nil {
		return fail("promiscuous mode", err)
	}
	if err := st.s.SetSpoofing(nicID, true); err != nil {
		return fail("spoofing", err)
	}
	st.s.SetRouteTable([]tcpip.Route{
		{Destination: header.IPv4EmptySubnet, NIC: nicID},
		{Destination: header.IPv6EmptySubnet, NIC: nicID},
	})
	tcpFwd := tcp.NewForwarder(st.s, 0, o.MaxInFlight, st.handleTCP)
	st.s.SetTransportProtocolHandler(tcp.ProtocolNumber, tcpFwd.HandlePacket)
	udpFwd := udp.NewForwarder(st.s, st.handleUDP)
	st.s.SetTransportProtocolHandler(udp.ProtocolNumber, udpFwd.HandlePacket)

	st.ctx, st.cancel = context.WithCancel(context.Background())
	st.wg.Add(2)
	go func() { defer st.wg.Done(); st.readLoop() }()
	go func() { defer st.wg.Done(); st.writeLoop() }()
	return st, nil
}

// SetLocal replaces the set of local agent addresses: the only sources a packet from the device
// may carry, and the only destinations DialFrom reaches.
func (st *Stack) SetLocal(addrs []netip.Addr) {
	m := make(map[netip.Addr]struct{}, len(addrs))
	for _, a := range addrs {
		m[a.Unmap()] = struct{}{}
	}
	st.local.Store(&m)
}

func (st *Stack) isLocal(a netip.Addr) bool {
	_, ok := (*st.local.Load())[a.Unmap()]
	return ok
}

// Stats returns the counters.
func (st *Stack) Stats() Stats {
	return Stats{
		Spoofed: st.c.spoofed.Load(), Unsupported: st.c.unsupported.Load(), Malformed: st.c.malformed.Load(),
		Refused: st.c.refused.Load(), Outbound: st.c.outbound.Load(), Inbound: st.c.inbound.Load(),
		UDPDropped: st.c.udpDropped.Load(),
	}
}

// spawn runs f on a goroutine Close waits for; false once the stack is closing.
func (st *Stack) spawn(f func()) bool {
	if !st.enter() {
		return false
	}
	go func() {
		defer st.wg.Done()
		f()
	}()
	return true
}

// enter counts a goroutine that is already running (one gVisor started, or the caller's) as one
// Close waits for; false once the stack is closing. The caller calls st.wg.Done when it is done.
func (st *Stack) enter() bool {
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.closed {
		return false
	}
	st.wg.Add(1)
	return true
}

// Close stops the stack and closes dev (which ends the blocked device read): every spliced
// flow is closed and every goroutine has returned when it does. Closing the device again
// afterwards (its owner, tundev.Device.Close) is harmless for the kernel device.
func (st *Stack) Close() error {
	st.mu.Lock()
	if st.closed {
		st.mu.Unlock()
		return nil
	}
	st.closed = true
	st.mu.Unlock()
	st.cancel()
	st.s.Close()
	st.ep.Close()
	err := st.dev.Close()
	st.wg.Wait()
	st.s.Wait()
	if errors.Is(err, os.ErrClosed) {
		err = nil
	}
	return err
}

// filter says whether a packet read from the device may enter the stack.
func (st *Stack) filter(pkt []byte) (tcpip.NetworkProtocolNumber, bool) {
	if len(pkt) < 1 {
		st.c.malformed.Add(1)
		return 0, false
	}
	var (
		src   netip.Addr
		proto uint8
		pn    tcpip.NetworkProtocolNumber
	)
	switch pkt[0] >> 4 {
	case 4:
		h := header.IPv4(pkt)
		if !h.IsValid(len(pkt)) {
			st.c.malformed.Add(1)
			return 0, false
		}
		if h.More() || h.FragmentOffset() != 0 {
			st.c.unsupported.Add(1)
			return 0, false
		}
		src = netip.AddrFrom4(h.SourceAddress().As4())
		proto, pn = h.Protocol(), ipv4.ProtocolNumber
	case 6:
		h := header.IPv6(pkt)
		if !h.IsValid(len(pkt)) {
			st.c.malformed.Add(1)
			return 0, false
		}
		src = netip.AddrFrom16(h.SourceAddress().As16())
		proto, pn = h.NextHeader(), ipv6.ProtocolNumber
	default:
		st.c.malformed.Add(1)
		return 0, false
	}
	if proto != uint8(header.TCPProtocolNumber) && proto != uint8(header.UDPProtocolNumber) {
		st.c.unsupported.Add(1)
		return 0, false
	}
	if !st.isLocal(src) {
		st.c.spoofed.Add(1)
		return 0, false
	}
	return pn, true
}

// readLoop moves packets from the device into the stack through the filter.
func (st *Stack) readLoop() {
	batch := st.dev.BatchSize()
	bufs := make([][]byte, batch)
	for i := range bufs {
		bufs[i] = make([]byte, offset+65535)
	}
	sizes := make([]int, batch)
	for {
		n, err := st.dev.Read(bufs, sizes, offset)
		for i := range n {
			pkt := bufs[i][offset : offset+sizes[i]]
			pn, ok := st.filter(pkt)
			if !ok {
				continue
			}
			pb := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(pkt)})
			st.ep.InjectInbound(pn, pb)
			pb.DecRef()
		}
		if err != nil {
			if errors.Is(err, os.ErrClosed) || errors.Is(err, net.ErrClosed) || st.ctx.Err() != nil {
				return
			}
			if errors.Is(err, tun.ErrTooManySegments) {
				continue
			}
			st.log.Warn("tun read failed", "err", err)
			select {
			case <-st.ctx.Done():
				return
			case <-time.After(10 * time.Millisecond):
			}
		}
	}
}

// writeLoop moves packets the stack sends to the device, in batches so the device can coalesce
// TCP segments (GRO) before the kernel sees them.
func (st *Stack) writeLoop() {
	batch := max(st.dev.BatchSize(), 1)
	bufs := make([][]byte, batch)
	for i := range bufs {
		bufs[i] = make([]byte, 0, offset+65535)
	}
	out := make([][]byte, 0, batch)
	for {
		pkt := st.ep.ReadContext(st.ctx)
		if pkt == nil {
			return
		}
		out = out[:0]
		for pkt != nil {
			b := bufs[len(out)][:offset]
			for _, s := range pkt.AsSlices() {
				b = append(b, s...)
			}
			pkt.DecRef()
			out = append(out, b)
			if len(out) == batch {
				break
			}
			pkt = st.ep.Read()
		}
		if _, err := st.dev.Write(out, offset); err != nil {
			if errors.Is(err, os.ErrClosed) || st.ctx.Err() != nil {
				return
			}
			st.log.Debug("tun write failed", "err", err)
		}
	}
}

func addrPort(a tcpip.Address, port uint16) netip.AddrPort {
	ip, _ := netip.AddrFromSlice(a.AsSlice())
	return netip.AddrPortFrom(ip.Unmap(), port)
}

func fullAddr(ap netip.AddrPort) (tcpip.FullAddress, tcpip.NetworkProtocolNumber) {
	a := ap.Addr().Unmap()
	pn := ipv4.ProtocolNumber
	if a.Is6() {
		pn = ipv6.ProtocolNumber
	}
	return tcpip.FullAddress{NIC: nicID, Addr: tcpip.AddrFromSlice(a.AsSlice()), Port: ap.Port()}, pn
}

// handleTCP runs on a goroutine the forwarder starts per SYN, and the connection's whole life
// runs on it (Close waits for it): starting another one for the same work was one more goroutine
// and scheduler hand-off per new connection. The Handler is asked before the handshake
// completes, so a refused connection is reset and the local program's connect fails.
func (st *Stack) handleTCP(r *tcp.ForwarderRequest) {
	if !st.enter() {
		r.Complete(true)
		return
	}
	defer st.wg.Done()
	st.forwardTCP(r)
}

func (st *Stack) forwardTCP(r *tcp.ForwarderRequest) {
	id := r.ID()
	src, dst := addrPort(id.RemoteAddress, id.RemotePort), addrPort(id.LocalAddress, id.LocalPort)
	oc, err := st.h.Outbound(st.ctx, TCP, src, dst)
	if err != nil {
		st.c.refused.Add(1)
		st.log.Debug("tun flow refused", "proto", TCP, "src", src.String(), "dst", dst.String(), "err", err)
		r.Complete(true)
		return
	}
	var wq waiter.Queue
	ep, terr := r.CreateEndpoint(&wq)
	if terr != nil {
		r.Complete(true)
		_ = oc.Close()
		st.log.Debug("tun handshake failed", "src", src.String(), "dst", dst.String(), "err", terr.String())
		return
	}
	r.Complete(false)
	ep.SocketOptions().SetDelayOption(false)
	st.c.outbound.Add(1)
	st.splice(gonet.NewTCPConn(&wq, ep), oc)
}

// splice copies both ways until both directions end, half-closing where both sides can, and
// closes both conns. It returns when the stack closes, too.
//
// One direction runs on the calling goroutine and one on a new goroutine, and the stack's end
// closes both conns through context.AfterFunc: per connection, one goroutine where there were
// three (a watcher and two copiers), each a start and a scheduler hand-off on the path of a new
// connection.
func (st *Stack) splice(a, b net.Conn) {
	closeBoth := func() {
		_ = a.Close()
		_ = b.Close()
	}
	stop := context.AfterFunc(st.ctx, closeBoth)
	one := func(dst, src net.Conn) {
		buf := st.copyBufs.Get().(*[]byte)
		_, err := io.CopyBuffer(dst, src, *buf)
		st.copyBufs.Put(buf)
		if cw, ok := dst.(interface{ CloseWrite() error }); ok && err == nil {
			_ = cw.CloseWrite()
			return
		}
		// No half-close on this side, or an error: end the flow both ways.
		closeBoth()
	}
	done := make(chan struct{})
	go func() { defer close(done); one(a, b) }()
	one(b, a)
	<-done
	stop()
	closeBoth()
}

// handleUDP runs synchronously in the stack's packet path for a datagram that matches no
// endpoint: it must not block.
func (st *Stack) handleUDP(r *udp.ForwarderRequest) {
	id := r.ID()
	st.mu.Lock()
	until, held := st.held[id]
	now := time.Now()
	if held && now.Before(until) {
		st.mu.Unlock()
		return
	}
	delete(st.held, id)
	st.mu.Unlock()
	var wq waiter.Queue
	ep, terr := r.CreateEndpoint(&wq)
	if terr != nil {
		st.log.Debug("tun udp endpoint", "err", terr.String())
		return
	}
	c := gonet.NewUDPConn(&wq, ep)
	if !st.spawn(func() { st.forwardUDP(id, c) }) {
		_ = c.Close()
	}
}

func (st *Stack) forwardUDP(id stack.TransportEndpointID, c *gonet.UDPConn) {
	src, dst := addrPort(id.RemoteAddress, id.RemotePort), addrPort(id.LocalAddress, id.LocalPort)
	oc, err := st.h.Outbound(st.ctx, UDP, src, dst)
	if err != nil {
		st.c.refused.Add(1)
		st.log.Debug("tun flow refused", "proto", UDP, "src", src.String(), "dst", dst.String(), "err", err)
		st.mu.Lock()
		// Bounded: a flood of refused flows keeps at most this many entries; an old one expiring
		// early only costs one more Handler call.
		if len(st.held) >= 4096 {
			for k, t := range st.held {
				if time.Now().After(t) {
					delete(st.held, k)
				}
			}
		}
		if len(st.held) < 4096 {
			st.held[id] = time.Now().Add(st.opts.RefusedHold)
		}
		st.mu.Unlock()
		_ = c.Close()
		return
	}
	st.c.outbound.Add(1)
	st.spliceUDP(c, oc)
}

// spliceUDP copies datagrams both ways until the flow is idle for UDPIdle, either side fails,
// or the stack closes.
func (st *Stack) spliceUDP(a, b net.Conn) {
	var last atomic.Int64
	last.Store(time.Now().UnixNano())
	stop := make(chan struct{})
	var once sync.Once
	end := func() { once.Do(func() { close(stop); _ = a.Close(); _ = b.Close() }) }
	one := func(dst, src net.Conn, toOverlay bool) {
		bp := st.datagramBufs.Get().(*[]byte)
		defer st.datagramBufs.Put(bp)
		buf := *bp
		for {
			_ = src.SetReadDeadline(time.Now().Add(st.opts.UDPIdle))
			n, err := src.Read(buf)
			if err != nil {
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() && time.Since(time.Unix(0, last.Load())) < st.opts.UDPIdle {
					continue
				}
				end()
				return
			}
			last.Store(time.Now().UnixNano())
			if _, err := dst.Write(buf[:n]); err != nil {
				if toOverlay {
					// The datagram is lost, as on a congested network; the flow goes on (its
					// end ends the other direction's read, hence the splice).
					st.c.udpDropped.Add(1)
					continue
				}
				end()
				return
			}
		}
	}
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); one(b, a, true) }()
	go func() { defer wg.Done(); one(a, b, false) }()
	select {
	case <-st.ctx.Done():
		end()
	case <-stop:
	}
	wg.Wait()
}

// DialFrom originates a connection from src (a remote agent's overlay address) to dst (a local
// agent's address and port) through the interface, so the local program sees src as its peer.
// For UDP the conn is connected: one Write sends one datagram.
func (st *Stack) DialFrom(ctx context.Context, proto string, src, dst netip.AddrPort) (net.Conn, error) {
	st.mu.Lock()
	closed := st.closed
	st.mu.Unlock()
	if closed {
		return nil, ErrClosed
	}
	if !st.isLocal(dst.Addr()) {
		return nil, fmt.Errorf("%w: %s", ErrNotLocal, dst.Addr())
	}
	if st.isLocal(src.Addr()) {
		// Same-node flows never cross the interface: the kernel delivers them locally.
		return nil, fmt.Errorf("tunstack: source %s is a local agent address", src.Addr())
	}
	if src.Addr().Unmap().Is4() != dst.Addr().Unmap().Is4() {
		return nil, fmt.Errorf("tunstack: %s and %s are of different address families", src, dst)
	}
	lfa, pn := fullAddr(src)
	rfa, _ := fullAddr(dst)
	switch proto {
	case TCP:
		c, err := gonet.DialTCPWithBind(ctx, st.s, lfa, rfa, pn)
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			return nil, fmt.Errorf("%w: %s to %s: %w", ErrDial, src, dst, err)
		}
		st.c.inbound.Add(1)
		return c, nil
	case UDP:
		c, err := gonet.DialUDP(st.s, &lfa, &rfa, pn)
		if err != nil {
			return nil, fmt.Errorf("%w: udp %s to %s: %w", ErrDial, src, dst, err)
		}
		st.c.inbound.Add(1)
		return c, nil
	}
	return nil, fmt.Errorf("%w: %q", ErrProto, proto)
}

// SpliceHere is Splice on the calling goroutine: it returns once both directions have ended (or
// the stack closed), and Close waits for it like for its own goroutines. A caller that has a
// goroutine per flow anyway (the daemon's inbound flows) saves a goroutine start and a hand-off
// per connection. False, with both conns closed at once, when the stack is closing.
func (st *Stack) SpliceHere(proto string, local, overlay net.Conn) bool {
	if !st.enter() {
		_ = local.Close()
		_ = overlay.Close()
		return false
	}
	defer st.wg.Done()
	if proto == UDP {
		st.spliceUDP(local, overlay)
	} else {
		st.splice(local, overlay)
	}
	return true
}

// Splice copies between an inbound overlay flow and the conn DialFrom returned until both end
// (or the stack closes), then calls done (if not nil). It belongs to the stack, so Close waits
// for it. proto says whether the conns carry a byte stream or datagrams. False when the stack is
// closing: both conns are closed and done is called before it returns.
func (st *Stack) Splice(proto string, local, overlay net.Conn, done func()) bool {
	if done == nil {
		done = func() {}
	}
	f := func() { defer done(); st.splice(local, overlay) }
	if proto == UDP {
		f = func() { defer done(); st.spliceUDP(local, overlay) }
	}
	if !st.spawn(f) {
		_ = local.Close()
		_ = overlay.Close()
		done()
		return false
	}
	return true
}
