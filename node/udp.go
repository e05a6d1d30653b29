package node

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ute-project/ute/overlay/dtl"
	"github.com/ute-project/ute/overlay/tunnel"
)

// UDP for SDK agents. A UDP flow is admitted like a TCP flow (a DTL record on a control stream,
// destination protocol udp); its datagrams then travel as QUIC datagrams tagged with the flow id
// (tunnel.OpenPacketFlow / PacketHandler), and one too large for a QUIC datagram on the flow's
// control stream, so any datagram up to tunnel.MaxPacketPayload (65,535 bytes) arrives whole. A
// flow is one (source agent, destination port) pair: the dialer's net.Conn and one peer address
// on the listener's net.PacketConn.

// udpQueue bounds the datagrams queued for a reader, per dialed conn and per listener; beyond it
// datagrams are dropped, as a UDP socket buffer would.
const udpQueue = 256

// ErrNoFlow is returned by WriteTo for an address no admitted flow comes from: a UDP listener
// answers its callers, it cannot start flows (Dial does).
var ErrNoFlow = errors.New("node: no admitted UDP flow from that address")

// checkDatagramSize refuses what no UDP datagram can be, on same-node flows as on the tunnel.
func checkDatagramSize(p []byte) error {
	if len(p) > tunnel.MaxPacketPayload {
		return fmt.Errorf("%w: %d bytes, a UDP flow carries at most %d", tunnel.ErrDatagramTooLarge, len(p), tunnel.MaxPacketPayload)
	}
	return nil
}

func isUDP(network string) bool { return network == "udp" || network == "udp4" || network == "udp6" }

func udpAddr(ip netip.Addr, port uint16) net.Addr {
	if !ip.IsValid() {
		return nil
	}
	return net.UDPAddrFromAddrPort(netip.AddrPortFrom(ip, port))
}

// flowPort is the source port both ends show for a UDP flow: records carry no source port, and a
// listener needs one address per flow to route replies, so it is derived from the flow id, in the
// dynamic range 49152–65535.
func flowPort(flowID uint64) uint16 { return uint16(49152 + flowID%16384) }

// deadline is a resettable deadline whose channel closes when it passes (as net.Pipe does).
type deadline struct {
	mu     sync.Mutex
	timer  *time.Timer
	cancel chan struct{}
}

func newDeadline() *deadline { return &deadline{cancel: make(chan struct{})} }

func (d *deadline) set(t time.Time) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.timer != nil && !d.timer.Stop() {
		<-d.cancel // the timer fired: wait until it closed the channel
	}
	d.timer = nil
	closed := isDone(d.cancel)
	if t.IsZero() {
		if closed {
			d.cancel = make(chan struct{})
		}
		return
	}
	if dur := time.Until(t); dur > 0 {
		if closed {
			d.cancel = make(chan struct{})
		}
		c := d.cancel
		d.timer = time.AfterFunc(dur, func() { close(c) })
		return
	}
	if !closed {
		close(d.cancel)
	}
}

func (d *deadline) wait() <-chan struct{} {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.cancel
}

