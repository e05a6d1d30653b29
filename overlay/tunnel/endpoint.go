package tunnel

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/ute-project/ute/overlay/dtl"
)

// Application error codes used when closing connections and streams.
const (
	codeNormal        quic.ApplicationErrorCode = 0
	code0RTT          quic.ApplicationErrorCode = 0x101
	codeNoPeer        quic.ApplicationErrorCode = 0x102
	codeShutdown      quic.ApplicationErrorCode = 0x103
	codePeerClosed    quic.ApplicationErrorCode = 0x104
	streamCodeReject  quic.StreamErrorCode      = 0x201
	streamCodeBad     quic.StreamErrorCode      = 0x202
	streamCodeIdle    quic.StreamErrorCode      = 0x203
	streamCodeClosed  quic.StreamErrorCode      = 0x204
	streamCodeControl quic.StreamErrorCode      = 0x205
	streamCodeAborted quic.StreamErrorCode      = 0x206
)

// Endpoint is one node's QUIC endpoint: one quic.Transport over one PacketConn, listening for and
// dialing zone tunnels. All goroutines it starts stop in Close.
type Endpoint struct {
	cfg   Config
	lim   Limits
	log   *slog.Logger
	clock func() time.Time

	tr    *quic.Transport
	ln    *quic.Listener
	qconf *quic.Config

	// cert is the chain every new handshake presents; SetCertificate replaces it. Each tunnel
	// remembers the pointer its handshake used, so a replaced one marks the tunnel stale.
	cert atomic.Pointer[tls.Certificate]
	// gate, when set, paces outbound handshakes (gate.go).
	gate atomic.Pointer[gateHolder]
	// born is the origin of mono(); gossipIdle is the idle close of tunnels, idlePolicy its
	// per-tunnel replacement when set (idle.go).
	born       time.Time
	gossipIdle atomic.Int64
	idlePolicy atomic.Pointer[func(zone, peerNodeID string) time.Duration]

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu      sync.Mutex
	closed  bool
	zones   map[string]bool
	live    map[tunnelKey]*Tunnel // the tunnel Dial reuses per (peer, zone)
	tunnels map[*Tunnel]struct{}  // every open tunnel, for Close
	dials   map[tunnelKey]*dialCall

	table        *flowTable
	budget       *budgets
	stats        counters
	preAdmitRead atomic.Int64 // bytes read from streams before their admission (test hook for I2)

	jobs          chan streamJob // streams for parked admission workers (admitpool.go); unbuffered
	idleAdmitters atomic.Int32   // workers parked on jobs
}

type tunnelKey struct{ node, zone string }

// peerHolder carries the peer verified inside the server-side handshake, and the certificate
// this side presented in it, to the accept loop.
type peerHolder struct {
	mu    sync.Mutex
	peer  *Peer
	local *tls.Certificate
}

type holderKey struct{}

