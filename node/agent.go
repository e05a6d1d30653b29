package node

import (
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/identity/record"
	"github.com/ute-project/ute/node/state"
	"github.com/ute-project/ute/overlay/dtl"
	"github.com/ute-project/ute/overlay/tunnel"
	"github.com/ute-project/ute/zones"
)

// listenBacklog bounds admitted flows waiting for Accept, like a TCP listen backlog.
const listenBacklog = 128

// Agent is an in-process SDK agent: one identity of this node's directory, its key held by the
// node. It Listens and Dials like package net; every flow it opens carries a DTL record signed
// with its key.
type Agent struct {
	n  *Node
	id identity.ID
	ip netip.Addr
	// cert, key and issuer (the node's issuing certificate that signed cert) change when the node renews;
	// they are guarded by n.credMu and read together through creds.
	cert   *identity.Certificate
	key    ed25519.PrivateKey
	issuer *identity.Certificate
	// revIDs are the revocation keys of (issuer, cert), computed once per certificate rather
	// than on every Dial; set with them through setCreds. Never modified in place.
	revIDs []string
	// What every record repeats, computed once per certificate rather than on every Dial (the
	// SPIFFE IDs are built strings, the chain hash a SHA-256 over both certificates); set with
	// the certificates through setCreds.
	idStr, nodeIDStr string
	chainHash        [dtl.HashLen]byte
}

// setCreds installs a certificate and its issuer (and the key, when not nil); n.credMu is held.
func (a *Agent) setCreds(cert *identity.Certificate, key ed25519.PrivateKey, issuer *identity.Certificate) {
	a.cert, a.issuer = cert, issuer
	if key != nil {
		a.key = key
	}
	a.revIDs = record.ChainKeys(issuer, cert)
	a.idStr = a.id.String()
	if issuer != nil && cert != nil {
		a.nodeIDStr = issuer.ID.String()
		a.chainHash = dtl.CertChain{Node: issuer.Raw(), Agent: cert.Raw()}.Hash()
	}
}

// agentCreds is one consistent snapshot of an agent's chain and key: a record signed with it
// carries a node certificate that really issued its agent certificate, even while a renewal
// swaps them.
type agentCreds struct {
	node, cert *identity.Certificate
	key        ed25519.PrivateKey
	revIDs     []string
	// agentID and nodeID are the SPIFFE IDs of cert and node, chainHash their dtl.CertChain hash.
	agentID, nodeID string
	chainHash       [dtl.HashLen]byte
}

func (a *Agent) creds() agentCreds {
	a.n.credMu.RLock()
	defer a.n.credMu.RUnlock()
	return agentCreds{node: a.issuer, cert: a.cert, key: a.key, revIDs: a.revIDs,
		agentID: a.idStr, nodeID: a.nodeIDStr, chainHash: a.chainHash}
}

