package memnet

import (
	"container/heap"
	"errors"
	"fmt"
	"hash/fnv"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// Link is the behaviour of the path between two hosts, applied to each packet independently.
type Link struct {
	// Latency is the one-way delay of every packet.
	Latency time.Duration
	// Jitter adds a uniformly drawn extra delay in [0, Jitter); packets may then be reordered,
	// as on a real network.
	Jitter time.Duration
	// Loss is the probability in [0, 1] that a packet is dropped.
	Loss float64
}

func (l Link) validate() error {
	if l.Latency < 0 || l.Jitter < 0 || l.Loss < 0 || l.Loss > 1 {
		return fmt.Errorf("memnet: invalid link %+v: latency and jitter must be >= 0 and loss in [0, 1]", l)
	}
	return nil
}

// Stats counts the packets the network has handled.
type Stats struct {
	Sent        uint64 // WriteTo calls that handed a packet to the network
	Delivered   uint64 // packets placed in a receiver's queue
	Lost        uint64 // dropped by a link's loss rate
	Partitioned uint64 // dropped because sender and receiver were in different partitions
	Unreachable uint64 // no conn at the destination, or its queue was full
	Bytes       uint64 // payload bytes delivered
}

// ErrAddrInUse is returned by Listen for an address that already has a conn.
var ErrAddrInUse = errors.New("memnet: address already in use")

// DefaultQueueBytes is a conn's receive queue; beyond it packets are dropped, like a full socket
// buffer. SetReadBuffer changes it.
const DefaultQueueBytes = 4 << 20

// Network is one simulated underlay. Its zero value is not usable: call New.
type Network struct {
	seed uint64

	// mu guards the topology: conns, links, partitions. Senders only read it; the packets in
	// flight are in shards, each with its own lock, queue and scheduler.
	mu     sync.RWMutex
	conns  map[netip.AddrPort]*Conn
	def    Link
	links  map[pair]Link
	group  map[netip.Addr]int
	closed bool

	sent, delivered, lost, partitioned, unreachable, bytes atomic.Uint64

	// tracing makes every conn keep a Trace of each packet it reads (Trace, Traced).
	tracing atomic.Bool

	shards      [numShards]*shard
	done        chan struct{}
	schedulerWG sync.WaitGroup
}

// numShards is how many queues carry the packets in flight, a link's packets always in the same
// one (so a link keeps its order and its loss and jitter draws). With one queue and one lock,
// a 600-node run's spread had 6,235 of quic-go's send loops blocked on that lock at once, and
// the scheduler that delivers packets waited behind them: handshakes took 6–13 s of wall time
// instead of 0.1–0.2 s (docs/benchmarks.md, "Session of 7 December 2026, 1,000-node memory
// and tail").
const numShards = 64

// shard is one queue of packets in flight and its scheduler.
type shard struct {
	mu      sync.Mutex
	linkRNG map[pair]*rand.Rand
	queue   pending
	nextSeq uint64
	wake    chan struct{}
}

func (n *Network) shardOf(p pair) *shard {
	h := fnv.New64a()
	_, _ = h.Write(p.a.AsSlice())
	_, _ = h.Write(p.b.AsSlice())
	return n.shards[h.Sum64()%numShards]
}

type pair struct{ a, b netip.Addr }

func mkpair(a, b netip.Addr) pair {
	if b.Less(a) {
		a, b = b, a
	}
	return pair{a, b}
}

// New returns a network whose links all behave like def until SetLink says otherwise. Close
// stops it.
func New(seed uint64, def Link) (*Network, error) {
	if err := def.validate(); err != nil {
		return nil, err
	}
	n := &Network{
		seed: seed, conns: map[netip.AddrPort]*Conn{}, def: def, links: map[pair]Link{},
		group: map[netip.Addr]int{}, done: make(chan struct{}),
	}
	for i := range n.shards {
		sh := &shard{linkRNG: map[pair]*rand.Rand{}, wake: make(chan struct{}, 1)}
		n.shards[i] = sh
		n.schedulerWG.Go(func() { n.scheduler(sh) })
	}
	return n, nil
}

// HostAddr is the i-th simulated host address, in 198.18.0.0/15 (RFC 2544's benchmarking range):
// a label only, never a socket. It covers 131,070 hosts.
func HostAddr(i int) netip.Addr {
	i++ // skip 198.18.0.0
	return netip.AddrFrom4([4]byte{198, 18 + byte(i>>16&1), byte(i >> 8), byte(i)})
}

// SetLink sets the behaviour of the path between hosts a and b (both directions).
func (n *Network) SetLink(a, b netip.Addr, l Link) error {
	if err := l.validate(); err != nil {
		return err
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	n.links[mkpair(a, b)] = l
	return nil
}

// SetDefaultLink changes the behaviour of every link without its own setting.
func (n *Network) SetDefaultLink(l Link) error {
	if err := l.validate(); err != nil {
		return err
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	n.def = l
	return nil
}

// Partition splits the network: the hosts of each set can reach each other, and the hosts of no
// set reach each other, but no packet crosses between two different groups. It replaces any
// earlier partition.
func (n *Network) Partition(sets ...[]netip.Addr) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.group = map[netip.Addr]int{}
	for i, s := range sets {
		for _, a := range s {
			n.group[a] = i + 1
		}
	}
}

// Reachable reports whether a packet sent now from from to to could arrive: no partition
// separates them and a conn is listening at to (loss aside).
func (n *Network) Reachable(from, to netip.AddrPort) bool {
	n.mu.RLock()
	defer n.mu.RUnlock()
	_, listening := n.conns[to]
	return listening && n.group[from.Addr()] == n.group[to.Addr()]
}

// Heal removes every partition.
func (n *Network) Heal() {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.group = map[netip.Addr]int{}
}

// Stats returns the counters so far.
func (n *Network) Stats() Stats {
	return Stats{Sent: n.sent.Load(), Delivered: n.delivered.Load(), Lost: n.lost.Load(),
		Partitioned: n.partitioned.Load(), Unreachable: n.unreachable.Load(), Bytes: n.bytes.Load()}
}

// Listen returns the conn of host address addr.
func (n *Network) Listen(addr netip.AddrPort) (*Conn, error) {
	if !addr.IsValid() || addr.Port() == 0 {
		return nil, fmt.Errorf("memnet: listen on %s: an address with a port is required", addr)
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return nil, net.ErrClosed
	}
	if _, ok := n.conns[addr]; ok {
		return nil, fmt.Errorf("%w: %s", ErrAddrInUse, addr)
	}
	c := &Conn{net: n, addr: addr, udp: net.UDPAddrFromAddrPort(addr), limit: DefaultQueueBytes,
		wake: make(chan struct{}, 1), closed: make(chan struct{}), deadlineChanged: make(chan struct{}, 1)}
	n.conns[addr] = c
	return c, nil
}

// Close closes every conn and stops the delivery of packets still in flight.
func (n *Network) Close() error {
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		return nil
	}
	n.closed = true
	conns := make([]*Conn, 0, len(n.conns))
	for _, c := range n.conns {
		conns = append(conns, c)
	}
	n.mu.Unlock()
	for _, c := range conns {
		_ = c.Close()
	}
	close(n.done)
	n.schedulerWG.Wait()
	return nil
}

// send routes one packet; it is called with a private copy of the payload.
func (n *Network) send(from, to netip.AddrPort, data []byte, sent time.Time) {
	n.mu.RLock()
	if n.closed {
		n.mu.RUnlock()
		return
	}
	n.sent.Add(1)
	if n.group[from.Addr()] != n.group[to.Addr()] {
		n.partitioned.Add(1)
		n.mu.RUnlock()
		return
	}
	p := mkpair(from.Addr(), to.Addr())
	l, ok := n.links[p]
	if !ok {
		l = n.def
	}
	n.mu.RUnlock()
	sh := n.shardOf(p)
	sh.mu.Lock()
	var delay time.Duration
	if l.Loss > 0 || l.Jitter > 0 {
		rng := sh.linkRNG[p]
		if rng == nil {
			h := fnv.New64a()
			_, _ = h.Write(p.a.AsSlice())
			_, _ = h.Write(p.b.AsSlice())
			rng = rand.New(rand.NewPCG(n.seed, h.Sum64()))
			sh.linkRNG[p] = rng
		}
		if l.Loss > 0 && rng.Float64() < l.Loss {
			n.lost.Add(1)
			sh.mu.Unlock()
			return
		}
		if l.Jitter > 0 {
			delay = time.Duration(rng.Int64N(int64(l.Jitter)))
		}
	}
	delay += l.Latency
	if delay <= 0 {
		n.deliver(from, to, data, sent)
		sh.mu.Unlock()
		return
	}
	sh.nextSeq++
	at := time.Now().Add(delay)
	first := len(sh.queue) == 0 || at.Before(sh.queue[0].at)
	heap.Push(&sh.queue, &packet{at: at, seq: sh.nextSeq, from: from, to: to, data: data, sent: sent})
	sh.mu.Unlock()
	if first {
		select {
		case sh.wake <- struct{}{}:
		default:
		}
	}
}

// deliver places a packet in its receiver's queue.
func (n *Network) deliver(from, to netip.AddrPort, data []byte, sent time.Time) {
	n.mu.RLock()
	c := n.conns[to]
	n.mu.RUnlock()
	if c == nil || !c.push(from, data, sent) {
		n.unreachable.Add(1)
		return
	}
	n.delivered.Add(1)
	n.bytes.Add(uint64(len(data)))
}

// scheduler delivers sh's delayed packets when they are due, in order, without holding sh's
// lock while it delivers; Close stops it.
func (n *Network) scheduler(sh *shard) {
	t := time.NewTimer(time.Hour)
	defer t.Stop()
	var due []*packet
	for {
		sh.mu.Lock()
		now := time.Now()
		for len(sh.queue) > 0 && !sh.queue[0].at.After(now) {
			due = append(due, heap.Pop(&sh.queue).(*packet))
		}
		wait := time.Hour
		if len(sh.queue) > 0 {
			wait = sh.queue[0].at.Sub(now)
		}
		sh.mu.Unlock()
		for i, p := range due {
			n.deliver(p.from, p.to, p.data, p.sent)
			due[i] = nil
		}
		due = due[:0]
		t.Reset(wait)
		select {
		case <-n.done:
			return
		case <-sh.wake:
		case <-t.C:
		}
	}
}

type packet struct {
	at, sent time.Time
	seq      uint64 // ties keep send order
	from, to netip.AddrPort
	data     []byte
}

type pending []*packet

func (q pending) Len() int { return len(q) }
func (q pending) Less(i, j int) bool {
	if q[i].at.Equal(q[j].at) {
		return q[i].seq < q[j].seq
	}
	return q[i].at.Before(q[j].at)
}
func (q pending) Swap(i, j int) { q[i], q[j] = q[j], q[i] }
func (q *pending) Push(x any)   { *q = append(*q, x.(*packet)) }
func (q *pending) Pop() any {
	old := *q
	p := old[len(old)-1]
	old[len(old)-1] = nil
	*q = old[:len(old)-1]
	return p
}

// Conn is one host's socket on the network; it implements net.PacketConn.
type Conn struct {
	net  *Network
	addr netip.AddrPort
	udp  *net.UDPAddr

	mu              sync.Mutex
	q               []queued
	qBytes          int
	limit           int
	isClosed        bool
	readDeadline    time.Time
	wake            chan struct{}
	closed          chan struct{}
	deadlineChanged chan struct{}
	traced          []Trace
}

type queued struct {
	from         netip.AddrPort
	data         []byte
	sent, queued time.Time
}

// Trace is one packet a conn read while the network traced: where it came from, its size, and
// when it was sent, placed in this conn's queue (after the link's delay) and read. It splits a
// packet's way into the sender's side (before Sent), the link, and the receiver's socket queue
// (Queued to Read); what happens after the read is the receiver's.
type Trace struct {
	From               netip.AddrPort
	Size               int
	Sent, Queued, Read time.Time
}

// maxTraced bounds each conn's trace, so that tracing a busy network cannot exhaust memory.
const maxTraced = 1 << 14

// Trace starts (clearing every conn's trace) or stops recording the packets each conn reads.
// It is a diagnostic: the simulator turns it on for a revocation's spread.
func (n *Network) Trace(on bool) {
	n.mu.RLock()
	defer n.mu.RUnlock()
	if on {
		for _, c := range n.conns {
			c.mu.Lock()
			c.traced = nil
			c.mu.Unlock()
		}
	}
	n.tracing.Store(on)
}

// Traced returns a copy of what the conn at addr read while the network traced (at most the
// first 16,384 packets), in the order it read them.
func (n *Network) Traced(addr netip.AddrPort) []Trace {
	n.mu.RLock()
	c := n.conns[addr]
	n.mu.RUnlock()
	if c == nil {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.traced)
}

var _ net.PacketConn = (*Conn)(nil)

// push queues a packet; false when the conn is closed or its queue is full.
func (c *Conn) push(from netip.AddrPort, data []byte, sent time.Time) bool {
	var now time.Time
	if c.net.tracing.Load() {
		now = time.Now()
	}
	c.mu.Lock()
	if c.isClosed || c.qBytes+len(data) > c.limit {
		c.mu.Unlock()
		return false
	}
	c.q = append(c.q, queued{from: from, data: data, sent: sent, queued: now})
	c.qBytes += len(data)
	c.mu.Unlock()
	select {
	case c.wake <- struct{}{}:
	default:
	}
	return true
}

// ReadFrom blocks until a packet arrives, the read deadline passes or the conn is closed.
func (c *Conn) ReadFrom(p []byte) (int, net.Addr, error) {
	for {
		c.mu.Lock()
		if c.isClosed {
			c.mu.Unlock()
			return 0, nil, c.opErr("read", net.ErrClosed)
		}
		if len(c.q) > 0 {
			pk := c.q[0]
			c.q[0] = queued{}
			c.q = c.q[1:]
			c.qBytes -= len(pk.data)
			// A packet sent before the trace started carries no send time and is not traced.
			if !pk.sent.IsZero() && !pk.queued.IsZero() && c.net.tracing.Load() && len(c.traced) < maxTraced {
				c.traced = append(c.traced, Trace{From: pk.from, Size: len(pk.data), Sent: pk.sent, Queued: pk.queued, Read: time.Now()})
			}
			more := len(c.q) > 0
			c.mu.Unlock()
			if more { // another reader may be waiting
				select {
				case c.wake <- struct{}{}:
				default:
				}
			}
			return copy(p, pk.data), net.UDPAddrFromAddrPort(pk.from), nil
		}
		dl := c.readDeadline
		c.mu.Unlock()
		var timeout <-chan time.Time
		var t *time.Timer
		if !dl.IsZero() {
			d := time.Until(dl)
			if d <= 0 {
				return 0, nil, c.opErr("read", os.ErrDeadlineExceeded)
			}
			t = time.NewTimer(d)
			timeout = t.C
		}
		select {
		case <-c.wake:
		case <-c.closed:
		case <-c.deadlineChanged:
		case <-timeout:
		}
		if t != nil {
			t.Stop()
		}
	}
}

// WriteTo sends a packet; like UDP it succeeds whether or not the packet arrives.
func (c *Conn) WriteTo(p []byte, addr net.Addr) (int, error) {
	c.mu.Lock()
	closed := c.isClosed
	c.mu.Unlock()
	if closed {
		return 0, c.opErr("write", net.ErrClosed)
	}
	to, err := addrPort(addr)
	if err != nil {
		return 0, c.opErr("write", err)
	}
	var sent time.Time // stamped only for a trace: reading the clock per packet costs when untraced
	if c.net.tracing.Load() {
		sent = time.Now()
	}
	c.net.send(c.addr, to, append([]byte(nil), p...), sent)
	return len(p), nil
}

func addrPort(a net.Addr) (netip.AddrPort, error) {
	if u, ok := a.(*net.UDPAddr); ok {
		ap := u.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), nil
	}
	if a == nil {
		return netip.AddrPort{}, errors.New("no destination address")
	}
	ap, err := netip.ParseAddrPort(a.String())
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("destination %q: %w", a.String(), err)
	}
	return ap, nil
}

