package zones

import (
	"bytes"
	"strings"

	"github.com/goccy/go-yaml/token"
)

// MaxDepth is how deeply collections (lists and mappings) may nest in a policy. The schema needs
// eight levels at most (zones, a zone, its rules, a rule, a selector, its labels); the YAML parser's
// memory grows with the square of the nesting depth (50,000 levels took 3.85 GB), so a document
// nested deeper than this is refused before the parser builds anything.
const MaxDepth = 32

// depthTracker counts open collections. It is fed either by the byte scanner (checkDepth) or by
// the YAML lexer's tokens (checkTokenDepth); both refuse as soon as the count passes the limit, so
// its stacks never hold more than limit+1 entries and checking costs a fixed amount of memory.
//
// Block collections are identified by the column of their indicator (- ? :) or first key: a
// collection nested in another starts at a greater column, except a list that is the value of a
// key, which may start at the key's column. Flow collections are counted by their brackets, and a
// "key: value" entry inside a flow list counts as one more level (it is a one-pair mapping).
type depthTracker struct {
	file  string
	limit int
	block []blockLevel
	flow  []flowLevel
	maps  int // open '{' among flow
	// flowPeak is the most levels the current (or last) outermost flow collection reached.
	flowPeak int
	// dangling is set by an anchor or tag that ends its line: the parser makes the next node
	// its value wherever that node starts ("a: !t\nb:" nests b under a), so the next block
	// node is counted one level deeper, whatever its column.
	dangling bool
	max      int // deepest count seen, for tests comparing the estimate with the parser's tree
}

type blockLevel struct {
	col  int
	kind byte // 's' list, 'm' mapping
	// open marks a list entry whose "-" ended its line (anchors, tags and comments aside): the
	// parser takes a key on a later line at the dash's own column as that entry's content, one
	// level deeper, so "-\na:\n-\nb:\n..." nests without ever moving right.
	open bool
}

type flowLevel struct {
	kind  byte // '[' or '{'
	extra int  // levels that the current entry adds without a bracket: "- " entries, key: value pairs
	key   bool // a '{' entry has had its key indicator, which opens no level of its own
	dash  bool // the current entry holds a "- " list entry
}

func newDepthTracker(file string, limit int) *depthTracker {
	return &depthTracker{
		file:  file,
		limit: limit,
		block: make([]blockLevel, 0, limit+1),
		flow:  make([]flowLevel, 0, limit+1),
	}
}

func (d *depthTracker) depth() int {
	n := len(d.block) + len(d.flow)
	for _, f := range d.flow {
		n += f.extra
	}
	return n
}

func (d *depthTracker) check(line, col int) error {
	n := d.depth()
	if len(d.flow) > 0 {
		d.flowPeak = max(d.flowPeak, n-len(d.block))
	}
	return d.checkDepth(line, col, n)
}

// keyNode records a block key whose node was a flow collection ("[a, [b]]: c"): the mapping
// holds the key, so the collection's levels count below the mapping's.
func (d *depthTracker) keyNode(line, col int, afterFlow bool) error {
	if err := d.blockNode(line, col, 'm'); err != nil || !afterFlow {
		return err
	}
	return d.checkDepth(line, col+1, d.depth()+d.flowPeak)
}

// explicitValue records a ':' that opens a line: the value of the node before it, which becomes
// a key wherever it started ("!t - a\n: b" makes the list a key), so the mapping is counted
// around whatever is open.
func (d *depthTracker) explicitValue(line, col int) error { return d.pushBlock(line, col, 'm') }

func (d *depthTracker) checkDepth(line, col, n int) error {
	if n > d.max {
		d.max = n
	}
	if n > d.limit {
		return errf(d.file, pos{line, col}, "", ErrTooDeep,
			"lists and mappings nest more than %d levels deep here; a policy needs at most 8", d.limit)
	}
	return nil
}

// reset forgets block structure at a document marker.
func (d *depthTracker) reset() { d.block = d.block[:0] }

