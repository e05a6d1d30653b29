package zones

import (
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/goccy/go-yaml/ast"
	"github.com/goccy/go-yaml/lexer"

	"github.com/ute-project/ute/zones/strictyaml"
)

// MaxPolicySize caps a policy file; a real policy is a few kilobytes.
const MaxPolicySize = 1 << 20

// Structural caps so that a hostile file cannot make validation quadratic in its size.
const (
	maxZones        = 256
	maxCIDRsPerZone = 16
	maxRegions      = 64
	maxRulesPerZone = 10000
	maxPortsPerRule = 64
	maxLabels       = 32
)

// Load reads a policy file and parses it. It is the package's only I/O.
func Load(path string) (*Policy, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read policy: %w", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, MaxPolicySize+1))
	if err != nil {
		return nil, fmt.Errorf("read policy %s: %w", path, err)
	}
	return Parse(path, data)
}

// Parse parses and validates a policy file strictly: unknown keys, duplicate keys, anchors,
// aliases, tags, multiple documents and values of the wrong type are refused. Every error is a
// *ParseError naming filename, line and field and wrapping one of the Err* sentinels.
func Parse(filename string, data []byte) (*Policy, error) {
	if len(data) > MaxPolicySize {
		return nil, errf(filename, pos{}, "", ErrTooLarge, "the file is larger than %d bytes", MaxPolicySize)
	}
	// Nesting is checked on the raw bytes before the YAML library sees them, and again on its
	// tokens before it builds a tree: its memory grows with the square of the depth.
	if _, err := checkDepth(filename, data, MaxDepth); err != nil {
		return nil, err
	}
	file, err := parseYAML(filename, data)
	if err != nil {
		var pe *ParseError
		if errors.As(err, &pe) {
			return nil, err
		}
		return nil, syntaxError(filename, err)
	}
	w := &walker{loc: &locator{file: filename}}
	zones, err := w.document(file)
	if err != nil {
		return nil, err
	}
	if err := validate(zones, w.loc); err != nil {
		return nil, err
	}
	return compile(zones), nil
}

// parseYAML runs the YAML parser after the depth check; strictyaml.Parse turns a panic inside the
// parser into an error (a crash of the authority or a node on a bad file would break invariant I8).
func parseYAML(filename string, data []byte) (f *ast.File, err error) {
	defer func() {
		if r := recover(); r != nil { // the lexer and the depth check; strictyaml.Parse guards the parser
			f, err = nil, fmt.Errorf("the YAML parser failed on this input (%v)", r)
		}
	}()
	tokens := lexer.Tokenize(string(data))
	if _, err := checkTokenDepth(filename, tokens, MaxDepth); err != nil {
		return nil, err
	}
	return strictyaml.Parse(tokens)
}

func syntaxError(filename string, err error) error {
	at, msg := strictyaml.Syntax(err)
	return errf(filename, pos{at.Line, at.Col}, "", ErrSyntax, "%s", msg)
}

type walker struct {
	loc *locator
}

func (w *walker) err(n ast.Node, field string, sentinel error, format string, args ...any) error {
	return errf(w.loc.file, posOf(n), field, sentinel, format, args...)
}

// problem places a strictyaml problem in this package's error type.
func (w *walker) problem(p *strictyaml.Problem) error {
	if p == nil {
		return nil
	}
	at := posOf(p.At)
	return &ParseError{File: w.loc.file, Line: at.line, Column: at.col, Field: p.Field, Err: p.Err}
}

func posOf(n ast.Node) pos {
	p := strictyaml.PosOf(n)
	return pos{p.Line, p.Col}
}

// kind names a node type for error messages.
func kind(n ast.Node) string { return strictyaml.Kind(n) }

// unsupported refuses YAML features whose meaning would not be obvious in a security policy.
func (w *walker) unsupported(n ast.Node, field string) error {
	return w.problem(strictyaml.Unsupported(n, field))
}

// fields reads a mapping, refusing keys outside allowed, and returns the value node of each key.
func (w *walker) fields(n ast.Node, field string, allowed ...string) (map[string]*ast.MappingValueNode, error) {
	es, p := strictyaml.Fields(n, field, allowed...)
	if p != nil {
		return nil, w.problem(p)
	}
	out := make(map[string]*ast.MappingValueNode, len(es))
	for _, e := range es {
		out[e.Key] = e.Pair
	}
	return out, nil
}

func joinField(parent, name string) string { return strictyaml.Join(parent, name) }

func contains(list []string, s string) bool { return slices.Contains(list, s) }

// valuePos places an error about a field's value on the value, or on the key if the value is empty.
func valuePos(mv *ast.MappingValueNode) pos {
	if p := posOf(mv.Value); p.line > 0 {
		if _, null := mv.Value.(*ast.NullNode); !null {
			return p
		}
	}
	return posOf(mv.Key)
}

