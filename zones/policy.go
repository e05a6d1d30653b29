package zones

import (
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"time"
)

// Policy is a validated, compiled set of zones. Build it with Parse, Load or New; treat it as
// read-only afterwards (the compiled indexes are not rebuilt if Zones is modified). A nil *Policy
// is valid to call decisions on and denies everything.
type Policy struct {
	// Zones in file order.
	Zones []Zone

	byName map[string]*compiledZone
}

// Zone is one virtual trust zone.
type Zone struct {
	Name string
	// CIDRs are the zone's overlay prefixes (IPv4 and/or IPv6); no two prefixes of a policy overlap.
	CIDRs []netip.Prefix
	// Regions is the placement: the only regions the zone's nodes and agents may run in.
	Regions []string
	// MinTrust is the trust score (0..100) a subject needs to open flows.
	MinTrust int
	// IsolateBelow is the score (0..MinTrust) under which a subject is isolated and revoked.
	IsolateBelow int
	// MaxCertLifetime caps certificates issued for this zone; 0 means the issuer's default.
	MaxCertLifetime time.Duration
	// NodePrefix and NodePrefix6 are the lengths of the slice of each IPv4 (IPv6) CIDR that the
	// authority gives every node of the zone; 0 means DefaultNodePrefix. See NodePrefixFor.
	NodePrefix, NodePrefix6 int
	// Rules allow intra-zone flows; anything no rule allows is denied.
	Rules []Rule
	// TrustFlow tunes TrustFlow's weights and decay for the zone's subjects; nil: the defaults.
	TrustFlow *TrustFlow
	// Line is the line of the zone in its policy file (0 when built with New).
	Line int
}

// Rule allows flows from agents matching From to agents matching To on Ports, inside one zone.
type Rule struct {
	From, To Selector
	Ports    []PortRange
	// Line is the line of the rule in its policy file (0 when built with New).
	Line int
}

// Selector picks agents of a zone. Exactly one of Name, Glob or Labels is set.
type Selector struct {
	// Name matches one agent exactly.
	Name string
	// Glob matches agent names with path.Match semantics ("billing-*", "worker-?").
	Glob string
	// Labels matches agents whose certificate labels include every pair listed.
	Labels map[string]string
}

