package zones

import (
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"path"
	"slices"
	"strings"
)

// locator maps parts of a policy to their places in the source; nil for policies built with New,
// whose errors then carry only the field path.
type locator struct {
	file  string
	top   pos
	zones []zoneLoc
}

type zoneLoc struct {
	self    pos
	fields  map[string]pos // field name → position of its value
	cidrs   []pos
	regions []pos
	rules   []ruleLoc
}

type ruleLoc struct {
	self   pos
	fields map[string]pos
	ports  []pos
}

func (l *locator) fileName() string {
	if l == nil {
		return ""
	}
	return l.file
}

func (l *locator) zone(i int) *zoneLoc {
	if l == nil || i >= len(l.zones) {
		return nil
	}
	return &l.zones[i]
}

func (z *zoneLoc) field(name string) pos {
	if z == nil {
		return pos{}
	}
	if p, ok := z.fields[name]; ok {
		return p
	}
	return z.self
}

func (z *zoneLoc) item(list func(*zoneLoc) []pos, i int) pos {
	if z == nil {
		return pos{}
	}
	if l := list(z); i < len(l) {
		return l[i]
	}
	return z.self
}

func (z *zoneLoc) rule(i int) *ruleLoc {
	if z == nil || i >= len(z.rules) {
		return nil
	}
	return &z.rules[i]
}

func (r *ruleLoc) field(name string) pos {
	if r == nil {
		return pos{}
	}
	if p, ok := r.fields[name]; ok {
		return p
	}
	return r.self
}

func (r *ruleLoc) port(i int) pos {
	if r == nil {
		return pos{}
	}
	if i < len(r.ports) {
		return r.ports[i]
	}
	return r.field("ports")
}

func cidrsOf(z *zoneLoc) []pos   { return z.cidrs }
func regionsOf(z *zoneLoc) []pos { return z.regions }

// Limits that keep a hostile or mistaken policy from costing unbounded memory or time.
const (
	maxNameLen   = 63
	maxLabelLen  = 63
	maxRegionLen = 63
)

// validName is a DNS label: zone names end up in ALPN strings and SPIFFE paths, agent names in
// SPIFFE paths, so both keep to lowercase letters, digits and inner hyphens (agents may also use
// dots and underscores).
func validName(s string, extra string) bool {
	if s == "" || len(s) > maxNameLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9':
		case c == '-' && i > 0 && i < len(s)-1:
		case strings.IndexByte(extra, c) >= 0:
		default:
			return false
		}
	}
	return true
}

func validZoneName(s string) bool  { return validName(s, "") }
func validAgentName(s string) bool { return validName(s, "._") }

func validRegion(s string) bool {
	if s == "" || len(s) > maxRegionLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.') {
			return false
		}
	}
	return true
}

func validLabelPart(s string) bool {
	if s == "" || len(s) > maxLabelLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte("-_./", c) >= 0) {
			return false
		}
	}
	return true
}

