package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"slices"
	"sync"
	"time"

	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/tun"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/identity/record"
	"github.com/ute-project/ute/node"
	"github.com/ute-project/ute/node/attest"
	"github.com/ute-project/ute/node/config"
	"github.com/ute-project/ute/node/state"
	"github.com/ute-project/ute/overlay/dtl"
	"github.com/ute-project/ute/overlay/tundev"
	"github.com/ute-project/ute/overlay/tunnel"
	"github.com/ute-project/ute/overlay/wireguard"
)

// The WireGuard transport (`--transport wireguard`): one wireguard-go device per node behind a
// per-flow admission filter, peers only the same-zone nodes whose WireGuard key is bound to their
// verified identity, allowed IPs only their agents' verified addresses. Every new 5-tuple is
// admitted by the receiving node from the source agent's DTL record, sent on the zone's QUIC
// tunnel (control channel 17); revocation, isolation and policy changes cut peers and tuples
// synchronously through the node's flow tracking (node.TrackFlow), and a node that cuts a tuple
// on its own decision tells the node at the other end (control channel 18, a cut notice).

// WireGuardOptions tune the WireGuard transport; the zero value runs it on the kernel TUN.
type WireGuardOptions struct {
	// TUN, when set, is the kernel-side device (tests pass a channel TUN); otherwise the daemon
	// creates the interface (overlay/tundev) with its agents' addresses and its zones' routes.
	TUN tun.Device
	// Interface names the kernel interface; default tundev.DefaultName.
	Interface string
	// MTU of the interface; default DefaultWireGuardMTU.
	MTU int
	// Bind is wireguard-go's UDP socket; nil is a real UDP socket on Port.
	Bind conn.Bind
	// Port is the WireGuard UDP port; 0 means the QUIC port + 1, or any free port when the QUIC
	// port is 0. The port in use is announced in the signed key binding.
	Port uint16
	// Attest checks the process behind a new outgoing tuple of an agent with an enrolled
	// workload; nil uses node/attest (TCP).
	Attest func(t wireguard.Tuple, w node.Workload) (attest.Process, error)
	// Keepalive is the persistent keepalive of every peer in seconds; 0 is off.
	Keepalive int
}

// DefaultWireGuardMTU leaves room for WireGuard's 80 bytes of IPv6+UDP+WireGuard overhead in a
// 1,500-byte underlay.
const DefaultWireGuardMTU = 1420

// Sentinels of the WireGuard transport.
var (
	// ErrTransportMismatch: the destination's node does not run the WireGuard transport. Nodes of
	// one zone must run the same transport; a mixed zone is refused, never bridged.
	ErrTransportMismatch = errors.New("daemon: the destination's node does not run the WireGuard transport; every node of a zone must run the same transport")
	// ErrNoPeer: the destination's node has no WireGuard peer configured here (no verified
	// binding, revoked, or its key conflicts with another node's).
	ErrNoPeer = errors.New("daemon: no WireGuard peer for the destination's node")
	// ErrLocalFlow: a tuple between two agents of this node reached the device; the kernel
	// delivers those locally, so it is refused.
	ErrLocalFlow = errors.New("daemon: flow between two agents of this node")
)

type wgKey struct{ node, zone string }

type wgPeer struct {
	b    *wireguard.Binding
	cert *identity.Certificate
}

// wgFlow is what the filter keeps with an admitted tuple.
type wgFlow struct {
	node     string // the peer node at the other end
	zone     string // the zone it was admitted in: its cut notice goes over that zone's tunnel
	outbound bool
	prov     *node.Provenance // inbound: the admitted record
}

type wgTransport struct {
	d        *Daemon
	log      *slog.Logger
	key      wireguard.KeyPair
	kdev     *tundev.Device
	filter   *wireguard.Filter
	dev      *wireguard.Device
	endpoint netip.AddrPort
	attest   func(wireguard.Tuple, node.Workload) (attest.Process, error)

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	// syncMu orders peer-set changes: a recomputation never re-adds a peer a revocation removed.
	syncMu sync.Mutex

	mu       sync.Mutex
	bindings map[wgKey]wgPeer
	watched  map[string]func()                  // node ID + serial → untrack of the node's revocation watch
	agents   map[string]map[netip.Addr][]string // peer node → its agents' addresses → their revocation keys
	agentsW  map[netip.Addr]func()              // untrack of each agent address's revocation watch
	flows    map[wireguard.Tuple]func()         // untrack of each admitted tuple's revocation watch
	clients  map[*tunnel.Tunnel]*admitClient
	servers  map[net.Conn]struct{}
	inflight map[wgKey]bool
	retry    map[wgKey]time.Time
	refused  map[string]uint64 // outbound refusals by reason
	cuts     CutNoticeStats
	cutQ     map[wgKey][]wireguard.Tuple // cut notices waiting for their peer's sender
	cutBusy  map[wgKey]bool              // a sender runs for the peer: it takes what is queued
	own      []byte
	ownAt    time.Time
	ownZones []string
	ownCert  *identity.Certificate // the node certificate whose key signed own
	closed   bool
}