func (w *walker) str(n ast.Node, field string, hint string) (string, error) {
	if err := w.unsupported(n, field); err != nil {
		return "", err
	}
	s, ok := n.(*ast.StringNode)
	if !ok {
		return "", w.err(n, field, ErrBadValue, "expected a string, got %s; %s", kind(n), hint)
	}
	return s.Value, nil
}

func (w *walker) list(n ast.Node, field string, limit int, hint string) ([]ast.Node, error) {
	if err := w.unsupported(n, field); err != nil {
		return nil, err
	}
	s, ok := n.(*ast.SequenceNode)
	if !ok {
		return nil, w.err(n, field, ErrBadValue, "expected a list, got %s; %s", kind(n), hint)
	}
	if len(s.Values) > limit {
		return nil, w.err(n, field, ErrTooLarge, "more than %d entries", limit)
	}
	return s.Values, nil
}

func (w *walker) integer(n ast.Node, field string) (int, error) {
	if err := w.unsupported(n, field); err != nil {
		return 0, err
	}
	in, ok := n.(*ast.IntegerNode)
	if !ok {
		return 0, w.err(n, field, ErrBadValue, "expected an integer 0..100, got %s", kind(n))
	}
	switch v := in.Value.(type) {
	case int64:
		if v >= -1000 && v <= 1000 {
			return int(v), nil
		}
	case uint64:
		if v <= 1000 {
			return int(v), nil
		}
	}
	return 0, w.err(n, field, ErrThreshold, "%v is outside 0..100", in.Value)
}

// prefixLen reads a prefix length 1..max written as a bare integer (28) or with a slash ("/28").
func (w *walker) prefixLen(n ast.Node, field string, max int) (int, error) {
	if err := w.unsupported(n, field); err != nil {
		return 0, err
	}
	hint := fmt.Sprintf("write a prefix length 1..%d such as %d", max, max-4)
	var text string
	switch v := n.(type) {
	case *ast.IntegerNode:
		text = v.GetToken().Value
	case *ast.StringNode:
		text = strings.TrimPrefix(v.Value, "/")
	default:
		return 0, w.err(n, field, ErrNodePrefix, "expected a prefix length, got %s; %s", kind(n), hint)
	}
	v := 0
	for i, c := range []byte(text) {
		if c < '0' || c > '9' || i >= 3 || (i > 0 && text[0] == '0') {
			return 0, w.err(n, field, ErrNodePrefix, "%q is not a prefix length; %s", text, hint)
		}
		v = v*10 + int(c-'0')
	}
	if text == "" || v < 1 || v > max {
		return 0, w.err(n, field, ErrNodePrefix, "%q is outside 1..%d; %s", text, max, hint)
	}
	return v, nil
}

func (w *walker) document(f *ast.File) ([]Zone, error) {
	if len(f.Docs) > 1 {
		return nil, w.err(f.Docs[1].Body, "", ErrUnsupported, "the file holds %d YAML documents; a policy is one document", len(f.Docs))
	}
	if len(f.Docs) == 0 || f.Docs[0].Body == nil {
		return nil, errf(w.loc.file, pos{1, 1}, "zones", ErrNoZones, "the file is empty; declare zones under zones:")
	}
	top, err := w.fields(f.Docs[0].Body, "", "zones")
	if err != nil {
		return nil, err
	}
	mv, ok := top["zones"]
	if !ok {
		return nil, errf(w.loc.file, posOf(f.Docs[0].Body), "zones", ErrMissingField, "the policy has no zones: list")
	}
	w.loc.top = valuePos(mv)
	items, err := w.list(mv.Value, "zones", maxZones, "write zones as a list of - name: ... entries")
	if err != nil {
		return nil, err
	}
	zones := make([]Zone, 0, len(items))
	w.loc.zones = make([]zoneLoc, 0, len(items))
	for i, item := range items {
		z, zl, err := w.zone(item, fmt.Sprintf("zones[%d]", i))
		if err != nil {
			return nil, err
		}
		zones = append(zones, z)
		w.loc.zones = append(w.loc.zones, zl)
	}
	return zones, nil
}

var zoneFields = []string{"name", "cidr", "regions", "min_trust", "isolate_below", "max_cert_lifetime", "node_prefix", "node_prefix6", "rules", "trustflow"}

