package gossip

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/memberlist"

	"github.com/ute-project/ute/overlay/tunnel"
)

// Dialer is the part of *tunnel.Endpoint the transport uses.
type Dialer interface {
	// Dial returns the tunnel to nodeID for zone, handshaking with addr if there is none; the
	// peer must prove nodeID's certificate.
	Dial(ctx context.Context, addr netip.AddrPort, nodeID, zone string) (*tunnel.Tunnel, error)
	// LiveTunnel returns an open tunnel to nodeID for zone without dialing.
	LiveTunnel(nodeID, zone string) (*tunnel.Tunnel, bool)
}

var _ Dialer = (*tunnel.Endpoint)(nil)

// TransportConfig configures one zone's Transport. Zero durations and sizes take the defaults.
type TransportConfig struct {
	Zone      string
	Advertise netip.AddrPort // this node's underlay address as members should dial it
	Dialer    Dialer         // the node's tunnel endpoint
	Mux       *Mux           // the mux plugged into that endpoint's control hooks

	DialTimeout         time.Duration // a background dial for packets; default 5 s
	RedialAfter         time.Duration // packets to a peer whose dial failed are dropped this long; default 1 s
	PacketStreamTimeout time.Duration // reading or writing one packet carried on a stream; default 2 s
	PacketQueue         int           // inbound packets waiting for memberlist; default 1024
	StreamQueue         int           // inbound streams waiting for memberlist; default 64
	PendingPerPeer      int           // packets held while a peer's tunnel is dialed; default 16
	// TunnelUp, if set, is told the node ID of the peer of every tunnel of the zone established,
	// inbound or outbound, through Mux.TunnelUp: the membership sends the records it is still
	// spreading over the new tunnel. It runs on the endpoint's goroutine and must not block.
	TunnelUp func(peerNodeID string)
	// Take, if set, sees every inbound packet before memberlist does and returns true for one it
	// consumed, which memberlist then never sees. The membership takes its record messages here:
	// memberlist queues user messages behind member-state messages (alive ones first) in one
	// handler goroutine per pool and drops them when that queue is full, so in a zone busy with
	// suspicions a revocation could wait behind them or be lost. It runs on the tunnel's
	// goroutine, must not block, and must copy what it keeps.
	Take func(packet []byte) bool
	// Deferrable, if set, reports whether a packet to a member without a tunnel is worth a
	// handshake only when one is to spare: its background dial is then marked
	// tunnel.Deferrable, and a dial gate refuses it at once rather than queue it behind the
	// others. The membership marks memberlist's gossip of member state, which memberlist sends
	// to other members anyway, and its gossip rounds' record packets, which a later round sends
	// again. Packets queued behind the one that started a dial share its fate. It is called
	// with the transport's lock held: it must not block or call the transport, nor keep the
	// packet.
	Deferrable func(packet []byte) bool
	Logger     *slog.Logger
}