// startWireGuard brings the WireGuard transport up; the pools are started (d.advertise is set).
func (d *Daemon) startWireGuard() error {
	opts := d.opts.WireGuard
	if opts.TUN == nil && d.cfg.Interface != config.InterfaceTUN {
		return errors.New("daemon: transport wireguard carries the kernel interface's packets: set interface tun")
	}
	kp, err := wireguard.GenerateKeyPair()
	if err != nil {
		return err
	}
	w := &wgTransport{d: d, log: d.log.With("transport", "wireguard"), key: kp, attest: opts.Attest,
		bindings: map[wgKey]wgPeer{}, watched: map[string]func(){}, agents: map[string]map[netip.Addr][]string{}, agentsW: map[netip.Addr]func(){},
		flows: map[wireguard.Tuple]func(){}, clients: map[*tunnel.Tunnel]*admitClient{}, servers: map[net.Conn]struct{}{},
		inflight: map[wgKey]bool{}, retry: map[wgKey]time.Time{}, refused: map[string]uint64{},
		cutQ: map[wgKey][]wireguard.Tuple{}, cutBusy: map[wgKey]bool{}}
	if w.attest == nil {
		att := attest.New(attest.Options{})
		w.attest = func(t wireguard.Tuple, wl node.Workload) (attest.Process, error) { return attestTuple(att, t, wl) }
	}
	w.ctx, w.cancel = context.WithCancel(d.ctx)
	mtu := opts.MTU
	if mtu == 0 {
		mtu = DefaultWireGuardMTU
	}
	inner := opts.TUN
	if inner == nil {
		addrs, routes := d.tunPrefixes()
		kd, err := tundev.Open(d.ctx, tundev.Config{Name: opts.Interface, MTU: mtu, Addrs: addrs, Routes: routes}, d.log)
		if err != nil {
			return fmt.Errorf("daemon: wireguard transport: %w", err)
		}
		w.kdev, inner = kd, kd.TUN()
	}
	w.filter = wireguard.NewFilter(wireguard.FilterConfig{Inner: inner, Admit: w.admitCounted, OnRemove: w.forgotten,
		Clock: d.now, Logger: w.log})
	port := opts.Port
	if port == 0 && d.node.Addr().Port() != 0 && d.node.Addr().Port() < 65535 {
		port = d.node.Addr().Port() + 1
	}
	w.dev, err = wireguard.OpenDevice(wireguard.DeviceConfig{TUN: w.filter, Bind: opts.Bind, Key: kp, Port: port,
		Keepalive: opts.Keepalive, Logger: w.log})
	if err != nil {
		_ = w.filter.Close()
		if w.kdev != nil {
			_ = w.kdev.Close()
		}
		return fmt.Errorf("daemon: wireguard transport: %w", err)
	}
	w.endpoint = netip.AddrPortFrom(d.advertise.Addr(), w.dev.Port())
	if err := d.mux.HandleStream(wireguard.ChannelBinding, w.serveBinding); err != nil {
		w.shutdown()
		return err
	}
	if err := d.mux.HandleStream(wireguard.ChannelAdmit, w.serveAdmit); err != nil {
		w.shutdown()
		return err
	}
	if err := d.mux.HandleStream(wireguard.ChannelCut, w.serveCut); err != nil {
		w.shutdown()
		return err
	}
	d.mu.Lock()
	d.wgt = w
	d.mu.Unlock()
	w.wg.Go(w.loop)
	w.log.Info("wireguard transport up", "key", kp.Public.String(), "endpoint", w.endpoint.String(), "mtu", mtu,
		"direct_read", w.filter.DirectRead())
	return nil
}

// closeWireGuard stops the transport; it is a no-op without one.
func (d *Daemon) closeWireGuard() {
	d.mu.Lock()
	w := d.wgt
	d.wgt = nil
	d.mu.Unlock()
	if w != nil {
		w.shutdown()
	}
}

// WireGuard reports the transport's key, endpoint, peers and filter counters; ok is false when
// the node runs another transport.
func (d *Daemon) WireGuard() (info WireGuardInfo, ok bool) {
	d.mu.Lock()
	w := d.wgt
	d.mu.Unlock()
	if w == nil {
		return WireGuardInfo{}, false
	}
	w.mu.Lock()
	refused := maps.Clone(w.refused)
	cuts := w.cuts
	w.mu.Unlock()
	return WireGuardInfo{Key: w.key.Public, Endpoint: w.endpoint, Peers: w.dev.Peers(), Filter: w.filter.Stats(), Refused: refused, Cuts: cuts}, true
}

// WireGuardInfo is the state of the WireGuard transport.
type WireGuardInfo struct {
	Key      wireguard.Key
	Endpoint netip.AddrPort
	Peers    []wireguard.PeerSpec
	Filter   wireguard.FilterStats
	// Refused counts the outbound tuples this node refused or saw refused, by reason: spoofed,
	// workload, resolve (cross-zone, unknown), transport, peer, or the receiver's dtl reason.
	Refused map[string]uint64
	// Cuts counts the cut notices exchanged with peer nodes.
	Cuts CutNoticeStats
}

// CutNoticeStats count cut notices (control channel 18): a node that cuts an admitted tuple on
// its own decision tells the node at the other end, which cuts its end too.
type CutNoticeStats struct {
	Sent    uint64 // notices written to peer nodes
	Applied uint64 // received notices that cut a tuple admitted with the sender
	Unknown uint64 // received notices of no tuple admitted here (already cut, or idle and forgotten)
	Refused uint64 // received notices of a tuple admitted with another node or zone: dropped, nothing cut
}

// wireguardPolicyApplied re-decides the admitted inbound tuples under the policy now in force
// and recomputes the peers (zones may have gone).
func (d *Daemon) wireguardPolicyApplied() {
	d.mu.Lock()
	w := d.wgt
	d.mu.Unlock()
	if w == nil {
		return
	}
	cut := w.removeFlows(true, func(f *wgFlow) bool { return f.prov != nil && !d.node.FlowAllowed(f.prov) })
	w.sync()
	if cut > 0 {
		w.log.Info("policy change cut wireguard flows", "flows", cut)
	}
}

