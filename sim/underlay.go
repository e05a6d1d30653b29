package sim

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ute-project/ute/sim/memnet"
)

// underlay is the network the nodes' sockets live on: the in-memory network (memnet), or real
// UDP sockets on loopback (--real).
type underlay interface {
	// plan returns the address of the i-th node.
	plan(i int) (netip.AddrPort, error)
	// listen returns the socket of a planned address.
	listen(addr netip.AddrPort) (net.PacketConn, error)
	// partition splits the hosts into sets (hosts in no set form one more group); heal ends it.
	partition(sets ...[]netip.AddrPort)
	heal()
	// reachable reports whether a packet from from could reach to now: no partition between
	// them and, where the underlay knows it, a socket at to.
	reachable(from, to netip.AddrPort) bool
	stats() memnet.Stats
	// trace starts or stops recording what each host's socket reads; traced returns what the
	// socket at addr read (memnet.Network.Trace). Real UDP traces nothing.
	trace(on bool)
	traced(addr netip.AddrPort) []memnet.Trace
	close() error
}

// memUnderlay is memnet: per-link latency, jitter, loss and partitions.
type memUnderlay struct{ n *memnet.Network }

func (m memUnderlay) plan(i int) (netip.AddrPort, error) {
	return netip.AddrPortFrom(memnet.HostAddr(i), nodePort), nil
}

func (m memUnderlay) listen(addr netip.AddrPort) (net.PacketConn, error) { return m.n.Listen(addr) }

func (m memUnderlay) partition(sets ...[]netip.AddrPort) {
	hosts := make([][]netip.Addr, len(sets))
	for i, s := range sets {
		for _, a := range s {
			hosts[i] = append(hosts[i], a.Addr())
		}
	}
	m.n.Partition(hosts...)
}

func (m memUnderlay) heal() { m.n.Heal() }
func (m memUnderlay) reachable(from, to netip.AddrPort) bool {
	return m.n.Reachable(from, to)
}
func (m memUnderlay) stats() memnet.Stats { return m.n.Stats() }
func (m memUnderlay) close() error        { return m.n.Close() }
func (m memUnderlay) trace(on bool)       { m.n.Trace(on) }
func (m memUnderlay) traced(addr netip.AddrPort) []memnet.Trace {
	return m.n.Traced(addr)
}

// udpUnderlay is real UDP on 127.0.0.1: the kernel's loopback carries every packet, with its
// own (near zero) latency and no loss; the scenario's link settings do not apply. Partitions
// are applied by filtering at each socket, by the peer's address, in both directions.
type udpUnderlay struct {
	mu     sync.Mutex
	bound  map[netip.AddrPort]*net.UDPConn // planned, not yet handed out
	group  map[netip.AddrPort]int
	closed bool

	sent, delivered, partitioned, bytes atomic.Uint64
}

func newUDPUnderlay() *udpUnderlay {
	return &udpUnderlay{bound: map[netip.AddrPort]*net.UDPConn{}, group: map[netip.AddrPort]int{}}
}

// plan binds a socket on a port the kernel picks, so that the address is known before the node
// joins (it is advertised in the node's certificate request).
func (u *udpUnderlay) plan(int) (netip.AddrPort, error) {
	c, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.MustParseAddrPort("127.0.0.1:0")))
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("sim: --real: %w", err)
	}
	ap := c.LocalAddr().(*net.UDPAddr).AddrPort()
	u.mu.Lock()
	defer u.mu.Unlock()
	u.bound[ap] = c
	return ap, nil
}

func (u *udpUnderlay) listen(addr netip.AddrPort) (net.PacketConn, error) {
	u.mu.Lock()
	if u.closed {
		u.mu.Unlock()
		return nil, net.ErrClosed
	}
	c := u.bound[addr]
	delete(u.bound, addr)
	u.mu.Unlock()
	if c == nil {
		// A restarted node takes its old port again.
		var err error
		if c, err = net.ListenUDP("udp4", net.UDPAddrFromAddrPort(addr)); err != nil {
			return nil, fmt.Errorf("sim: --real: listen %s: %w", addr, err)
		}
	}
	return &filteredConn{c: c, u: u, self: addr}, nil
}

