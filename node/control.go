package node

import (
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sort"
	"strconv"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/identity/record"
	"github.com/ute-project/ute/overlay/audit"
	"github.com/ute-project/ute/overlay/dtl"
	"github.com/ute-project/ute/overlay/tunnel"
	"github.com/ute-project/ute/zones"
)

// The daemon's view of a node: what node/daemon calls to reload policy, register agents added
// while the node runs, and report state through the local API. Nothing here decides policy or
// verifies signatures; the daemon hands in a policy it has verified.

// EventPolicy is the audit event of an applied policy.
const EventPolicy = "policy"

// pol is the policy in force; SetPolicy replaces it whole, so a reader never sees half of one.
func (n *Node) pol() *zones.Policy { return n.policy.Load() }

// Policy is the policy in force.
func (n *Node) Policy() *zones.Policy { return n.pol() }

// PolicyResult reports what SetPolicy tore down.
type PolicyResult struct {
	TunnelsClosed int
	FlowsCut      int
	Zones         []string // the zones the node serves under the new policy
}

// SetPolicy puts next in force and applies its reload plan at once: the endpoint stops offering
// zones the policy no longer has, tunnels the new policy would refuse to open are closed, and
// inbound flows it would refuse to admit are reset. version labels the audit entry. The caller
// has checked next's signature and that its version is newer than the one in force.
func (n *Node) SetPolicy(ctx context.Context, next *zones.Policy, version uint64) (PolicyResult, error) {
	if next == nil {
		return PolicyResult{}, fmt.Errorf("%w: nil policy", ErrConfig)
	}
	n.policy.Store(next)
	var res PolicyResult
	for _, z := range n.certificate().Claims.ZoneNames() {
		if _, ok := next.Zone(z); ok {
			res.Zones = append(res.Zones, z)
		}
	}
	n.ep.SetZones(res.Zones)

	self := n.certificate()
	selfNode := zones.Node{Name: self.ID.Name, Zones: self.Claims.ZoneNames(), Region: n.region}
	for _, t := range n.ep.Tunnels() {
		peer := zones.Node{Name: t.Peer().NodeID}
		if c := peerCert(t.Peer()); c != nil {
			peer = zones.Node{Name: c.ID.Name, Zones: c.Claims.ZoneNames()}
			if len(c.Claims.Regions) > 0 {
				peer.Region = c.Claims.Regions[0]
			}
		}
		if d := next.Tunnel(t.Zone(), selfNode, peer); !d.Allow {
			_ = t.Close()
			res.TunnelsClosed++
		}
	}
	var cut []tunnel.Admission
	n.ep.Flows(func(_ string, adm tunnel.Admission) {
		if !n.flowAllowed(next, adm) {
			cut = append(cut, adm)
		}
	})
	if len(cut) > 0 {
		res.FlowsCut = n.ep.CloseFlows(func(_ string, adm tunnel.Admission) bool {
			return slices.ContainsFunc(cut, func(c tunnel.Admission) bool { return c.Info == adm.Info })
		})
	}
	n.log.Info("policy applied", "version", version, "zones", res.Zones, "tunnels_closed", res.TunnelsClosed, "flows_cut", res.FlowsCut)
	return res, n.audit.Append(ctx, audit.Entry{Event: EventPolicy, Fields: map[string]string{
		"version": strconv.FormatUint(version, 10), "tunnels_closed": strconv.Itoa(res.TunnelsClosed),
		"flows_cut": strconv.Itoa(res.FlowsCut),
	}})
}

// flowAllowed re-decides an admitted inbound flow under pol, exactly as admission would now.
func (n *Node) flowAllowed(pol *zones.Policy, adm tunnel.Admission) bool {
	p := admissionProvenance(adm)
	if p == nil {
		return false
	}
	if p.Destination.Agent == directoryAgent {
		_, ok := pol.Zone(p.Zone)
		return ok
	}
	var proto zones.Proto
	switch p.Destination.Proto {
	case dtl.ProtoTCP:
		proto = zones.ProtoTCP
	case dtl.ProtoUDP:
		proto = zones.ProtoUDP
	default:
		return false
	}
	src := zones.Agent{Name: p.AgentName, Zone: p.Zone, Labels: p.labels, Region: p.Region, Trust: zones.Score{Value: int(p.Trust), Known: true}}
	d, err := n.flowDecision(pol, src, p.Zone, p.Destination.Agent, p.Destination.Port, proto)
	return err == nil && d.Allow
}

// Endpoint is the node's tunnel endpoint, for the parts of the daemon that carry node-level
// traffic over it (gossip).
func (n *Node) Endpoint() *tunnel.Endpoint { return n.ep }

// ReloadAgents re-reads the agents registered in the node directory, so that an agent added
// while the node runs (`ute agent add` through the local API) is live at once.
func (n *Node) ReloadAgents() error { return n.reloadAgents() }

// Revoked reports whether any of the canonical subjects ("spiffe://…" or "serial:N") is revoked.
func (n *Node) Revoked(subjects ...string) bool { return n.isRevoked(subjects...) }

// TunnelInfo describes one open tunnel.
type TunnelInfo struct {
	Peer     string // peer node SPIFFE ID
	Zone     string
	Remote   string // peer's underlay address
	Outbound bool
}

// AgentInfo describes one agent registered on this node.
type AgentInfo struct {
	Name, Zone, SPIFFEID, Serial string
	IP                           netip.Addr
	Revoked                      bool
}