// tunPrefixes are the kernel interface's addresses (this node's live agents) and routes (its
// zones' CIDRs).
func (d *Daemon) tunPrefixes() (addrs, routes []netip.Prefix) {
	for _, a := range d.node.Snapshot().Agents {
		if !a.Revoked && a.IP.IsValid() {
			addrs = append(addrs, netip.PrefixFrom(a.IP, a.IP.BitLen()))
		}
	}
	pol := d.node.Policy()
	for _, z := range d.node.Endpoint().Zones() {
		if zz, ok := pol.Zone(z); ok {
			routes = append(routes, zz.CIDRs...)
		}
	}
	return addrs, routes
}

func (w *wgTransport) shutdown() {
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		return
	}
	w.closed = true
	var conns []net.Conn
	for c := range w.servers {
		conns = append(conns, c)
	}
	for _, c := range w.clients {
		conns = append(conns, c.c)
	}
	w.mu.Unlock()
	w.d.mux.RemoveStream(wireguard.ChannelBinding)
	w.d.mux.RemoveStream(wireguard.ChannelAdmit)
	w.d.mux.RemoveStream(wireguard.ChannelCut)
	w.cancel()
	for _, c := range conns {
		_ = c.Close()
	}
	w.dev.Close() // closes the filter, which closes the kernel-side device
	w.wg.Wait()
	w.mu.Lock()
	var untrack []func()
	for _, u := range w.flows {
		untrack = append(untrack, u)
	}
	for _, u := range w.watched {
		untrack = append(untrack, u)
	}
	for _, u := range w.agentsW {
		untrack = append(untrack, u)
	}
	w.flows, w.watched, w.agentsW = map[wireguard.Tuple]func(){}, map[string]func(){}, map[netip.Addr]func(){}
	w.mu.Unlock()
	for _, u := range untrack {
		u()
	}
	if w.kdev != nil {
		if err := w.kdev.Close(); err != nil {
			w.log.Warn("remove tun interface", "err", err)
		}
	}
}