func (u *udpUnderlay) partition(sets ...[]netip.AddrPort) {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.group = map[netip.AddrPort]int{}
	for i, s := range sets {
		for _, a := range s {
			u.group[a] = i + 1
		}
	}
}

func (u *udpUnderlay) heal() {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.group = map[netip.AddrPort]int{}
}

// apart reports whether a partition separates a and b.
func (u *udpUnderlay) apart(a, b netip.AddrPort) bool {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.group[a] != u.group[b]
}

// reachable knows partitions only: a crashed node's port is not tracked.
func (u *udpUnderlay) reachable(from, to netip.AddrPort) bool { return !u.apart(from, to) }

func (u *udpUnderlay) trace(bool)                           {}
func (u *udpUnderlay) traced(netip.AddrPort) []memnet.Trace { return nil }

func (u *udpUnderlay) stats() memnet.Stats {
	return memnet.Stats{Sent: u.sent.Load(), Delivered: u.delivered.Load(), Partitioned: u.partitioned.Load(), Bytes: u.bytes.Load()}
}

func (u *udpUnderlay) close() error {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.closed = true
	var errs []error
	for _, c := range u.bound {
		errs = append(errs, c.Close())
	}
	u.bound = nil
	return errors.Join(errs...)
}

// filteredConn is a node's UDP socket that drops what a partition separates and counts
// packets. It exposes only the net.PacketConn methods and the buffer sizes, not ReadMsgUDP or
// SyscallConn, so that quic-go uses ReadFrom and WriteTo and every packet passes the filter.
type filteredConn struct {
	c    *net.UDPConn
	u    *udpUnderlay
	self netip.AddrPort
}

// ReadFrom drops packets from the far side of a partition, as the network would.
func (c *filteredConn) ReadFrom(p []byte) (int, net.Addr, error) {
	for {
		n, from, err := c.c.ReadFromUDPAddrPort(p)
		if err != nil {
			return n, nil, err
		}
		from = netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
		if c.u.apart(c.self, from) {
			c.u.partitioned.Add(1)
			continue
		}
		c.u.delivered.Add(1)
		c.u.bytes.Add(uint64(n))
		return n, net.UDPAddrFromAddrPort(from), nil
	}
}

// WriteTo sends unless a partition separates the peer (then the packet is lost silently, as on
// a cut network).
func (c *filteredConn) WriteTo(p []byte, addr net.Addr) (int, error) {
	c.u.sent.Add(1)
	if ua, ok := addr.(*net.UDPAddr); ok {
		to := ua.AddrPort()
		to = netip.AddrPortFrom(to.Addr().Unmap(), to.Port())
		if c.u.apart(c.self, to) {
			c.u.partitioned.Add(1)
			return len(p), nil
		}
	}
	return c.c.WriteTo(p, addr)
}

func (c *filteredConn) Close() error                       { return c.c.Close() }
func (c *filteredConn) LocalAddr() net.Addr                { return c.c.LocalAddr() }
func (c *filteredConn) SetDeadline(t time.Time) error      { return c.c.SetDeadline(t) }
func (c *filteredConn) SetReadDeadline(t time.Time) error  { return c.c.SetReadDeadline(t) }
func (c *filteredConn) SetWriteDeadline(t time.Time) error { return c.c.SetWriteDeadline(t) }
func (c *filteredConn) SetReadBuffer(n int) error          { return c.c.SetReadBuffer(n) }
func (c *filteredConn) SetWriteBuffer(n int) error         { return c.c.SetWriteBuffer(n) }

var _ net.PacketConn = (*filteredConn)(nil)
