package config

import (
	"fmt"
	"io"
	"os"
	"time"

	"github.com/goccy/go-yaml/ast"
	"github.com/goccy/go-yaml/lexer"
	"github.com/goccy/go-yaml/token"

	"github.com/ute-project/ute/zones/strictyaml"
)

// MaxSize caps a config file: a real one is well under a kilobyte, and the YAML parser's cost
// grows faster than linearly with nesting.
const MaxSize = 64 << 10

// MaxDepth caps flow nesting ([ and {) and compact block nesting (- - x on one line). The schema
// needs three levels; the cap is checked on the tokens before the parser sees the file, since
// the parser is quadratic in nesting (64 KiB of [ takes it seconds).
const MaxDepth = 16

// Load reads and parses the config file at path.
func Load(path string) (Config, error) {
	f, err := os.Open(path)
	if err != nil {
		return Config{}, fmt.Errorf("read config: %w", err)
	}
	defer func() { _ = f.Close() }()
	data, err := io.ReadAll(io.LimitReader(f, MaxSize+1))
	if err != nil {
		return Config{}, fmt.Errorf("read config %s: %w", path, err)
	}
	return Parse(path, data)
}

// Parse parses a config file's bytes; filename is used in errors only. Keys that are absent keep
// Default's value. Every error is a *ParseError wrapping one of the sentinels.
func Parse(filename string, data []byte) (Config, error) {
	if len(data) > MaxSize {
		return Config{}, errAt(filename, pos{}, "", valueError(ErrTooLarge, "the file is larger than %d bytes", MaxSize))
	}
	if err := checkDepth(filename, string(data)); err != nil {
		return Config{}, err
	}
	file, err := parseYAML(data)
	if err != nil {
		return Config{}, syntaxError(filename, err)
	}
	w := &walker{file: filename}
	return w.document(file)
}

// checkDepth refuses deep nesting from the token stream, which the lexer produces in linear time.
func checkDepth(filename, src string) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = errAt(filename, pos{}, "", valueError(ErrSyntax, "the YAML lexer failed on this input (%v)", r))
		}
	}()
	flow, run, runLine := 0, 0, -1
	for _, tk := range lexer.Tokenize(src) {
		switch tk.Type {
		case token.SequenceStartType, token.MappingStartType:
			flow++
			if flow > MaxDepth {
				return errAt(filename, tokenPos(tk), "", valueError(ErrTooDeep, "more than %d nested [ or {; a node config needs three levels", MaxDepth))
			}
		case token.SequenceEndType, token.MappingEndType:
			if flow > 0 {
				flow--
			}
		case token.SequenceEntryType, token.MappingKeyType:
			line := tokenPos(tk).line
			if line != runLine {
				run, runLine = 0, line
			}
			run++
			if run > MaxDepth {
				return errAt(filename, tokenPos(tk), "", valueError(ErrTooDeep, "more than %d nested entries on one line", MaxDepth))
			}
		default:
			runLine = -1
		}
	}
	return nil
}

func tokenPos(tk *token.Token) pos {
	p := strictyaml.TokenPos(tk)
	return pos{p.Line, p.Col}
}

// parseYAML runs the parser; strictyaml.Parse turns a panic inside it into an error: it is fed
// bytes an operator (or whoever can write the file) controls, and the daemon must not crash on them.
func parseYAML(data []byte) (*ast.File, error) {
	tokens, err := tokenize(string(data))
	if err != nil {
		return nil, err
	}
	return strictyaml.Parse(tokens)
}

func tokenize(src string) (tokens token.Tokens, err error) {
	defer func() {
		if r := recover(); r != nil {
			tokens, err = nil, fmt.Errorf("the YAML lexer failed on this input (%v)", r)
		}
	}()
	return lexer.Tokenize(src), nil
}

func syntaxError(filename string, err error) error {
	at, msg := strictyaml.Syntax(err)
	return errAt(filename, pos{at.Line, at.Col}, "", valueError(ErrSyntax, "%s", msg))
}

type walker struct{ file string }

func (w *walker) err(n ast.Node, field string, sentinel error, format string, args ...any) error {
	return errAt(w.file, posOf(n), field, valueError(sentinel, format, args...))
}

// wrap places a value error from a scalar parser on node n.
func (w *walker) wrap(n ast.Node, field string, err error) error {
	return errAt(w.file, posOf(n), field, err)
}

// problem places a strictyaml problem in this package's error type.
func (w *walker) problem(p *strictyaml.Problem) error {
	if p == nil {
		return nil
	}
	return errAt(w.file, posOf(p.At), p.Field, p.Err)
}

func posOf(n ast.Node) pos {
	p := strictyaml.PosOf(n)
	return pos{p.Line, p.Col}
}

func kind(n ast.Node) string { return strictyaml.Kind(n) }

func (w *walker) unsupported(n ast.Node, field string) error {
	return w.problem(strictyaml.Unsupported(n, field))
}

// entry is one key of a mapping with its position, kept in file order.
type entry struct {
	key  string
	kpos ast.Node
	val  ast.Node
}

