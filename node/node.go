package node

import (
	"context"
	"crypto/ed25519"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/identity/record"
	"github.com/ute-project/ute/node/attest"
	"github.com/ute-project/ute/node/state"
	"github.com/ute-project/ute/overlay/audit"
	"github.com/ute-project/ute/overlay/dtl"
	"github.com/ute-project/ute/overlay/tunnel"
	"github.com/ute-project/ute/zones"
)

// DirAudit is the audit log's directory inside the node directory.
const DirAudit = "audit"

// DefaultTrust is the trust score a node attests for its agents until TrustFlow computes one.
const DefaultTrust = 100

// Errors of the node and its SDK. Refused flows are *RefusedError values that wrap one of these or
// a dtl / tunnel sentinel, so callers match them with errors.Is.
var (
	ErrClosed          = errors.New("node: closed")
	ErrConfig          = errors.New("node: invalid configuration")
	ErrCrossZone       = errors.New("node: destination is in another zone than the agent")
	ErrUnknownName     = errors.New("node: no agent of that name or address in the zone")
	ErrUnsupported     = errors.New("node: unsupported network or address")
	ErrAddrInUse       = errors.New("node: agent already listens on that port")
	ErrNoProvenance    = errors.New("node: connection carries no admitted DTL record")
	ErrBadDirectory    = errors.New("node: malformed directory message")
	ErrNotJoined       = errors.New("node: directory not joined")
	ErrBadRevocation   = errors.New("node: revocation subject must be a SPIFFE ID or serial:<decimal>")
	ErrPeerUnreachable = errors.New("node: no route to the destination's node")
	ErrNameTaken       = errors.New("node: directory entry names an agent another node serves")
)

// Peer is a statically configured peer node (gossip will discover them later). Node is the peer's
// node name or SPIFFE ID: tunnel.Endpoint.Dial requires the expected identity, so an address that
// answers with another node's certificate is refused (tunnel.ErrPeerMismatch).
type Peer struct {
	Node string
	Addr netip.AddrPort
}

