package node

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"github.com/ute-project/ute/overlay/dtl"
	"github.com/ute-project/ute/overlay/tunnel"
)

// Admission of packet flows that another data plane carries (the WireGuard transport): the
// sending node signs the source agent's DTL record on the zone's tunnel session exactly as Dial
// does, sends it over a control stream with the flow's 5-tuple, and the receiving node verifies
// it here in dtl's order and checks that the 5-tuple is the one the record and the certificates
// describe. The packets themselves never touch this package.

// ErrNotAgentAddr is returned for an overlay address that is not one of this node's agents (a
// spoofed source).
var ErrNotAgentAddr = errors.New("node: address is not an agent of this node")

// Workload is an agent's enrolled workload, for attesting the process behind a flow.
type Workload struct {
	Digest   []byte // the fingerprint digest of the agent certificate; nil when none is enrolled
	UID, GID uint32
	Exe      string
}

// AgentByAddr returns the local agent whose overlay address is ip, with its enrolled workload.
func (n *Node) AgentByAddr(ip netip.Addr) (*Agent, Workload, error) {
	ip = ip.Unmap()
	n.mu.Lock()
	var key agentKey
	var w Workload
	found := false
	for k, st := range n.agents {
		if st.IP == ip {
			key, found = k, true
			w = Workload{UID: st.UID, GID: st.GID, Exe: st.Exe}
			if d, err := hex.DecodeString(st.Workload); err == nil && len(d) > 0 {
				w.Digest = d
			}
			break
		}
	}
	n.mu.Unlock()
	if !found {
		return nil, Workload{}, fmt.Errorf("%w: %s", ErrNotAgentAddr, ip)
	}
	a, err := n.Agent(key.zone, key.name)
	if err != nil {
		return nil, Workload{}, err
	}
	return a, w, nil
}

// PacketPeer is the destination of a packet flow as the zone's directory names it.
type PacketPeer struct {
	Zone, Agent string
	Node        string // hosting node's SPIFFE ID; "" for an agent of this node
	IP          netip.Addr
	// RevocationIDs are the keys whose revocation ends flows to this destination: the agent's
	// SPIFFE ID, its certificate serial (bare and as issued by its node) and its node's ID. Empty
	// for an agent of this node.
	RevocationIDs []string
}

// ResolveAddr names the agent behind dst in a's zone (refreshing the zone's directory on a miss):
// an address in another zone is ErrCrossZone, an unknown one ErrUnknownName, both inside a
// *RefusedError. A revoked source agent is refused with dtl.ErrRevoked.
func (a *Agent) ResolveAddr(ctx context.Context, dst netip.AddrPort) (PacketPeer, error) {
	if err := a.n.usable(); err != nil {
		return PacketPeer{}, err
	}
	if a.n.isRevoked(a.revocationIDs()...) {
		return PacketPeer{}, fmt.Errorf("%w: %s or its node is revoked", dtl.ErrRevoked, a.id)
	}
	d, err := a.resolve(ctx, netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port()).String())
	if err != nil {
		return PacketPeer{}, err
	}
	pp := PacketPeer{Zone: d.zone, Agent: d.name, Node: d.node, IP: d.ip}
	if d.node != "" {
		a.n.mu.Lock()
		if e, ok := a.n.view[d.zone][d.name]; ok && e.node == d.node {
			pp.RevocationIDs = []string{e.agent, e.serial, e.serial + "@" + e.node, e.node}
		}
		a.n.mu.Unlock()
		if pp.RevocationIDs == nil {
			pp.RevocationIDs = []string{d.node}
		}
	}
	return pp, nil
}

// OpenTuple signs the record of a flow from a to dst on t's session and hands it to send, which
// delivers it to the receiving node and returns its verdict (an error matching the dtl sentinel
// of a refusal). A record naming its chain by hash that the receiver no longer caches is resent
// once with the full chain, as Dial does.
func (a *Agent) OpenTuple(ctx context.Context, t *tunnel.Tunnel, dst dtl.Destination, send func(ctx context.Context, rec []byte) error) error {
	return a.openFlowWithChain(ctx, t, dst, func(rec []byte, _ uint64) error { return send(ctx, rec) })
}