// Agent returns the local agent name of zone, registered in the node directory (`ute agent add`
// or state.Dir.AddAgent). The node's credential scheduler keeps its certificate renewed for as
// long as the node runs; Agent reissues it itself only if it finds it due first (same rule).
func (n *Node) Agent(zone, name string) (*Agent, error) {
	if n.isClosed() {
		return nil, ErrClosed
	}
	k := agentKey{zone, name}
	n.mu.Lock()
	a := n.open[k]
	n.mu.Unlock()
	if a != nil {
		cr, now := a.creds(), n.now()
		if at, ok := n.agentRenewAt(n.issuerCertificate(), cr.cert, now); !ok || now.Before(at) {
			return a, nil
		}
	}
	if err := n.reloadAgents(); err != nil {
		return nil, err
	}
	st, err := n.dir.Agent(zone, name)
	if err != nil {
		return nil, fmt.Errorf("node: agent %s.%s: %w; add it with `ute agent add --dir %s --zone %s --name %s`", name, zone, err, n.cfg.Dir, zone, name)
	}
	if err := n.usable(); err != nil {
		return nil, err
	}
	self := n.issuerCertificate()
	// Due (past half-life, or signed by a node key this node no longer holds): reissue.
	if at, ok := n.agentRenewAt(self, st.Cert, n.now()); ok && !n.now().Before(at) {
		old := st.Cert
		if st, err = n.dir.ReissueAgent(zone, name); err != nil {
			return nil, fmt.Errorf("node: reissue agent %s.%s: %w", name, zone, err)
		}
		n.auditAgentRenewed(old, st, causeOnDemand)
	}
	if err := n.verif.VerifyAgent(self, st.Cert, n.now()); err != nil {
		if n.issuerCertificate() != self {
			return n.Agent(zone, name) // a renewal landed meanwhile: check against the new certificate
		}
		return nil, fmt.Errorf("node: agent %s.%s certificate does not verify under this node: %w", name, zone, err)
	}
	key, err := n.dir.AgentKey(zone, name)
	if err != nil {
		return nil, err
	}
	if a, ok := n.registerAgent(k, st, key, self); ok {
		return a, nil
	}
	// A renewal swapped the node certificate while this agent's was being checked; the renewal
	// reissued it, so the next pass finds it issued under the new one.
	return n.Agent(zone, name)
}

// register records st as agent k's current certificate, issued by self, unless the node's
// issuing certificate is no longer self. One *Agent per identity is handed out, so that a renewal
// updates every holder.
func (n *Node) register(k agentKey, st *state.Agent, key ed25519.PrivateKey, self *identity.Certificate) (*Agent, bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.credMu.Lock()
	defer n.credMu.Unlock()
	if n.issuer != self {
		return nil, false
	}
	a := n.open[k]
	if a != nil {
		a.setCreds(st.Cert, key, self)
	} else {
		a = &Agent{n: n, id: st.Cert.ID, ip: st.IP}
		a.setCreds(st.Cert, key, self)
		n.open[k] = a
	}
	n.agents[k] = st
	return a, true
}

// registerAgent is register, then tells the scheduler about the certificate.
func (n *Node) registerAgent(k agentKey, st *state.Agent, key ed25519.PrivateKey, self *identity.Certificate) (*Agent, bool) {
	a, ok := n.register(k, st, key, self)
	if ok {
		n.noteAgents(st.Cert)
	}
	return a, ok
}

// ID is the agent's SPIFFE ID.
func (a *Agent) ID() identity.ID { return a.id }

// IP is the agent's overlay IP.
func (a *Agent) IP() netip.Addr { return a.ip }

// Zone is the agent's zone.
func (a *Agent) Zone() string { return a.id.Zone }

// Name is the agent's name within its zone.
func (a *Agent) Name() string { return a.id.Name }

// Node is the node hosting the agent.
func (a *Agent) Node() *Node { return a.n }

// Listen accepts admitted flows to this agent on a TCP port: network "tcp" (or tcp4/tcp6), addr
// ":PORT" or "IP:PORT" with the agent's overlay IP.
func (a *Agent) Listen(network, addr string) (net.Listener, error) {
	k, err := a.listenKey(dtl.ProtoTCP, network, addr)
	if err != nil {
		return nil, err
	}
	port := k.port
	l := &listener{n: a.n, key: k, addr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(a.ip, port)),
		ch: make(chan net.Conn, listenBacklog), done: make(chan struct{})}
	a.n.mu.Lock()
	defer a.n.mu.Unlock()
	if a.n.closed {
		return nil, ErrClosed
	}
	if _, dup := a.n.listeners[k]; dup {
		return nil, fmt.Errorf("%w: %s.%s tcp/%d", ErrAddrInUse, a.id.Name, a.id.Zone, port)
	}
	a.n.listeners[k] = l
	return l, nil
}