// Config configures a Node.
type Config struct {
	// Dir is the joined node directory (node/state).
	Dir string
	// PacketConn is the underlay socket; the caller keeps ownership. When nil, the node listens on
	// ListenAddr (default 127.0.0.1:0) and closes that socket itself.
	PacketConn net.PacketConn
	ListenAddr string
	// Peers are the other nodes this node may open tunnels to.
	Peers []Peer
	// Clock is the time source for certificates, records and audit; nil means time.Now.
	Clock func() time.Time
	// Logger receives structured logs; nil discards them.
	Logger *slog.Logger
	// Trust is the score this node attests for its agents in every record (0..100); 0 means
	// DefaultTrust. Use TrustSet with Trust 0 to attest a zero score.
	Trust    uint8
	TrustSet bool
	// MaxSkew is the freshness tolerance for records; 0 means dtl.DefaultSkew.
	MaxSkew time.Duration
	// Limits tunes the tunnel endpoint.
	Limits tunnel.Limits
	// AuditFlush is the audit log's flush interval (audit.Options.FlushInterval).
	AuditFlush time.Duration
	// AuditRefusals tunes how refusals are audited (window, hourly budget; zero fields take
	// audit.Flood's defaults, a 10 s window and 8 MiB per hour). Clock and Logger are used when
	// its own are nil.
	AuditRefusals audit.FloodOptions
	// Authority is the authority's UDP address. When set, the node renews its certificate by
	// itself at half-life (see renew.go); empty leaves renewal to `ute node renew`. Use the
	// address in node.json (state.Info.Authority) for the authority the node joined. Agent
	// certificates are reissued at their half-life either way (credentials.go).
	Authority string
	// After is the timer of the credential scheduler (node renewal and agent reissue); nil means
	// time.After. Tests inject a fake one together with Clock.
	After func(time.Duration) <-chan time.Time
	// RenewMinRetry and RenewMaxRetry bound the backoff after a failed renewal or agent reissue
	// (defaults 5 s and 5 min); RenewTimeout bounds one renewal attempt (default 30 s).
	RenewMinRetry, RenewMaxRetry, RenewTimeout time.Duration
	// Revoked seeds the revocation set (canonical key of a verified record, identity/record's
	// Revocation.Keys, → reason) before the endpoint accepts
	// its first handshake: the daemon passes every record of its durable store here, so that a
	// node restarted after a crash enforces each accepted revocation from its first packet.
	Revoked map[string]string
	// ControlHandler and ControlDatagram receive the node-level control traffic of every tunnel
	// (tunnel.Config: gossip runs there, overlay/gossip's Mux plugs in); nil refuses it.
	ControlHandler  func(t *tunnel.Tunnel, channel byte, c net.Conn)
	ControlDatagram func(t *tunnel.Tunnel, payload []byte)
	// TunnelUp, if set, is told every established tunnel, inbound and outbound, once the node has
	// registered it (not one whose peer was revoked during the handshake): the gossip mux sends
	// the records it is still spreading over it. It runs on an endpoint-owned goroutine, before
	// the directory exchange, and must not block.
	TunnelUp func(t *tunnel.Tunnel)
	// Policy, when set, is put in force instead of the policy stored at join: the daemon passes
	// the newest signed policy release it holds, so a restarted node never runs an older one.
	Policy *zones.Policy
	// OnVerdict, if set, is told every audited flow verdict (metrics): reason is empty for an
	// admission, else the dtl reason code. It must not block.
	OnVerdict func(zone, reason string)
	// OnRefused, if set, is told every Dial of this node's agents that UTE refused, here or at
	// the peer: the agent's zone, the stage and the reason of the *RefusedError (metrics; a
	// peer's reason is one of the 256 wire codes, so the set stays bounded).
	OnRefused func(zone, stage, reason string)
	// Resolve, if set, names an address for a peer node ID this node has none for (the daemon
	// answers from gossip and its bootstrap members). The handshake still proves the identity.
	Resolve func(nodeID string) (netip.AddrPort, bool)
	// Advertise is the underlay address (host:port) the node tells the authority at each
	// renewal, for the bootstrap members it hands to other nodes; empty keeps the recorded one.
	Advertise string
	// OnFlowVerdict, if set, is told every audited flow verdict with the record's source and
	// the tunnel's peer (TrustFlow's signals, trusthook.go). It must not block.
	OnFlowVerdict func(FlowVerdict)
	// TrustView, if set, is this node's own TrustFlow view (0..100) of a subject (agent or node
	// SPIFFE ID). The node attests the lower of Trust and its view of the agent and of itself,
	// and admits a flow on the lower of the record's score and its view of the source agent and
	// node. It must not block.
	TrustView func(subject string) int
	// OnCredentialFailure, if set, is told each failed renewal of the node certificate (subject:
	// the node ID) or reissue of an agent certificate (the agent ID). It must not block.
	OnCredentialFailure func(subject string, err error)
	// OnWorkloadMismatch, if set, is told each Dial refused because this process is not the
	// agent's enrolled workload (selfattest.go), with the reason: TrustFlow's
	// fingerprint_mismatch signal. It must not block.
	OnWorkloadMismatch func(agent identity.ID, reason string)
	// OnDirectoryDuplicate, if set, is told each agent name that two nodes of a zone announce
	// as live at once in their directory entries (directory.go): TrustFlow's duplicate_identity
	// signal. It must not block.
	OnDirectoryDuplicate func(DirectoryDuplicate)
}

// Node is a running UTE node. All its methods are safe for concurrent use.
type Node struct {
	cfg  Config
	log  *slog.Logger
	now  func() time.Time
	dir  *state.Dir
	info state.Info
	// credMu guards the credentials a renewal replaces: cert and key here, and cert, issuer of
	// every Agent handed out. Readers take one consistent snapshot (certificate, Agent.creds).
	credMu sync.RWMutex
	cert   *identity.Certificate
	issuer *identity.Certificate // the node's issuing certificate, which signs its agents; swapped with cert
	key    tls.Certificate
	anchor *identity.Certificate
	verif  identity.Verifier
	policy atomic.Pointer[zones.Policy] // replaced whole by SetPolicy
	region string
	trust  uint8
	audit  *auditLog
	ep     *tunnel.Endpoint
	pc     net.PacketConn
	ownPC  bool
	admit  *dtl.Verifier
	secret [32]byte // derives the per-zone session binding of local (same-node) flows

	localFlow, localSeqs atomic.Uint64 // flow ids and sequence numbers of same-node records

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu        sync.Mutex
	closed    bool
	revoked   map[string]string         // canonical subject → reason
	agents    map[agentKey]*state.Agent // every agent registered in the directory
	open      map[agentKey]*Agent       // agents handed out by Agent()
	listeners map[listenKey]*listener
	sessions  map[string]*session // by session binding (exporter) value
	tunnels   map[*tunnel.Tunnel]*tunnelState
	view      map[string]map[string]viewEntry // zone → agent name → entry (remote agents)
	refreshed map[refreshKey]time.Time
	peers     map[string]netip.AddrPort // node SPIFFE ID → address
	lastSweep time.Time
	inflight  map[refreshKey]*refreshCall   // directory exchanges under way
	flows     map[*liveFlow]struct{}        // flows the node must reset on revocation besides inbound tunnel flows
	plisten   map[listenKey]*packetListener // UDP ports of SDK agents
	sched     credSched                     // the credential scheduler's state (credentials.go)

	// self attests this process against SDK agents' enrolled workloads (selfattest.go); its
	// digest cache makes a Dial pay an fstat, not a hash.
	self *attest.Attester
}

