package zones

import (
	"fmt"
	"path"
	"sort"
	"strings"
)

// compiledZone holds a zone's rules indexed so that a flow decision touches only the rules that
// can match it. Rules only allow, so the order in which candidates are tried does not change the
// outcome; it only decides which allowing rule is named in the Decision.
type compiledZone struct {
	zone  *Zone
	rules []compiledRule
	// pair indexes rules whose from and to are both exact names.
	pair map[pairKey][]int32
	// byFrom indexes rules with an exact from and a non-exact to; byTo the reverse.
	byFrom map[string][]int32
	byTo   map[string][]int32
	// byLabel indexes rules with a label from and a non-exact to, by the from's first label pair:
	// an agent carries few labels, so looking each of them up beats scanning every label rule.
	byLabel map[labelKV][]int32
	// rest holds the remaining rules: a glob from and a non-exact to.
	rest []int32
}

type pairKey struct{ from, to string }

type compiledRule struct {
	from, to matcher
	ports    []PortRange
	rule     *Rule
	allowMsg string // built once so that the allow path does not allocate
}

type matchKind uint8

const (
	matchExact matchKind = iota
	matchPrefix
	matchSuffix
	matchAnyName
	matchGlob
	matchLabels
)

type labelKV struct{ key, value string }

type matcher struct {
	kind    matchKind
	lit     string // exact name, prefix or suffix
	pattern string // full glob, for matchGlob
	labels  []labelKV
}

func compileSelector(s Selector) matcher {
	switch {
	case s.Name != "":
		return matcher{kind: matchExact, lit: s.Name}
	case s.Glob != "":
		g := s.Glob
		// Common shapes get a fast path equivalent to path.Match, where '*' never crosses '/'.
		switch {
		case g == "*":
			return matcher{kind: matchAnyName}
		case strings.HasSuffix(g, "*") && !strings.ContainsAny(g[:len(g)-1], globMeta):
			return matcher{kind: matchPrefix, lit: g[:len(g)-1]}
		case strings.HasPrefix(g, "*") && !strings.ContainsAny(g[1:], globMeta):
			return matcher{kind: matchSuffix, lit: g[1:]}
		default:
			return matcher{kind: matchGlob, pattern: g}
		}
	default:
		kvs := make([]labelKV, 0, len(s.Labels))
		for k, v := range s.Labels {
			kvs = append(kvs, labelKV{k, v})
		}
		sort.Slice(kvs, func(i, j int) bool { return kvs[i].key < kvs[j].key })
		return matcher{kind: matchLabels, labels: kvs}
	}
}

func (m *matcher) match(a *Agent) bool {
	switch m.kind {
	case matchExact:
		return a.Name == m.lit
	case matchPrefix:
		return strings.HasPrefix(a.Name, m.lit) && strings.IndexByte(a.Name[len(m.lit):], '/') < 0
	case matchSuffix:
		return strings.HasSuffix(a.Name, m.lit) && strings.IndexByte(a.Name[:len(a.Name)-len(m.lit)], '/') < 0
	case matchAnyName:
		return strings.IndexByte(a.Name, '/') < 0
	case matchGlob:
		ok, err := path.Match(m.pattern, a.Name)
		return err == nil && ok
	case matchLabels:
		for _, kv := range m.labels {
			if v, ok := a.Labels[kv.key]; !ok || v != kv.value {
				return false
			}
		}
		return true
	}
	return false
}

func compile(zones []Zone) *Policy {
	p := &Policy{Zones: zones, byName: make(map[string]*compiledZone, len(zones))}
	for i := range p.Zones {
		z := &p.Zones[i]
		cz := &compiledZone{
			zone:   z,
			rules:  make([]compiledRule, len(z.Rules)),
			pair:   map[pairKey][]int32{},
			byFrom: map[string][]int32{},
			byTo:   map[string][]int32{},

			byLabel: map[labelKV][]int32{},
		}
		for k := range z.Rules {
			r := &z.Rules[k]
			ports := make([]string, len(r.Ports))
			for j, pr := range r.Ports {
				ports[j] = pr.String()
			}
			where := fmt.Sprintf("rule %d", k+1)
			if r.Line > 0 {
				where = fmt.Sprintf("rule %d (line %d)", k+1, r.Line)
			}
			cz.rules[k] = compiledRule{
				from:  compileSelector(r.From),
				to:    compileSelector(r.To),
				ports: r.Ports,
				rule:  r,
				allowMsg: fmt.Sprintf("zone %s %s allows %s to %s on %s",
					z.Name, where, r.From, r.To, strings.Join(ports, ", ")),
			}
			idx := int32(k)
			fromExact, toExact := r.From.Name != "", r.To.Name != ""
			switch {
			case fromExact && toExact:
				key := pairKey{r.From.Name, r.To.Name}
				cz.pair[key] = append(cz.pair[key], idx)
			case fromExact:
				cz.byFrom[r.From.Name] = append(cz.byFrom[r.From.Name], idx)
			case toExact:
				cz.byTo[r.To.Name] = append(cz.byTo[r.To.Name], idx)
			case len(r.From.Labels) > 0:
				first := cz.rules[k].from.labels[0]
				cz.byLabel[first] = append(cz.byLabel[first], idx)
			default:
				cz.rest = append(cz.rest, idx)
			}
		}
		p.byName[z.Name] = cz
	}
	return p
}

// match returns the first rule allowing the flow, and whether any rule matched both endpoints
// (so that a port mismatch can be told apart from no rule at all).
func (cz *compiledZone) match(src, dst *Agent, port uint16, proto Proto) (*compiledRule, bool) {
	endpoints := false
	try := func(list []int32, checkFrom, checkTo bool) *compiledRule {
		for _, i := range list {
			r := &cz.rules[i]
			if checkFrom && !r.from.match(src) {
				continue
			}
			if checkTo && !r.to.match(dst) {
				continue
			}
			endpoints = true
			for _, pr := range r.ports {
				if pr.Contains(proto, port) {
					return r
				}
			}
		}
		return nil
	}
	if r := try(cz.pair[pairKey{src.Name, dst.Name}], false, false); r != nil {
		return r, true
	}
	if r := try(cz.byFrom[src.Name], false, true); r != nil {
		return r, true
	}
	if r := try(cz.byTo[dst.Name], true, false); r != nil {
		return r, true
	}
	if len(cz.byLabel) > 0 {
		for k, v := range src.Labels {
			if r := try(cz.byLabel[labelKV{k, v}], true, true); r != nil {
				return r, true
			}
		}
	}
	if r := try(cz.rest, true, true); r != nil {
		return r, true
	}
	return nil, endpoints
}