func isDone(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

// udpConn is the dialing side of a UDP flow.
type udpConn struct {
	local, remote net.Addr
	in            chan []byte
	done          chan struct{}
	once          sync.Once
	send          func([]byte) error
	onClose       func()
	rd            *deadline
	dropped       atomic.Uint64
}

var _ net.Conn = (*udpConn)(nil)

func newUDPConn(local, remote net.Addr) *udpConn {
	return &udpConn{local: local, remote: remote, in: make(chan []byte, udpQueue), done: make(chan struct{}), rd: newDeadline()}
}

// push queues a datagram for Read, dropping it when the queue is full or the conn closed.
func (c *udpConn) push(b []byte) {
	if isDone(c.done) {
		return
	}
	select {
	case c.in <- b:
	default:
		c.dropped.Add(1)
	}
}

// Read reads one datagram; a datagram longer than p is truncated, as with UDP sockets.
func (c *udpConn) Read(p []byte) (int, error) {
	select {
	case b := <-c.in:
		return copy(p, b), nil
	default:
	}
	select {
	case b := <-c.in:
		return copy(p, b), nil
	case <-c.done:
		return 0, &net.OpError{Op: "read", Net: "udp", Addr: c.remote, Err: net.ErrClosed}
	case <-c.rd.wait():
		return 0, &net.OpError{Op: "read", Net: "udp", Addr: c.remote, Err: os.ErrDeadlineExceeded}
	}
}

// Write sends p as one datagram.
func (c *udpConn) Write(p []byte) (int, error) {
	if isDone(c.done) {
		return 0, &net.OpError{Op: "write", Net: "udp", Addr: c.remote, Err: net.ErrClosed}
	}
	if err := checkDatagramSize(p); err != nil {
		return 0, &net.OpError{Op: "write", Net: "udp", Addr: c.remote, Err: err}
	}
	if err := c.send(p); err != nil {
		return 0, &net.OpError{Op: "write", Net: "udp", Addr: c.remote, Err: err}
	}
	return len(p), nil
}

// Close ends the flow on both sides.
func (c *udpConn) Close() error {
	c.once.Do(func() {
		close(c.done)
		if c.onClose != nil {
			c.onClose()
		}
	})
	return nil
}

func (c *udpConn) LocalAddr() net.Addr  { return c.local }
func (c *udpConn) RemoteAddr() net.Addr { return c.remote }

// SetDeadline sets the read deadline. A write blocks only while the tunnel's send queues are full,
// and at most about a second (tunnel.PacketFlow.Send), then fails with tunnel.ErrSendQueueFull;
// a write deadline is not applied.
func (c *udpConn) SetDeadline(t time.Time) error      { c.rd.set(t); return nil }
func (c *udpConn) SetReadDeadline(t time.Time) error  { c.rd.set(t); return nil }
func (c *udpConn) SetWriteDeadline(_ time.Time) error { return nil }

// dialUDP opens an admitted UDP flow to dst.
func (a *Agent) dialUDP(ctx context.Context, addr string, dst destination) (net.Conn, error) {
	n := a.n
	ddst := dtl.Destination{Agent: dst.name, Port: dst.port, Proto: dtl.ProtoUDP}
	remote := udpAddr(dst.ip, dst.port)
	if dst.node == "" {
		return a.dialLocalUDP(ctx, addr, ddst, remote)
	}
	t, err := n.tunnelTo(ctx, dst.node, dst.zone)
	if err != nil {
		return nil, refused(addr, "tunnel", "tunnel", err)
	}
	var pf *tunnel.PacketFlow
	err = a.openFlowWithChain(ctx, t, ddst, func(rec []byte, flowID uint64) error {
		var err error
		pf, err = t.OpenPacketFlow(ctx, flowID, rec, udpAddr(a.ip, flowPort(flowID)), remote)
		return err
	})
	if err != nil {
		return nil, dialErr(addr, err)
	}
	c := newUDPConn(pf.LocalAddr(), pf.RemoteAddr())
	c.send = pf.Send
	f := &liveFlow{ids: a.revocationIDs(), t: t, abort: func() { _ = c.Close() }}
	c.onClose = func() { n.untrackFlow(f); _ = pf.Close() }
	n.trackFlow(f)
	if !n.spawn(func() { pumpToConn(n.ctx, pf, c) }) {
		_ = c.Close()
		return nil, refused(addr, "tunnel", "tunnel", ErrClosed)
	}
	if n.isRevoked(f.ids...) {
		_ = c.Close()
		return nil, refused(addr, "admission", "revoked", fmt.Errorf("%w: %s was revoked while dialing", dtl.ErrRevoked, a.id))
	}
	return c, nil
}

// pumpToConn moves a packet flow's datagrams to a dialed conn until either ends.
func pumpToConn(ctx context.Context, pf *tunnel.PacketFlow, c *udpConn) {
	defer func() { _ = c.Close() }()
	for {
		b, err := pf.Receive(ctx)
		if err != nil {
			return
		}
		c.push(b)
	}
}

// dialLocalUDP admits a same-node UDP flow like any other and connects the two ends in memory.
func (a *Agent) dialLocalUDP(ctx context.Context, addr string, dst dtl.Destination, remote net.Addr) (net.Conn, error) {
	n := a.n
	zone := a.id.Zone
	adm, p, err := a.admitLocal(ctx, addr, dst)
	if err != nil {
		return nil, err
	}
	n.mu.Lock()
	l := n.packetListenerLocked(zone, dst.Agent, dst.Port)
	n.mu.Unlock()
	if l == nil {
		return nil, refused(addr, "admission", "unreachable", fmt.Errorf("%w: %s stopped listening", dtl.ErrUnreachable, dst.Agent))
	}
	c := newUDPConn(adm.Remote, remote)
	// The caller may reuse its buffer once Write returns, as with a socket: queue a copy.
	pfl := &packetFlow{addr: adm.Remote, prov: p, send: func(b []byte) error { c.push(bytes.Clone(b)); return nil }, close: func() { _ = c.Close() }}
	f := &liveFlow{ids: p.ids, abort: func() { _ = c.Close() }}
	c.send = func(b []byte) error { l.push(pfl, bytes.Clone(b)); return nil }
	c.onClose = func() { n.untrackFlow(f); l.remove(pfl) }
	n.trackFlow(f)
	if !l.add(pfl) {
		_ = c.Close()
		return nil, refused(addr, "admission", "unreachable", fmt.Errorf("%w: %s stopped listening", dtl.ErrUnreachable, dst.Agent))
	}
	if n.isRevoked(f.ids...) {
		_ = c.Close()
		return nil, refused(addr, "admission", "revoked", fmt.Errorf("%w: %s was revoked while dialing", dtl.ErrRevoked, a.id))
	}
	return c, nil
}

// ListenPacket receives admitted UDP flows to this agent on a port: network "udp" (or
// udp4/udp6), addr ":PORT" or "IP:PORT" with the agent's overlay IP. ReadFrom returns datagrams
// of every admitted flow with the flow's source address (the caller's overlay IP and a port
// naming the flow); WriteTo answers such an address; WhoIsPacket returns its verified provenance.
func (a *Agent) ListenPacket(network, addr string) (net.PacketConn, error) {
	k, err := a.listenKey(dtl.ProtoUDP, network, addr)
	if err != nil {
		return nil, err
	}
	port := k.port
	l := &packetListener{n: a.n, key: k, addr: net.UDPAddrFromAddrPort(netip.AddrPortFrom(a.ip, port)),
		in: make(chan datagram, udpQueue), done: make(chan struct{}), flows: map[string]*packetFlow{}, rd: newDeadline()}
	a.n.mu.Lock()
	defer a.n.mu.Unlock()
	if a.n.closed {
		return nil, ErrClosed
	}
	if _, dup := a.n.plisten[k]; dup {
		return nil, fmt.Errorf("%w: %s.%s udp/%d", ErrAddrInUse, a.id.Name, a.id.Zone, port)
	}
	a.n.plisten[k] = l
	return l, nil
}

// packetFlow is one admitted flow as the listener sees it.
type packetFlow struct {
	addr  net.Addr
	prov  *Provenance
	send  func([]byte) error
	close func()
}

type datagram struct {
	b    []byte
	from net.Addr
}

// packetListener is an agent's UDP port; every flow it holds was admitted.
type packetListener struct {
	n    *Node
	key  listenKey
	addr net.Addr
	in   chan datagram
	done chan struct{}
	once sync.Once
	rd   *deadline

	mu    sync.Mutex
	flows map[string]*packetFlow // by source address

	dropped atomic.Uint64 // datagrams dropped because the read queue was full
}

var _ net.PacketConn = (*packetListener)(nil)

// add registers an admitted flow; false when the listener is closed or the address is taken
// (two flows whose ids fold onto one port: the caller closes the new one).
func (l *packetListener) add(f *packetFlow) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if isDone(l.done) {
		return false
	}
	if _, dup := l.flows[f.addr.String()]; dup {
		return false
	}
	l.flows[f.addr.String()] = f
	return true
}