type agentKey struct{ zone, name string }

type listenKey struct {
	zone, name string
	port       uint16
}

type refreshKey struct{ node, zone string }

// Open loads the node directory at cfg.Dir and starts the node's tunnel endpoint.
func Open(ctx context.Context, cfg Config) (*Node, error) {
	if cfg.Dir == "" {
		return nil, fmt.Errorf("%w: Config.Dir is required", ErrConfig)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	n := &Node{
		cfg: cfg, log: cfg.Logger, now: cfg.Clock,
		revoked: map[string]string{}, agents: map[agentKey]*state.Agent{}, open: map[agentKey]*Agent{},
		listeners: map[listenKey]*listener{}, sessions: map[string]*session{},
		tunnels: map[*tunnel.Tunnel]*tunnelState{}, view: map[string]map[string]viewEntry{},
		refreshed: map[refreshKey]time.Time{}, peers: map[string]netip.AddrPort{},
		inflight: map[refreshKey]*refreshCall{}, flows: map[*liveFlow]struct{}{}, plisten: map[listenKey]*packetListener{},
		sched: credSched{wake: make(chan struct{}, 1)}, self: attest.New(attest.Options{CacheSize: 4}),
	}
	if n.log == nil {
		n.log = slog.New(slog.DiscardHandler)
	}
	if n.now == nil {
		n.now = time.Now
	}
	n.trust = DefaultTrust
	if cfg.Trust != 0 || cfg.TrustSet {
		n.trust = cfg.Trust
	}
	if n.trust > dtl.MaxTrust {
		return nil, fmt.Errorf("%w: trust %d is outside 0..%d", ErrConfig, n.trust, dtl.MaxTrust)
	}
	for key, reason := range cfg.Revoked {
		n.revoked[key] = reason
	}
	if err := n.load(); err != nil {
		return nil, err
	}
	if _, err := rand.Read(n.secret[:]); err != nil {
		return nil, fmt.Errorf("node: session secret: %w", err)
	}
	for _, p := range cfg.Peers {
		id, err := n.peerID(p.Node)
		if err != nil {
			return nil, err
		}
		if !p.Addr.IsValid() {
			return nil, fmt.Errorf("%w: peer %s has no address", ErrConfig, p.Node)
		}
		n.peers[id] = p.Addr
	}
	// The head is signed with the node key, so that cutting the log's tail and rewriting the head
	// to match is caught by `ute audit verify` (it checks the head against node.crt's key). The
	// key changes at renewal; the log then records the change instead of refusing to open.
	nodeKey, _ := n.key.PrivateKey.(ed25519.PrivateKey)
	al, err := openAuditLog(filepath.Join(cfg.Dir, DirAudit), audit.Options{Logger: n.log, Now: n.now, FlushInterval: cfg.AuditFlush,
		Key: nodeKey}, cfg.AuditRefusals)
	if err != nil {
		return nil, fmt.Errorf("node: audit log: %w", err)
	}
	n.audit = al
	n.admit = &dtl.Verifier{
		Chains:     dtl.ChainVerifierFunc(n.verifyAgentChain),
		Revocation: dtl.RevocationFunc(n.isRevoked),
		Policy:     dtl.PolicyFunc(n.allowFlow),
		MinTrust:   n.minTrust,
		MaxSkew:    cfg.MaxSkew,
		Now:        n.now,
	}
	n.pc = cfg.PacketConn
	if n.pc == nil {
		addr := cfg.ListenAddr
		if addr == "" {
			addr = "127.0.0.1:0"
		}
		pc, err := net.ListenPacket("udp", addr)
		if err != nil {
			_ = al.Close()
			return nil, fmt.Errorf("node: listen %s: %w; pick a free address with --listen", addr, err)
		}
		n.pc, n.ownPC = pc, true
	}
	n.ctx, n.cancel = context.WithCancel(context.Background())
	ep, err := tunnel.New(tunnel.Config{
		PacketConn:      n.pc,
		Certificate:     n.key,
		Zones:           n.cert.Claims.ZoneNames(),
		Verifier:        peerVerifier{n},
		Admitter:        admitter{n},
		StreamHandler:   n.handleStream,
		PacketHandler:   n.handlePacket,
		OnTunnel:        n.onTunnel,
		OnVerdict:       n.onVerdict,
		OnRefused:       n.onRefused,
		OnStalled:       n.onStalled,
		ControlHandler:  cfg.ControlHandler,
		ControlDatagram: cfg.ControlDatagram,
		Clock:           n.now,
		Logger:          n.log,
		Limits:          cfg.Limits,
	})
	if err != nil {
		n.cancel()
		_ = al.Close()
		if n.ownPC {
			_ = n.pc.Close()
		}
		return nil, fmt.Errorf("node: %w", err)
	}
	n.ep = ep
	n.log.Info("node up", "node", n.cert.ID.String(), "addr", ep.Addr().String(), "zones", n.cert.Claims.ZoneNames())
	n.startCredentials()
	return n, nil
}

// load reads identity, policy and agents from the node directory.
func (n *Node) load() error {
	d, err := state.Open(n.cfg.Dir, state.WithClock(n.now))
	if err != nil {
		return fmt.Errorf("%w: %w", ErrNotJoined, err)
	}
	n.dir = d
	if n.info, err = d.Info(); err != nil {
		return err
	}
	if n.cert, err = d.NodeCert(); err != nil {
		return err
	}
	if n.anchor, err = d.AuthorityCert(); err != nil {
		return err
	}
	key, err := d.NodeKey()
	if err != nil {
		return err
	}
	if n.key, err = identity.TLSCertificate(key, n.cert); err != nil {
		return err
	}
	n.verif = identity.Verifier{Authority: n.anchor, Cache: identity.NewSignatureCache(4096)}
	if err := n.verif.VerifyNode(n.cert, n.now()); err != nil {
		return fmt.Errorf("node: own certificate does not verify (renew with `ute node renew --dir %s`): %w", n.cfg.Dir, err)
	}
	if err := n.loadIssuer(d); err != nil {
		return err
	}
	pol, err := d.Policy()
	if err != nil {
		return err
	}
	p := n.cfg.Policy
	if p == nil {
		if p, err = zones.Parse(filepath.Join(n.cfg.Dir, state.FilePolicy), pol); err != nil {
			return fmt.Errorf("node: stored policy: %w", err)
		}
	}
	n.policy.Store(p)
	n.region = n.info.Region
	if n.region == "" && len(n.cert.Claims.Regions) > 0 {
		n.region = n.cert.Claims.Regions[0]
	}
	return n.reloadAgents()
}

// reloadAgents re-reads the agents registered in the directory (an offline `ute agent add` may
// have added some).
func (n *Node) reloadAgents() error {
	list, err := n.dir.Agents()
	if err != nil {
		return fmt.Errorf("node: agents: %w", err)
	}
	m := make(map[agentKey]*state.Agent, len(list))
	for _, a := range list {
		m[agentKey{a.Zone, a.Name}] = a
	}
	var changed []*identity.Certificate
	n.mu.Lock()
	for k, a := range m {
		if old := n.agents[k]; a.Cert != nil && (old == nil || old.Cert == nil || old.Cert.Serial().Cmp(a.Cert.Serial()) != 0) {
			changed = append(changed, a.Cert)
		}
	}
	n.agents = m
	n.mu.Unlock()
	n.noteAgents(changed...)
	return nil
}

// Close stops the endpoint, every listener and flow, and flushes the audit log.
func (n *Node) Close() error {
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		return nil
	}
	n.closed = true
	ls := make([]*listener, 0, len(n.listeners))
	for _, l := range n.listeners {
		ls = append(ls, l)
	}
	pls := make([]*packetListener, 0, len(n.plisten))
	for _, l := range n.plisten {
		pls = append(pls, l)
	}
	n.mu.Unlock()
	for _, l := range ls {
		_ = l.Close()
	}
	for _, l := range pls {
		_ = l.Close()
	}
	n.cancel()
	err := n.ep.Close()
	n.wg.Wait()
	if n.ownPC {
		err = errors.Join(err, n.pc.Close())
	}
	return errors.Join(err, n.audit.Close())
}