// loop exchanges bindings with the zones' gossip members that have none yet (or an old one) and
// keeps the peer set current.
func (w *wgTransport) loop() {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		w.exchangeMembers()
		w.sync()
		select {
		case <-w.ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (w *wgTransport) exchangeMembers() {
	d := w.d
	self := d.node.ID().String()
	now := d.now()
	for _, z := range d.node.Endpoint().Zones() {
		for _, m := range d.members(z) {
			if m.NodeID == self {
				continue
			}
			k := wgKey{m.NodeID, z}
			w.mu.Lock()
			p, have := w.bindings[k]
			fresh := have && p.b.Expires.Sub(now) > wireguard.BindingLifetime/4
			start := !fresh && !w.inflight[k] && !now.Before(w.retry[k]) && !w.closed
			if start {
				w.inflight[k] = true
			}
			w.mu.Unlock()
			if !start {
				continue
			}
			w.wg.Go(func() {
				ctx, cancel := context.WithTimeout(w.ctx, 5*time.Second)
				err := w.exchange(ctx, k.node, k.zone)
				cancel()
				w.mu.Lock()
				delete(w.inflight, k)
				if err != nil {
					w.retry[k] = d.now().Add(5 * time.Second)
				}
				w.mu.Unlock()
				if err != nil {
					w.log.Debug("key binding exchange", "peer", k.node, "zone", k.zone, "err", err)
				}
			})
		}
	}
}

// ownBinding is this node's signed binding for the zones it serves, re-signed when half-way to
// its expiry, when its zones change, or when the node certificate was renewed: a peer verifies
// the binding against the certificate the tunnel's handshake proved, which after a renewal is the
// new one (with a new key), so a binding signed with the old key would be refused.
func (w *wgTransport) ownBinding() ([]byte, error) {
	d := w.d
	zones := d.node.Endpoint().Zones()
	now := d.now()
	cert, key, err := d.node.Credentials()
	if err != nil {
		return nil, err
	}
	w.mu.Lock()
	if w.own != nil && w.ownCert == cert && slices.Equal(w.ownZones, zones) && now.Sub(w.ownAt) < wireguard.BindingLifetime/2 {
		raw := w.own
		w.mu.Unlock()
		return raw, nil
	}
	w.mu.Unlock()
	exp := now.Add(wireguard.BindingLifetime)
	if cert.X509.NotAfter.Before(exp) {
		exp = cert.X509.NotAfter
	}
	raw, err := wireguard.SignBinding(wireguard.Binding{Node: cert.ID.String(), Zones: zones, Key: w.key.Public,
		Endpoint: w.endpoint, IssuedAt: now, Expires: exp}, key)
	if err != nil {
		return nil, err
	}
	w.mu.Lock()
	w.own, w.ownAt, w.ownZones, w.ownCert = raw, now, zones, cert
	w.mu.Unlock()
	return raw, nil
}

// exchange sends this node's binding to node over the zone's tunnel and verifies the answer.
func (w *wgTransport) exchange(ctx context.Context, nodeID, zone string) error {
	t, err := w.d.node.Tunnel(ctx, nodeID, zone)
	if err != nil {
		return err
	}
	if t.Stale() {
		// The peer checks the binding against the certificate this tunnel was opened with, and
		// the node key that signed it has been renewed since.
		_ = t.Close()
		if t, err = w.d.node.Tunnel(ctx, nodeID, zone); err != nil {
			return err
		}
	}
	return w.exchangeOn(ctx, t)
}

// exchangeOn sends this node's binding over t and verifies the answer against the certificate
// t's handshake proved. A peer that renewed its certificate since that handshake cannot sign an
// answer that verifies here (its old key is gone); it pushes its binding over a fresh tunnel
// instead (serveBinding) and closes this stream without an answer, so a binding installed for
// the peer while this exchange waited is its answer.
func (w *wgTransport) exchangeOn(ctx context.Context, t *tunnel.Tunnel) error {
	nodeID, zone := t.Peer().NodeID, t.Zone()
	own, err := w.ownBinding()
	if err != nil {
		return err
	}
	w.mu.Lock()
	before := w.bindings[wgKey{nodeID, zone}].b
	w.mu.Unlock()
	c, err := t.OpenControl(ctx, wireguard.ChannelBinding)
	if err != nil {
		return err
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	if err := wireguard.WriteHello(c, own); err != nil {
		return fmt.Errorf("%w: %s: %w", ErrTransportMismatch, nodeID, err)
	}
	raw, err := wireguard.ReadHello(c)
	if err != nil {
		w.mu.Lock()
		after := w.bindings[wgKey{nodeID, zone}].b
		w.mu.Unlock()
		if after != nil && after != before {
			return nil // pushed over a tunnel that proves the peer's current certificate
		}
		if ctx.Err() != nil {
			return err
		}
		return fmt.Errorf("%w: %s refused the key-binding channel: %w", ErrTransportMismatch, nodeID, err)
	}
	if len(raw) == 0 {
		return fmt.Errorf("%w: %s", ErrTransportMismatch, nodeID)
	}
	return w.acceptBinding(t, raw)
}

// serveBinding answers a peer's binding hello with this node's.
func (w *wgTransport) serveBinding(t *tunnel.Tunnel, c net.Conn) {
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	raw, err := wireguard.ReadHello(c)
	if err != nil {
		return
	}
	if err := w.acceptBinding(t, raw); err != nil {
		w.log.Warn("key binding refused", "peer", t.Peer().NodeID, "zone", t.Zone(), "err", err)
		return // no answer: a node whose binding is refused learns nothing of ours
	}
	if t.Stale() {
		// This node renewed its certificate (and node key) since t's handshake: the peer
		// verifies our answer against the certificate t proved, which the key now signing no
		// longer matches, and must refuse it. Push the binding over a tunnel that proves the
		// current certificate, before closing this stream unanswered: the peer's exchange finds
		// the pushed binding installed when its read ends.
		w.pushBinding(t.Peer().NodeID, t.Zone())
		return
	}
	own, err := w.ownBinding()
	if err != nil {
		return
	}
	_ = wireguard.WriteHello(c, own)
}

// pushBinding runs the binding exchange with nodeID in zone over a fresh tunnel, unless one is
// already running (a peer opening many binding streams on a stale tunnel gets one exchange).
func (w *wgTransport) pushBinding(nodeID, zone string) {
	k := wgKey{nodeID, zone}
	w.mu.Lock()
	if w.inflight[k] || w.closed {
		w.mu.Unlock()
		return
	}
	w.inflight[k] = true
	w.mu.Unlock()
	ctx, cancel := context.WithTimeout(w.ctx, 4*time.Second)
	err := w.exchange(ctx, nodeID, zone)
	cancel()
	w.mu.Lock()
	delete(w.inflight, k)
	w.mu.Unlock()
	if err != nil {
		w.log.Debug("key binding push after renewal", "peer", nodeID, "zone", zone, "err", err)
	}
}

// acceptBinding verifies raw against the certificate t's handshake proved and records it.
func (w *wgTransport) acceptBinding(t *tunnel.Tunnel, raw []byte) error {
	d := w.d
	cert, _ := t.Peer().Info.(*identity.Certificate)
	b, err := wireguard.VerifyBinding(raw, cert, t.Zone(), d.now())
	if err != nil {
		return err
	}
	if b.Key == w.key.Public {
		return fmt.Errorf("%w: %s presented this node's own key", wireguard.ErrBindingKey, b.Node)
	}
	ids := []string{cert.ID.String(), record.SerialKey(cert.Serial())}
	watch := ids[0] + " " + ids[1]
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		return errors.New("daemon: wireguard transport closed")
	}
	w.bindings[wgKey{b.Node, t.Zone()}] = wgPeer{b: b, cert: cert}
	_, watching := w.watched[watch]
	w.mu.Unlock()
	if !watching {
		untrack, revoked := d.node.TrackFlow(ids, func() { w.dropNode(b.Node) })
		w.mu.Lock()
		if _, dup := w.watched[watch]; dup || w.closed {
			w.mu.Unlock()
			untrack()
		} else {
			w.watched[watch] = untrack
			w.mu.Unlock()
		}
		if revoked {
			w.dropNode(b.Node)
			return fmt.Errorf("%w: node %s", dtl.ErrRevoked, b.Node)
		}
	}
	w.sync()
	return nil
}

// dropNode removes a revoked node's peer, bindings and tuples; the node's revocation calls it
// before returning, so no packet of that node passes afterwards.
func (w *wgTransport) dropNode(nodeID string) {
	w.syncMu.Lock()
	w.dev.RemoveNode(nodeID)
	w.mu.Lock()
	for k := range w.bindings {
		if k.node == nodeID {
			delete(w.bindings, k)
		}
	}
	var untrack []func()
	for a := range w.agents[nodeID] {
		if u := w.agentsW[a]; u != nil {
			untrack = append(untrack, u)
			delete(w.agentsW, a)
		}
	}
	delete(w.agents, nodeID)
	w.mu.Unlock()
	w.syncMu.Unlock()
	for _, u := range untrack {
		u()
	}
	// No cut notice: the peer is the one revoked, and its tunnels are being closed.
	w.removeFlows(false, func(f *wgFlow) bool { return f.node == nodeID })
}

// dropAgent removes a revoked agent's address from its node's allowed IPs; the agent's
// revocation calls it before returning, so the device routes nothing to that address and
// accepts nothing from it afterwards (its tuples are cut by their own watches).
func (w *wgTransport) dropAgent(nodeID string, ip netip.Addr) {
	w.syncMu.Lock()
	w.mu.Lock()
	delete(w.agents[nodeID], ip)
	untrack := w.agentsW[ip]
	delete(w.agentsW, ip)
	w.mu.Unlock()
	w.dev.RemoveAllowedIP(ip)
	w.syncMu.Unlock()
	if untrack != nil {
		untrack()
	}
}

// sync recomputes the peer set and applies it.
func (w *wgTransport) sync() {
	d := w.d
	w.syncMu.Lock()
	defer w.syncMu.Unlock()
	now := d.now()
	var ms []wireguard.Member
	revokedAgents := map[netip.Addr]string{} // address → its node
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		return
	}
	for k, p := range w.bindings {
		if !now.Before(p.b.Expires) || !now.Before(p.cert.X509.NotAfter) {
			delete(w.bindings, k)
			continue
		}
		if d.node.Revoked(p.cert.ID.String(), record.SerialKey(p.cert.Serial())) {
			continue
		}
		g, _ := p.cert.Claims.Zone(k.zone)
		var agents []netip.Addr
		for a, ids := range w.agents[k.node] {
			if d.node.Revoked(ids...) {
				revokedAgents[a] = k.node
			}
			agents = append(agents, a)
		}
		ms = append(ms, wireguard.Member{Zone: k.zone, Binding: p.b, Prefixes: g.Prefixes, Agents: agents})
	}
	w.mu.Unlock()
	specs, conflicts := wireguard.ComputePeers(w.key.Public, d.node.Endpoint().Zones(), ms, wireguard.Exclude{
		Agent: func(n string, a netip.Addr) bool { return revokedAgents[a] == n },
	})
	for _, c := range conflicts {
		w.log.Warn("wireguard key bound by several nodes: none of them is a peer", "key", c.Key.String(), "nodes", c.Nodes)
	}
	if err := w.dev.Apply(specs); err != nil {
		w.log.Error("wireguard peers", "err", err)
	}
}

// hasPeer reports whether node is a configured peer whose allowed IPs include ip.
func (w *wgTransport) hasPeer(nodeID string, ip netip.Addr) bool {
	pfx := netip.PrefixFrom(ip, ip.BitLen())
	for _, p := range w.dev.Peers() {
		if p.Node == nodeID {
			return slices.Contains(p.AllowedIPs, pfx)
		}
	}
	return false
}

// addAgent records ip as an address of nodeID's agent whose revocation keys are ids, and
// watches them: the agent's revocation removes the address from the node's allowed IPs at once.
// It reports false when the agent is already revoked.
func (w *wgTransport) addAgent(nodeID string, ip netip.Addr, ids []string) bool {
	ip = ip.Unmap()
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		return false
	}
	set := w.agents[nodeID]
	if set == nil {
		set = map[netip.Addr][]string{}
		w.agents[nodeID] = set
	}
	set[ip] = ids
	_, watching := w.agentsW[ip]
	w.mu.Unlock()
	if watching || len(ids) == 0 {
		return !w.d.node.Revoked(ids...)
	}
	untrack, revoked := w.d.node.TrackFlow(ids, func() { w.dropAgent(nodeID, ip) })
	w.mu.Lock()
	if _, dup := w.agentsW[ip]; dup || w.closed {
		w.mu.Unlock()
		untrack()
	} else {
		w.agentsW[ip] = untrack
		w.mu.Unlock()
	}
	if revoked {
		w.dropAgent(nodeID, ip)
		return false
	}
	return true
}