// New starts an endpoint listening on cfg.PacketConn.
func New(cfg Config) (*Endpoint, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	cert, err := withLeaf(cfg.Certificate)
	if err != nil {
		return nil, fmt.Errorf("tunnel: invalid config: %w", err)
	}
	e := &Endpoint{
		cfg:     cfg,
		lim:     cfg.Limits.withDefaults(),
		log:     cfg.Logger,
		clock:   cfg.Clock,
		zones:   make(map[string]bool),
		live:    make(map[tunnelKey]*Tunnel),
		tunnels: make(map[*Tunnel]struct{}),
		dials:   make(map[tunnelKey]*dialCall),
		born:    time.Now(),
		jobs:    make(chan streamJob),
	}
	e.gossipIdle.Store(int64(e.lim.GossipIdleTimeout))
	if e.log == nil {
		e.log = slog.Default()
	}
	if e.clock == nil {
		e.clock = time.Now
	}
	if e.cfg.SessionBinding == nil {
		e.cfg.SessionBinding = dtl.Exporter
	}
	e.cert.Store(&cert)
	for _, z := range cfg.Zones {
		e.zones[z] = true
	}
	e.table = newFlowTable(e.lim)
	e.budget = newBudgets(e.lim)
	e.ctx, e.cancel = context.WithCancel(context.Background())
	e.qconf = &quic.Config{
		HandshakeIdleTimeout: e.lim.HandshakeTimeout,
		MaxIdleTimeout:       e.lim.MaxIdleTimeout,
		KeepAlivePeriod:      e.lim.KeepAlivePeriod,
		MaxIncomingStreams:   e.lim.MaxIncomingFlows,
		// Peers never need unidirectional streams; refusing them removes an attack surface.
		MaxIncomingUniStreams: -1,
		EnableDatagrams:       true,
		Allow0RTT:             false,
	}
	e.tr = &quic.Transport{
		Conn:              cfg.PacketConn,
		StatelessResetKey: resetKey(cert),
		ConnContext: func(ctx context.Context, ci *quic.ClientInfo) (context.Context, error) {
			// A source at its connection cap is turned away before the handshake's signatures.
			if ci != nil && e.budget.sourceFull(ci.RemoteAddr) {
				e.stats.busyTunnels.Add(1)
				return nil, errSourceBusy
			}
			return context.WithValue(ctx, holderKey{}, &peerHolder{}), nil
		},
	}
	// Only the dialing side sends keep-alives: a PING from it keeps both ends' idle timers fresh
	// (and the dialer is the side behind a NAT, whose mapping needs the traffic), so a second
	// PING stream from the accepting side would only double the at-rest packets per tunnel.
	lconf := e.qconf.Clone()
	lconf.KeepAlivePeriod = 0
	ln, err := e.tr.Listen(e.serverTLS(), lconf)
	if err != nil {
		_ = e.tr.Close()
		e.cancel()
		return nil, fmt.Errorf("tunnel: listen on %s: %w", cfg.PacketConn.LocalAddr(), err)
	}
	e.ln = ln
	e.spawn(e.acceptLoop)
	e.spawn(e.sweepLoop)
	return e, nil
}

// resetKey derives the stateless reset key from the node key, so that a restarted node can reset
// connections its previous incarnation held and peers reconnect at once instead of waiting for the
// idle timeout. The derivation is one-way and domain-separated, so the key itself is not exposed.
//
// It is derived once, in New, from the key the endpoint starts with, and SetCertificate does not
// change it: the reset tokens of every live connection were computed from it (quic-go fixes the
// key for the transport's lifetime), so a renewal must not invalidate them. After a renewal and a
// restart the key differs, and the peers of the previous incarnation fall back to the idle
// timeout, as they would for a node restarted with a new key for any other reason.
func resetKey(cert tls.Certificate) *quic.StatelessResetKey {
	priv, ok := cert.PrivateKey.(ed25519.PrivateKey)
	if !ok {
		return nil
	}
	var k quic.StatelessResetKey
	h := sha256.New()
	h.Write([]byte("ute/1 quic stateless reset key\x00"))
	h.Write(priv.Seed())
	copy(k[:], h.Sum(nil))
	return &k
}

// withLeaf checks that c is usable as the node's TLS certificate and fills in its parsed leaf.
func withLeaf(c tls.Certificate) (tls.Certificate, error) {
	if len(c.Certificate) == 0 || c.PrivateKey == nil {
		return tls.Certificate{}, errors.New("the node certificate needs a chain and a private key")
	}
	if c.Leaf == nil {
		leaf, err := x509.ParseCertificate(c.Certificate[0])
		if err != nil {
			return tls.Certificate{}, fmt.Errorf("the node certificate does not parse: %w", err)
		}
		c.Leaf = leaf
	}
	if priv, ok := c.PrivateKey.(ed25519.PrivateKey); ok {
		if pub, ok := c.Leaf.PublicKey.(ed25519.PublicKey); !ok || !pub.Equal(priv.Public()) {
			return tls.Certificate{}, errors.New("the node certificate is not for its private key")
		}
	}
	return c, nil
}