func (c *Conn) opErr(op string, err error) error {
	return &net.OpError{Op: op, Net: "udp", Source: c.udp, Err: err}
}

// Close removes the conn from the network; packets queued for it are dropped.
func (c *Conn) Close() error {
	c.mu.Lock()
	if c.isClosed {
		c.mu.Unlock()
		return nil
	}
	c.isClosed = true
	c.q, c.qBytes = nil, 0
	close(c.closed)
	c.mu.Unlock()
	c.net.mu.Lock()
	if c.net.conns[c.addr] == c {
		delete(c.net.conns, c.addr)
	}
	c.net.mu.Unlock()
	return nil
}

// LocalAddr is the conn's simulated address (a *net.UDPAddr).
func (c *Conn) LocalAddr() net.Addr { return c.udp }

// AddrPort is the conn's simulated address.
func (c *Conn) AddrPort() netip.AddrPort { return c.addr }

// SetDeadline sets the read deadline; writes never block.
func (c *Conn) SetDeadline(t time.Time) error { return c.SetReadDeadline(t) }

// SetReadDeadline makes blocked and future reads fail with os.ErrDeadlineExceeded after t.
func (c *Conn) SetReadDeadline(t time.Time) error {
	c.mu.Lock()
	c.readDeadline = t
	c.mu.Unlock()
	select {
	case c.deadlineChanged <- struct{}{}:
	default:
	}
	return nil
}

// SetWriteDeadline is accepted and ignored: writes never block.
func (c *Conn) SetWriteDeadline(time.Time) error { return nil }

// SetReadBuffer sets the receive queue's size in bytes. quic-go calls it (and would log a
// warning about UDP buffer sizes on a conn without it).
func (c *Conn) SetReadBuffer(bytes int) error {
	if bytes <= 0 {
		return fmt.Errorf("memnet: read buffer of %d bytes", bytes)
	}
	c.mu.Lock()
	c.limit = bytes
	c.mu.Unlock()
	return nil
}

// SetWriteBuffer is accepted and ignored (sends never queue at the sender).
func (c *Conn) SetWriteBuffer(int) error { return nil }