func (w *wgTransport) hasBinding(nodeID, zone string) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	_, ok := w.bindings[wgKey{nodeID, zone}]
	return ok
}

// admitCounted is admitOutbound with its refusals counted by reason.
func (w *wgTransport) admitCounted(ctx context.Context, t wireguard.Tuple) error {
	err := w.admitOutbound(ctx, t)
	if err == nil {
		return nil
	}
	reason := "internal"
	var rej *dtl.RejectError
	switch {
	case errors.Is(err, node.ErrNotAgentAddr):
		reason = "spoofed"
	case errors.Is(err, attest.ErrMismatch), errors.Is(err, attest.ErrNoOwner), errors.Is(err, attest.ErrPIDReused), errors.Is(err, attest.ErrUnreadable):
		reason = "workload"
	case errors.Is(err, node.ErrCrossZone), errors.Is(err, node.ErrUnknownName):
		reason = "resolve"
	case errors.Is(err, ErrTransportMismatch):
		reason = "transport"
	case errors.Is(err, ErrNoPeer), errors.Is(err, ErrLocalFlow):
		reason = "peer"
	case errors.As(err, &rej):
		reason = rej.Code.String()
	case errors.Is(err, dtl.ErrRevoked):
		reason = "revoked"
	}
	w.mu.Lock()
	w.refused[reason]++
	w.mu.Unlock()
	w.log.Debug("flow refused", "flow", t.String(), "reason", reason, "err", err)
	return err
}

