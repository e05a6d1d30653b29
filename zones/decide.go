package zones

import "fmt"

// Reason is the machine-readable code of a decision. Its values are stable strings: they appear in
// logs, metrics, audit records and JSON output.
type Reason string

// Reason codes. docs/zones.md explains when each is returned.
const (
	ReasonAllowed           Reason = "allowed"
	ReasonNoPolicy          Reason = "no_policy"
	ReasonUnknownZone       Reason = "unknown_zone"
	ReasonUnknownNode       Reason = "unknown_node"
	ReasonUnknownAgent      Reason = "unknown_agent"
	ReasonNotCertified      Reason = "not_certified"
	ReasonRevoked           Reason = "revoked"
	ReasonCrossZone         Reason = "cross_zone"
	ReasonBadRequest        Reason = "bad_request"
	ReasonRegionUnknown     Reason = "region_unknown"
	ReasonRegionOutside     Reason = "region_outside"
	ReasonTrustUnknown      Reason = "trust_unknown"
	ReasonTrustBelowMin     Reason = "trust_below_min"
	ReasonTrustBelowIsolate Reason = "trust_below_isolate"
	ReasonFingerprintDrift  Reason = "fingerprint_drift"
	ReasonDuplicateIdentity Reason = "duplicate_identity"
	ReasonNoRule            Reason = "no_rule"
	ReasonPortNotAllowed    Reason = "port_not_allowed"
)

// Reasons lists every reason code, for documentation checks and metric label sets.
func Reasons() []Reason {
	return []Reason{
		ReasonAllowed, ReasonNoPolicy, ReasonUnknownZone, ReasonUnknownNode, ReasonUnknownAgent,
		ReasonNotCertified, ReasonRevoked, ReasonCrossZone, ReasonBadRequest, ReasonRegionUnknown,
		ReasonRegionOutside, ReasonTrustUnknown, ReasonTrustBelowMin, ReasonTrustBelowIsolate,
		ReasonFingerprintDrift, ReasonDuplicateIdentity, ReasonNoRule, ReasonPortNotAllowed,
	}
}

// Decision is the outcome of a tunnel or flow check.
type Decision struct {
	Allow   bool
	Reason  Reason
	Message string // one human sentence
	// Rule is the rule that allowed a flow; nil for every other decision. It points into the
	// Policy and must not be modified.
	Rule *Rule
}

func deny(reason Reason, format string, args ...any) Decision {
	return Decision{Reason: reason, Message: fmt.Sprintf(format, args...)}
}

// Score is a trust score as TrustFlow reports it; Known is false when no score is available,
// which every decision treats as a denial.
type Score struct {
	Value int // 0..100
	Known bool
}

// Node describes a node as its verified certificate and the revocation store present it.
type Node struct {
	Name    string
	Zones   []string // zones the node's certificate grants
	Region  string   // the region the node runs in now; "" when unknown
	Revoked bool
}

// Agent describes an agent as its verified certificate, TrustFlow and the revocation store
// present it.
type Agent struct {
	Name    string
	Zone    string
	Labels  map[string]string
	Region  string // the region of the agent's node now; "" when unknown
	Trust   Score
	Revoked bool
}

// Tunnel decides whether nodes a and b may hold a tunnel carrying zone: both certified for the
// zone, neither revoked, both inside the zone's placement (invariant I1).
func (p *Policy) Tunnel(zone string, a, b Node) Decision {
	if p == nil {
		return deny(ReasonNoPolicy, "no policy is loaded, so no tunnel is allowed")
	}
	cz, ok := p.byName[zone]
	if !ok {
		return deny(ReasonUnknownZone, "zone %q is not in the policy", zone)
	}
	for _, n := range [2]*Node{&a, &b} {
		if n.Name == "" {
			return deny(ReasonUnknownNode, "a tunnel end has no node name")
		}
	}
	for _, n := range [2]*Node{&a, &b} {
		if n.Revoked {
			return deny(ReasonRevoked, "node %s is revoked", n.Name)
		}
	}
	for _, n := range [2]*Node{&a, &b} {
		if !contains(n.Zones, zone) {
			return deny(ReasonNotCertified, "node %s is not certified for zone %s", n.Name, zone)
		}
	}
	for _, n := range [2]*Node{&a, &b} {
		if d, bad := placement(cz.zone, "node "+n.Name, n.Region); bad {
			return d
		}
	}
	return Decision{Allow: true, Reason: ReasonAllowed,
		Message: fmt.Sprintf("nodes %s and %s are certified for zone %s, unrevoked and inside its placement", a.Name, b.Name, zone)}
}