// ID is the node's SPIFFE ID.
func (n *Node) ID() identity.ID { return n.certificate().ID }

// Certificate is the node's current certificate (it changes when the node renews).
func (n *Node) Certificate() *identity.Certificate { return n.certificate() }

// certificate is the node certificate in use now.
func (n *Node) certificate() *identity.Certificate {
	n.credMu.RLock()
	defer n.credMu.RUnlock()
	return n.cert
}

// Addr is the node's underlay (UDP) address.
func (n *Node) Addr() netip.AddrPort {
	if ua, ok := n.ep.Addr().(*net.UDPAddr); ok {
		return ua.AddrPort()
	}
	ap, _ := netip.ParseAddrPort(n.ep.Addr().String())
	return ap
}

// Zones lists the zones the node's certificate grants.
func (n *Node) Zones() []string { return n.certificate().Claims.ZoneNames() }

// Region is the region the node attests in its records.
func (n *Node) Region() string { return n.region }

// Stats returns the tunnel endpoint's counters.
func (n *Node) Stats() tunnel.Stats { return n.ep.Stats() }

// PeerAddr is the address the node holds for a peer, by its canonical node SPIFFE ID (no
// parsing: the daemon compares its gossip members with the table on every member sync).
func (n *Node) PeerAddr(nodeID string) (netip.AddrPort, bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	a, ok := n.peers[nodeID]
	return a, ok
}