// SetCertificate replaces the certificate chain and key this endpoint presents, without
// restarting it: every handshake that starts afterwards, inbound or outbound, presents the new
// chain (tls.Config GetCertificate / GetClientCertificate). Tunnels already established keep
// running, since their peer verified the old certificate, which is still valid; they are marked
// stale (Tunnel.Stale), Dial no longer reuses them for new flows, and the idle sweep closes each
// one once the certificate its handshake presented has expired by the endpoint's clock.
func (e *Endpoint) SetCertificate(c tls.Certificate) error {
	c, err := withLeaf(c)
	if err != nil {
		return fmt.Errorf("tunnel: set certificate: %w", err)
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	e.cert.Store(&c)
	// A stale tunnel stays in e.tunnels (Close and the sweep find it) but leaves e.live, so the
	// next Dial of its (peer, zone) handshakes afresh with the new chain.
	for k, t := range e.live {
		if t.Stale() {
			delete(e.live, k)
		}
	}
	return nil
}

// Certificate returns the certificate chain new handshakes present.
func (e *Endpoint) Certificate() tls.Certificate { return *e.cert.Load() }

// Addr is the endpoint's underlay address.
func (e *Endpoint) Addr() net.Addr { return e.cfg.PacketConn.LocalAddr() }

// Zones returns the zones this endpoint serves, sorted.
func (e *Endpoint) Zones() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := make([]string, 0, len(e.zones))
	for z := range e.zones {
		out = append(out, z)
	}
	slices.Sort(out)
	return out
}

// SetZones replaces the zones this endpoint serves. Tunnels of zones no longer served are closed.
func (e *Endpoint) SetZones(zones []string) {
	next := make(map[string]bool, len(zones))
	for _, z := range zones {
		next[z] = true
	}
	e.mu.Lock()
	e.zones = next
	var drop []*Tunnel
	for t := range e.tunnels {
		if !next[t.zone] {
			drop = append(drop, t)
		}
	}
	e.mu.Unlock()
	for _, t := range drop {
		t.closeWith(codeShutdown, "zone no longer served")
	}
}

func (e *Endpoint) servesZone(z string) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.zones[z]
}

// spawn runs f on an endpoint-owned goroutine unless the endpoint is closed.
func (e *Endpoint) spawn(f func()) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closed {
		return false
	}
	e.wg.Go(f)
	return true
}

// Close stops listening, closes every tunnel and flow and waits for every goroutine it started.
// It does not close the PacketConn.
func (e *Endpoint) Close() error {
	e.mu.Lock()
	if e.closed {
		e.mu.Unlock()
		return nil
	}
	e.closed = true
	tunnels := make([]*Tunnel, 0, len(e.tunnels))
	for t := range e.tunnels {
		tunnels = append(tunnels, t)
	}
	e.mu.Unlock()

	e.cancel()
	err := e.ln.Close()
	for _, t := range tunnels {
		t.closeWith(codeShutdown, "endpoint closing")
	}
	e.table.closeAll()
	err = errors.Join(err, e.tr.Close())
	e.wg.Wait()
	e.flushStalls()
	if err != nil && !errors.Is(err, net.ErrClosed) && !errors.Is(err, quic.ErrServerClosed) {
		return fmt.Errorf("tunnel: close: %w", err)
	}
	return nil
}

// baseTLS is the TLS configuration of one handshake. The certificate is looked up when the
// handshake asks for it, so SetCertificate takes effect on the next handshake; presented, when not
// nil, learns which certificate that was (the tunnel is stale once it is replaced).
func (e *Endpoint) baseTLS(presented func(*tls.Certificate)) *tls.Config {
	current := func() *tls.Certificate {
		c := e.cert.Load()
		if presented != nil {
			presented(c)
		}
		return c
	}
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			return current(), nil
		},
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return current(), nil
		},
		// Session resumption would skip certificate verification on later handshakes and enable
		// 0-RTT; every tunnel must prove its node certificate afresh.
		SessionTicketsDisabled: true,
		// The x509 pool verification cannot check UTE's constraints (SPIFFE IDs, zone grants,
		// revocation); VerifyConnection runs the PeerVerifier on every handshake instead, on both
		// sides, which is why skipping the standard verification is safe here.
		InsecureSkipVerify: true,
	}
}