func (c TransportConfig) withDefaults() TransportConfig {
	if c.DialTimeout <= 0 {
		c.DialTimeout = 5 * time.Second
	}
	if c.RedialAfter <= 0 {
		c.RedialAfter = time.Second
	}
	if c.PacketStreamTimeout <= 0 {
		c.PacketStreamTimeout = 2 * time.Second
	}
	if c.PacketQueue <= 0 {
		c.PacketQueue = 1024
	}
	if c.StreamQueue <= 0 {
		c.StreamQueue = 64
	}
	if c.PendingPerPeer <= 0 {
		c.PendingPerPeer = 16
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	return c
}

// TransportStats counts a transport's traffic and drops.
type TransportStats struct {
	PacketsSent       uint64 // packets handed to a tunnel (datagram or stream)
	PacketsOverStream uint64 // of those, packets too large for a datagram, sent on a control stream
	PacketsReceived   uint64 // packets handed to memberlist
	PacketsTaken      uint64 // packets TransportConfig.Take consumed instead
	PacketsDropped    uint64 // outbound and inbound packets dropped: queue full, dial failed, partitioned
	StreamsDropped    uint64 // inbound streams closed because memberlist's queue was full
	DialFailures      uint64 // tunnel dials for this zone that failed
	DialsDeferred     uint64 // deferrable dials a dial gate refused at once (tunnel.ErrGateBusy)
}

// Transport is a memberlist.NodeAwareTransport for one zone over the node's tunnel endpoint.
type Transport struct {
	cfg  TransportConfig
	zone string
	log  *slog.Logger

	packetCh chan *memberlist.Packet
	streamCh chan net.Conn

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu          sync.Mutex
	closed      bool
	partitioned bool
	pending     map[string]*pendingDial
	hints       map[netip.AddrPort]hint
	conns       map[*trackedConn]struct{}

	sent, overStream, received, taken, dropped, streamsDropped, dialFailures, deferred atomic.Uint64
}

type pendingDial struct {
	packets     []pendingPacket
	dialing     bool
	failedUntil time.Time
}

// pendingPacket is a packet held for a tunnel being dialed, and who to tell its fate (SendPacket).
type pendingPacket struct {
	b    []byte
	done func(sent bool) // nil for memberlist's own packets
}

type hint struct {
	nodeID string
	refs   int
}

var _ memberlist.NodeAwareTransport = (*Transport)(nil)

// NewTransport registers a transport for cfg.Zone on cfg.Mux.
func NewTransport(cfg TransportConfig) (*Transport, error) {
	cfg = cfg.withDefaults()
	var errs []error
	if cfg.Zone == "" {
		errs = append(errs, errors.New("a zone is required"))
	}
	if cfg.Dialer == nil || cfg.Mux == nil {
		errs = append(errs, errors.New("a Dialer and a Mux are required"))
	}
	if !cfg.Advertise.IsValid() || cfg.Advertise.Addr().IsUnspecified() || cfg.Advertise.Port() == 0 {
		errs = append(errs, fmt.Errorf("advertise address %s must be a specific IP and port", cfg.Advertise))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("gossip: invalid transport config: %w", err)
	}
	t := &Transport{
		cfg:      cfg,
		zone:     cfg.Zone,
		log:      cfg.Logger.With("zone", cfg.Zone),
		packetCh: make(chan *memberlist.Packet, cfg.PacketQueue),
		streamCh: make(chan net.Conn, cfg.StreamQueue),
		pending:  map[string]*pendingDial{},
		hints:    map[netip.AddrPort]hint{},
		conns:    map[*trackedConn]struct{}{},
	}
	t.ctx, t.cancel = context.WithCancel(context.Background())
	if err := cfg.Mux.register(t); err != nil {
		t.cancel()
		return nil, err
	}
	return t, nil
}

// Zone is the transport's zone.
func (t *Transport) Zone() string { return t.zone }

// FinalAdvertiseAddr returns the configured advertise address; memberlist's own values are
// ignored since the tunnel endpoint, not memberlist, owns the socket.
func (t *Transport) FinalAdvertiseAddr(string, int) (net.IP, int, error) {
	return net.IP(t.cfg.Advertise.Addr().AsSlice()), int(t.cfg.Advertise.Port()), nil
}

// PacketCh delivers inbound packets; From is the tunnel's remote underlay address.
func (t *Transport) PacketCh() <-chan *memberlist.Packet { return t.packetCh }

// StreamCh delivers inbound streams.
func (t *Transport) StreamCh() <-chan net.Conn { return t.streamCh }

// Hint names the node expected at addr for memberlist calls that carry no node name (Join).
// Release it with the returned func once the join is over.
func (t *Transport) Hint(addr netip.AddrPort, nodeID string) (release func()) {
	addr = netip.AddrPortFrom(addr.Addr().Unmap(), addr.Port()) // as resolve looks it up
	t.mu.Lock()
	h := t.hints[addr]
	h.nodeID, h.refs = nodeID, h.refs+1
	t.hints[addr] = h
	t.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			t.mu.Lock()
			defer t.mu.Unlock()
			h := t.hints[addr]
			if h.refs--; h.refs <= 0 {
				delete(t.hints, addr)
			} else {
				t.hints[addr] = h
			}
		})
	}
}

// SetPartitioned drops every packet and refuses every stream, both ways, while on (fault
// injection for tests and the simulator).
func (t *Transport) SetPartitioned(on bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.partitioned = on
}

func (t *Transport) resolve(a memberlist.Address) (netip.AddrPort, string, error) {
	ap, err := netip.ParseAddrPort(a.Addr)
	if err != nil {
		return netip.AddrPort{}, "", fmt.Errorf("gossip: member address %q: %w", a.Addr, err)
	}
	ap = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	name := a.Name
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return ap, name, ErrShutdown
	}
	if t.partitioned {
		return ap, name, ErrPartitioned
	}
	if name == "" {
		name = t.hints[ap].nodeID
	}
	if name == "" {
		return ap, "", fmt.Errorf("%w: %s", ErrNoNodeName, ap)
	}
	return ap, name, nil
}