func placement(z *Zone, who, region string) (Decision, bool) {
	if region == "" {
		return deny(ReasonRegionUnknown, "the region of %s is unknown, so it cannot be placed in zone %s", who, z.Name), true
	}
	if !z.AllowsRegion(region) {
		return deny(ReasonRegionOutside, "%s runs in %s, outside the placement of zone %s %v", who, region, z.Name, z.Regions), true
	}
	return Decision{}, false
}

// Flow decides whether agent src may open a flow to agent dst on port and proto: same zone, both
// unrevoked, src inside the placement with a known trust score of at least min_trust, and a rule
// of the zone matching both agents and the port. The allow path does not allocate.
func (p *Policy) Flow(src, dst Agent, port uint16, proto Proto) Decision {
	if p == nil {
		return deny(ReasonNoPolicy, "no policy is loaded, so no flow is allowed")
	}
	if src.Name == "" || dst.Name == "" {
		return deny(ReasonUnknownAgent, "the flow's source or destination agent is unknown")
	}
	if src.Revoked {
		return deny(ReasonRevoked, "agent %s is revoked", src.Name)
	}
	if dst.Revoked {
		return deny(ReasonRevoked, "agent %s is revoked", dst.Name)
	}
	if src.Zone == "" || dst.Zone == "" {
		return deny(ReasonUnknownZone, "agent %s or %s carries no zone", src.Name, dst.Name)
	}
	if src.Zone != dst.Zone {
		return deny(ReasonCrossZone, "agent %s is in zone %s and %s in zone %s; flows never cross zones",
			src.Name, src.Zone, dst.Name, dst.Zone)
	}
	cz, ok := p.byName[src.Zone]
	if !ok {
		return deny(ReasonUnknownZone, "zone %q is not in the policy", src.Zone)
	}
	switch proto {
	case ProtoTCP, ProtoUDP:
		if port == 0 {
			return deny(ReasonBadRequest, "a %s flow needs a port in 1..65535", proto)
		}
	case ProtoICMP:
	default:
		return deny(ReasonBadRequest, "a flow's protocol must be tcp, udp or icmp, not %s", proto)
	}
	if src.Region == "" {
		return deny(ReasonRegionUnknown, "the region of agent %s is unknown, so it cannot be placed in zone %s", src.Name, cz.zone.Name)
	}
	if !cz.zone.AllowsRegion(src.Region) {
		return deny(ReasonRegionOutside, "agent %s runs in %s, outside the placement of zone %s %v",
			src.Name, src.Region, cz.zone.Name, cz.zone.Regions)
	}
	if d, bad := trustGate(cz.zone, src.Name, src.Trust); bad {
		return d
	}
	r, endpoints := cz.match(&src, &dst, port, proto)
	if r != nil {
		return Decision{Allow: true, Reason: ReasonAllowed, Message: r.allowMsg, Rule: r.rule}
	}
	if endpoints {
		return deny(ReasonPortNotAllowed, "rules of zone %s let %s reach %s, but not on %s", cz.zone.Name, src.Name, dst.Name, flowPort(proto, port))
	}
	return deny(ReasonNoRule, "no rule of zone %s lets %s reach %s (default deny)", cz.zone.Name, src.Name, dst.Name)
}

func flowPort(proto Proto, port uint16) string {
	if proto == ProtoICMP {
		return "icmp"
	}
	return fmt.Sprintf("%s/%d", proto, port)
}

func trustGate(z *Zone, who string, s Score) (Decision, bool) {
	switch {
	case !s.Known:
		return deny(ReasonTrustUnknown, "agent %s has no trust score; zone %s needs %d", who, z.Name, z.MinTrust), true
	case s.Value < 0 || s.Value > 100:
		return deny(ReasonTrustUnknown, "agent %s has an invalid trust score %d (valid: 0..100)", who, s.Value), true
	case s.Value < z.IsolateBelow:
		return deny(ReasonTrustBelowIsolate, "agent %s has trust %d, below zone %s's isolation threshold %d",
			who, s.Value, z.Name, z.IsolateBelow), true
	case s.Value < z.MinTrust:
		return deny(ReasonTrustBelowMin, "agent %s has trust %d, below zone %s's minimum %d",
			who, s.Value, z.Name, z.MinTrust), true
	}
	return Decision{}, false
}