func (e *Endpoint) serverTLS() *tls.Config {
	base := e.baseTLS(nil)
	base.ClientAuth = tls.RequireAnyClientCert
	base.GetConfigForClient = func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
		holder, _ := hello.Context().Value(holderKey{}).(*peerHolder)
		var remote net.Addr
		if hello.Conn != nil {
			remote = hello.Conn.RemoteAddr()
		}
		c := e.baseTLS(func(cert *tls.Certificate) {
			if holder != nil {
				holder.mu.Lock()
				holder.local = cert
				holder.mu.Unlock()
			}
		})
		c.ClientAuth = tls.RequireAnyClientCert
		// Offering only the zones held makes a client for another zone fail ALPN negotiation.
		for _, z := range e.Zones() {
			c.NextProtos = append(c.NextProtos, ALPN(z))
		}
		c.VerifyConnection = func(cs tls.ConnectionState) error {
			zone, ok := zoneFromALPN(cs.NegotiatedProtocol)
			if !ok {
				return e.refused("", remote, fmt.Errorf("%w: no zone negotiated", ErrPeerRefused))
			}
			peer, err := e.verifyPeer(zone, cs)
			if err != nil {
				return e.refused(zone, remote, err)
			}
			if holder == nil {
				return e.refused(zone, remote, fmt.Errorf("%w: connection context lost", ErrPeerRefused))
			}
			holder.mu.Lock()
			holder.peer = &peer
			holder.mu.Unlock()
			return nil
		}
		return c, nil
	}
	return base
}

func (e *Endpoint) verifyPeer(zone string, cs tls.ConnectionState) (Peer, error) {
	if len(cs.PeerCertificates) == 0 {
		return Peer{}, fmt.Errorf("%w: zone %q: no certificate presented", ErrPeerRefused, zone)
	}
	raw := make([][]byte, len(cs.PeerCertificates))
	for i, c := range cs.PeerCertificates {
		raw[i] = c.Raw
	}
	peer, err := e.cfg.Verifier.VerifyPeer(zone, raw)
	if err != nil {
		return Peer{}, fmt.Errorf("%w: zone %q: %w", ErrPeerRefused, zone, err)
	}
	if peer.NodeID == "" {
		return Peer{}, fmt.Errorf("%w: zone %q: verifier returned no node ID", ErrPeerRefused, zone)
	}
	if peer.Certificate == nil {
		peer.Certificate = cs.PeerCertificates[0]
	}
	return peer, nil
}

func (e *Endpoint) refused(zone string, remote net.Addr, err error) error {
	e.stats.handshakesRefused.Add(1)
	e.log.Warn("tunnel handshake refused", "zone", zone, "remote", addrString(remote), "err", err)
	if e.cfg.OnRefused != nil {
		e.cfg.OnRefused(Refusal{Zone: zone, Remote: remote, Err: err})
	}
	return err
}

func addrString(a net.Addr) string {
	if a == nil {
		return ""
	}
	return a.String()
}

func (e *Endpoint) acceptLoop() {
	for {
		conn, err := e.ln.Accept(e.ctx)
		if err != nil {
			if e.ctx.Err() == nil && !errors.Is(err, quic.ErrServerClosed) {
				e.log.Error("tunnel accept loop stopped", "err", err)
			}
			return
		}
		holder, _ := conn.Context().Value(holderKey{}).(*peerHolder)
		var (
			peer  *Peer
			local *tls.Certificate
		)
		if holder != nil {
			holder.mu.Lock()
			peer, local = holder.peer, holder.local
			holder.mu.Unlock()
		}
		if peer == nil || local == nil {
			// Unreachable while VerifyConnection guards the handshake; fail closed anyway.
			_ = conn.CloseWithError(codeNoPeer, "peer not verified")
			continue
		}
		zone, _ := zoneFromALPN(conn.ConnectionState().TLS.NegotiatedProtocol)
		if _, err := e.newTunnel(conn, *peer, local, zone, false); err != nil {
			e.log.Warn("tunnel inbound connection dropped", "remote", addrString(conn.RemoteAddr()), "err", err)
		}
	}
}