// listenKey parses and checks the arguments of Listen (proto tcp) and ListenPacket (proto udp):
// a network of that protocol, and addr ":PORT" or "IP:PORT" where IP is the agent's overlay IP or
// unspecified (0.0.0.0, ::), PORT 1..65535.
func (a *Agent) listenKey(proto dtl.Proto, network, addr string) (listenKey, error) {
	switch {
	case proto == dtl.ProtoTCP && !isTCP(network):
		return listenKey{}, fmt.Errorf("%w: network %q; SDK agents listen on tcp", ErrUnsupported, network)
	case proto == dtl.ProtoUDP && !isUDP(network):
		return listenKey{}, fmt.Errorf("%w: network %q; SDK agents listen for datagrams on udp", ErrUnsupported, network)
	case proto != dtl.ProtoTCP && proto != dtl.ProtoUDP:
		return listenKey{}, fmt.Errorf("%w: protocol %s; SDK agents listen on tcp or udp", ErrUnsupported, proto)
	}
	host, ps, err := net.SplitHostPort(addr)
	if err != nil {
		return listenKey{}, fmt.Errorf("%w: listen address %q: %w", ErrUnsupported, addr, err)
	}
	if host != "" && host != a.ip.String() && host != "0.0.0.0" && host != "::" {
		return listenKey{}, fmt.Errorf("%w: %s is not agent %s's overlay IP %s", ErrUnsupported, host, a.id.Name, a.ip)
	}
	port, err := parsePort(ps)
	if err != nil {
		return listenKey{}, err
	}
	return listenKey{a.id.Zone, a.id.Name, port}, nil
}

func isTCP(network string) bool { return network == "tcp" || network == "tcp4" || network == "tcp6" }

func parsePort(s string) (uint16, error) {
	p, err := strconv.ParseUint(s, 10, 16)
	if err != nil || p == 0 {
		return 0, fmt.Errorf("%w: port %q must be 1..65535", ErrUnsupported, s)
	}
	return uint16(p), nil
}

// listener is an agent's port. Admission has already happened for every conn it queues.
type listener struct {
	n    *Node
	key  listenKey
	addr net.Addr
	ch   chan net.Conn
	done chan struct{}
	once sync.Once
}

func (l *listener) Accept() (net.Conn, error) {
	select {
	case c := <-l.ch:
		return c, nil
	case <-l.done:
		return nil, fmt.Errorf("accept on %s: %w", l.addr, net.ErrClosed)
	}
}

func (l *listener) Close() error {
	l.once.Do(func() {
		l.n.mu.Lock()
		if l.n.listeners[l.key] == l {
			delete(l.n.listeners, l.key)
		}
		l.n.mu.Unlock()
		close(l.done)
		for {
			select {
			case c := <-l.ch:
				_ = c.Close()
			default:
				return
			}
		}
	})
	return nil
}

func (l *listener) Addr() net.Addr { return l.addr }

// deliver queues an admitted conn, closing it when the listener is gone or its backlog is full.
func (l *listener) deliver(c net.Conn) bool {
	select {
	case <-l.done:
	default:
		select {
		case l.ch <- c:
			return true
		default:
		}
	}
	_ = c.Close()
	return false
}

// RefusedError is a Dial that UTE refused. Reason is machine-readable: the dtl reason name for
// refusals by admission ("policy", "replay", "zone", ...) or the node's own ("cross-zone",
// "unknown-name", "tunnel"). Err wraps the precise cause (dtl / tunnel / node sentinels).
type RefusedError struct {
	Addr   string
	Stage  string // "attest" (workload: selfattest.go), "resolve", "tunnel" or "admission"
	Reason string
	Err    error
	// ClockOffset, with Reason "skew" (a peer refused this node's record as stale or in the
	// future, at resolve or admission), is this node's clock minus the peer's as the peer
	// measured it: positive when this node is ahead. OffsetKnown says the peer stated it.
	ClockOffset time.Duration
	OffsetKnown bool
}