// blockNode records a block list entry or mapping key at col.
func (d *depthTracker) blockNode(line, col int, kind byte) error {
	if d.dangling {
		d.dangling = false
		return d.pushBlock(line, col, kind)
	}
	for len(d.block) > 0 && d.block[len(d.block)-1].col > col {
		d.block = d.block[:len(d.block)-1]
	}
	if n := len(d.block); n > 0 && d.block[n-1].col == col {
		if d.block[n-1].kind == kind {
			return nil // a sibling in the same collection
		}
		if kind == 'm' && d.block[n-1].open {
			d.block[n-1].open = false // the key is the open entry's content: push it
		} else if kind == 'm' {
			// A key at the column of a list ends that list: the list was the value of a key in
			// the mapping below it, and this key is that key's sibling.
			d.block = d.block[:n-1]
			if n > 1 && d.block[n-2].col == col && d.block[n-2].kind == 'm' {
				return nil
			}
		}
	}
	return d.pushBlock(line, col, kind)
}

func (d *depthTracker) pushBlock(line, col int, kind byte) error {
	if len(d.block) == cap(d.block) {
		return d.check(line, col+1) // unreachable while check refuses at limit+1; keeps append in bounds
	}
	d.block = append(d.block, blockLevel{col: col, kind: kind})
	return d.check(line, col+1)
}

// openEntry marks the innermost block list's current entry as open (see blockLevel.open).
func (d *depthTracker) openEntry(open bool) {
	if n := len(d.block); n > 0 && d.block[n-1].kind == 's' {
		d.block[n-1].open = open
	}
}

func (d *depthTracker) flowOpen(line, col int, kind byte) error {
	if len(d.flow) == 0 {
		d.flowPeak = 0
	}
	if len(d.flow) == cap(d.flow) {
		return d.check(line, col+1)
	}
	d.flow = append(d.flow, flowLevel{kind: kind})
	if kind == '{' {
		d.maps++
	}
	return d.check(line, col+1)
}

// flowClose reports whether the outermost flow collection just closed.
// A closer that does not match the innermost opener closes nothing: the parser does not take
// "}" as the end of a "[" list, so counting it would let "[[}[" hide a level.
func (d *depthTracker) flowClose(closer byte) bool {
	if n := len(d.flow); n > 0 && (closer == ']') == (d.flow[n-1].kind == '[') {
		if d.flow[n-1].kind == '{' {
			d.maps--
		}
		d.flow = d.flow[:n-1]
	}
	return len(d.flow) == 0
}

// flowPair records a key indicator (':' or '?') in the innermost flow collection. In a flow
// list it makes the entry a one-pair mapping, one level more; in a flow mapping the first one of
// an entry is the mapping's own, and any further one (the parser nests "- a: b") is counted too.
func (d *depthTracker) flowPair(line, col int) error {
	n := len(d.flow)
	if n == 0 {
		return nil
	}
	f := &d.flow[n-1]
	if f.kind == '{' && !f.key && !f.dash {
		f.key = true
		return nil
	}
	f.extra++
	return d.check(line, col+1)
}

// flowDash records a "- " inside a flow collection, which the parser nests as a block list.
func (d *depthTracker) flowDash(line, col int) error {
	n := len(d.flow)
	if n == 0 {
		return nil
	}
	d.flow[n-1].extra++
	d.flow[n-1].dash = true
	return d.check(line, col+1)
}

// flowSep ends an entry of the innermost flow collection.
func (d *depthTracker) flowSep() {
	if n := len(d.flow); n > 0 {
		d.flow[n-1].extra, d.flow[n-1].key, d.flow[n-1].dash = 0, false, false
	}
}

// checkDepth scans the raw bytes of a policy and refuses it as soon as its nesting passes limit,
// without allocating in proportion to the input. It follows YAML's lexical rules closely enough
// for everything a policy uses (plain, quoted and block scalars, comments, flow and block
// collections); where it cannot tell, it counts a level rather than skip one, so it may refuse an
// exotic document that is valid but never accepts a deep one that the parser would nest.
// checkTokenDepth repeats the count on the parser's own tokens in case the two ever disagree.
func checkDepth(file string, data []byte, limit int) (*depthTracker, error) {
	s := byteScanner{d: newDepthTracker(file, limit), nodeCol: -1}
	for ln := 1; len(data) > 0; ln++ {
		// The lexer breaks lines at "\n", "\r\n" and a lone "\r".
		line := data
		if i := bytes.IndexAny(data, "\r\n"); i >= 0 {
			sep := data[i]
			line, data = data[:i], data[i+1:]
			if sep == '\r' && len(data) > 0 && data[0] == '\n' {
				data = data[1:]
			}
		} else {
			data = nil
		}
		if err := s.line(ln, line); err != nil {
			return s.d, err
		}
	}
	return s.d, nil
}