// fields reads a mapping, refusing unknown, duplicate and non-string keys.
func (w *walker) fields(n ast.Node, field string, allowed ...string) ([]entry, error) {
	es, p := strictyaml.Fields(n, field, allowed...)
	if p != nil {
		return nil, w.problem(p)
	}
	out := make([]entry, len(es))
	for i, e := range es {
		out[i] = entry{key: e.Key, kpos: e.Pair.Key, val: e.Value}
	}
	return out, nil
}

func join(parent, name string) string { return strictyaml.Join(parent, name) }

// at is the node an error about e's value points to: the value, or the key when it is empty.
func (e entry) at() ast.Node {
	if _, null := e.val.(*ast.NullNode); null || e.val == nil || posOf(e.val).line == 0 {
		return e.kpos
	}
	return e.val
}

// str reads a string scalar. Quoted and plain scalars are both strings; numbers, booleans and
// collections are refused, so "listen: 7444" gets a hint instead of a silent conversion.
func (w *walker) str(e entry, field, hint string) (string, error) {
	s, ok := e.val.(*ast.StringNode)
	if !ok {
		return "", w.err(e.at(), field, ErrBadValue, "expected a string, got %s; %s", kind(e.val), hint)
	}
	return s.Value, nil
}

// optStr is str for keys where an empty value means "unset".
func (w *walker) optStr(e entry, field, hint string) (string, error) {
	if _, null := e.val.(*ast.NullNode); null || e.val == nil {
		return "", nil
	}
	return w.str(e, field, hint)
}

func (w *walker) duration(e entry, field string, lo, hi time.Duration) (time.Duration, error) {
	s, err := w.str(e, field, "write a duration with a unit, e.g. 200ms, 5s or 1m")
	if err != nil {
		return 0, err
	}
	d, err := parseDuration(s, lo, hi)
	if err != nil {
		return 0, w.wrap(e.at(), field, err)
	}
	return d, nil
}

var topFields = []string{"listen", "advertise", "interface", "transport", "peers", "metrics", "log", "gossip", "renewal", "authority", "agents"}

func (w *walker) document(f *ast.File) (Config, error) {
	c := Default()
	if len(f.Docs) > 1 {
		return Config{}, w.err(f.Docs[1].Body, "", ErrUnsupported, "the file holds %d YAML documents; a config is one document", len(f.Docs))
	}
	if len(f.Docs) == 0 || f.Docs[0].Body == nil {
		return c, nil // an empty file (or only comments) is the default configuration
	}
	if _, null := f.Docs[0].Body.(*ast.NullNode); null {
		return c, nil
	}
	top, err := w.fields(f.Docs[0].Body, "", topFields...)
	if err != nil {
		return Config{}, err
	}
	for _, e := range top {
		if err := w.top(&c, e); err != nil {
			return Config{}, err
		}
	}
	return c, nil
}

func (w *walker) top(c *Config, e entry) (err error) {
	field := e.key
	scalar := func(hint string, optional bool, parse func(string) error) error {
		var s string
		if optional {
			s, err = w.optStr(e, field, hint)
		} else {
			s, err = w.str(e, field, hint)
		}
		if err != nil {
			return err
		}
		if err := parse(s); err != nil {
			return w.wrap(e.at(), field, err)
		}
		return nil
	}
	const addrHint = "write an IP address and port such as 127.0.0.1:7444"
	switch e.key {
	case "listen":
		return scalar(addrHint, false, func(s string) (err error) { c.Listen, err = parseListen(s); return })
	case "advertise":
		return scalar(addrHint, true, func(s string) (err error) { c.Advertise, err = parseAdvertise(s); return })
	case "metrics":
		return scalar("write a loopback address such as 127.0.0.1:9464, or leave it empty for no metrics", true,
			func(s string) (err error) { c.Metrics, err = parseMetrics(s); return })
	case "authority":
		return scalar("write the authority's UDP address such as 10.0.0.1:7443", true,
			func(s string) (err error) { c.Authority, err = parseAuthority(s); return })
	case "interface":
		return scalar("write netstack, tun or proxy", false, func(s string) (err error) { c.Interface, err = parseInterface(s); return })
	case "transport":
		return scalar("write quic or wireguard", false, func(s string) (err error) { c.Transport, err = parseTransport(s); return })
	case "peers":
		c.Peers, err = w.peers(e)
		return err
	case "log":
		return w.log(c, e)
	case "gossip":
		return w.gossip(c, e)
	case "renewal":
		return w.renewal(c, e)
	case "agents":
		c.Agents, err = w.agents(e)
		return err
	}
	return nil
}

