package node

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"time"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/overlay/audit"
	"github.com/ute-project/ute/overlay/dtl"
	"github.com/ute-project/ute/overlay/tunnel"
	"github.com/ute-project/ute/zones"
)

// directoryAgent is the reserved destination of the zone directory exchange. An underscore is not
// valid in an agent name (identity.ValidateName), so no real agent can be addressed as it.
const directoryAgent = "_directory"

// Event names this package appends to the audit log besides audit.EventAdmit/EventDeny/EventRevoke.
const (
	eventTunnelRefused = "tunnel-refused"
	eventDirectory     = "directory"
)

// session is the admission state of one tunnel session (or of local flows in one zone).
type session struct {
	dtl      dtl.Session
	lastUsed time.Time
	// bound: the session of a live tunnel, kept until the tunnel closes (sessions.go), so that
	// its chain cache outlives idle time and the sender's hash-only records stay admissible.
	bound bool
}

// peerVerifier implements tunnel.PeerVerifier: chain to the anchor, revocation, then the zones
// tunnel decision (invariant I1).
type peerVerifier struct{ n *Node }

// VerifyPeer runs inside both sides' TLS handshakes.
func (v peerVerifier) VerifyPeer(zone string, rawCerts [][]byte) (tunnel.Peer, error) {
	n := v.n
	cert, err := n.verif.VerifyNodeDER(rawCerts, n.now())
	if err != nil {
		return tunnel.Peer{}, err
	}
	id := cert.ID.String()
	if n.isRevoked(id, serialKey(cert)) {
		return tunnel.Peer{}, fmt.Errorf("%w: node %s", dtl.ErrRevoked, id)
	}
	region := ""
	if len(cert.Claims.Regions) > 0 {
		region = cert.Claims.Regions[0]
	}
	self := n.certificate()
	d := n.pol().Tunnel(zone,
		zones.Node{Name: self.ID.Name, Zones: self.Claims.ZoneNames(), Region: n.region},
		zones.Node{Name: cert.ID.Name, Zones: cert.Claims.ZoneNames(), Region: region})
	if !d.Allow {
		return tunnel.Peer{}, &PolicyError{Decision: d}
	}
	return tunnel.Peer{NodeID: id, Certificate: cert.X509, Info: cert}, nil
}

// PolicyError is a zones decision that refused a tunnel or a flow.
type PolicyError struct{ Decision zones.Decision }

func (e *PolicyError) Error() string {
	return fmt.Sprintf("%s: %s", e.Decision.Reason, e.Decision.Message)
}

func (n *Node) onRefused(r tunnel.Refusal) {
	remote := ""
	if r.Remote != nil {
		remote = r.Remote.String()
	}
	// OnRefused must not block: the audit append is one buffered write, or a count. Refusals
	// from one source prefix for one reason collapse (refusals.go).
	_ = n.audit.Refuse(context.Background(), audit.Entry{Event: eventTunnelRefused, Fields: map[string]string{
		"zone": r.Zone, "remote": remote, "source": refusalSource(r.Remote), "reason": handshakeReason(r.Err),
		"error": truncate(r.Err.Error()),
	}}, tunnelRefusalKey...)
}