type byteScanner struct {
	d *depthTracker

	quote       byte // inside a quoted scalar that continues on the next line: '"' or '\''
	blockScalar bool // skipping the content lines of a | or > scalar
	scalarAbove int  // content lines of that scalar are indented more than this column
	afterNode   bool // block context: a quoted or flow node just ended; a ':' makes it a key
	afterFlow   bool // that node was a flow collection
	nodeCol     int  // block context: column where the current node (key candidate) starts, or -1

	// colN is the column (in characters) of byte colP of the current line; columns are computed
	// forward from there so that a long line costs time in proportion to its length only.
	colP int
	colN int
}

func isBlank(c byte) bool { return c == ' ' || c == '\t' }

// endsIndicator reports whether an indicator at line[p] is followed by a blank, the line end or,
// as the lexer also takes it, a NUL.
func endsIndicator(line []byte, p int) bool {
	return p+1 >= len(line) || isBlank(line[p+1]) || line[p+1] == 0
}

// restIsEmpty reports whether line[p:] holds nothing but blanks, anchors, tags and a comment.
func restIsEmpty(line []byte, p int) bool {
	for p < len(line) {
		switch c := line[p]; {
		case isBlank(c):
			p++
		case c == '#':
			return true
		case c == '&' || c == '!':
			p = skipProperty(line, p, false)
		default:
			return false
		}
	}
	return true
}

// skipProperty returns the end of the anchor or tag at line[p]. As the lexer reads them, a tag
// runs to a space (a tab, '[' and ']' are part of it; in flow context ',' ends it too) and an
// anchor to a blank.
func skipProperty(line []byte, p int, flow bool) int {
	tag := line[p] == '!'
	for p++; p < len(line); p++ {
		c := line[p]
		if c == ' ' || (!tag && c == '\t') || (flow && (c == ',' || c == '{' || c == '}')) {
			break
		}
	}
	return p
}

// endsFlowIndicator is endsIndicator in flow context, where a flow indicator also ends a token.
func endsFlowIndicator(line []byte, p int) bool {
	return endsIndicator(line, p) || strings.IndexByte(",[]{}", line[p+1]) >= 0
}

// col returns the column of line[p] in characters, as the parser counts it (0-based).
func (s *byteScanner) col(line []byte, p int) int {
	if p < s.colP {
		s.colP, s.colN = 0, 0
	}
	for ; s.colP < p; s.colP++ {
		if line[s.colP]&0xC0 != 0x80 {
			s.colN++
		}
	}
	return s.colN
}

func (s *byteScanner) line(ln int, line []byte) error {
	if len(line) == 0 {
		return nil
	}
	s.colP, s.colN = 0, 0
	indent := 0
	for indent < len(line) && line[indent] == ' ' {
		indent++
	}
	if s.blockScalar {
		if indent == len(line) || indent > s.scalarAbove {
			return nil
		}
		s.blockScalar = false
	}
	p := 0
	if s.quote == 0 && len(s.d.flow) == 0 {
		s.nodeCol, s.afterNode = -1, false
		// "---" needs a blank after it; the lexer ends a document at "..." whatever follows
		// ("...- - -" is a list), and so does this count.
		if len(line) >= 3 && (string(line[:3]) == "..." || string(line[:3]) == "---" && (len(line) == 3 || isBlank(line[3]))) {
			s.d.reset()
			p = 3
		} else if line[0] == '%' {
			return nil // a directive
		}
	}
	scalarStart := true // flow context: the next character may start a scalar
	for p < len(line) {
		c := line[p]
		if s.quote != 0 {
			p = s.skipQuote(line, p)
			if s.quote == 0 {
				scalarStart = false
				s.afterNode, s.afterFlow = len(s.d.flow) == 0, false
			}
			continue
		}
		if isBlank(c) {
			p++
			scalarStart = true
			continue
		}
		if c == '#' && (p == 0 || isBlank(line[p-1])) {
			return nil
		}
		if len(s.d.flow) > 0 {
			var err error
			p, scalarStart, err = s.flowChar(ln, line, p, scalarStart)
			if err != nil {
				return err
			}
			continue
		}
		var err error
		var stop bool
		p, stop, err = s.blockChar(ln, line, p)
		if err != nil || stop {
			return err
		}
	}
	return nil
}