// AddPeer adds or replaces a peer's address.
func (n *Node) AddPeer(p Peer) error {
	id, err := n.peerID(p.Node)
	if err != nil {
		return err
	}
	if !p.Addr.IsValid() {
		return fmt.Errorf("%w: peer %s has no address", ErrConfig, p.Node)
	}
	n.mu.Lock()
	n.peers[id] = p.Addr
	n.mu.Unlock()
	return nil
}

// peerID turns a node name or SPIFFE ID into the canonical node SPIFFE ID string.
func (n *Node) peerID(s string) (string, error) {
	if id, err := identity.ParseID(s); err == nil {
		if id.Kind != identity.KindNode {
			return "", fmt.Errorf("%w: peer %s is not a node ID", ErrConfig, s)
		}
		return id.String(), nil
	}
	if err := identity.ValidateName("peer node name", s); err != nil {
		return "", fmt.Errorf("%w: %w", ErrConfig, err)
	}
	return identity.NodeID(n.certificate().ID.TrustDomain, s).String(), nil
}

// Revoke adds a subject to the node's revocation set and cuts the subject off at once: tunnels
// with a revoked node are closed (both sides see the connection end), and every live flow of a
// revoked agent — inbound from a peer, outbound from a local agent, or same-node — is reset, so a
// revoked subject loses its established connections, not just new ones. subject is a SPIFFE ID
// (node or agent; revoking a node revokes its agents) or "serial:<decimal>" naming a certificate
// serial. Revocation is idempotent. The set is in memory: the daemon (node/daemon) persists every
// signed record before it calls ApplyRevocation, and seeds the set at start (Config.Revoked).
func (n *Node) Revoke(ctx context.Context, subject, reason string) error {
	key, err := canonicalSubject(subject)
	if err != nil {
		return err
	}
	_, err = n.ApplyRevocation(ctx, []string{key}, reason)
	return err
}