// globMeta are the characters that make a selector string a path.Match pattern.
const globMeta = `*?[\`

func isGlob(s string) bool { return strings.ContainsAny(s, globMeta) }

// validate checks everything about a policy that is not YAML structure: names, CIDRs and their
// overlaps, regions, thresholds, selectors and ports. It returns the first problem found, in file
// order, so the operator fixes errors top to bottom.
func validate(zones []Zone, loc *locator) error {
	file := loc.fileName()
	if len(zones) == 0 {
		var at pos
		if loc != nil {
			at = loc.top
		}
		return errf(file, at, "zones", ErrNoZones, "the policy declares no zones; add at least one under zones:")
	}
	if len(zones) > maxZones {
		return errf(file, pos{}, "zones", ErrTooLarge, "more than %d zones", maxZones)
	}
	seen := make(map[string]int, len(zones))
	for i := range zones {
		if _, dup := seen[zones[i].Name]; !dup && zones[i].Name != "" {
			seen[zones[i].Name] = i
		}
	}
	type ownedPrefix struct {
		p    netip.Prefix
		zone int
		idx  int
	}
	var prefixes []ownedPrefix
	for i := range zones {
		z := &zones[i]
		zl := loc.zone(i)
		field := fmt.Sprintf("zones[%d]", i)

		if z.Name == "" {
			return errf(file, zl.field("name"), field+".name", ErrMissingField, "every zone needs a name")
		}
		if !validZoneName(z.Name) {
			return errf(file, zl.field("name"), field+".name", ErrBadName,
				"zone name %q must be 1-63 lowercase letters, digits or inner hyphens", z.Name)
		}
		if first := seen[z.Name]; first != i {
			where := fmt.Sprintf("zones[%d]", first)
			if fl := loc.zone(first); fl != nil && fl.self.line > 0 {
				where = fmt.Sprintf("line %d", fl.self.line)
			}
			return errf(file, zl.field("name"), field+".name", ErrDuplicateZone,
				"zone %q is already declared at %s; merge the two or rename one", z.Name, where)
		}

		if len(z.CIDRs) == 0 {
			return errf(file, zl.field("cidr"), field+".cidr", ErrMissingField,
				"zone %s needs an overlay CIDR, e.g. cidr: 100.100.1.0/24", z.Name)
		}
		if len(z.CIDRs) > maxCIDRsPerZone || len(z.Regions) > maxRegions || len(z.Rules) > maxRulesPerZone {
			return errf(file, zl.self, field, ErrTooLarge, "zone %s has more than %d CIDRs, %d regions or %d rules",
				z.Name, maxCIDRsPerZone, maxRegions, maxRulesPerZone)
		}
		for j, p := range z.CIDRs {
			f := fmt.Sprintf("%s.cidr[%d]", field, j)
			at := zl.item(cidrsOf, j)
			if err := checkPrefix(p); err != nil {
				return errf(file, at, f, ErrBadCIDR, "%v", err)
			}
			for _, o := range prefixes {
				if o.p.Overlaps(p) {
					owner := zones[o.zone].Name
					if ol := loc.zone(o.zone); ol != nil && ol.item(cidrsOf, o.idx).line > 0 {
						owner = fmt.Sprintf("%s (line %d)", owner, ol.item(cidrsOf, o.idx).line)
					}
					return errf(file, at, f, ErrOverlappingCIDR,
						"%s overlaps %s of zone %s; zone CIDRs must be disjoint", p, o.p, owner)
				}
			}
			prefixes = append(prefixes, ownedPrefix{p: p, zone: i, idx: j})
		}

		if npField, cidrIdx, err := checkNodePrefixes(z); err != nil {
			if cidrIdx >= 0 {
				return errf(file, zl.item(cidrsOf, cidrIdx), fmt.Sprintf("%s.cidr[%d]", field, cidrIdx), ErrBadCIDR, "%v", err)
			}
			return errf(file, zl.field(npField), field+"."+npField, ErrNodePrefix, "%v", err)
		}

		if len(z.Regions) == 0 {
			return errf(file, zl.field("regions"), field+".regions", ErrMissingField,
				"zone %s needs its placement, e.g. regions: [eu-west-1]", z.Name)
		}
		for j, r := range z.Regions {
			f := fmt.Sprintf("%s.regions[%d]", field, j)
			at := zl.item(regionsOf, j)
			if !validRegion(r) {
				return errf(file, at, f, ErrBadRegion,
					"region %q must be 1-63 lowercase letters, digits, '-', '_' or '.'", r)
			}
			for _, prev := range z.Regions[:j] {
				if prev == r {
					return errf(file, at, f, ErrBadRegion, "region %q is listed twice", r)
				}
			}
		}

		if z.MinTrust < 0 || z.MinTrust > 100 {
			return errf(file, zl.field("min_trust"), field+".min_trust", ErrThreshold,
				"min_trust %d is outside 0..100", z.MinTrust)
		}
		if z.IsolateBelow < 0 || z.IsolateBelow > 100 {
			return errf(file, zl.field("isolate_below"), field+".isolate_below", ErrThreshold,
				"isolate_below %d is outside 0..100", z.IsolateBelow)
		}
		if z.IsolateBelow > z.MinTrust {
			return errf(file, zl.field("isolate_below"), field+".isolate_below", ErrThreshold,
				"isolate_below %d is above min_trust %d; a subject must lose flows before it is isolated, so set isolate_below <= min_trust",
				z.IsolateBelow, z.MinTrust)
		}
		if z.MaxCertLifetime < 0 {
			return errf(file, zl.field("max_cert_lifetime"), field+".max_cert_lifetime", ErrBadValue,
				"max_cert_lifetime %s is negative; write a positive duration such as 1h", z.MaxCertLifetime)
		}

		for k := range z.Rules {
			if err := validateRule(zones, seen, i, k, loc); err != nil {
				return err
			}
		}
	}
	return nil
}

func checkPrefix(p netip.Prefix) error {
	switch {
	case !p.IsValid():
		return fmt.Errorf("invalid prefix; write it like 100.100.1.0/24 or fd00:ute:1::/64")
	case p.Addr().Zone() != "":
		return fmt.Errorf("%s carries an IPv6 zone; remove the %%%s", p, p.Addr().Zone())
	case p.Addr().Is4In6():
		return fmt.Errorf("%s is an IPv4-mapped IPv6 prefix; write the IPv4 prefix instead", p)
	case p.Masked() != p:
		return fmt.Errorf("%s has host bits set; write %s", p, p.Masked())
	}
	return nil
}

func validateRule(zones []Zone, names map[string]int, zi, ri int, loc *locator) error {
	file := loc.fileName()
	z := &zones[zi]
	r := &z.Rules[ri]
	rl := loc.zone(zi).rule(ri)
	field := fmt.Sprintf("zones[%d].rules[%d]", zi, ri)
	for _, side := range []struct {
		name string
		sel  Selector
	}{{"from", r.From}, {"to", r.To}} {
		if err := checkSelector(side.sel, z.Name, names); err != nil {
			return errf(file, rl.field(side.name), field+"."+side.name, sentinelOf(err), "%v", err)
		}
	}
	if len(r.Ports) > maxPortsPerRule || len(r.From.Labels) > maxLabels || len(r.To.Labels) > maxLabels {
		return errf(file, rl.self, field, ErrTooLarge, "a rule lists at most %d ports and %d labels per selector", maxPortsPerRule, maxLabels)
	}
	if len(r.Ports) == 0 {
		return errf(file, rl.field("ports"), field+".ports", ErrMissingField,
			"list at least one port, e.g. ports: [tcp/443], or ports: [any]")
	}
	for j, pr := range r.Ports {
		if err := checkPortRange(pr); err != nil {
			return errf(file, rl.port(j), fmt.Sprintf("%s.ports[%d]", field, j), ErrBadPort, "%v", err)
		}
	}
	return nil
}

// selectorError carries the sentinel a selector problem maps to.
type selectorError struct {
	sentinel error
	msg      string
}

func (e *selectorError) Error() string { return e.msg }

func sentinelOf(err error) error {
	var se *selectorError
	if errors.As(err, &se) {
		return se.sentinel
	}
	return ErrBadSelector
}

func selErr(sentinel error, format string, args ...any) error {
	return &selectorError{sentinel: sentinel, msg: fmt.Sprintf(format, args...)}
}

func checkSelector(s Selector, zone string, zones map[string]int) error {
	set := 0
	if s.Name != "" {
		set++
	}
	if s.Glob != "" {
		set++
	}
	if len(s.Labels) > 0 {
		set++
	}
	switch {
	case set == 0:
		return selErr(ErrMissingField, "the selector is empty; name an agent, a glob like billing-*, or {labels: {team: billing}}")
	case set > 1:
		return selErr(ErrBadSelector, "the selector sets more than one of name, glob and labels; use one")
	}
	text := s.Name
	if s.Glob != "" {
		text = s.Glob
	}
	if text != "" {
		if before, after, ok := strings.Cut(text, "/"); ok {
			if _, exists := zones[before]; !exists {
				return selErr(ErrUnknownZone,
					"%q names zone %q, which does not exist; rules select agents of zone %s by name only", text, before, zone)
			}
			if before != zone {
				return selErr(ErrCrossZone,
					"%q names an agent of zone %s; rules only allow flows inside zone %s and nothing crosses zones", text, before, zone)
			}
			return selErr(ErrBadSelector, "%q: write the agent name without the zone prefix: %s", text, after)
		}
	}
	switch {
	case s.Name != "":
		if isGlob(s.Name) {
			return selErr(ErrBadSelector, "%q is a pattern; set it as a glob", s.Name)
		}
		if !validAgentName(s.Name) {
			return selErr(ErrBadSelector,
				"agent name %q must be 1-63 lowercase letters, digits, '.', '_' or inner hyphens", s.Name)
		}
	case s.Glob != "":
		if !isGlob(s.Glob) {
			return selErr(ErrBadSelector, "glob %q has no wildcard; write it as an agent name", s.Glob)
		}
		if len(s.Glob) > 4*maxNameLen {
			return selErr(ErrBadSelector, "glob %q is longer than %d characters", s.Glob, 4*maxNameLen)
		}
		if _, err := path.Match(s.Glob, ""); err != nil {
			return selErr(ErrBadSelector, "glob %q is malformed (%v); use *, ? and [a-z] as in shell patterns", s.Glob, err)
		}
	default:
		// Sorted so that the same bad file always reports the same label.
		for _, k := range slices.Sorted(maps.Keys(s.Labels)) {
			if v := s.Labels[k]; !validLabelPart(k) || !validLabelPart(v) {
				return selErr(ErrBadSelector,
					"label %q: %q: keys and values must be 1-63 letters, digits, '-', '_', '.' or '/'", k, v)
			}
		}
	}
	return nil
}

func checkPortRange(r PortRange) error {
	switch r.Proto {
	case ProtoAny:
		if r.First != 0 || r.Last != 65535 {
			return fmt.Errorf("\"any\" covers every port; do not give it a range")
		}
	case ProtoICMP:
		if r.First != 0 || r.Last != 0 {
			return fmt.Errorf("icmp has no ports")
		}
	case ProtoTCP, ProtoUDP:
		if r.First == 0 || r.Last < r.First {
			return fmt.Errorf("%s/%d-%d: ports must be 1..65535 with first <= last", r.Proto, r.First, r.Last)
		}
	default:
		return fmt.Errorf("unknown protocol %d; use tcp, udp, icmp or any", r.Proto)
	}
	return nil
}