// WriteTo is WriteToAddress without a node name; it works only for hinted addresses.
func (t *Transport) WriteTo(b []byte, addr string) (time.Time, error) {
	return t.WriteToAddress(b, memberlist.Address{Addr: addr})
}

// WriteToAddress sends one packet to the member addr.Name at addr.Addr. It never blocks on a
// handshake: with no tunnel up it starts one in the background, holds a few packets for it, and
// reports success (packets are best effort, as over UDP).
func (t *Transport) WriteToAddress(b []byte, addr memberlist.Address) (time.Time, error) {
	now := time.Now()
	ap, name, err := t.resolve(addr)
	if errors.Is(err, ErrPartitioned) {
		t.dropped.Add(1)
		return now, nil
	}
	if err != nil {
		return now, err
	}
	t.send(ap, name, b, nil)
	return now, nil
}

// SendPacket sends one packet to member name at addr as WriteToAddress does (b framed as
// memberlist frames it, e.g. a user message), and reports its fate once through done: true when
// it was handed to a tunnel (at once, or after the background dial it waited for), false when it
// was dropped here (the dial failed or failed lately, too many packets wait for that dial, the
// transport is partitioned or shut down). Delivery is still best effort past the tunnel. done
// runs on the caller's goroutine or on a dial's and must not block. The membership's record
// gossip counts a transmission only when it was handed on, so that packets lost to failed dials
// do not spend a record's retransmissions.
func (t *Transport) SendPacket(b []byte, addr netip.AddrPort, name string, done func(sent bool)) {
	ap, name, err := t.resolve(memberlist.Address{Addr: addr.String(), Name: name})
	if err != nil {
		if errors.Is(err, ErrPartitioned) {
			t.dropped.Add(1)
		}
		done(false)
		return
	}
	t.send(ap, name, b, done)
}

// Held reports whether packets to name are being dropped without a dial: its last dial failed
// less than RedialAfter ago. A sender with a choice of members picks another.
func (t *Transport) Held(name string) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	p := t.pending[name]
	return p != nil && !p.dialing && time.Now().Before(p.failedUntil)
}

// send sends b on name's live tunnel, or holds it for a background dial.
func (t *Transport) send(ap netip.AddrPort, name string, b []byte, done func(bool)) {
	if tun, ok := t.cfg.Dialer.LiveTunnel(name, t.zone); ok {
		if sent, ok := t.sendOn(tun, b); ok {
			report(done, sent)
			return
		}
		// The tunnel closed under this packet (closed when idle, or the peer went away): dial
		// again as if there had been none, so that a closed gossip tunnel costs one handshake
		// and not a lost packet.
	}
	t.queueDial(ap, name, pendingPacket{b: append([]byte(nil), b...), done: done})
}

func report(done func(bool), sent bool) {
	if done != nil {
		done(sent)
	}
}

// sendOn sends a packet as a control datagram, or on a control stream when it does not fit;
// sent reports whether it was handed on (a stream's packet counts once its send is started). It
// returns ok false, without counting a drop, when the tunnel had closed before the send: the
// caller may dial again.
func (t *Transport) sendOn(tun *tunnel.Tunnel, b []byte) (sent, ok bool) {
	err := tun.SendControlDatagram(AppendDatagram(make([]byte, 0, 1+len(b)), ChannelPacket, b))
	if err == nil {
		t.sent.Add(1)
		return true, true
	}
	if errors.Is(err, tunnel.ErrDatagramTooLarge) {
		pkt := append([]byte(nil), b...)
		if !t.spawn(func() { t.sendStream(tun, pkt) }) {
			t.dropped.Add(1)
			return false, true
		}
		return true, true
	}
	if !tun.Alive() {
		return false, false
	}
	t.dropped.Add(1)
	t.log.Debug("gossip packet dropped", "peer", tun.Peer().NodeID, "err", err)
	return false, true
}

func (t *Transport) sendStream(tun *tunnel.Tunnel, b []byte) {
	ctx, cancel := context.WithTimeout(t.ctx, t.cfg.PacketStreamTimeout)
	defer cancel()
	c, err := tun.OpenControl(ctx, ChannelPacket)
	if err != nil {
		t.dropped.Add(1)
		return
	}
	defer func() { _ = c.Close() }()
	_ = c.SetWriteDeadline(time.Now().Add(t.cfg.PacketStreamTimeout))
	if _, err := c.Write(b); err != nil {
		t.dropped.Add(1)
		return
	}
	_ = c.CloseWrite()
	t.sent.Add(1)
	t.overStream.Add(1)
}