// newTunnel wraps an established connection, registers it and starts its loops.
func (e *Endpoint) newTunnel(conn *quic.Conn, peer Peer, local *tls.Certificate, zone string, outbound bool) (*Tunnel, error) {
	cs := conn.ConnectionState()
	if cs.Used0RTT {
		_ = conn.CloseWithError(code0RTT, "0-RTT is never allowed")
		return nil, Err0RTT
	}
	binding, err := e.cfg.SessionBinding(cs.TLS)
	if err != nil {
		_ = conn.CloseWithError(codeShutdown, "session binding failed")
		return nil, fmt.Errorf("tunnel: session binding: %w", err)
	}
	t := &Tunnel{
		ep:       e,
		conn:     conn,
		peer:     peer,
		zone:     zone,
		exporter: binding,
		outbound: outbound,
		local:    local,
		opened:   time.Now(),
		packets:  make(map[uint64]*PacketFlow),
	}
	e.armIdle(t)
	key := tunnelKey{peer.NodeID, zone}
	e.mu.Lock()
	if e.closed {
		e.mu.Unlock()
		_ = conn.CloseWithError(codeShutdown, "endpoint closing")
		return nil, ErrClosed
	}
	if !outbound {
		if !e.budget.addConn(peer.NodeID, conn.RemoteAddr(), e.clock()) {
			e.mu.Unlock()
			e.stats.busyTunnels.Add(1)
			_ = conn.CloseWithError(codeBusy, "too many connections from this peer")
			return nil, errPeerBusy
		}
		t.counted = true
	}
	e.tunnels[t] = struct{}{}
	if old, ok := e.live[key]; !ok || !old.Alive() || old.Stale() || renewedPeer(peer, old.peer) {
		e.live[key] = t
	}
	e.wg.Go(t.streamLoop)
	e.wg.Go(t.datagramLoop)
	e.wg.Go(func() {
		<-conn.Context().Done()
		e.forget(t)
	})
	e.mu.Unlock()
	e.stats.tunnelsOpened.Add(1)
	if !outbound {
		if err := t.sendReady(); err != nil {
			t.closeWith(codeShutdown, "ready signal failed")
			return nil, fmt.Errorf("tunnel: ready signal: %w", err)
		}
	}
	e.log.Debug("tunnel up", "peer", peer.NodeID, "zone", zone, "outbound", outbound)
	if e.cfg.OnTunnel != nil {
		// A closed endpoint has already closed t (Close snapshots e.tunnels after e.closed is set,
		// and t was registered before), so skipping the hook then loses nothing.
		e.spawn(func() { e.cfg.OnTunnel(t) })
	}
	return t, nil
}

// renewedPeer reports whether cur proves a certificate the peer was issued after the one prev
// proved: the peer renewed. Its tunnels from before are stale on its side (it opens no flows on
// them and refuses directory exchanges there), so the new one becomes the live tunnel. The same
// certificate again (concurrent handshakes of one peer) or an older one never displaces the live
// tunnel, so the choice does not flap.
func renewedPeer(cur, prev Peer) bool {
	if cur.Certificate == nil || prev.Certificate == nil || bytes.Equal(cur.Certificate.Raw, prev.Certificate.Raw) {
		return false
	}
	return !cur.Certificate.NotBefore.Before(prev.Certificate.NotBefore)
}

// LiveTunnel returns the tunnel Dial would reuse for (peerNodeID, zone), without dialing: an
// open, current tunnel with that verified peer, inbound or outbound. Gossip uses it to answer
// over a tunnel that already exists instead of blocking on a handshake.
func (e *Endpoint) LiveTunnel(peerNodeID, zone string) (*Tunnel, bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	t := e.live[tunnelKey{peerNodeID, zone}]
	if t == nil || !t.Alive() || t.Stale() || !t.claim() {
		return nil, false
	}
	return t, true
}