func (w *walker) peers(e entry) ([]Peer, error) {
	if _, null := e.val.(*ast.NullNode); null {
		return nil, nil
	}
	seq, ok := e.val.(*ast.SequenceNode)
	if !ok {
		return nil, w.err(e.at(), "peers", ErrBadValue, "expected a list of - node: NAME  addr: IP:PORT entries, got %s", kind(e.val))
	}
	if len(seq.Values) > maxPeers {
		return nil, w.err(seq, "peers", ErrTooLarge, "more than %d peers; list a few, gossip finds the rest", maxPeers)
	}
	out := make([]Peer, 0, len(seq.Values))
	seen := map[string]bool{}
	for i, item := range seq.Values {
		field := fmt.Sprintf("peers[%d]", i)
		fs, err := w.fields(item, field, "node", "addr")
		if err != nil {
			return nil, err
		}
		var p Peer
		var have [2]bool
		for _, f := range fs {
			sub := join(field, f.key)
			switch f.key {
			case "node":
				s, err := w.str(f, sub, "write the peer's node name or SPIFFE ID")
				if err != nil {
					return nil, err
				}
				if p.Node, err = parsePeerNode(s); err != nil {
					return nil, w.wrap(f.at(), sub, err)
				}
				if seen[p.Node] {
					return nil, w.err(f.at(), sub, ErrBadValue, "peer %q is listed twice", p.Node)
				}
				seen[p.Node] = true
				have[0] = true
			case "addr":
				s, err := w.str(f, sub, "write the peer's IP and port such as 10.0.0.2:7444")
				if err != nil {
					return nil, err
				}
				if p.Addr, err = parsePeerAddr(s); err != nil {
					return nil, w.wrap(f.at(), sub, err)
				}
				have[1] = true
			}
		}
		for j, name := range []string{"node", "addr"} {
			if !have[j] {
				at := item
				if len(fs) > 0 {
					at = fs[0].kpos // the entry's first key, where a reader looks for the missing one
				}
				return nil, w.err(at, join(field, name), ErrBadValue, "every peer needs node and addr")
			}
		}
		out = append(out, p)
	}
	return out, nil
}

func (w *walker) log(c *Config, e entry) error {
	fs, err := w.fields(e.val, "log", "level", "format")
	if err != nil {
		return err
	}
	for _, f := range fs {
		field := join("log", f.key)
		switch f.key {
		case "level":
			s, err := w.str(f, field, "write debug, info, warn or error")
			if err != nil {
				return err
			}
			if c.Log.Level, err = parseLogLevel(s); err != nil {
				return w.wrap(f.at(), field, err)
			}
		case "format":
			s, err := w.str(f, field, "write text or json")
			if err != nil {
				return err
			}
			if c.Log.Format, err = parseLogFormat(s); err != nil {
				return w.wrap(f.at(), field, err)
			}
		}
	}
	return nil
}

func (w *walker) gossip(c *Config, e entry) error {
	fs, err := w.fields(e.val, "gossip", "interval", "probe_interval", "push_pull_interval", "retransmit_mult", "tunnel_idle")
	if err != nil {
		return err
	}
	for _, f := range fs {
		field := join("gossip", f.key)
		switch f.key {
		case "interval":
			c.Gossip.Interval, err = w.duration(f, field, minGossipInterval, maxGossipInterval)
		case "probe_interval":
			c.Gossip.ProbeInterval, err = w.duration(f, field, minProbeInterval, maxProbeInterval)
		case "push_pull_interval":
			c.Gossip.PushPullInterval, err = w.duration(f, field, minPushPull, maxPushPull)
		case "retransmit_mult":
			c.Gossip.RetransmitMult, err = w.smallInt(f, field, 1, maxRetransmitMult)
		case "tunnel_idle":
			c.Gossip.TunnelIdle, err = w.duration(f, field, minTunnelIdle, maxTunnelIdle)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

func (w *walker) smallInt(e entry, field string, lo, hi int) (int, error) {
	in, ok := e.val.(*ast.IntegerNode)
	if !ok {
		return 0, w.err(e.at(), field, ErrBadValue, "expected an integer %d..%d, got %s", lo, hi, kind(e.val))
	}
	switch v := in.Value.(type) {
	case int64:
		if v >= int64(lo) && v <= int64(hi) {
			return int(v), nil
		}
	case uint64:
		if v >= uint64(lo) && v <= uint64(hi) {
			return int(v), nil
		}
	}
	return 0, w.err(e.at(), field, ErrBadValue, "%s is outside %d..%d", in.GetToken().Value, lo, hi)
}

func (w *walker) renewal(c *Config, e entry) error {
	fs, err := w.fields(e.val, "renewal", "min_retry", "max_retry", "timeout")
	if err != nil {
		return err
	}
	var last entry
	for _, f := range fs {
		field := join("renewal", f.key)
		switch f.key {
		case "min_retry":
			c.Renewal.MinRetry, err = w.duration(f, field, minRetry, maxRetry)
		case "max_retry":
			c.Renewal.MaxRetry, err = w.duration(f, field, minRetry, maxRetry)
		case "timeout":
			c.Renewal.Timeout, err = w.duration(f, field, minRenewTimeout, maxRenewTimeout)
		}
		if err != nil {
			return err
		}
		if f.key != "timeout" {
			last = f
		}
	}
	if c.Renewal.MinRetry > c.Renewal.MaxRetry {
		field := "renewal"
		if last.val != nil {
			field = join("renewal", last.key)
		}
		at := e.kpos
		if last.val != nil {
			at = last.at()
		}
		return w.err(at, field, ErrBadValue, "min_retry %s is longer than max_retry %s", c.Renewal.MinRetry, c.Renewal.MaxRetry)
	}
	return nil
}