// skipQuote advances through a quoted scalar from line[p], clearing s.quote at its closing quote.
func (s *byteScanner) skipQuote(line []byte, p int) int {
	for p < len(line) {
		c := line[p]
		switch {
		case s.quote == '"' && c == '\\':
			p += 2
		case c == s.quote && s.quote == '\'' && p+1 < len(line) && line[p+1] == '\'':
			p += 2
		case c == s.quote:
			s.quote = 0
			return p + 1
		default:
			p++
		}
	}
	return len(line)
}

func (s *byteScanner) flowChar(ln int, line []byte, p int, scalarStart bool) (int, bool, error) {
	switch c := line[p]; c {
	case '[', '{':
		return p + 1, true, s.d.flowOpen(ln, s.col(line, p), c)
	case ']', '}':
		if s.d.flowClose(c) {
			s.afterNode, s.afterFlow = true, true
		}
		return p + 1, false, nil
	case ',':
		s.d.flowSep()
		return p + 1, true, nil
	case ':':
		// Outside flow mappings "a:b" and "fd00::1" are plain scalars: ':' is an indicator before
		// a blank, a flow indicator or the line end, or right after a quoted key ("a":b). Inside
		// one (at any depth) the lexer takes every ':' as an indicator, and so does this count.
		if s.d.maps > 0 || endsFlowIndicator(line, p) || (p > 0 && (line[p-1] == '"' || line[p-1] == '\'')) {
			return p + 1, true, s.d.flowPair(ln, s.col(line, p))
		}
	case '?':
		if scalarStart && endsFlowIndicator(line, p) {
			return p + 1, true, s.d.flowPair(ln, s.col(line, p))
		}
	case '-':
		if scalarStart && endsFlowIndicator(line, p) {
			return p + 1, true, s.d.flowDash(ln, s.col(line, p))
		}
	case '"', '\'':
		if scalarStart {
			s.quote = c
			return p + 1, false, nil
		}
	case '!':
		if scalarStart {
			return skipProperty(line, p, true), true, nil // "[!t] [x]": the tag holds the ']'
		}
	}
	return p + 1, false, nil
}

// blockChar handles line[p] in block context; stop means the rest of the line holds no structure.
func (s *byteScanner) blockChar(ln int, line []byte, p int) (int, bool, error) {
	c := line[p]
	if s.afterNode {
		s.afterNode = false
		if c == ':' && endsIndicator(line, p) {
			err := s.d.keyNode(ln, s.nodeStart(line, p), s.afterFlow)
			s.nodeCol = -1
			return p + 1, false, err
		}
		// Anything else after a complete node is an error for the parser; keep counting anyway.
	}
	switch c {
	case '-', '?', ':':
		if endsIndicator(line, p) {
			kind := byte('m')
			if c == '-' {
				kind = 's'
			}
			s.nodeCol = -1
			var err error
			if c == ':' {
				err = s.d.explicitValue(ln, s.col(line, p))
			} else {
				err = s.d.blockNode(ln, s.col(line, p), kind)
			}
			if err != nil {
				return p + 1, false, err
			}
			if c == '-' {
				s.d.openEntry(restIsEmpty(line, p+1))
			}
			return p + 1, false, nil
		}
	case '&', '!':
		start := s.nodeStart(line, p)
		p = skipProperty(line, p, false)
		var err error
		if line[p-1] == ':' {
			// "!:" may end a key the lexer continued from the line before ("!t a\n!:"), or be
			// a tag: count both readings.
			s.nodeCol = -1
			err = s.d.blockNode(ln, start, 'm')
		}
		if restIsEmpty(line, p) {
			s.d.dangling = true
		}
		return p, false, err
	case '*':
		if restIsEmpty(line, p+1) {
			s.d.dangling = true // an alias whose name is on the next line (see checkTokenDepth)
		}
	case '|', '>':
		s.blockScalar = true
		s.scalarAbove = -1
		if n := len(s.d.block); n > 0 {
			s.scalarAbove = s.d.block[n-1].col
		}
		return len(line), true, nil
	case '"', '\'':
		s.nodeStart(line, p)
		s.quote = c
		return p + 1, false, nil
	case '[', '{':
		s.nodeStart(line, p)
		return p + 1, false, s.d.flowOpen(ln, s.col(line, p), c)
	}
	// A plain scalar runs to ": " (then it was a key), " #" or the end of the line.
	start := s.nodeStart(line, p)
	for q := p; q < len(line); q++ {
		switch {
		case line[q] == ':' && endsIndicator(line, q):
			s.nodeCol = -1
			return q + 1, false, s.d.blockNode(ln, start, 'm')
		case line[q] == '#' && q > p && isBlank(line[q-1]):
			return len(line), true, nil
		}
	}
	return len(line), true, nil
}