func (w *walker) zone(n ast.Node, field string) (Zone, zoneLoc, error) {
	zl := zoneLoc{self: posOf(n), fields: map[string]pos{}}
	f, err := w.fields(n, field, zoneFields...)
	if err != nil {
		return Zone{}, zl, err
	}
	for name, mv := range f {
		zl.fields[name] = valuePos(mv)
	}
	if mv, ok := f["name"]; ok {
		zl.self = posOf(mv.Key)
	}
	z := Zone{Line: zl.self.line}
	for _, req := range []string{"name", "cidr", "regions", "min_trust", "isolate_below"} {
		if _, ok := f[req]; !ok {
			return Zone{}, zl, errf(w.loc.file, zl.self, joinField(field, req), ErrMissingField,
				"every zone needs %s (see docs/zones.md)", req)
		}
	}
	if z.Name, err = w.str(f["name"].Value, field+".name", "write the zone name, e.g. name: payments"); err != nil {
		return Zone{}, zl, err
	}

	// cidr is one prefix or a list of them (IPv4 and IPv6 side by side).
	cidrNode := f["cidr"].Value
	cidrItems := []ast.Node{cidrNode}
	if _, isList := cidrNode.(*ast.SequenceNode); isList {
		if cidrItems, err = w.list(cidrNode, field+".cidr", maxCIDRsPerZone, ""); err != nil {
			return Zone{}, zl, err
		}
	}
	for j, item := range cidrItems {
		sub := fmt.Sprintf("%s.cidr[%d]", field, j)
		s, err := w.str(item, sub, "write a prefix such as 100.100.1.0/24")
		if err != nil {
			return Zone{}, zl, err
		}
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return Zone{}, zl, w.err(item, sub, ErrBadCIDR, "%q is not a CIDR; write it like 100.100.1.0/24 or fd00:100:1::/64", s)
		}
		z.CIDRs = append(z.CIDRs, p)
		zl.cidrs = append(zl.cidrs, posOf(item))
	}

	regions, err := w.list(f["regions"].Value, field+".regions", maxRegions, "write regions: [eu-west-1]")
	if err != nil {
		return Zone{}, zl, err
	}
	for j, item := range regions {
		s, err := w.str(item, fmt.Sprintf("%s.regions[%d]", field, j), "write a region name such as eu-west-1")
		if err != nil {
			return Zone{}, zl, err
		}
		z.Regions = append(z.Regions, s)
		zl.regions = append(zl.regions, posOf(item))
	}

	if z.MinTrust, err = w.integer(f["min_trust"].Value, field+".min_trust"); err != nil {
		return Zone{}, zl, err
	}
	if z.IsolateBelow, err = w.integer(f["isolate_below"].Value, field+".isolate_below"); err != nil {
		return Zone{}, zl, err
	}
	if mv, ok := f["max_cert_lifetime"]; ok {
		sub := field + ".max_cert_lifetime"
		s, err := w.str(mv.Value, sub, "write a duration such as 1h or 30m")
		if err != nil {
			return Zone{}, zl, err
		}
		d, err := time.ParseDuration(s)
		if err != nil || d <= 0 {
			return Zone{}, zl, w.err(mv.Value, sub, ErrBadValue, "%q is not a positive duration; write e.g. 1h or 30m", s)
		}
		z.MaxCertLifetime = d
	}
	for _, np := range []struct {
		name string
		max  int
		into *int
	}{{"node_prefix", 32, &z.NodePrefix}, {"node_prefix6", 128, &z.NodePrefix6}} {
		if mv, ok := f[np.name]; ok {
			if *np.into, err = w.prefixLen(mv.Value, field+"."+np.name, np.max); err != nil {
				return Zone{}, zl, err
			}
		}
	}

	if mv, ok := f["trustflow"]; ok {
		if z.TrustFlow, err = w.trustflow(mv, field+".trustflow"); err != nil {
			return Zone{}, zl, err
		}
	}
	if mv, ok := f["rules"]; ok {
		items, err := w.list(mv.Value, field+".rules", maxRulesPerZone, "write rules as a list of - from: ... to: ... ports: [...] entries, or [] for none")
		if err != nil {
			return Zone{}, zl, err
		}
		for k, item := range items {
			r, rl, err := w.rule(item, fmt.Sprintf("%s.rules[%d]", field, k))
			if err != nil {
				return Zone{}, zl, err
			}
			z.Rules = append(z.Rules, r)
			zl.rules = append(zl.rules, rl)
		}
	}
	return z, zl, nil
}