// ApplyRevocation is Revoke for the canonical keys of a verified revocation record
// (identity/record: a subject, or a serial as issued by one node). It returns how many tunnels it
// closed and flows it reset.
func (n *Node) ApplyRevocation(ctx context.Context, keys []string, reason string) (cut int, err error) {
	match := func(ids ...string) bool {
		for _, id := range ids {
			if slices.Contains(keys, id) {
				return true
			}
		}
		return false
	}
	n.mu.Lock()
	for _, key := range keys {
		n.revoked[key] = reason
	}
	for z, m := range n.view {
		for name, e := range m {
			if match(e.node, e.agent, e.serial, e.serial+"@"+e.node) {
				delete(n.view[z], name)
			}
		}
	}
	var abort []*liveFlow
	for f := range n.flows {
		if match(f.ids...) {
			abort = append(abort, f)
		}
	}
	n.mu.Unlock()
	// The set is updated first: a handshake or admission racing with this call either sees the
	// revocation or finishes before the sweeps below, which then close what it opened (onTunnel
	// and the flow handlers re-check revocation after registering, for the remaining window).
	tunnels := n.ep.CloseTunnels(func(p tunnel.Peer) bool {
		return slices.ContainsFunc(keys, func(k string) bool { return peerMatches(p, k) })
	})
	inbound := n.ep.CloseFlows(func(_ string, adm tunnel.Admission) bool {
		p := admissionProvenance(adm)
		return p != nil && match(p.ids...)
	})
	for _, f := range abort {
		f.abort()
	}
	subject := strings.Join(keys, ",")
	n.log.Info("revoked", "subject", subject, "reason", reason, "tunnels_closed", tunnels, "flows_reset", inbound+len(abort))
	return tunnels + inbound + len(abort), n.audit.Append(ctx, audit.Entry{Event: audit.EventRevoke, Fields: map[string]string{
		"subject": subject, "reason": reason,
		"tunnels_closed": strconv.Itoa(tunnels), "flows_reset": strconv.Itoa(inbound + len(abort)),
	}})
}

// peerMatches reports whether a tunnel peer is the revoked subject key (node ID or serial).
func peerMatches(p tunnel.Peer, key string) bool {
	if p.NodeID == key {
		return true
	}
	c, ok := p.Info.(*identity.Certificate)
	return ok && serialKey(c) == key
}

// peerRevoked reports whether a tunnel's peer node is revoked.
func (n *Node) peerRevoked(p tunnel.Peer) bool {
	ids := []string{p.NodeID}
	if c, ok := p.Info.(*identity.Certificate); ok {
		ids = append(ids, serialKey(c))
	}
	return n.isRevoked(ids...)
}

// liveFlow is a flow the node resets when one of ids (the source agent's and its node's
// revocation identities) is revoked: flows local agents opened, and same-node flows. Inbound
// tunnel flows are found through the endpoint's flow table instead.
type liveFlow struct {
	ids   []string
	t     *tunnel.Tunnel // nil for same-node flows
	abort func()
}

// trackFlow registers f until untrackFlow(f) (or f's tunnel closes). The caller then checks
// isRevoked(f.ids...) and aborts the flow itself: a revocation that landed while the flow was
// being opened missed the registration. f.abort may run as soon as f is registered.
func (n *Node) trackFlow(f *liveFlow) {
	n.mu.Lock()
	n.flows[f] = struct{}{}
	n.mu.Unlock()
}

func (n *Node) untrackFlow(f *liveFlow) {
	n.mu.Lock()
	delete(n.flows, f)
	n.mu.Unlock()
}

// untrackTunnel forgets the tracked flows of a closed tunnel.
func (n *Node) untrackTunnel(t *tunnel.Tunnel) {
	n.mu.Lock()
	defer n.mu.Unlock()
	for f := range n.flows {
		if f.t == t {
			delete(n.flows, f)
		}
	}
}

func canonicalSubject(s string) (string, error) {
	key, err := record.CanonicalSubject(s)
	if err != nil {
		return "", fmt.Errorf("%w: %q", ErrBadRevocation, s)
	}
	return key, nil
}

func serialKey(c *identity.Certificate) string { return "serial:" + c.Serial().String() }

// isRevoked reports whether any of the canonical subjects is revoked.
func (n *Node) isRevoked(ids ...string) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.revokedLocked(ids...)
}

// revokedLocked is isRevoked for a caller holding n.mu.
func (n *Node) revokedLocked(ids ...string) bool {
	for _, id := range ids {
		if _, ok := n.revoked[id]; ok {
			return true
		}
	}
	return false
}

// localBinding is the session binding of same-node flows in zone: secret per node run, distinct
// per zone, never equal to a TLS exporter value of any tunnel.
func (n *Node) localBinding(zone string) []byte {
	m := hmac.New(sha256.New, n.secret[:])
	m.Write([]byte("ute local session\x00" + zone))
	return m.Sum(nil)
}

func (n *Node) minTrust(zone string) (int, bool) {
	z, ok := n.pol().Zone(zone)
	if !ok {
		return 0, false
	}
	return z.MinTrust, true
}

func (n *Node) isClosed() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.closed
}

// spawn runs f on a node-owned goroutine unless the node is closed.
func (n *Node) spawn(f func()) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return false
	}
	n.wg.Go(f)
	return true
}