// queueDial holds pkt for name and dials its tunnel unless a dial is under way or failed lately.
func (t *Transport) queueDial(ap netip.AddrPort, name string, pkt pendingPacket) {
	t.mu.Lock()
	p := t.pending[name]
	if p == nil {
		p = &pendingDial{}
		t.pending[name] = p
	}
	switch {
	case !p.dialing && time.Now().Before(p.failedUntil), len(p.packets) >= t.cfg.PendingPerPeer:
		t.mu.Unlock()
		t.dropped.Add(1)
		report(pkt.done, false)
		return
	}
	p.packets = append(p.packets, pkt)
	start := !p.dialing
	p.dialing = true
	t.mu.Unlock()
	if start && !t.spawn(func() { t.dialAndFlush(ap, name) }) {
		t.mu.Lock()
		var pkts []pendingPacket
		if p := t.pending[name]; p != nil {
			pkts = p.packets
		}
		delete(t.pending, name)
		t.mu.Unlock()
		for _, q := range pkts {
			report(q.done, false)
		}
	}
}

func (t *Transport) dialAndFlush(ap netip.AddrPort, name string) {
	ctx, cancel := context.WithTimeout(t.ctx, t.cfg.DialTimeout)
	if t.cfg.Deferrable != nil && t.firstDeferrable(name) {
		ctx = tunnel.Deferrable(ctx)
	}
	tun, err := t.cfg.Dialer.Dial(ctx, ap, name, t.zone)
	cancel()
	busy := errors.Is(err, tunnel.ErrGateBusy)
	t.mu.Lock()
	p := t.pending[name]
	var pkts []pendingPacket
	if p != nil {
		pkts, p.packets, p.dialing = p.packets, nil, false
		if err != nil && !busy {
			p.failedUntil = time.Now().Add(t.cfg.RedialAfter)
		} else {
			// Tunnel up, or no slot was free: the peer is not held as unreachable, so that
			// the next packet to it (a probe) dials again.
			delete(t.pending, name)
		}
	}
	t.mu.Unlock()
	if busy {
		t.deferred.Add(1)
		t.dropped.Add(uint64(len(pkts)))
		for _, q := range pkts {
			report(q.done, false)
		}
		return
	}
	if err != nil {
		t.dialFailures.Add(1)
		t.dropped.Add(uint64(len(pkts)))
		t.log.Debug("gossip dial failed", "peer", name, "addr", ap.String(), "err", err)
		for _, q := range pkts {
			report(q.done, false)
		}
		return
	}
	for _, q := range pkts {
		sent, ok := t.sendOn(tun, q.b)
		if !ok {
			t.dropped.Add(1) // closed right after its handshake: not dialed a second time
		}
		report(q.done, sent)
	}
}

// firstDeferrable reports whether the packet that started name's dial is deferrable
// (TransportConfig.Deferrable). Packets queued behind it share its fate.
func (t *Transport) firstDeferrable(name string) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	p := t.pending[name]
	return p != nil && len(p.packets) > 0 && t.cfg.Deferrable(p.packets[0].b)
}

// DialTimeout is DialAddressTimeout without a node name; it works only for hinted addresses.
func (t *Transport) DialTimeout(addr string, timeout time.Duration) (net.Conn, error) {
	return t.DialAddressTimeout(memberlist.Address{Addr: addr}, timeout)
}

// DialAddressTimeout opens a memberlist stream to addr.Name: a control stream on the zone tunnel
// to that node, dialed (and verified) first if needed.
func (t *Transport) DialAddressTimeout(addr memberlist.Address, timeout time.Duration) (net.Conn, error) {
	ap, name, err := t.resolve(addr)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(t.ctx, timeout)
	defer cancel()
	var c *tunnel.ControlConn
	// Twice at most: a live tunnel can close between the lookup and the stream (closed when
	// idle, or the peer restarted); then the stream goes on a tunnel dialed afresh.
	for attempt := 0; ; attempt++ {
		tun, ok := t.cfg.Dialer.LiveTunnel(name, t.zone)
		if !ok {
			tun, err = t.cfg.Dialer.Dial(ctx, ap, name, t.zone)
			if err != nil {
				t.dialFailures.Add(1)
				return nil, fmt.Errorf("gossip: dial %s at %s: %w", name, ap, err)
			}
		}
		c, err = tun.OpenControl(ctx, ChannelStream)
		if err == nil {
			break
		}
		if attempt > 0 || tun.Alive() || ctx.Err() != nil {
			return nil, fmt.Errorf("gossip: stream to %s: %w", name, err)
		}
	}
	tc, ok := t.track(c)
	if !ok {
		_ = c.Close()
		return nil, ErrShutdown
	}
	return tc, nil
}