// verifyAgentChain is the dtl.ChainVerifier: identity's full chain check, then the facts admission
// needs, taken from the certificates only.
func (n *Node) verifyAgentChain(nodeDER, agentDER []byte, now time.Time) (dtl.AgentInfo, error) {
	ch, err := n.verif.VerifyAgentDER(nodeDER, agentDER, now)
	if err != nil {
		return dtl.AgentInfo{}, err
	}
	notAfter := ch.Agent.X509.NotAfter
	if ch.Node.X509.NotAfter.Before(notAfter) {
		notAfter = ch.Node.X509.NotAfter
	}
	zone := ""
	if zs := ch.Agent.Claims.ZoneNames(); len(zs) == 1 {
		zone = zs[0]
	}
	var ip netip.Addr
	if len(ch.Agent.Claims.OverlayIPs) > 0 {
		ip = ch.Agent.Claims.OverlayIPs[0]
	}
	return dtl.AgentInfo{
		Agent:       ch.Agent.ID.String(),
		Node:        ch.Node.ID.String(),
		Zone:        zone,
		AgentKey:    ch.Agent.PublicKey(),
		Fingerprint: ch.Agent.Claims.Fingerprint,
		Regions:     ch.Node.Claims.Regions,
		Labels:      ch.Agent.Claims.Labels,
		OverlayIP:   ip,
		AgentSerial: serialKey(ch.Agent),
		NodeSerial:  "serial:" + ch.Node.NodeSerial().String(), // the node certificate's, which its issuing certificate names
		NotAfter:    notAfter,
	}, nil
}

// errUnknownDestination marks a record naming an agent this node does not host; it is reported
// as a policy denial so that a peer cannot enumerate the agents of a node by probing names.
var errUnknownDestination = errors.New("destination agent is not hosted here")

// allowFlow is the dtl.PolicyChecker: the zones flow decision between the record's source agent and
// the local destination agent.
func (n *Node) allowFlow(info *dtl.AgentInfo, c *dtl.Claims) error {
	if c.Destination.Agent == directoryAgent {
		if c.Destination.Port != 0 || c.Destination.Proto != dtl.ProtoTCP {
			return fmt.Errorf("directory exchange must name port 0/tcp, not %s", c.Destination)
		}
		return nil
	}
	var proto zones.Proto
	switch c.Destination.Proto {
	case dtl.ProtoTCP:
		proto = zones.ProtoTCP
	case dtl.ProtoUDP:
		proto = zones.ProtoUDP
	default:
		return fmt.Errorf("this node carries TCP and UDP flows for SDK agents, not %s", c.Destination.Proto)
	}
	// The receiver admits on the lower of the score the sender attests and its own view of the
	// source agent and node (TrustFlow); the provenance then carries that lower score.
	if v := n.trustView(info.Agent, info.Node); v < int(c.Trust) {
		c.Trust = uint8(v)
	}
	if minTrust, ok := n.minTrust(c.Zone); ok && int(c.Trust) < minTrust {
		// Step 10 of dtl.Verifier.Admit, which runs right after this checker, refuses the flow
		// with reason "trust"; the zones trust gate would report the same refusal as "policy".
		return nil
	}
	src, err := identity.ParseID(info.Agent)
	if err != nil {
		return err
	}
	d, err := n.flowDecision(n.pol(),
		zones.Agent{Name: src.Name, Zone: src.Zone, Labels: info.Labels, Region: c.Region, Trust: zones.Score{Value: int(c.Trust), Known: true}},
		c.Zone, c.Destination.Agent, c.Destination.Port, proto)
	if err != nil {
		return err
	}
	if !d.Allow {
		return &PolicyError{Decision: d}
	}
	return nil
}

// flowDecision is the zones decision on a flow from src to the local agent dstName of zone under
// pol. Admission and a policy reload both ask it, so a reload cuts exactly what admission would
// now refuse.
func (n *Node) flowDecision(pol *zones.Policy, src zones.Agent, zone, dstName string, port uint16, proto zones.Proto) (zones.Decision, error) {
	n.mu.Lock()
	dst, ok := n.agents[agentKey{zone, dstName}]
	n.mu.Unlock()
	if !ok {
		return zones.Decision{}, fmt.Errorf("%w: %s in zone %s", errUnknownDestination, dstName, zone)
	}
	return pol.Flow(src,
		zones.Agent{Name: dst.Name, Zone: dst.Zone, Labels: dst.Labels, Region: n.region, Trust: zones.Score{Value: int(n.trust), Known: true}},
		port, proto), nil
}

// admitter implements tunnel.Admitter.
type admitter struct{ n *Node }

