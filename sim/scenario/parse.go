package scenario

import (
	"errors"
	"fmt"
	"io"
	"os"
	"regexp"
	"slices"
	"strings"

	"github.com/goccy/go-yaml"
	"github.com/goccy/go-yaml/ast"
	"github.com/goccy/go-yaml/lexer"
	"github.com/goccy/go-yaml/parser"
	"github.com/goccy/go-yaml/token"
)

// MaxSize caps a scenario file.
const MaxSize = 256 << 10

// Caps that keep a hostile or mistaken file from asking for more than a run can give.
const (
	MaxNodes    = 5000
	MaxEvents   = 1000
	MaxDilation = 1000
	maxDepth    = 16
)

// Undilated names, for an event kind whose outcome depends on a timer that a run with dilation
// cannot slow down, that timer; "" for the others.
func Undilated(kind string) string {
	switch kind {
	case KindRegionDrift, KindDirCopy:
		return "TrustFlow's evidence and region-file timers in the node daemon (fixed, not injectable)"
	}
	return ""
}

// Sentinels wrapped by every *Error.
var (
	ErrSyntax      = errors.New("syntax")
	ErrUnsupported = errors.New("unsupported")
	ErrInvalid     = errors.New("invalid")
	ErrTooLarge    = errors.New("too large")
)

// Error is a refusal of a scenario file, with its position.
type Error struct {
	File      string
	Line, Col int
	Err       error // wraps a sentinel
}

func (e *Error) Error() string {
	if e.Line > 0 {
		return fmt.Sprintf("%s:%d:%d: %v", e.File, e.Line, e.Col, e.Err)
	}
	return fmt.Sprintf("%s: %v", e.File, e.Err)
}

func (e *Error) Unwrap() error { return e.Err }

// Load reads and parses a scenario file.
func Load(path string) (*Scenario, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read scenario: %w", err)
	}
	defer func() { _ = f.Close() }()
	data, err := io.ReadAll(io.LimitReader(f, MaxSize+1))
	if err != nil {
		return nil, fmt.Errorf("read scenario %s: %w", path, err)
	}
	return Parse(path, data)
}

// Parse parses and validates a scenario; filename is used in errors only.
func Parse(filename string, data []byte) (s *Scenario, err error) {
	if len(data) > MaxSize {
		return nil, &Error{File: filename, Err: fmt.Errorf("%w: the file is larger than %d bytes", ErrTooLarge, MaxSize)}
	}
	defer func() {
		if r := recover(); r != nil { // the YAML library is fed untrusted bytes
			s, err = nil, &Error{File: filename, Err: fmt.Errorf("%w: the YAML parser failed on this input (%v)", ErrSyntax, r)}
		}
	}()
	if err := scanTokens(filename, data); err != nil {
		return nil, err
	}
	file, err := parser.ParseBytes(data, 0)
	if err != nil {
		return nil, yamlError(filename, err)
	}
	if len(file.Docs) != 1 || file.Docs[0].Body == nil {
		return nil, &Error{File: filename, Err: fmt.Errorf("%w: expected exactly one YAML document with a mapping", ErrInvalid)}
	}
	if _, ok := file.Docs[0].Body.(*ast.MappingNode); !ok {
		if _, ok := file.Docs[0].Body.(*ast.MappingValueNode); !ok {
			return nil, &Error{File: filename, Err: fmt.Errorf("%w: the document must be a mapping (name, zones, nodes, timeline …)", ErrInvalid)}
		}
	}
	if err := checkDurations(filename, file.Docs[0].Body); err != nil {
		return nil, err
	}
	s = &Scenario{}
	if err := yaml.NodeToValue(file.Docs[0].Body, s, yaml.DisallowUnknownField()); err != nil {
		return nil, yamlError(filename, err)
	}
	s.file = filename
	v := &validator{file: filename, ast: file}
	for i := range s.Timeline {
		s.Timeline[i].line, _ = v.pos(fmt.Sprintf("$.timeline[%d]", i))
	}
	if err := v.scenario(s); err != nil {
		return nil, err
	}
	return s, nil
}