func (e *RefusedError) Error() string {
	if e.Reason == reasonSkew {
		return fmt.Sprintf("dial %s refused at %s (%s: %s): %v", e.Addr, e.Stage, e.Reason, e.skewText(), e.Err)
	}
	return fmt.Sprintf("dial %s refused at %s (%s): %v", e.Addr, e.Stage, e.Reason, e.Err)
}

func (e *RefusedError) Unwrap() error { return e.Err }

func refused(addr, stage, reason string, err error) error {
	return &RefusedError{Addr: addr, Stage: stage, Reason: reason, Err: err}
}

// destination is a resolved dial target.
type destination struct {
	zone, name string
	ip         netip.Addr
	port       uint16
	node       string // SPIFFE ID of the hosting node; "" for a local agent
}

// Dial opens a flow to "agent.zone:port" or "overlayIP:port": network "tcp" gives a stream
// (TCP), "udp" a datagram flow (see ListenPacket). The destination must be in the agent's own
// zone. The flow is admitted by the destination's node before Dial returns.
//
// Before anything is resolved, signed or sent, Dial checks that this process is the agent's
// enrolled workload (its executable, uid and gid: selfattest.go); a program that is not is
// refused with ErrWorkloadMismatch. The daemon's interfaces dial through Relay instead.
func (a *Agent) Dial(ctx context.Context, network, addr string) (net.Conn, error) {
	return a.dialFrom(ctx, network, addr, true)
}

// dialFrom is Dial; self says whether this process is the program the flow is for (Dial), as
// opposed to a relay for an attested socket owner (Relay).
func (a *Agent) dialFrom(ctx context.Context, network, addr string, self bool) (net.Conn, error) {
	c, err := a.dial(ctx, network, addr, self)
	if err != nil && a.n.cfg.OnRefused != nil {
		if re, ok := errors.AsType[*RefusedError](err); ok {
			a.n.cfg.OnRefused(a.id.Zone, re.Stage, re.Reason)
		}
	}
	return c, err
}

func (a *Agent) dial(ctx context.Context, network, addr string, self bool) (net.Conn, error) {
	if err := a.n.usable(); err != nil {
		return nil, refused(addr, "resolve", "expired", err)
	}
	// A revoked agent (or an agent of a revoked node) sends nothing: no peer would admit it, and
	// the refusal should say why rather than how a closed tunnel looked.
	if ids := a.revocationIDs(); a.n.isRevoked(ids...) {
		err := fmt.Errorf("%w: %s or its node is revoked", dtl.ErrRevoked, a.id)
		// Audited like any refusal: a revoked identity that still tries is the attack to see.
		a.n.auditVerdict(ctx, a.n.ID().String(), a.id.Zone, &Provenance{Agent: a.id.String(), Node: a.n.ID().String(), Zone: a.id.Zone}, err)
		return nil, refused(addr, "resolve", "revoked", err)
	}
	udp := isUDP(network)
	if !isTCP(network) && !udp {
		return nil, refused(addr, "resolve", "unsupported", fmt.Errorf("%w: network %q; SDK agents dial tcp or udp", ErrUnsupported, network))
	}
	if self {
		if err := a.attestSelf(ctx, addr); err != nil {
			return nil, err
		}
	}
	dst, err := a.resolve(ctx, addr)
	if err != nil {
		return nil, err
	}
	if udp {
		return a.dialUDP(ctx, addr, dst)
	}
	if dst.node == "" {
		return a.dialLocal(ctx, addr, dst)
	}
	t, err := a.n.tunnelTo(ctx, dst.node, dst.zone)
	if err != nil {
		return nil, refused(addr, "tunnel", "tunnel", err)
	}
	fc, err := a.openStream(ctx, t, dtl.Destination{Agent: dst.name, Port: dst.port, Proto: dtl.ProtoTCP}, tcpAddr(a.ip, 0), tcpAddr(dst.ip, dst.port))
	if err != nil {
		return nil, dialErr(addr, err)
	}
	// Taken again after the record was signed: a renewal in between swapped the certificate
	// whose serial a revocation would name.
	f := &liveFlow{ids: a.revocationIDs(), t: t, abort: fc.Abort}
	c := &dialedConn{FlowConn: fc, untrack: func() { a.n.untrackFlow(f) }}
	a.n.trackFlow(f)
	if a.n.isRevoked(f.ids...) {
		_ = c.Close()
		return nil, refused(addr, "admission", "revoked", fmt.Errorf("%w: %s was revoked while dialing", dtl.ErrRevoked, a.id))
	}
	return c, nil
}