// Admit verifies a flow's record in dtl's fixed order (decode, chain, signature with this
// session's binding, peer, zone, claims, revocation, zones policy, minimum trust, freshness,
// replay), then checks that the destination listens. It does not audit: the endpoint may still
// refuse an approved flow (flow limits, flow ids), so the verdict is audited once it is final, in
// onVerdict. A refusal carries what is known of the record (Info) for that entry.
func (a admitter) Admit(_ context.Context, req tunnel.FlowRequest) (tunnel.Admission, error) {
	adm, prov, err := a.n.admitRecord(req.Zone, req.Peer.NodeID, req.Exporter, req.Record)
	if err != nil {
		if prov == nil {
			return tunnel.Admission{}, err
		}
		return tunnel.Admission{Info: prov}, err
	}
	return adm, nil
}

// onVerdict audits the final verdict on every inbound tunnel flow (tunnel.Config.OnVerdict):
// admissions, the admitter's refusals, and the refusals the endpoint made itself (unreadable or
// oversized first frames, flow limits, flow ids the peer may not open).
func (n *Node) onVerdict(v tunnel.Verdict) {
	p := admissionProvenance(v.Admission)
	if p == nil && v.Record != nil {
		p = partialProvenance(v.Record)
	}
	// The flow's own context may already be gone (the peer hung up); its verdict is still audited.
	n.auditVerdict(context.Background(), v.Peer.NodeID, v.Zone, p, v.Err)
}

// admitRecord is the admission of one record on the session bound to aad. The same path serves
// tunnel flows and same-node flows.
func (n *Node) admitRecord(zone, peerNode string, aad, raw []byte) (tunnel.Admission, *Provenance, error) {
	if n.isClosed() {
		return tunnel.Admission{}, nil, dtl.Deny(fmt.Errorf("%w: %w", dtl.ErrConfig, ErrClosed))
	}
	s := n.session(zone, peerNode, aad)
	ok, err := n.admit.Admit(&s.dtl, raw)
	if err != nil {
		return tunnel.Admission{}, partialProvenance(raw), err
	}
	c := ok.Claims()
	prov, err := newProvenance(ok)
	if err != nil {
		return tunnel.Admission{}, partialProvenance(raw), dtl.Deny(err)
	}
	prov.recordSize = len(raw)
	if c.Destination.Agent == directoryAgent {
		return tunnel.Admission{Agent: ok.Agent.Agent, Kind: tunnel.KindStream, FlowID: c.FlowID, Info: &directoryFlow{zone: zone, peer: peerNode, prov: prov}}, prov, nil
	}
	dport := c.Destination.Port
	n.mu.Lock()
	dst := n.agents[agentKey{zone, c.Destination.Agent}]
	listening := n.listeningLocked(zone, c.Destination.Agent, dport, c.Destination.Proto)
	n.mu.Unlock()
	if dst == nil || !listening {
		return tunnel.Admission{}, prov, dtl.Deny(fmt.Errorf("%w: %s is not listening on %s/%d", dtl.ErrUnreachable, c.Destination.Agent, c.Destination.Proto, dport))
	}
	if c.Destination.Proto == dtl.ProtoUDP {
		return tunnel.Admission{
			Agent:  ok.Agent.Agent,
			Kind:   tunnel.KindPacket,
			FlowID: c.FlowID,
			Local:  net.UDPAddrFromAddrPort(netip.AddrPortFrom(dst.IP, dport)),
			Remote: udpAddr(prov.SourceIP, flowPort(c.FlowID)),
			Info:   prov,
		}, prov, nil
	}
	return tunnel.Admission{
		Agent:  ok.Agent.Agent,
		Kind:   tunnel.KindStream,
		FlowID: c.FlowID,
		Local:  &net.TCPAddr{IP: dst.IP.AsSlice(), Port: int(dport)},
		Remote: tcpAddr(prov.SourceIP, 0),
		Info:   prov,
	}, prov, nil
}