// scanTokens refuses anchors, aliases, tags, merge keys, several documents and deep nesting
// before the parser builds a tree (its cost grows with the square of the nesting).
func scanTokens(filename string, data []byte) error {
	depth := 0
	for _, tk := range lexer.Tokenize(string(data)) {
		at := func(format string, args ...any) error {
			e := &Error{File: filename, Err: fmt.Errorf(format, args...)}
			if tk.Position != nil {
				e.Line, e.Col = tk.Position.Line, tk.Position.Column
			}
			return e
		}
		switch tk.Type {
		case token.AnchorType, token.AliasType:
			return at("%w: anchors and aliases are not supported; write the value out", ErrUnsupported)
		case token.TagType:
			return at("%w: YAML tags are not supported; remove the !tag", ErrUnsupported)
		case token.MergeKeyType:
			return at("%w: merge keys (<<) are not supported; write the fields out", ErrUnsupported)
		case token.DocumentHeaderType:
			if tk.Position != nil && tk.Position.Line > 1 {
				return at("%w: one document per file", ErrUnsupported)
			}
		case token.SequenceStartType, token.MappingStartType:
			depth++
			if depth > maxDepth {
				return at("%w: more than %d nested [ or {", ErrInvalid, maxDepth)
			}
		case token.SequenceEndType, token.MappingEndType:
			depth = max(0, depth-1)
		}
	}
	return nil
}

// durationKeys are the keys whose values are Durations: they are checked on the tree, where
// their position is known (the decoder reports a bad text value without one).
var durationKeys = map[string]bool{"at": true, "within": true, "interval": true, "latency": true, "jitter": true, "settle": true, "tunnel_idle": true, "warmup": true}

func checkDurations(filename string, root ast.Node) error {
	var err error
	ast.Walk(visitor(func(n ast.Node) bool {
		mv, ok := n.(*ast.MappingValueNode)
		if ok && err == nil && mv.Key != nil && mv.Key.String() == "dilation" {
			// The decoder would truncate 2.5 to 2: a factor is written whole.
			if _, whole := mv.Value.(*ast.IntegerNode); !whole {
				e := &Error{File: filename, Err: fmt.Errorf("%w: dilation: %s is not a whole number", ErrSyntax, mv.Value.String())}
				if tk := mv.Value.GetToken(); tk != nil && tk.Position != nil {
					e.Line, e.Col = tk.Position.Line, tk.Position.Column
				}
				err = e
			}
			return err == nil
		}
		if !ok || err != nil || mv.Key == nil || !durationKeys[mv.Key.String()] {
			return err == nil
		}
		text := mv.Value.String()
		if sn, ok := mv.Value.(*ast.StringNode); ok {
			text = sn.Value
		}
		var d Duration
		if uerr := d.UnmarshalText([]byte(text)); uerr != nil {
			e := &Error{File: filename, Err: fmt.Errorf("%w: %s: %v", ErrSyntax, mv.Key.String(), uerr)}
			if tk := mv.Value.GetToken(); tk != nil && tk.Position != nil {
				e.Line, e.Col = tk.Position.Line, tk.Position.Column
			}
			err = e
		}
		return err == nil
	}), root)
	return err
}

type visitor func(ast.Node) bool

func (v visitor) Visit(n ast.Node) ast.Visitor {
	if v(n) {
		return v
	}
	return nil
}

var posRE = regexp.MustCompile(`^\[(\d+):(\d+)\] ?(.*)$`)

// yamlError turns the library's multi-line error into one line with file:line:col.
func yamlError(filename string, err error) error {
	msg := strings.TrimSpace(err.Error())
	first, _, _ := strings.Cut(msg, "\n")
	e := &Error{File: filename}
	if m := posRE.FindStringSubmatch(first); m != nil {
		_, _ = fmt.Sscan(m[1], &e.Line)
		_, _ = fmt.Sscan(m[2], &e.Col)
		first = m[3]
	}
	e.Err = fmt.Errorf("%w: %s", ErrSyntax, first)
	return e
}

type validator struct {
	file string
	ast  *ast.File
}