// admitOutbound is the filter's Admit hook for a new tuple leaving the interface: the source
// must be an agent of this node, its process the enrolled workload, the destination an agent of
// the same zone on a WireGuard peer; then the record goes to the destination's node, which
// admits the tuple or refuses it.
func (w *wgTransport) admitOutbound(ctx context.Context, t wireguard.Tuple) error {
	d := w.d
	a, wl, err := d.node.AgentByAddr(t.Src)
	if err != nil {
		d.metrics.FlowDenied("spoofed")
		return err
	}
	if wl.Digest != nil {
		if p, err := w.attest(t, wl); err != nil {
			d.workloadRefused(a.Name()+"."+a.Zone(), t.Source(), p, err)
			return err
		}
	}
	pp, err := a.ResolveAddr(ctx, t.Destination())
	if err != nil {
		d.metrics.FlowDenied("resolve")
		return err
	}
	if pp.Node == "" {
		return fmt.Errorf("%w: %s", ErrLocalFlow, t)
	}
	if d.node.Revoked(pp.RevocationIDs...) {
		return fmt.Errorf("%w: destination %s.%s is revoked", dtl.ErrRevoked, pp.Agent, pp.Zone)
	}
	tn, err := d.node.Tunnel(ctx, pp.Node, pp.Zone)
	if err != nil {
		return err
	}
	if !w.hasBinding(pp.Node, pp.Zone) {
		if err := w.exchange(ctx, pp.Node, pp.Zone); err != nil {
			return err
		}
	}
	if !w.addAgent(pp.Node, pp.IP, pp.RevocationIDs) {
		return fmt.Errorf("%w: destination %s.%s is revoked", dtl.ErrRevoked, pp.Agent, pp.Zone)
	}
	w.sync()
	if !w.hasPeer(pp.Node, pp.IP) {
		return fmt.Errorf("%w: %s (agent %s at %s)", ErrNoPeer, pp.Node, pp.Agent, pp.IP)
	}
	dst := dtl.Destination{Agent: pp.Agent, Port: t.DstPort, Proto: dtl.Proto(t.Proto)}
	err = a.OpenTuple(ctx, tn, dst, func(ctx context.Context, rec []byte) error {
		c, err := w.client(ctx, tn)
		if err != nil {
			return err
		}
		return c.request(ctx, t, rec)
	})
	if err != nil {
		return err
	}
	// Either end's revocation cuts the tuple: the source agent's (or its node's) and the
	// destination agent's (or its node's).
	return w.admitted(t, &wgFlow{node: pp.Node, zone: pp.Zone, outbound: true}, append(a.RevocationIDs(), pp.RevocationIDs...))
}

// admitted puts an admitted tuple in the filter and under the node's revocation watch (ids).
func (w *wgTransport) admitted(t wireguard.Tuple, f *wgFlow, ids []string) error {
	if f.outbound {
		w.filter.AddOutbound(t, f)
	} else {
		w.filter.AddInbound(t, f)
	}
	untrack, revoked := w.d.node.TrackFlow(ids, func() { w.cut(t) })
	w.mu.Lock()
	old := w.flows[t]
	w.flows[t] = untrack
	w.mu.Unlock()
	if old != nil {
		old()
	}
	if revoked {
		w.cut(t)
		return fmt.Errorf("%w: revoked while admitting %s", dtl.ErrRevoked, t)
	}
	return nil
}

// cut removes one tuple (one of its ends was revoked); the filter resets a TCP flow's local end,
// and the node at the other end is told, since it may not have decided the cut itself (a trust
// isolation local to this node).
func (w *wgTransport) cut(t wireguard.Tuple) {
	info, ok := w.filter.Remove(t)
	w.forget(t)
	if f, isFlow := info.(*wgFlow); ok && isFlow {
		w.notifyCuts(map[wgKey][]wireguard.Tuple{{f.node, f.zone}: {t}})
	}
}

// attestTuple finds the process that owns the local socket of an outgoing tuple and checks it
// is the agent's enrolled workload.
func attestTuple(att *attest.Attester, t wireguard.Tuple, wl node.Workload) (attest.Process, error) {
	want := attest.Expected{Digest: wl.Digest, UID: wl.UID, GID: wl.GID, Exe: wl.Exe}
	if t.Proto == wireguard.ProtoTCP {
		return att.Verify(t.Source(), t.Destination(), want)
	}
	return att.VerifyUDP(t.Source(), t.Destination(), want)
}

func (w *wgTransport) forget(t wireguard.Tuple) {
	w.mu.Lock()
	untrack := w.flows[t]
	delete(w.flows, t)
	w.mu.Unlock()
	if untrack != nil {
		untrack()
	}
}

// forgotten is the filter's OnRemove hook (idle tuples).
func (w *wgTransport) forgotten(t wireguard.Tuple, _ any) { w.forget(t) }

// removeFlows removes the tuples whose flow match selects and returns how many; with notify, the
// nodes at their other ends are sent cut notices.
func (w *wgTransport) removeFlows(notify bool, match func(*wgFlow) bool) int {
	var gone []wireguard.Tuple
	peers := map[wgKey][]wireguard.Tuple{}
	n := w.filter.RemoveMatching(func(t wireguard.Tuple, info any) bool {
		f, ok := info.(*wgFlow)
		if ok && match(f) {
			gone = append(gone, t)
			k := wgKey{f.node, f.zone}
			peers[k] = append(peers[k], t)
			return true
		}
		return false
	})
	for _, t := range gone {
		w.forget(t)
	}
	if notify {
		w.notifyCuts(peers)
	}
	return n
}