// ClosePeer closes every tunnel with the node peerNodeID, in every zone, and returns how many it
// closed. The node calls it when the peer is revoked: its flows end at once on both sides (the
// peer sees application error 0x104), and a new handshake is up to the PeerVerifier.
func (e *Endpoint) ClosePeer(peerNodeID string) int {
	return e.CloseTunnels(func(p Peer) bool { return p.NodeID == peerNodeID })
}

// CloseTunnels closes every tunnel whose verified peer matches and returns how many it closed.
func (e *Endpoint) CloseTunnels(match func(Peer) bool) int {
	e.mu.Lock()
	var drop []*Tunnel
	for t := range e.tunnels {
		if match(t.peer) {
			drop = append(drop, t)
		}
	}
	e.mu.Unlock()
	for _, t := range drop {
		t.closeWith(codePeerClosed, "peer closed by this node")
	}
	return len(drop)
}

// CloseFlows resets every admitted inbound flow (stream or packet) whose admission matches, in
// both directions (stream error 0x206), and returns how many it reset. peer is the flow's tunnel
// peer node. The node calls it when a source agent is revoked, so that established flows end too,
// not just new ones.
func (e *Endpoint) CloseFlows(match func(peer string, adm Admission) bool) int {
	return e.table.closeMatching(func(fe *flowEntry) bool { return match(fe.peer, fe.adm) }, streamCodeAborted)
}

func (e *Endpoint) forget(t *Tunnel) {
	t.stopIdle()
	e.mu.Lock()
	delete(e.tunnels, t)
	key := tunnelKey{t.peer.NodeID, t.zone}
	if e.live[key] == t {
		delete(e.live, key)
	}
	e.mu.Unlock()
	if t.counted {
		e.budget.removeConn(t.peer.NodeID, t.conn.RemoteAddr())
	}
	t.closeFlows()
}

func (e *Endpoint) sweepLoop() {
	tick := time.NewTicker(e.lim.SweepInterval)
	defer tick.Stop()
	for {
		select {
		case <-e.ctx.Done():
			return
		case <-tick.C:
			e.SweepIdle()
			e.flushStalls()
		}
	}
}

// SweepIdle closes inbound flows idle longer than Limits.FlowIdleTimeout by the injected clock and
// returns how many it closed. The endpoint calls it every SweepInterval.
//
// It also closes tunnels that outlived a certificate proved in their handshake (invariant I1):
// stale tunnels (see SetCertificate) whose own certificate has expired, whose peers redial and
// verify the current one; and tunnels whose peer's certificate has expired. The peer should
// have closed those itself, but this side cannot rely on a peer that stopped renewing, or that
// was modified to keep its sessions, so it ends them by its own clock: the peer redials with a
// renewed certificate or not at all. Those closures are not counted in the return value.
func (e *Endpoint) SweepIdle() int {
	now := e.clock()
	n := e.table.sweep(now)
	e.stats.expired.Add(uint64(n))
	type expiry struct {
		t   *Tunnel
		msg string
	}
	e.mu.Lock()
	var expired []expiry
	for t := range e.tunnels {
		switch {
		case t.Stale() && t.local.Leaf != nil && !now.Before(t.local.Leaf.NotAfter):
			expired = append(expired, expiry{t, "certificate renewed; the old one expired"})
		case t.peer.Certificate != nil && !now.Before(t.peer.Certificate.NotAfter):
			expired = append(expired, expiry{t, "the peer's certificate expired"})
		}
	}
	e.mu.Unlock()
	for _, x := range expired {
		x.t.closeWith(codeShutdown, x.msg)
	}
	return n
}

// Stats returns a snapshot of the endpoint's counters.
func (e *Endpoint) Stats() Stats {
	s := e.stats.snapshot()
	e.mu.Lock()
	s.Tunnels = len(e.tunnels)
	e.mu.Unlock()
	s.ActiveFlows = e.table.len()
	s.PendingStreams = e.budget.pendingTotal()
	return s
}