func (l *packetListener) remove(f *packetFlow) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.flows[f.addr.String()] == f {
		delete(l.flows, f.addr.String())
	}
}

func (l *packetListener) push(f *packetFlow, b []byte) {
	if isDone(l.done) {
		return
	}
	select {
	case l.in <- datagram{b: b, from: f.addr}:
	default:
		l.dropped.Add(1)
	}
}

func (l *packetListener) ReadFrom(p []byte) (int, net.Addr, error) {
	select {
	case d := <-l.in:
		return copy(p, d.b), d.from, nil
	default:
	}
	select {
	case d := <-l.in:
		return copy(p, d.b), d.from, nil
	case <-l.done:
		return 0, nil, &net.OpError{Op: "read", Net: "udp", Addr: l.addr, Err: net.ErrClosed}
	case <-l.rd.wait():
		return 0, nil, &net.OpError{Op: "read", Net: "udp", Addr: l.addr, Err: os.ErrDeadlineExceeded}
	}
}

func (l *packetListener) flow(addr net.Addr) *packetFlow {
	if addr == nil {
		return nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.flows[addr.String()]
}

func (l *packetListener) WriteTo(p []byte, addr net.Addr) (int, error) {
	if isDone(l.done) {
		return 0, &net.OpError{Op: "write", Net: "udp", Addr: addr, Err: net.ErrClosed}
	}
	f := l.flow(addr)
	if f == nil {
		return 0, &net.OpError{Op: "write", Net: "udp", Addr: addr, Err: ErrNoFlow}
	}
	if err := checkDatagramSize(p); err != nil {
		return 0, &net.OpError{Op: "write", Net: "udp", Addr: addr, Err: err}
	}
	if err := f.send(p); err != nil {
		return 0, &net.OpError{Op: "write", Net: "udp", Addr: addr, Err: err}
	}
	return len(p), nil
}

// Close stops the port and ends every flow to it on both sides.
func (l *packetListener) Close() error {
	l.once.Do(func() {
		l.n.mu.Lock()
		if l.n.plisten[l.key] == l {
			delete(l.n.plisten, l.key)
		}
		l.n.mu.Unlock()
		l.mu.Lock()
		close(l.done)
		flows := make([]*packetFlow, 0, len(l.flows))
		for _, f := range l.flows {
			flows = append(flows, f)
		}
		clear(l.flows)
		l.mu.Unlock()
		for _, f := range flows {
			f.close()
		}
	})
	return nil
}

func (l *packetListener) LocalAddr() net.Addr                { return l.addr }
func (l *packetListener) SetDeadline(t time.Time) error      { l.rd.set(t); return nil }
func (l *packetListener) SetReadDeadline(t time.Time) error  { l.rd.set(t); return nil }
func (l *packetListener) SetWriteDeadline(_ time.Time) error { return nil }

// handlePacket receives every admitted tunnel packet flow (tunnel.Config.PacketHandler).
func (n *Node) handlePacket(pf *tunnel.PacketFlow) {
	adm, _ := pf.Admission()
	n.track(pf.Tunnel())
	p, ok := adm.Info.(*Provenance)
	if !ok || n.isRevoked(p.ids...) {
		_ = pf.Close()
		return
	}
	n.mu.Lock()
	l := n.packetListenerLocked(p.Zone, p.Destination.Agent, p.Destination.Port)
	n.mu.Unlock()
	f := &packetFlow{addr: pf.RemoteAddr(), prov: p, send: pf.Send, close: func() { _ = pf.Close() }}
	if l == nil || !l.add(f) {
		_ = pf.Close()
		return
	}
	if !n.spawn(func() {
		defer l.remove(f)
		for {
			b, err := pf.Receive(n.ctx)
			if err != nil {
				_ = pf.Close()
				return
			}
			l.push(f, b)
		}
	}) {
		l.remove(f)
		_ = pf.Close()
	}
}

// WhoIsPacket returns the verified provenance of the UDP flow that datagrams from addr arrive on,
// for a net.PacketConn returned by Agent.ListenPacket.
func WhoIsPacket(pc net.PacketConn, addr net.Addr) (*Provenance, error) {
	l, ok := pc.(*packetListener)
	if !ok {
		return nil, fmt.Errorf("%w: %T is not a UTE UDP listener", ErrNoProvenance, pc)
	}
	f := l.flow(addr)
	if f == nil {
		return nil, fmt.Errorf("%w: no admitted flow from %v", ErrNoProvenance, addr)
	}
	return f.prov, nil
}