// nodeStart records that a node (with its anchor or tag) starts at line[p] unless one already did.
func (s *byteScanner) nodeStart(line []byte, p int) int {
	if s.nodeCol < 0 {
		s.nodeCol = s.col(line, p)
	}
	return s.nodeCol
}

// checkTokenDepth counts nesting again on the lexer's tokens, which are exactly what the parser
// will nest: if the byte scanner ever misreads a quote, a comment or a block scalar, this still
// refuses the document before the parser builds its tree. The tokens exist anyway (the parser
// is handed them), so this costs no extra memory.
func checkTokenDepth(file string, tokens token.Tokens, limit int) (*depthTracker, error) {
	d := newDepthTracker(file, limit)
	nodeCol, lastLine := -1, 0
	for i, tk := range tokens {
		if tk == nil || tk.Position == nil || tk.Type == token.CommentType {
			continue
		}
		line, col := tk.Position.Line, tk.Position.Column-1
		// A node starts afresh on each line, except that the lexer lets a key run over several
		// lines (after a tag, "!t a\nb: c" is the key "a b"): a ':' then belongs to the node
		// started on an earlier line.
		if line != lastLine && len(d.flow) == 0 && tk.Type != token.MappingValueType {
			nodeCol = -1
		}
		lastLine = line
		var err error
		switch tk.Type {
		case token.DocumentHeaderType, token.DocumentEndType:
			d.reset()
			nodeCol = -1
		case token.SequenceStartType, token.MappingStartType:
			if len(d.flow) == 0 && nodeCol < 0 {
				nodeCol = col
			}
			kind := byte('[')
			if tk.Type == token.MappingStartType {
				kind = '{'
			}
			err = d.flowOpen(line, col, kind)
		case token.SequenceEndType, token.MappingEndType:
			closer := byte(']')
			if tk.Type == token.MappingEndType {
				closer = '}'
			}
			d.flowClose(closer)
		case token.CollectEntryType:
			d.flowSep()
		case token.MappingValueType, token.MappingKeyType:
			switch {
			case len(d.flow) > 0:
				err = d.flowPair(line, col)
			case tk.Type == token.MappingValueType && nodeCol >= 0:
				prev := prevToken(tokens, i)
				err = d.keyNode(line, nodeCol, prev != nil && (prev.Type == token.SequenceEndType || prev.Type == token.MappingEndType))
			case tk.Type == token.MappingValueType:
				err = d.explicitValue(line, col)
			default:
				err = d.blockNode(line, col, 'm')
			}
			nodeCol = -1
		case token.SequenceEntryType:
			if len(d.flow) > 0 {
				err = d.flowDash(line, col)
			} else if err = d.blockNode(line, col, 's'); err == nil {
				d.openEntry(entryEndsLine(tokens[i+1:], line))
			}
			nodeCol = -1
		default:
			if len(d.flow) > 0 {
				break
			}
			if nodeCol < 0 {
				nodeCol = col
			}
			// A tag, an anchor's name or an alias without a name that ends its line leaves its
			// node dangling: the lexer takes what the next line starts with as part of it
			// ("- - *\n0:" is the key "*0" in the innermost list).
			if (tk.Type == token.TagType || tk.Type == token.AliasType || (i > 0 && tokens[i-1].Type == token.AnchorType)) && entryEndsLine(tokens[i+1:], line) {
				d.dangling = true
			}
		}
		if err != nil {
			return d, err
		}
	}
	return d, nil
}

// entryEndsLine reports whether nothing but anchors, tags and comments follows a "-" on its line.
func entryEndsLine(rest token.Tokens, line int) bool {
	for j, tk := range rest {
		if tk == nil || tk.Position == nil || tk.Position.Line != line {
			return true
		}
		switch tk.Type {
		case token.CommentType, token.AnchorType, token.TagType:
		default:
			if j > 0 && rest[j-1].Type == token.AnchorType {
				continue // the anchor's name
			}
			return false
		}
	}
	return true
}

// prevToken is the token before tokens[i], comments aside.
func prevToken(tokens token.Tokens, i int) *token.Token {
	for j := i - 1; j >= 0; j-- {
		if tokens[j] != nil && tokens[j].Type != token.CommentType {
			return tokens[j]
		}
	}
	return nil
}