// Snapshot is the node's state for `ute status`.
type Snapshot struct {
	ID      string
	Addr    string
	Region  string
	Zones   []string
	Trust   uint8
	Tunnels []TunnelInfo
	Agents  []AgentInfo
	Revoked int // subjects in the revocation set
	Stats   tunnel.Stats
}

// Snapshot reports the node's state now.
func (n *Node) Snapshot() Snapshot {
	s := Snapshot{ID: n.ID().String(), Addr: n.Addr().String(), Region: n.region, Zones: n.ep.Zones(), Trust: n.trust, Stats: n.ep.Stats()}
	for _, t := range n.ep.Tunnels() {
		if !t.Alive() {
			continue
		}
		s.Tunnels = append(s.Tunnels, TunnelInfo{Peer: t.Peer().NodeID, Zone: t.Zone(), Remote: t.RemoteAddr().String(), Outbound: t.Outbound()})
	}
	sort.Slice(s.Tunnels, func(i, j int) bool {
		a, b := s.Tunnels[i], s.Tunnels[j]
		return a.Zone < b.Zone || (a.Zone == b.Zone && a.Peer < b.Peer)
	})
	n.mu.Lock()
	s.Revoked = len(n.revoked)
	for _, a := range n.agents {
		ai := AgentInfo{Name: a.Name, Zone: a.Zone, IP: a.IP}
		if a.Cert != nil {
			ai.SPIFFEID, ai.Serial = a.Cert.ID.String(), serialKey(a.Cert)
			_, r1 := n.revoked[ai.SPIFFEID]
			_, r2 := n.revoked[ai.Serial]
			ai.Revoked = r1 || r2
		}
		s.Agents = append(s.Agents, ai)
	}
	n.mu.Unlock()
	sort.Slice(s.Agents, func(i, j int) bool {
		a, b := s.Agents[i], s.Agents[j]
		return a.Zone < b.Zone || (a.Zone == b.Zone && a.Name < b.Name)
	})
	return s
}

// WhoIsAddr returns the verified provenance of the admitted inbound flow whose source is the
// overlay address src (the caller's IP and port as a server sees it), so that a server written in
// any language can ask the local API who is calling it.
func (n *Node) WhoIsAddr(src netip.AddrPort) (*Provenance, bool) {
	var found *Provenance
	n.ep.Flows(func(_ string, adm tunnel.Admission) {
		if found != nil || adm.Remote == nil {
			return
		}
		if addrPortOf(adm.Remote) == src {
			if p, ok := adm.Info.(*Provenance); ok {
				found = p
			}
		}
	})
	return found, found != nil
}

func addrPortOf(a net.Addr) netip.AddrPort {
	switch v := a.(type) {
	case *net.TCPAddr:
		return v.AddrPort()
	case *net.UDPAddr:
		return v.AddrPort()
	}
	ap, _ := netip.ParseAddrPort(a.String())
	return ap
}

// peerCert is the verified node certificate behind a tunnel peer (see peerVerifier).
func peerCert(p tunnel.Peer) *identity.Certificate {
	c, _ := p.Info.(*identity.Certificate)
	return c
}

// ErrNotMine is returned when a node is asked to sign a revocation of something it did not issue.
var ErrNotMine = errors.New("node: a node may revoke only itself or an agent it hosts; revoke anything else at the authority")

// SignRevocation signs, with the node key, a revocation record (identity/record) of subject: this
// node's own ID, or an agent this node hosts (name.zone, its SPIFFE ID, or "serial:N" of its
// current certificate). The record revokes that agent certificate as issued by this node. The
// caller (the daemon) stores the record durably, then applies and spreads it.
func (n *Node) SignRevocation(subject, reason string) ([]byte, error) {
	if err := record.CheckReason(reason); err != nil {
		return nil, err
	}
	n.credMu.RLock()
	self, issuer, key := n.cert, n.issuer, n.key.PrivateKey
	n.credMu.RUnlock()
	priv, ok := key.(ed25519.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("%w: node key is not Ed25519", ErrConfig)
	}
	now := n.now()
	if subject == self.ID.String() || subject == self.ID.Name {
		return record.SignRevocation(record.NodeRevocation(self, reason, now), priv)
	}
	var agent *identity.Certificate
	n.mu.Lock()
	for k, a := range n.agents {
		if a.Cert == nil {
			continue
		}
		if subject == a.Cert.ID.String() || subject == k.name+"."+k.zone || subject == serialKey(a.Cert) {
			agent = a.Cert
			break
		}
	}
	n.mu.Unlock()
	if agent == nil {
		return nil, fmt.Errorf("%w: %q", ErrNotMine, subject)
	}
	return record.SignRevocation(record.AgentRevocation(self, issuer, agent, reason, now), priv)
}

// Credentials are the node's current certificate and key, for the daemon's authority watch,
// which authenticates as this node over mutual TLS and must follow its renewals.
func (n *Node) Credentials() (*identity.Certificate, ed25519.PrivateKey, error) {
	n.credMu.RLock()
	defer n.credMu.RUnlock()
	priv, ok := n.key.PrivateKey.(ed25519.PrivateKey)
	if !ok {
		return nil, nil, fmt.Errorf("%w: node key is not Ed25519", ErrConfig)
	}
	return n.cert, priv, nil
}