func (w *walker) rule(n ast.Node, field string) (Rule, ruleLoc, error) {
	rl := ruleLoc{self: posOf(n), fields: map[string]pos{}}
	f, err := w.fields(n, field, "from", "to", "ports")
	if err != nil {
		return Rule{}, rl, err
	}
	for name, mv := range f {
		rl.fields[name] = valuePos(mv)
	}
	if mv, ok := f["from"]; ok {
		rl.self = posOf(mv.Key)
	}
	for _, req := range []string{"from", "to", "ports"} {
		if _, ok := f[req]; !ok {
			return Rule{}, rl, errf(w.loc.file, rl.self, joinField(field, req), ErrMissingField,
				"every rule needs from, to and ports")
		}
	}
	r := Rule{Line: rl.self.line}
	if r.From, err = w.selector(f["from"].Value, field+".from"); err != nil {
		return Rule{}, rl, err
	}
	if r.To, err = w.selector(f["to"].Value, field+".to"); err != nil {
		return Rule{}, rl, err
	}
	ports, err := w.list(f["ports"].Value, field+".ports", maxPortsPerRule, "write ports: [tcp/443] or ports: [any]")
	if err != nil {
		return Rule{}, rl, err
	}
	for j, item := range ports {
		sub := fmt.Sprintf("%s.ports[%d]", field, j)
		if _, isInt := item.(*ast.IntegerNode); isInt {
			return Rule{}, rl, w.err(item, sub, ErrBadPort, "a bare number does not say the protocol; write tcp/%s or udp/%s", item.GetToken().Value, item.GetToken().Value)
		}
		s, err := w.str(item, sub, "write tcp/443, udp/53, tcp/8000-8100, icmp or any")
		if err != nil {
			return Rule{}, rl, err
		}
		pr, err := parsePortRange(s)
		if err != nil {
			return Rule{}, rl, w.err(item, sub, ErrBadPort, "%v", err)
		}
		r.Ports = append(r.Ports, pr)
		rl.ports = append(rl.ports, posOf(item))
	}
	return r, rl, nil
}

// selector reads "name", "glob-*" or {labels: {k: v}}.
func (w *walker) selector(n ast.Node, field string) (Selector, error) {
	if err := w.unsupported(n, field); err != nil {
		return Selector{}, err
	}
	switch v := n.(type) {
	case *ast.StringNode:
		if isGlob(v.Value) {
			return Selector{Glob: v.Value}, nil
		}
		return Selector{Name: v.Value}, nil
	case *ast.MappingNode, *ast.MappingValueNode:
		f, err := w.fields(n, field, "labels")
		if err != nil {
			return Selector{}, err
		}
		mv, ok := f["labels"]
		if !ok {
			return Selector{}, w.err(n, field, ErrBadSelector, "write {labels: {team: billing}}")
		}
		sub := field + ".labels"
		if _, isMap := mv.Value.(*ast.MappingNode); !isMap {
			if _, isPair := mv.Value.(*ast.MappingValueNode); !isPair {
				return Selector{}, w.err(mv.Value, sub, ErrBadSelector, "labels must be a mapping such as {team: billing}, got %s", kind(mv.Value))
			}
		}
		var keys []string
		pairs := map[string]*ast.MappingValueNode{}
		switch m := mv.Value.(type) {
		case *ast.MappingNode:
			for _, p := range m.Values {
				if err := w.labelKey(p, sub, pairs, &keys); err != nil {
					return Selector{}, err
				}
			}
		case *ast.MappingValueNode:
			if err := w.labelKey(m, sub, pairs, &keys); err != nil {
				return Selector{}, err
			}
		}
		if len(keys) == 0 {
			return Selector{}, w.err(mv.Value, sub, ErrBadSelector, "labels must list at least one key: value pair")
		}
		if len(keys) > maxLabels {
			return Selector{}, w.err(mv.Value, sub, ErrTooLarge, "more than %d labels", maxLabels)
		}
		labels := make(map[string]string, len(keys))
		for _, k := range keys {
			val, err := w.str(pairs[k].Value, sub+"."+k, fmt.Sprintf("quote label values, e.g. %s: \"1\"", k))
			if err != nil {
				return Selector{}, err
			}
			labels[k] = val
		}
		return Selector{Labels: labels}, nil
	default:
		return Selector{}, w.err(n, field, ErrBadSelector,
			"expected an agent name, a glob like billing-* or {labels: {team: billing}}, got %s", kind(n))
	}
}

func (w *walker) labelKey(p *ast.MappingValueNode, field string, pairs map[string]*ast.MappingValueNode, keys *[]string) error {
	if err := w.unsupported(p.Key, field); err != nil {
		return err
	}
	k, ok := p.Key.(*ast.StringNode)
	if !ok {
		return w.err(p.Key, field, ErrBadSelector, "label keys must be strings, got %s", kind(p.Key))
	}
	if err := w.unsupported(p.Value, field+"."+k.Value); err != nil {
		return err
	}
	if _, dup := pairs[k.Value]; dup {
		return w.err(p.Key, field+"."+k.Value, ErrBadSelector, "label %q is given twice", k.Value)
	}
	pairs[k.Value] = p
	*keys = append(*keys, k.Value)
	return nil
}