// RevocationIDs are the identities whose revocation ends a's flows (agent, serials, node).
func (a *Agent) RevocationIDs() []string { return a.revocationIDs() }

// RevocationIDs are the identities of the flow's source whose revocation ends it.
func (p *Provenance) RevocationIDs() []string { return slices.Clone(p.ids) }

// AdmitTuple verifies rec, received on tunnel t with a packet flow's 5-tuple (src -> dst, proto),
// in dtl's order (chain, signature bound to t's session, peer, zone, claims, revocation, zones
// policy with the trust gate, freshness, replay), then checks that the tuple is the record's:
// src is the source agent certificate's overlay address, dst the address of the destination
// agent, hosted here, and the port and protocol are the record's. The verdict is audited like
// every flow verdict. Nothing is delivered: the caller's filter passes the tuple's packets.
func (n *Node) AdmitTuple(ctx context.Context, t *tunnel.Tunnel, rec []byte, src, dst netip.AddrPort, proto dtl.Proto) (*Provenance, error) {
	zone, peer := t.Zone(), t.Peer().NodeID
	prov, err := n.admitTuple(t, rec, src, dst, proto)
	p := prov
	if p == nil && err != nil {
		p = partialProvenance(rec)
	}
	n.auditVerdict(ctx, peer, zone, p, err)
	if err != nil {
		return nil, dtl.Deny(err)
	}
	return prov, nil
}

func (n *Node) admitTuple(t *tunnel.Tunnel, rec []byte, src, dst netip.AddrPort, proto dtl.Proto) (*Provenance, error) {
	if n.isClosed() {
		return nil, fmt.Errorf("%w: %w", dtl.ErrConfig, ErrClosed)
	}
	n.track(t)
	s := n.session(t.Zone(), t.Peer().NodeID, t.Exporter())
	ok, err := n.admit.Admit(&s.dtl, rec)
	if err != nil {
		return nil, err
	}
	prov, err := newProvenance(ok)
	if err != nil {
		return nil, err
	}
	prov.recordSize = len(rec)
	c := ok.Claims()
	if c.Destination.Agent == directoryAgent {
		return prov, fmt.Errorf("%w: the directory is not a packet destination", dtl.ErrUnreachable)
	}
	if c.Destination.Proto != proto || c.Destination.Port != dst.Port() {
		return prov, fmt.Errorf("%w: record names %s, the flow goes to port %d/%s", dtl.ErrClaimMismatch, c.Destination, dst.Port(), proto)
	}
	if prov.SourceIP != src.Addr().Unmap() {
		return prov, fmt.Errorf("%w: the flow comes from %s, agent %s holds %s", dtl.ErrClaimMismatch, src.Addr(), prov.Agent, prov.SourceIP)
	}
	n.mu.Lock()
	d := n.agents[agentKey{t.Zone(), c.Destination.Agent}]
	n.mu.Unlock()
	if d == nil || d.IP != dst.Addr().Unmap() {
		return prov, fmt.Errorf("%w: %s is not %s of zone %s on this node", dtl.ErrUnreachable, dst.Addr(), c.Destination.Agent, t.Zone())
	}
	return prov, nil
}

// TrackFlow registers a flow another data plane carries, so that a revocation of any of ids
// (ApplyRevocation, Revoke, a TrustFlow isolation) calls abort before it returns. It reports
// whether ids were already revoked, in which case the caller must abort the flow itself (the
// revocation may have run before the registration). untrack forgets the flow.
func (n *Node) TrackFlow(ids []string, abort func()) (untrack func(), revoked bool) {
	f := &liveFlow{ids: slices.Clone(ids), abort: abort}
	n.trackFlow(f)
	return func() { n.untrackFlow(f) }, n.isRevoked(f.ids...)
}

// FlowAllowed re-decides an admitted flow under the policy in force, exactly as admission would
// now (a policy release calls for it).
func (n *Node) FlowAllowed(p *Provenance) bool {
	return n.flowAllowed(n.pol(), tunnel.Admission{Info: p})
}