// pos is the line and column of the YAML path p; 0 when it is not in the file.
func (v *validator) pos(p string) (int, int) {
	for p != "" && p != "$" {
		path, err := yaml.PathString(p)
		if err == nil {
			if n, err := path.FilterFile(v.ast); err == nil && n != nil {
				if tk := n.GetToken(); tk != nil && tk.Position != nil {
					return tk.Position.Line, tk.Position.Column
				}
			}
		}
		// Fall back to the parent: an absent key is reported where its mapping is.
		i := max(strings.LastIndexByte(p, '.'), strings.LastIndexByte(p, '['))
		if i <= 0 {
			break
		}
		p = p[:i]
	}
	return 0, 0
}

func (v *validator) errf(p, format string, args ...any) error {
	return v.wrapf(ErrInvalid, p, format, args...)
}

func (v *validator) wrapf(sentinel error, p, format string, args ...any) error {
	l, c := v.pos(p)
	field := strings.TrimPrefix(p, "$.")
	return &Error{File: v.file, Line: l, Col: c, Err: fmt.Errorf("%w: %s: %s", sentinel, field, fmt.Sprintf(format, args...))}
}

var nameRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)

func (v *validator) scenario(s *Scenario) error {
	if s.Name == "" {
		return v.errf("$.name", "a scenario needs a name")
	}
	if s.TrustDomain == "" {
		s.TrustDomain = "sim.internal"
	}
	switch s.Gossip {
	case "":
		s.Gossip = "fast"
	case "fast", "lan", "scale":
	default:
		return v.errf("$.gossip", "%q: use fast, lan or scale", s.Gossip)
	}
	if s.Network.Loss < 0 || s.Network.Loss >= 1 {
		return v.errf("$.network.loss", "%v: must be in [0, 1)", s.Network.Loss)
	}
	switch s.Start {
	case "":
		s.Start = "all"
	case "all", "staggered":
	default:
		return v.errf("$.start", "%q: use all or staggered", s.Start)
	}
	if s.Dilation == 0 {
		s.Dilation = 1
	}
	if s.Dilation < 1 || s.Dilation > MaxDilation {
		return v.errf("$.dilation", "%d: a whole factor from 1 (none) to %d", s.Dilation, MaxDilation)
	}
	if s.Limits.Members == 0 {
		s.Limits.Members = 1
	}
	if s.Limits.Members < 0.5 || s.Limits.Members > 1 {
		return v.errf("$.limits.members", "%v: a fraction in [0.5, 1]", s.Limits.Members)
	}
	if s.Limits.Gossip == 0 {
		s.Limits.Gossip = Duration(60e9)
	}
	if len(s.Zones) == 0 {
		return v.errf("$.zones", "at least one zone is required")
	}
	zones := map[string]bool{}
	for i, z := range s.Zones {
		p := fmt.Sprintf("$.zones[%d]", i)
		if !nameRE.MatchString(z.Name) {
			return v.errf(p+".name", "%q is not a zone name (lowercase letters, digits, -)", z.Name)
		}
		if zones[z.Name] {
			return v.errf(p+".name", "zone %q is declared twice", z.Name)
		}
		zones[z.Name] = true
		if !validCIDR(z.CIDR) {
			return v.errf(p+".cidr", "%q is not a CIDR such as 100.100.1.0/24", z.CIDR)
		}
		if len(z.Regions) == 0 {
			return v.errf(p+".regions", "zone %s needs at least one region", z.Name)
		}
	}
	agents := map[string]string{} // agent.zone -> node
	nodes := map[string]*Group{}
	groups := map[string]bool{}
	total := 0
	for i := range s.Nodes {
		g := &s.Nodes[i]
		p := fmt.Sprintf("$.nodes[%d]", i)
		if !nameRE.MatchString(g.Name) {
			return v.errf(p+".name", "%q is not a node name (lowercase letters, digits, -)", g.Name)
		}
		if groups[g.Name] {
			return v.errf(p+".name", "group %q is declared twice", g.Name)
		}
		groups[g.Name] = true
		if g.Count == 0 {
			g.Count = 1
		}
		if g.Count < 0 || g.Count > MaxNodes {
			return v.errf(p+".count", "%d: must be 1-%d", g.Count, MaxNodes)
		}
		total += g.Count
		if total > MaxNodes {
			return v.errf(p+".count", "the topology has more than %d nodes", MaxNodes)
		}
		if len(g.Zones) == 0 {
			return v.errf(p+".zones", "group %s needs at least one zone", g.Name)
		}
		for j, z := range g.Zones {
			if !zones[z] {
				return v.errf(fmt.Sprintf("%s.zones[%d]", p, j), "zone %q is not declared under zones", z)
			}
			if g.Region == "" {
				continue
			}
			if zi := slices.IndexFunc(s.Zones, func(x Zone) bool { return x.Name == z }); !slices.Contains(s.Zones[zi].Regions, g.Region) {
				return v.errf(p+".region", "region %q is not among zone %s's regions %v", g.Region, z, s.Zones[zi].Regions)
			}
		}
		if g.Region == "" {
			return v.errf(p+".region", "group %s needs a region", g.Name)
		}
		for _, n := range g.NodeNames() {
			if nodes[n] != nil {
				return v.errf(p+".name", "node name %q is used by two groups", n)
			}
			nodes[n] = g
		}
		for j, a := range g.Agents {
			ap := fmt.Sprintf("%s.agents[%d]", p, j)
			if !nameRE.MatchString(a.Name) {
				return v.errf(ap+".name", "%q is not an agent name", a.Name)
			}
			if !slices.Contains(g.Zones, a.Zone) {
				return v.errf(ap+".zone", "agent %s is in zone %q, which group %s does not serve", a.Name, a.Zone, g.Name)
			}
			for k, n := range g.NodeNames() {
				key := g.AgentName(a, k) + "." + a.Zone
				if prev, ok := agents[key]; ok {
					return v.errf(ap+".name", "agent %s is declared on node %s and %s", key, prev, n)
				}
				agents[key] = n
			}
		}
	}
	if total == 0 {
		return v.errf("$.nodes", "at least one node is required")
	}
	agentRef := func(p, ref string) (AgentRef, error) {
		a, err := ParseAgentRef(ref)
		if err != nil {
			return a, v.errf(p, "%v", err)
		}
		if _, ok := agents[a.String()]; !ok {
			return a, v.errf(p, "no node runs agent %s", a)
		}
		return a, nil
	}
	dest := func(p, ref string) (Dest, error) {
		d, err := ParseDest(ref)
		if err != nil {
			return d, v.errf(p, "%v", err)
		}
		if _, ok := agents[d.AgentRef.String()]; !ok {
			return d, v.errf(p, "no node runs agent %s", d.AgentRef)
		}
		return d, nil
	}
	node := func(p, name string) error {
		if nodes[name] == nil {
			return v.errf(p, "no node is named %q", name)
		}
		return nil
	}
	for i, t := range s.Traffic {
		p := fmt.Sprintf("$.traffic[%d]", i)
		if _, err := agentRef(p+".from", t.From); err != nil {
			return err
		}
		if _, err := dest(p+".to", t.To); err != nil {
			return err
		}
		if t.Interval.D() < 10e6 {
			return v.errf(p+".interval", "an interval of at least 10ms is required")
		}
	}
	if len(s.Timeline) > MaxEvents {
		return v.errf("$.timeline", "more than %d events", MaxEvents)
	}
	var last Duration
	for i := range s.Timeline {
		e := &s.Timeline[i]
		p := fmt.Sprintf("$.timeline[%d]", i)
		if e.At < last {
			return v.errf(p+".at", "events must be in time order (%s is before the previous event's %s)", e.At.D(), last.D())
		}
		last = e.At
		if why := Undilated(e.Kind); why != "" && s.Dilation > 1 {
			return v.errf(p+".event", "%s cannot run with dilation %d: it waits on %s", e.Kind, s.Dilation, why)
		}
		if why, ok := unsupported[e.Kind]; ok {
			return v.wrapf(ErrUnsupported, p+".event", "%s is not supported in this version: %s", e.Kind, why)
		}
		need := func(field, val string) error {
			if val == "" {
				return v.errf(p, "event %s needs %s", e.Kind, field)
			}
			return nil
		}
		blocking := false
		switch e.Kind {
		case KindFlow, KindLateral:
			if err := need("from", e.From); err != nil {
				return err
			}
			if err := need("to", e.To); err != nil {
				return err
			}
			from, err := agentRef(p+".from", e.From)
			if err != nil {
				return err
			}
			to, err := dest(p+".to", e.To)
			if err != nil {
				return err
			}
			if e.Kind == KindLateral && from.Zone == to.Zone {
				return v.errf(p+".to", "lateral movement crosses zones; %s and %s are both in %s", from, to.AgentRef, from.Zone)
			}
			blocking = true
		case KindReplay:
			if err := need("from", e.From); err != nil {
				return err
			}
			if err := need("to", e.To); err != nil {
				return err
			}
			from, err := agentRef(p+".from", e.From)
			if err != nil {
				return err
			}
			to, err := dest(p+".to", e.To)
			if err != nil {
				return err
			}
			if from.Zone != to.Zone {
				return v.errf(p+".to", "a replay needs a flow that was admitted once: %s and %s are in different zones", from, to.AgentRef)
			}
			if e.Via != "" {
				if err := node(p+".via", e.Via); err != nil {
					return err
				}
				if !slices.Contains(nodes[e.Via].Zones, from.Zone) {
					return v.errf(p+".via", "node %s does not serve zone %s, so it has no tunnel to replay on", e.Via, from.Zone)
				}
			}
			blocking = true
		case KindTokenReuse:
			if err := need("node", e.Node); err != nil {
				return err
			}
			if err := node(p+".node", e.Node); err != nil {
				return err
			}
			blocking = true
		case KindForged:
			for _, f := range [][2]string{{"via", e.Via}, {"zone", e.Zone}, {"to", e.To}} {
				if err := need(f[0], f[1]); err != nil {
					return err
				}
			}
			if err := node(p+".via", e.Via); err != nil {
				return err
			}
			if !zones[e.Zone] {
				return v.errf(p+".zone", "zone %q is not declared", e.Zone)
			}
			to, err := dest(p+".to", e.To)
			if err != nil {
				return err
			}
			if to.Zone != e.Zone {
				return v.errf(p+".to", "the forged certificate claims zone %s, so the target must be in it", e.Zone)
			}
			toNode := nodes[agents[to.AgentRef.String()]]
			shared := false
			for _, z := range nodes[e.Via].Zones {
				shared = shared || slices.Contains(toNode.Zones, z)
			}
			if !shared {
				return v.errf(p+".via", "node %s shares no zone with %s's node, so it has no tunnel to send the forged flow on", e.Via, to.AgentRef)
			}
			blocking = true
		case KindRevoke:
			switch {
			case (e.Agent == "") == (e.Node == ""):
				return v.errf(p, "revoke names exactly one of agent or node")
			case e.Agent != "":
				if _, err := agentRef(p+".agent", e.Agent); err != nil {
					return err
				}
			default:
				if err := node(p+".node", e.Node); err != nil {
					return err
				}
			}
		case KindPartition:
			if len(e.Sets) < 1 {
				return v.errf(p+".sets", "a partition lists at least one set of groups or nodes")
			}
			seen := map[string]bool{}
			for j, set := range e.Sets {
				for k, name := range set {
					sp := fmt.Sprintf("%s.sets[%d][%d]", p, j, k)
					if !groups[name] && nodes[name] == nil {
						return v.errf(sp, "%q is neither a group nor a node", name)
					}
					if seen[name] {
						return v.errf(sp, "%q is in two sets", name)
					}
					seen[name] = true
				}
			}
		case KindRegionDrift:
			if err := need("node", e.Node); err != nil {
				return err
			}
			if err := node(p+".node", e.Node); err != nil {
				return err
			}
			if err := need("region", e.Region); err != nil {
				return err
			}
			if !nameRE.MatchString(e.Region) {
				return v.errf(p+".region", "%q is not a region name (lowercase letters, digits, -)", e.Region)
			}
			if err := need("to", e.To); err != nil {
				return err
			}
			if _, err := dest(p+".to", e.To); err != nil {
				return err
			}
			if e.From != "" {
				from, err := agentRef(p+".from", e.From)
				if err != nil {
					return err
				}
				if agents[from.String()] != e.Node {
					return v.errf(p+".from", "agent %s runs on node %s, not on the drifting node %s", from, agents[from.String()], e.Node)
				}
			} else if len(nodes[e.Node].Agents) == 0 {
				return v.errf(p+".node", "node %s runs no agent to send the flows that show the drift", e.Node)
			}
			blocking = true
		case KindExeSwap:
			if err := need("agent", e.Agent); err != nil {
				return err
			}
			if _, err := agentRef(p+".agent", e.Agent); err != nil {
				return err
			}
			if err := need("to", e.To); err != nil {
				return err
			}
			if _, err := dest(p+".to", e.To); err != nil {
				return err
			}
			blocking = true
		case KindDirCopy:
			if err := need("node", e.Node); err != nil {
				return err
			}
			if err := node(p+".node", e.Node); err != nil {
				return err
			}
			if err := need("to", e.To); err != nil {
				return err
			}
			to, err := dest(p+".to", e.To)
			if err != nil {
				return err
			}
			if agents[to.AgentRef.String()] == e.Node {
				return v.errf(p+".to", "%s runs on the copied node itself; name an agent on another node", to.AgentRef)
			}
			var ok bool
			for _, a := range nodes[e.Node].Agents {
				ok = ok || a.Zone == to.Zone
			}
			if !ok {
				return v.errf(p+".node", "node %s runs no agent in zone %s to send the copy's flows", e.Node, to.Zone)
			}
			blocking = true
		case KindChurn:
			if err := need("group", e.Group); err != nil {
				return err
			}
			if !groups[e.Group] {
				return v.errf(p+".group", "no group is named %q", e.Group)
			}
			if e.Count == 0 {
				e.Count = 1
			}
			if e.Rounds == 0 {
				e.Rounds = 1
			}
			if e.Down == 0 {
				e.Down = Duration(500e6)
			}
			gi := slices.IndexFunc(s.Nodes, func(g Group) bool { return g.Name == e.Group })
			if e.Count < 0 || e.Count >= s.Nodes[gi].Count {
				return v.errf(p+".count", "%d: between 1 and the group's size minus one (%d)", e.Count, s.Nodes[gi].Count-1)
			}
			if e.Rounds < 0 || e.Rounds > 100 {
				return v.errf(p+".rounds", "%d: between 1 and 100", e.Rounds)
			}
		case KindPolicy:
			if err := need("zone", e.Zone); err != nil {
				return err
			}
			if !zones[e.Zone] {
				return v.errf(p+".zone", "zone %q is not declared", e.Zone)
			}
		case KindHeal:
		case KindCrash, KindRejoin:
			if err := need("node", e.Node); err != nil {
				return err
			}
			if err := node(p+".node", e.Node); err != nil {
				return err
			}
		case "":
			return v.errf(p+".event", "every timeline entry needs an event")
		default:
			return v.errf(p+".event", "unknown event %q", e.Kind)
		}
		if err := v.expect(p, e, blocking); err != nil {
			return err
		}
	}
	return nil
}