func dialErr(addr string, err error) error {
	if serr := skewRefused(addr, "admission", err); serr != nil {
		return serr
	}
	var rej *tunnel.RejectedError
	if errors.As(err, &rej) {
		return refused(addr, "admission", rej.Reason, err)
	}
	var re *RefusedError
	if errors.As(err, &re) {
		return err
	}
	return refused(addr, "tunnel", "tunnel", err)
}

// revocationIDs are the identities whose revocation ends this agent's flows.
func (a *Agent) revocationIDs() []string {
	return a.creds().revIDs
}

// dialedConn is a stream flow a local agent opened. Close also stops tracking it for revocation.
type dialedConn struct {
	*tunnel.FlowConn
	untrack func()
	once    sync.Once
}

func (c *dialedConn) Close() error {
	c.once.Do(c.untrack)
	return c.FlowConn.Close()
}

// NetConn exposes the underlying flow (crypto/tls style), so WhoIs and callers can see through.
func (c *dialedConn) NetConn() net.Conn { return c.FlowConn }

// openFlowWithChain sends a flow record on t, naming the agent's chain by hash when the peer has
// admitted it on this session (dtl.KnownChains), and resends once with the full chain when the
// peer answers chain-unknown (it evicted the chain, or it restarted its session state).
func (a *Agent) openFlowWithChain(ctx context.Context, t *tunnel.Tunnel, dst dtl.Destination, open func(rec []byte, flowID uint64) error) error {
	ts := a.n.track(t)
	cr := a.creds()
	h := cr.chainHash
	compact := ts.known.Known(h)
	for {
		flowID := t.NewFlowID()
		var byHash []byte
		if compact {
			byHash = h[:]
		}
		rec, err := a.signWith(cr, t.Exporter(), flowID, ts.seq.Add(1), dst, byHash)
		if err != nil {
			return err
		}
		err = open(rec, flowID)
		switch {
		case err == nil:
			if !compact {
				ts.known.Accepted(h)
			}
			return nil
		case compact && errors.Is(err, dtl.ErrChainUnknown):
			ts.known.Forget(h)
			compact = false
		default:
			return err
		}
	}
}

// openStream opens an admitted stream flow to dst on t.
func (a *Agent) openStream(ctx context.Context, t *tunnel.Tunnel, dst dtl.Destination, local, remote net.Addr) (*tunnel.FlowConn, error) {
	var fc *tunnel.FlowConn
	err := a.openFlowWithChain(ctx, t, dst, func(rec []byte, _ uint64) error {
		var err error
		fc, err = t.OpenFlow(ctx, rec, local, remote)
		return err
	})
	return fc, err
}