// deliverPacket hands an inbound packet to Take or memberlist, or drops it when memberlist's
// queue is full.
func (t *Transport) deliverPacket(tun *tunnel.Tunnel, body []byte) {
	t.mu.Lock()
	off := t.closed || t.partitioned
	t.mu.Unlock()
	if off {
		t.dropped.Add(1)
		return
	}
	if t.cfg.Take != nil && t.cfg.Take(body) {
		t.taken.Add(1)
		return
	}
	select {
	case t.packetCh <- &memberlist.Packet{Buf: body, From: tun.RemoteAddr(), Timestamp: time.Now()}:
		t.received.Add(1)
	default:
		t.dropped.Add(1)
	}
}

// deliverStream hands an inbound stream to memberlist, or closes it when the queue is full.
func (t *Transport) deliverStream(c net.Conn) {
	t.mu.Lock()
	if t.closed || t.partitioned {
		t.mu.Unlock()
		t.streamsDropped.Add(1)
		_ = c.Close()
		return
	}
	tc := &trackedConn{Conn: c, t: t}
	t.conns[tc] = struct{}{}
	select {
	case t.streamCh <- tc:
		t.mu.Unlock()
	default:
		delete(t.conns, tc)
		t.mu.Unlock()
		t.streamsDropped.Add(1)
		_ = c.Close()
	}
}

func (t *Transport) track(c net.Conn) (*trackedConn, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return nil, false
	}
	tc := &trackedConn{Conn: c, t: t}
	t.conns[tc] = struct{}{}
	return tc, true
}

// tunnelUp passes a new tunnel of the zone to cfg.TunnelUp. A transport shut down meanwhile
// needs no check here: Shutdown unregisters it from the Mux, and its SendPacket drops.
func (t *Transport) tunnelUp(peerNodeID string) {
	if t.cfg.TunnelUp != nil {
		t.cfg.TunnelUp(peerNodeID)
	}
}

// spawn runs f on a transport-owned goroutine unless the transport is shut down.
func (t *Transport) spawn(f func()) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return false
	}
	t.wg.Go(f)
	return true
}

// Shutdown unregisters the transport, stops its dials and sends, and closes every stream it
// handed to memberlist or took from it. memberlist calls it from Memberlist.Shutdown.
func (t *Transport) Shutdown() error {
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		return nil
	}
	t.closed = true
	t.mu.Unlock()
	t.cfg.Mux.unregister(t)
	t.cancel()
	t.wg.Wait()
	t.mu.Lock()
	conns := make([]*trackedConn, 0, len(t.conns))
	for c := range t.conns {
		conns = append(conns, c)
	}
	t.mu.Unlock()
	for _, c := range conns {
		_ = c.Close()
	}
	for {
		select {
		case c := <-t.streamCh:
			_ = c.Close()
		default:
			return nil
		}
	}
}

// Stats returns the transport's counters.
func (t *Transport) Stats() TransportStats {
	return TransportStats{
		PacketsSent:       t.sent.Load(),
		PacketsOverStream: t.overStream.Load(),
		PacketsReceived:   t.received.Load(),
		PacketsTaken:      t.taken.Load(),
		PacketsDropped:    t.dropped.Load(),
		StreamsDropped:    t.streamsDropped.Load(),
		DialFailures:      t.dialFailures.Load(),
		DialsDeferred:     t.deferred.Load(),
	}
}

// trackedConn forgets itself on Close, so Shutdown closes only what is still open.
type trackedConn struct {
	net.Conn
	t    *Transport
	once sync.Once
}

func (c *trackedConn) Close() error {
	c.once.Do(func() {
		c.t.mu.Lock()
		delete(c.t.conns, c)
		c.t.mu.Unlock()
		_ = c.Conn.Close()
	})
	return nil
}