func (v *validator) expect(p string, e *Event, blocking bool) error {
	x := &e.Expect
	switch e.Kind {
	case KindRevoke, KindHeal, KindRejoin, KindChurn, KindPolicy:
		if x.Outcome == "" {
			x.Outcome = "converged"
		}
		if x.Outcome != "converged" {
			return v.errf(p+".expect.outcome", "%s expects converged", e.Kind)
		}
		if x.Converged == 0 {
			x.Converged = 1
		}
		if x.Converged < 0 || x.Converged > 1 {
			return v.errf(p+".expect.converged", "%v: a fraction in (0, 1]", x.Converged)
		}
		if x.Within == 0 {
			x.Within = Duration(10e9)
		}
	case KindPartition, KindCrash:
		if x.Outcome != "" {
			return v.errf(p+".expect.outcome", "%s has no outcome to expect", e.Kind)
		}
	default:
		if !blocking {
			break
		}
		switch x.Outcome {
		case "":
			return v.errf(p+".expect.outcome", "say whether %s must be blocked or allowed", e.Kind)
		case "blocked", "allowed":
		default:
			return v.errf(p+".expect.outcome", "%q: use blocked or allowed", x.Outcome)
		}
		if x.Within == 0 {
			x.Within = Duration(5e9)
		}
	}
	if x.LeakedBytes < 0 {
		return v.errf(p+".expect.leaked_bytes", "must be >= 0")
	}
	if x.FalseDenials != nil && *x.FalseDenials < 0 {
		return v.errf(p+".expect.false_denials", "must be >= 0")
	}
	return nil
}