func tcpAddr(ip netip.Addr, port uint16) net.Addr {
	if !ip.IsValid() {
		return nil
	}
	return net.TCPAddrFromAddrPort(netip.AddrPortFrom(ip, port))
}

// session returns the admission state of the session bound to aad, creating it on first use.
// Sessions idle for longer than twice the freshness window are dropped: every record admitted on
// one is then stale, so forgetting its replay window cannot let a replay through.
func (n *Node) session(zone, peerNode string, aad []byte) *session {
	now := n.now()
	n.mu.Lock()
	defer n.mu.Unlock()
	idle := 2 * n.skew()
	if now.Sub(n.lastSweep) > idle {
		for k, s := range n.sessions {
			if now.Sub(s.lastUsed) > idle && !s.bound {
				delete(n.sessions, k)
			}
		}
		n.lastSweep = now
	}
	return n.sessionLocked(zone, peerNode, aad, now)
}

// sessionLocked returns the session bound to aad, creating it; n.mu is held.
func (n *Node) sessionLocked(zone, peerNode string, aad []byte, now time.Time) *session {
	s := n.sessions[string(aad)] // a lookup by string(aad) does not copy aad
	if s == nil || s.dtl.Zone != zone || s.dtl.PeerNode != peerNode {
		// Chains: after a full-chain record is admitted, the sender names that chain by hash
		// (docs/protocol.md §4); the cache is per session, so a hash never crosses sessions.
		s = &session{
			dtl: dtl.Session{AAD: append([]byte(nil), aad...), PeerNode: peerNode, Zone: zone,
				Replay: &dtl.ReplayWindow{}, Chains: dtl.NewChainCache(0)},
		}
		n.sessions[string(aad)] = s
	}
	s.lastUsed = now
	return s
}

func (n *Node) skew() time.Duration {
	if n.cfg.MaxSkew > 0 {
		return n.cfg.MaxSkew
	}
	return dtl.DefaultSkew
}

// auditVerdict appends one admit or deny entry.
func (n *Node) auditVerdict(ctx context.Context, peer, zone string, p *Provenance, err error) {
	f := map[string]string{"peer": peer, "zone": zone}
	if p != nil {
		f["agent"] = truncate(p.Agent)
		f["node"] = truncate(p.Node)
		f["dst"] = truncate(p.Destination.String())
		f["flow"] = strconv.FormatUint(p.FlowID, 10)
		f["seq"] = strconv.FormatUint(p.Seq, 10)
	}
	ev := audit.EventAdmit
	reason := ""
	if err != nil {
		ev = audit.EventDeny
		d := dtl.Deny(err)
		reason = d.Reason
		f["reason"] = d.Reason
		f["error"] = truncate(err.Error())
		if p != nil {
			f["verified"] = strconv.FormatBool(p.verified)
		}
	}
	if n.cfg.OnVerdict != nil {
		n.cfg.OnVerdict(zone, reason)
	}
	if n.cfg.OnFlowVerdict != nil {
		fv := FlowVerdict{Zone: zone, Peer: peer, Reason: reason, Local: peer == n.certificate().ID.String()}
		if p != nil {
			fv.Agent, fv.Node, fv.Destination = p.Agent, p.Node, p.Destination.String()
		}
		n.cfg.OnFlowVerdict(fv)
	}
	// Admissions are written one by one; identical denials collapse (refusals.go).
	write := n.audit.Append
	if err != nil {
		write = func(ctx context.Context, e audit.Entry) error { return n.audit.Refuse(ctx, e, denyKey...) }
	}
	if aerr := write(ctx, audit.Entry{Event: ev, Fields: f}); aerr != nil {
		n.log.Error("audit append failed", "event", ev, "err", aerr)
	}
}

func truncate(s string) string {
	if len(s) > audit.MaxFieldValue {
		return s[:audit.MaxFieldValue]
	}
	return s
}