// resolve turns addr into a destination through the node's view of the agent's zone, refreshing
// the view from the zone's peers on a miss.
func (a *Agent) resolve(ctx context.Context, addr string) (destination, error) {
	host, ps, err := net.SplitHostPort(addr)
	if err != nil {
		return destination{}, refused(addr, "resolve", "unsupported", fmt.Errorf("%w: %w", ErrUnsupported, err))
	}
	port, err := parsePort(ps)
	if err != nil {
		return destination{}, refused(addr, "resolve", "unsupported", err)
	}
	zone := a.id.Zone
	var name string
	ip, ipErr := netip.ParseAddr(host)
	if ipErr == nil {
		ip = ip.Unmap()
		if z, ok := a.n.pol().ZoneForAddr(ip); !ok || z.Name != zone {
			other := "no zone"
			if ok {
				other = "zone " + z.Name
			}
			return destination{}, refused(addr, "resolve", string(zones.ReasonCrossZone),
				fmt.Errorf("%w: %s is in %s, agent %s is in zone %s", ErrCrossZone, ip, other, a.id.Name, zone))
		}
	} else {
		n, z, ok := strings.Cut(strings.TrimSuffix(host, "."), ".")
		if !ok || identity.ValidateName("agent name", n) != nil || identity.ValidateName("zone name", z) != nil {
			return destination{}, refused(addr, "resolve", "unsupported", fmt.Errorf("%w: host %q is not agent.zone or an overlay IP", ErrUnsupported, host))
		}
		if z != zone {
			return destination{}, refused(addr, "resolve", string(zones.ReasonCrossZone),
				fmt.Errorf("%w: %s.%s is in zone %s, agent %s is in zone %s; tunnels carry one zone", ErrCrossZone, n, z, z, a.id.Name, zone))
		}
		name = n
	}
	if d, ok := a.n.lookup(zone, name, ip, port); ok {
		return d, nil
	}
	rerr := a.n.refreshZone(ctx, a)
	if d, ok := a.n.lookup(zone, name, ip, port); ok {
		return d, nil
	}
	if rerr != nil {
		// Peers that refused the directory exchange's record for the clocks' skew: the name may
		// well exist; say why it could not be looked up.
		if serr := skewRefused(addr, "resolve", fmt.Errorf("%s in zone %s could not be looked up: %w", host, zone, rerr)); serr != nil {
			return destination{}, serr
		}
		return destination{}, refused(addr, "resolve", "unknown-name", fmt.Errorf("%w: %s in zone %s (peers not reached: %w)", ErrUnknownName, host, zone, rerr))
	}
	return destination{}, refused(addr, "resolve", "unknown-name", fmt.Errorf("%w: %s in zone %s", ErrUnknownName, host, zone))
}

// lookup finds a destination by name (or, when name is empty, by overlay IP) among local agents
// and the zone view. Each node's agents hold addresses from that node's own slice of the zone, so
// an IP names at most one agent; a second match could only come from a forged or stale entry and
// is refused as ambiguous rather than guessed.
func (n *Node) lookup(zone, name string, ip netip.Addr, port uint16) (destination, bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	var found []destination
	for k, st := range n.agents {
		if k.zone == zone && (k.name == name || (name == "" && st.IP == ip)) {
			found = append(found, destination{zone: zone, name: k.name, ip: st.IP, port: port})
		}
	}
	for nm, e := range n.view[zone] {
		if nm == name || (name == "" && e.ip == ip) {
			found = append(found, destination{zone: zone, name: nm, ip: e.ip, port: port, node: e.node})
		}
	}
	if len(found) != 1 {
		return destination{}, false
	}
	return found[0], true
}

// tunnelState is what the node keeps per tunnel it has used: the session's record sequence and
// the agent chains the peer has admitted on it.
type tunnelState struct {
	seq   atomic.Uint64
	known *dtl.KnownChains
}

func newTunnelState() *tunnelState { return &tunnelState{known: dtl.NewKnownChains(0)} }

// Tunnel returns the live tunnel to peer (a node name or SPIFFE ID) for zone, dialing it if
// needed. Dial uses tunnels implicitly; the demo and the simulator use this to replay captured
// records, which gives them no power a node's holder lacks: the receiving node enforces everything.
func (n *Node) Tunnel(ctx context.Context, peer, zone string) (*tunnel.Tunnel, error) {
	id, err := n.peerID(peer)
	if err != nil {
		return nil, err
	}
	return n.tunnelTo(ctx, id, zone)
}