// notifyCuts sends each peer node the cut notices of its tuples, in the background: it runs
// inside revocations and policy changes, which must not wait for a peer. One sender per peer and
// zone takes everything queued for it, so that a revocation cutting many tuples one by one opens
// a few streams, not one each (the peer refuses control streams over 16 at once). A notice that
// is lost (no tunnel, peer gone) costs what it did before notices existed: the peer's program
// waits for its own timeout.
func (w *wgTransport) notifyCuts(peers map[wgKey][]wireguard.Tuple) {
	for k, ts := range peers {
		if k.zone == "" || w.d.node.Revoked(k.node) {
			continue
		}
		w.mu.Lock()
		if w.closed {
			w.mu.Unlock()
			return
		}
		// Bounded: a peer that does not answer keeps at most one stream's worth queued.
		q := append(w.cutQ[k], ts...)
		w.cutQ[k] = q[max(0, len(q)-wireguard.MaxCutNotices):]
		if !w.cutBusy[k] {
			w.cutBusy[k] = true
			w.wg.Go(func() { w.cutSender(k) })
		}
		w.mu.Unlock()
	}
}

// cutSender sends k's queued cut notices until none is left.
func (w *wgTransport) cutSender(k wgKey) {
	for {
		w.mu.Lock()
		ts := w.cutQ[k]
		delete(w.cutQ, k)
		if len(ts) == 0 || w.closed {
			delete(w.cutBusy, k)
			w.mu.Unlock()
			return
		}
		w.mu.Unlock()
		ctx, cancel := context.WithTimeout(w.ctx, 5*time.Second)
		err := w.sendCuts(ctx, k.node, k.zone, ts)
		cancel()
		if err != nil {
			w.log.Debug("cut notice not sent", "peer", k.node, "zone", k.zone, "flows", len(ts), "err", err)
		}
	}
}

// sendCuts writes the cut notices of ts to nodeID over the zone's tunnel (control channel 18).
func (w *wgTransport) sendCuts(ctx context.Context, nodeID, zone string, ts []wireguard.Tuple) error {
	t, err := w.d.node.Tunnel(ctx, nodeID, zone)
	if err != nil {
		return err
	}
	c, err := t.OpenControl(ctx, wireguard.ChannelCut)
	if err != nil {
		return err
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	var b []byte
	for _, tp := range ts[:min(len(ts), wireguard.MaxCutNotices)] {
		if b, err = wireguard.AppendCut(b, tp); err != nil {
			return err
		}
	}
	if _, err := c.Write(b); err != nil {
		return err
	}
	if err := c.CloseWrite(); err != nil {
		return err
	}
	// Wait for the peer's end of stream: it has read (and applied) every notice by then.
	_, _ = c.Read(make([]byte, 1))
	w.mu.Lock()
	w.cuts.Sent += uint64(min(len(ts), wireguard.MaxCutNotices))
	w.mu.Unlock()
	return nil
}

// serveCut applies a peer node's cut notices. The tunnel authenticates the sender; a notice cuts
// only a tuple admitted with that node in that zone, so no node can cut another node's flows.
func (w *wgTransport) serveCut(t *tunnel.Tunnel, c net.Conn) {
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	peer, zone := t.Peer().NodeID, t.Zone()
	for range wireguard.MaxCutNotices {
		tp, err := wireguard.ReadCut(c)
		if err != nil {
			if !errors.Is(err, io.EOF) {
				w.log.Debug("cut notice stream", "peer", peer, "err", err)
			}
			break
		}
		found, removed := w.filter.RemoveIf(tp, func(info any) bool {
			f, ok := info.(*wgFlow)
			return ok && f.node == peer && f.zone == zone
		})
		w.mu.Lock()
		switch {
		case removed:
			w.cuts.Applied++
		case found:
			w.cuts.Refused++
		default:
			w.cuts.Unknown++
		}
		w.mu.Unlock()
		if removed {
			w.forget(tp)
		} else if found {
			w.log.Warn("cut notice for a flow not admitted with the sender: dropped", "peer", peer, "zone", zone, "flow", tp.String())
		}
	}
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
	}
}

// serveAdmit answers a peer's admission requests on one control stream, in order.
func (w *wgTransport) serveAdmit(t *tunnel.Tunnel, c net.Conn) {
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		_ = c.Close()
		return
	}
	w.servers[c] = struct{}{}
	w.mu.Unlock()
	defer func() {
		w.mu.Lock()
		delete(w.servers, c)
		w.mu.Unlock()
		_ = c.Close()
	}()
	var out []byte
	for {
		req, err := wireguard.ReadRequest(c)
		if err != nil {
			return
		}
		v := wireguard.Verdict{ID: req.ID}
		if err := w.admitInbound(t, req); err != nil {
			if v.Reject, err = dtl.Deny(err).RejectBody(); err != nil {
				v.Reject, _ = dtl.EncodeReject(dtl.ReasonInternal, "")
			}
		}
		if out, err = wireguard.AppendVerdict(out[:0], v); err != nil {
			return
		}
		if _, err := c.Write(out); err != nil {
			return
		}
	}
}