// String renders the selector the way the policy file writes it.
func (s Selector) String() string {
	switch {
	case s.Name != "":
		return s.Name
	case s.Glob != "":
		return s.Glob
	case len(s.Labels) > 0:
		keys := make([]string, 0, len(s.Labels))
		for k := range s.Labels {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		parts := make([]string, len(keys))
		for i, k := range keys {
			parts[i] = k + ": " + s.Labels[k]
		}
		return "{labels: {" + strings.Join(parts, ", ") + "}}"
	default:
		return "<empty selector>"
	}
}

// Proto is a transport protocol of a flow.
type Proto uint8

// Protocols. ProtoAny appears only in rules ("any"); a flow always names a concrete protocol.
const (
	ProtoAny Proto = iota
	ProtoTCP
	ProtoUDP
	ProtoICMP
)

// String returns the protocol's policy-file spelling.
func (p Proto) String() string {
	switch p {
	case ProtoAny:
		return "any"
	case ProtoTCP:
		return "tcp"
	case ProtoUDP:
		return "udp"
	case ProtoICMP:
		return "icmp"
	default:
		return fmt.Sprintf("proto(%d)", uint8(p))
	}
}

// ParseProto parses "tcp", "udp" or "icmp" (the protocols a flow can have).
func ParseProto(s string) (Proto, error) {
	switch s {
	case "tcp":
		return ProtoTCP, nil
	case "udp":
		return ProtoUDP, nil
	case "icmp":
		return ProtoICMP, nil
	default:
		return 0, fmt.Errorf("%w: unknown protocol %q: use tcp, udp or icmp", ErrBadPort, s)
	}
}

// PortRange is one entry of a rule's ports: a protocol and an inclusive port range.
// "any" is {ProtoAny, 0, 65535}; "icmp" is {ProtoICMP, 0, 0}.
type PortRange struct {
	Proto       Proto
	First, Last uint16
}

// Contains reports whether a flow with this protocol and port falls in the range.
func (r PortRange) Contains(proto Proto, port uint16) bool {
	return (r.Proto == ProtoAny || r.Proto == proto) && port >= r.First && port <= r.Last
}

// String renders the range the way the policy file writes it.
func (r PortRange) String() string {
	switch {
	case r.Proto == ProtoAny:
		return "any"
	case r.Proto == ProtoICMP:
		return "icmp"
	case r.First == r.Last:
		return fmt.Sprintf("%s/%d", r.Proto, r.First)
	default:
		return fmt.Sprintf("%s/%d-%d", r.Proto, r.First, r.Last)
	}
}

// ParsePortRange parses one ports entry: "tcp/443", "udp/53", "tcp/8000-8100", "icmp" or "any".
func ParsePortRange(s string) (PortRange, error) {
	r, err := parsePortRange(s)
	if err != nil {
		return PortRange{}, fmt.Errorf("%w: %w", ErrBadPort, err)
	}
	return r, nil
}

func parsePortRange(s string) (PortRange, error) {
	switch s {
	case "any":
		return PortRange{Proto: ProtoAny, First: 0, Last: 65535}, nil
	case "icmp":
		return PortRange{Proto: ProtoICMP}, nil
	}
	protoStr, ports, ok := strings.Cut(s, "/")
	if !ok {
		return PortRange{}, fmt.Errorf("%q is not a port entry: write tcp/443, udp/53, tcp/8000-8100, icmp or any", s)
	}
	var proto Proto
	switch protoStr {
	case "tcp":
		proto = ProtoTCP
	case "udp":
		proto = ProtoUDP
	default:
		return PortRange{}, fmt.Errorf("%q: protocol must be tcp or udp (icmp and any take no port)", s)
	}
	firstStr, lastStr, isRange := strings.Cut(ports, "-")
	first, err := parsePort(firstStr)
	if err != nil {
		return PortRange{}, fmt.Errorf("%q: %w", s, err)
	}
	last := first
	if isRange {
		if last, err = parsePort(lastStr); err != nil {
			return PortRange{}, fmt.Errorf("%q: %w", s, err)
		}
		if last < first {
			return PortRange{}, fmt.Errorf("%q: range is reversed; write %s/%d-%d", s, proto, last, first)
		}
	}
	return PortRange{Proto: proto, First: first, Last: last}, nil
}

// parsePort accepts decimal 1..65535 with no sign, spaces or leading zeros.
func parsePort(s string) (uint16, error) {
	if s == "" {
		return 0, errors.New("port is missing")
	}
	if len(s) > 5 || (len(s) > 1 && s[0] == '0') {
		return 0, fmt.Errorf("port %q is not a number in 1..65535", s)
	}
	n := 0
	for _, c := range []byte(s) {
		if c < '0' || c > '9' {
			return 0, fmt.Errorf("port %q is not a number in 1..65535", s)
		}
		n = n*10 + int(c-'0')
	}
	if n < 1 || n > 65535 {
		return 0, fmt.Errorf("port %d is outside 1..65535", n)
	}
	return uint16(n), nil
}

// New validates zones built in Go (the simulator and tests use it) and compiles them into a Policy.
// The zones are copied; errors wrap the same sentinels Parse uses.
func New(zones []Zone) (*Policy, error) {
	cp := make([]Zone, len(zones))
	for i, z := range zones {
		z.CIDRs = slices.Clone(z.CIDRs)
		z.Regions = slices.Clone(z.Regions)
		rules := make([]Rule, len(z.Rules))
		for j, r := range z.Rules {
			r.Ports = slices.Clone(r.Ports)
			r.From.Labels = cloneLabels(r.From.Labels)
			r.To.Labels = cloneLabels(r.To.Labels)
			rules[j] = r
		}
		z.Rules = rules
		if z.TrustFlow != nil {
			tf := *z.TrustFlow
			tf.Weights = maps.Clone(tf.Weights)
			if err := checkTrustFlow(&tf); err != nil {
				return nil, &ParseError{Field: fmt.Sprintf("zones[%d].trustflow", i), Err: err}
			}
			z.TrustFlow = &tf
		}
		cp[i] = z
	}
	if err := validate(cp, nil); err != nil {
		return nil, err
	}
	return compile(cp), nil
}

func cloneLabels(m map[string]string) map[string]string {
	if m == nil {
		return nil
	}
	out := make(map[string]string, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

// Zone returns the zone with this name.
func (p *Policy) Zone(name string) (*Zone, bool) {
	if p == nil {
		return nil, false
	}
	cz, ok := p.byName[name]
	if !ok {
		return nil, false
	}
	return cz.zone, true
}

// ZoneForAddr returns the zone whose CIDRs contain the overlay address.
func (p *Policy) ZoneForAddr(addr netip.Addr) (*Zone, bool) {
	if p == nil || !addr.IsValid() {
		return nil, false
	}
	addr = addr.Unmap()
	for i := range p.Zones {
		if p.Zones[i].Contains(addr) {
			return &p.Zones[i], true
		}
	}
	return nil, false
}

// Contains reports whether the overlay address lies in one of the zone's CIDRs.
func (z *Zone) Contains(addr netip.Addr) bool {
	addr = addr.Unmap()
	for _, pfx := range z.CIDRs {
		if pfx.Contains(addr) {
			return true
		}
	}
	return false
}

// AllowsRegion reports whether the region is inside the zone's placement. "" is never inside.
func (z *Zone) AllowsRegion(region string) bool {
	if region == "" {
		return false
	}
	for _, r := range z.Regions {
		if r == region {
			return true
		}
	}
	return false
}

// CertLifetime caps a requested certificate lifetime by the zone's MaxCertLifetime.
func (z *Zone) CertLifetime(requested time.Duration) time.Duration {
	if z.MaxCertLifetime > 0 && (requested <= 0 || requested > z.MaxCertLifetime) {
		return z.MaxCertLifetime
	}
	return requested
}