// tunnelTo returns the live tunnel to node for zone, dialing the node's configured address.
func (n *Node) tunnelTo(ctx context.Context, node, zone string) (*tunnel.Tunnel, error) {
	if err := n.usable(); err != nil {
		return nil, err
	}
	n.mu.Lock()
	addr := n.peers[node]
	n.mu.Unlock()
	if !addr.IsValid() && n.cfg.Resolve != nil {
		if a, ok := n.cfg.Resolve(node); ok {
			addr = a
		}
	}
	t, err := n.ep.Dial(ctx, addr, node, zone)
	if err != nil {
		if !addr.IsValid() && !errors.Is(err, tunnel.ErrZoneNotServed) {
			return nil, fmt.Errorf("%w: %s has no configured address and no live tunnel: %w", ErrPeerUnreachable, node, err)
		}
		return nil, err
	}
	n.track(t)
	return t, nil
}

// track registers t so that records get per-session sequence numbers and revocation can close it.
func (n *Node) track(t *tunnel.Tunnel) *tunnelState {
	n.mu.Lock()
	ts := n.tunnels[t]
	if ts != nil || n.closed {
		n.mu.Unlock()
		if ts == nil {
			ts = newTunnelState()
		}
		return ts
	}
	ts = newTunnelState()
	n.tunnels[t] = ts
	n.bindSessionLocked(t)
	n.wg.Go(func() {
		select {
		case <-t.Done():
		case <-n.ctx.Done():
		}
		n.mu.Lock()
		delete(n.tunnels, t)
		n.dropSessionLocked(t)
		n.mu.Unlock()
		n.untrackTunnel(t)
	})
	n.mu.Unlock()
	return ts
}

// Record signs a DTL record for a flow from this agent to dst on tunnel t: the next sequence
// number of t's session, a fresh flow id, now as issued-at, t's session binding as AAD, and always
// the full certificate chain (Dial names a chain the peer already admitted by its hash instead).
// The simulator and the demo use it to show that a captured record is refused elsewhere.
func (a *Agent) Record(t *tunnel.Tunnel, dst dtl.Destination) ([]byte, error) {
	ts := a.n.track(t)
	return a.sign(t.Exporter(), t.NewFlowID(), ts.seq.Add(1), dst)
}

// sign signs a record carrying the agent's current full chain.
func (a *Agent) sign(aad []byte, flowID, seq uint64, dst dtl.Destination) ([]byte, error) {
	return a.signWith(a.creds(), aad, flowID, seq, dst, nil)
}

// signWith signs a record with the chain and key of cr. A non-nil chainHash (cr's chain hash,
// which the caller has already computed) names the chain instead of carrying it.
func (a *Agent) signWith(cr agentCreds, aad []byte, flowID, seq uint64, dst dtl.Destination, chainHash []byte) ([]byte, error) {
	var chain *dtl.CertChain
	if chainHash == nil {
		chain = &dtl.CertChain{Node: cr.node.Raw(), Agent: cr.cert.Raw()}
	}
	c := &dtl.Claims{
		Version:     dtl.Version1,
		Zone:        a.id.Zone,
		Agent:       cr.agentID,
		Chain:       chain,
		ChainHash:   chainHash,
		Node:        cr.nodeID,
		Fingerprint: cr.cert.Claims.Fingerprint,
		Region:      a.n.region,
		Trust:       a.n.attestedTrust(cr.agentID, cr.nodeID),
		Destination: dst,
		FlowID:      flowID,
		Seq:         seq,
		IssuedAt:    a.n.now(),
	}
	rec, err := dtl.Sign(c, cr.key, aad)
	if err != nil {
		return nil, fmt.Errorf("node: sign record for %s: %w", a.id, err)
	}
	return rec, nil
}

// HTTPClient returns an http.Client whose connections are this agent's admitted flows, so
// "http://ledger.payments:8080/" reaches agent ledger of zone payments.
func (a *Agent) HTTPClient() *http.Client {
	return &http.Client{Transport: &http.Transport{
		DialContext:         a.Dial,
		MaxIdleConnsPerHost: 4,
		IdleConnTimeout:     30 * time.Second,
	}}
}