// admitInbound admits one tuple a peer's agent opens toward an agent of this node.
func (w *wgTransport) admitInbound(t *tunnel.Tunnel, req wireguard.Request) error {
	d := w.d
	peer := t.Peer().NodeID
	if !w.hasBinding(peer, t.Zone()) {
		return dtl.Deny(fmt.Errorf("%w: %w: %s has no verified WireGuard key binding in zone %s", dtl.ErrUnreachable, ErrNoPeer, peer, t.Zone()))
	}
	prov, err := d.node.AdmitTuple(w.ctx, t, req.Record, req.Tuple.Source(), req.Tuple.Destination(), dtl.Proto(req.Tuple.Proto))
	if err != nil {
		return err
	}
	if !w.addAgent(peer, prov.SourceIP, prov.RevocationIDs()) {
		return dtl.Deny(fmt.Errorf("%w: source agent of %s", dtl.ErrRevoked, req.Tuple))
	}
	w.sync()
	if !w.hasPeer(peer, prov.SourceIP) {
		return dtl.Deny(fmt.Errorf("%w: %w: %s", dtl.ErrUnreachable, ErrNoPeer, peer))
	}
	ids := prov.RevocationIDs()
	if dst, _, err := d.node.AgentByAddr(req.Tuple.Dst); err == nil {
		ids = append(ids, dst.RevocationIDs()...) // the local destination's revocation cuts it too
	}
	return w.admitted(req.Tuple, &wgFlow{node: peer, zone: t.Zone(), prov: prov}, ids)
}

// admitClient is the sending side of one tunnel's admission stream: requests are pipelined and
// verdicts matched by id.
type admitClient struct {
	w    *wgTransport
	c    *tunnel.ControlConn
	wmu  sync.Mutex
	mu   sync.Mutex
	next uint32
	wait map[uint32]chan wireguard.Verdict
	err  error
}

var errAdmitClosed = errors.New("daemon: admission stream closed")

// client returns t's admission stream, opening it on first use.
func (w *wgTransport) client(ctx context.Context, t *tunnel.Tunnel) (*admitClient, error) {
	w.mu.Lock()
	if c := w.clients[t]; c != nil {
		w.mu.Unlock()
		return c, nil
	}
	w.mu.Unlock()
	cc, err := t.OpenControl(ctx, wireguard.ChannelAdmit)
	if err != nil {
		return nil, err
	}
	c := &admitClient{w: w, c: cc, wait: map[uint32]chan wireguard.Verdict{}}
	w.mu.Lock()
	if old := w.clients[t]; old != nil || w.closed {
		w.mu.Unlock()
		_ = cc.Close()
		if old == nil {
			return nil, errAdmitClosed
		}
		return old, nil
	}
	w.clients[t] = c
	w.mu.Unlock()
	w.wg.Go(func() { c.readLoop(t) })
	return c, nil
}

func (c *admitClient) readLoop(t *tunnel.Tunnel) {
	w := c.w
	var err error
	for {
		var v wireguard.Verdict
		if v, err = wireguard.ReadVerdict(c.c); err != nil {
			break
		}
		c.mu.Lock()
		ch := c.wait[v.ID]
		delete(c.wait, v.ID)
		c.mu.Unlock()
		if ch != nil {
			ch <- v
		}
	}
	w.mu.Lock()
	if w.clients[t] == c {
		delete(w.clients, t)
	}
	w.mu.Unlock()
	_ = c.c.Close()
	c.mu.Lock()
	c.err = fmt.Errorf("%w: %w", errAdmitClosed, err)
	for id, ch := range c.wait {
		close(ch)
		delete(c.wait, id)
	}
	c.mu.Unlock()
}

// request sends one admission request and waits for its verdict.
func (c *admitClient) request(ctx context.Context, t wireguard.Tuple, rec []byte) error {
	ch := make(chan wireguard.Verdict, 1)
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return c.err
	}
	c.next++
	id := c.next
	c.wait[id] = ch
	c.mu.Unlock()
	b, err := wireguard.AppendRequest(nil, wireguard.Request{ID: id, Tuple: t, Record: rec})
	if err == nil {
		c.wmu.Lock()
		_, err = c.c.Write(b)
		c.wmu.Unlock()
	}
	if err != nil {
		c.mu.Lock()
		delete(c.wait, id)
		c.mu.Unlock()
		return err
	}
	select {
	case v, ok := <-ch:
		if !ok {
			c.mu.Lock()
			defer c.mu.Unlock()
			return c.err
		}
		if len(v.Reject) == 0 {
			return nil
		}
		rej, err := dtl.DecodeReject(v.Reject)
		if err != nil {
			return fmt.Errorf("%w: %w", dtl.ErrMalformed, err)
		}
		return rej
	case <-ctx.Done():
		c.mu.Lock()
		delete(c.wait, id)
		c.mu.Unlock()
		return ctx.Err()
	}
}

// wgAgentAdded puts an agent added through the local API on the WireGuard transport's kernel
// interface at once. The filter finds local agents by address through the node, so the address is
// all that was missing: without it the kernel never routes the agent's packets into the device.
func (d *Daemon) wgAgentAdded(st *state.Agent) {
	d.mu.Lock()
	w := d.wgt
	d.mu.Unlock()
	if w == nil || w.kdev == nil || d.agentRevoked(st) {
		return
	}
	if err := w.kdev.AddAddr(netip.PrefixFrom(st.IP, st.IP.BitLen())); err != nil {
		d.log.Error("new agent not on the wireguard interface; it is at the daemon's next start", "agent", st.Name+"."+st.Zone, "err", err)
	}
}
