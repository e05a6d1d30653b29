package zones

import (
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/goccy/go-yaml/ast"
	"github.com/goccy/go-yaml/lexer"
	"github.com/goccy/go-yaml/parser"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// deepDocs builds documents nested n levels deep in the shapes an attacker would try: flow and
// block lists and mappings, their mixes, pairs inside flow lists, and nesting hidden behind
// quotes, comments, block scalars and long anchors that a naive scanner would skip or misplace.
func deepDocs(n int) map[string]string {
	rep := strings.Repeat
	indented := func(item string) string { // each level one column deeper, as block YAML nests
		var b strings.Builder
		for i := 0; i < n && b.Len() < MaxPolicySize/2; i++ {
			b.WriteString(rep(" ", i))
			b.WriteString(item)
			b.WriteByte('\n')
		}
		return b.String()
	}
	return map[string]string{
		"flow lists":            "zones: " + rep("[", n) + rep("]", n),
		"flow mappings":         "zones: " + rep("{a: ", n) + "b" + rep("}", n),
		"flow pairs in lists":   "zones: " + rep("[a: ", n) + "b" + rep("]", n),
		"bare flow lists":       rep("[", n) + rep("]", n),
		"block compact lists":   "zones:\n" + rep("- ", n) + "x\n",
		"block explicit keys":   rep("? ", n) + "x\n",
		"block mappings":        indented("a:"),
		"block lists of maps":   indented("- a:"),
		"flow in block":         "zones:\n" + rep("- [", n/2) + rep("]", n/2) + "\n",
		"block then flow mix":   "zones:\n" + rep("- ", n/2) + rep("{a: [", n/4) + rep("]}", n/4) + "\n",
		"unterminated flow":     "zones: " + rep("[", n),
		"quoted closers first":  "zones: [\"]]]]]]]]]]]]]]]]\", '}}}}}}}}}}}}}', " + rep("[", n) + rep("]", n) + "]",
		"comment closers first": "zones: [ # ]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]\n" + rep("[", n) + rep("]", n) + "]",
		"escaped quote":         "zones: [\"\\\"]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]\", 'it''s]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]', " + rep("[", n) + rep("]", n) + "]",
		"multi-line quote":      "zones: [\"a\n]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]\n\", " + rep("[", n) + rep("]", n) + "]",
		"after block scalar":    "x: |\n  ]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]\nzones: " + rep("[", n) + rep("]", n) + "\n",
		"long anchors": func() string {
			var b strings.Builder
			for i := 0; i < n && b.Len() < MaxPolicySize/2; i++ {
				b.WriteString(rep(" ", i))
				b.WriteString("&" + rep("x", 40) + " a:\n")
			}
			return b.String()
		}(),
		"tab and CRLF": "zones:\r\n" + rep("-\t", n) + "x\r\n",
		// The parser takes a key under a "-" that ended its line as the entry's content, at the
		// same column: nesting that never moves right.
		"open entries":      rep("-\na:\n", n/2),
		"open tagged items": rep("- !t # c\n\"a\":\n", n/2),
		"lone CR lines":     rep("-\ra:\r", n/2),
		// A tag or anchor that ends its line takes the next node as its value, at any column.
		"dangling tags":    rep("a:\n !t\n", n),
		"dangling anchors": rep("a: &x\n", n),
	}
}

// TestDeepPolicyRefused is the deep-nesting attack: a policy nested tens of thousands of levels
// deep made the YAML parser take 13 s and 3.85 GB. Every shape must be refused with ErrTooDeep, a
// line and the limit, quickly and without allocating in proportion to the depth.
func TestDeepPolicyRefused(t *testing.T) {
	// 2,000 levels first: cheap even for a parser without the check (a few MB), so on code that
	// lacks it this test fails on the sentinel instead of exhausting the machine.
	for _, n := range []int{2000, 50000} {
		for name, doc := range deepDocs(n) {
			data := []byte(doc)
			var before, after runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&before)
			start := time.Now()
			p, err := Parse("deep.yaml", data)
			elapsed := time.Since(start)
			runtime.ReadMemStats(&after)

			require.ErrorIs(t, err, ErrTooDeep, "%s, %d levels: %v", name, n, err)
			require.Nil(t, p)
			var pe *ParseError
			require.ErrorAs(t, err, &pe)
			assert.Equal(t, "deep.yaml", pe.File, name)
			assert.Positive(t, pe.Line, "%s: the error names the line", name)
			assert.Contains(t, err.Error(), "32 levels", "%s: the error names the limit", name)
			assert.NotContains(t, err.Error(), "\n")
			assert.Less(t, elapsed, time.Second, "%s, %d levels", name, n)
			// The refusal comes from the byte scanner, before the lexer copies the input.
			assert.Less(t, after.TotalAlloc-before.TotalAlloc, uint64(64<<10),
				"%s, %d levels: allocated %d bytes", name, n, after.TotalAlloc-before.TotalAlloc)
		}
	}
}

func TestDeepPolicyRefusedByLoad(t *testing.T) {
	path := filepath.Join(t.TempDir(), "deep.yaml")
	require.NoError(t, os.WriteFile(path, []byte("zones:\n  - "+strings.Repeat("[", 2000)+strings.Repeat("]", 2000)+"\n"), 0o600))
	_, err := Load(path)
	require.ErrorIs(t, err, ErrTooDeep)
	assert.Contains(t, err.Error(), path+":2:")
	assert.Contains(t, err.Error(), "more than 32 levels")
}

// TestDepthLimitExact pins the limit: 32 levels pass the check, 33 are refused, on both layers.
func TestDepthLimitExact(t *testing.T) {
	for _, tc := range []struct {
		name string
		doc  func(n int) string // a document n levels deep
	}{
		{"flow", func(n int) string { return "zones: " + strings.Repeat("[", n-1) + strings.Repeat("]", n-1) }},
		{"pairs", func(n int) string {
			return "zones: " + strings.Repeat("[a: ", (n-1)/2) + "b" + strings.Repeat("]", (n-1)/2)
		}},
		{"block", func(n int) string { return "zones:\n" + strings.Repeat("- ", n-1) + "x" }},
		{"block maps", func(n int) string {
			var b strings.Builder
			for i := 0; i < n; i++ {
				b.WriteString(strings.Repeat("  ", i) + "a:\n")
			}
			return b.String()
		}},
	} {
		for _, n := range []int{MaxDepth - 1, MaxDepth} {
			if tc.name == "pairs" && n%2 == 0 {
				continue // two levels per bracket: odd depths only
			}
			doc := tc.doc(n)
			_, err := checkDepth("x", []byte(doc), MaxDepth)
			require.NoError(t, err, "%s at %d levels", tc.name, n)
			_, err = checkTokenDepth("x", lexer.Tokenize(doc), MaxDepth)
			require.NoError(t, err, "%s at %d levels (tokens)", tc.name, n)
			tree, err := parser.ParseBytes([]byte(doc), 0)
			require.NoError(t, err, tc.name)
			assert.Equal(t, n, astDepth(tree), "%s: the test document is %d deep", tc.name, n)
		}
		n := MaxDepth + 1
		doc := tc.doc(n)
		_, err := checkDepth("x", []byte(doc), MaxDepth)
		require.ErrorIs(t, err, ErrTooDeep, "%s at %d levels", tc.name, n)
		_, err = checkTokenDepth("x", lexer.Tokenize(doc), MaxDepth)
		require.ErrorIs(t, err, ErrTooDeep, "%s at %d levels (tokens)", tc.name, n)
	}
}

// TestTokenLayerCatchesWhatBytesMiss feeds the token check directly: it is the second line of
// defence should the byte scanner ever skip a bracket that the lexer sees.
func TestTokenLayerCatchesWhatBytesMiss(t *testing.T) {
	for name, doc := range deepDocs(200) {
		_, err := checkTokenDepth("deep.yaml", lexer.Tokenize(doc), MaxDepth)
		if name == "unterminated flow" || name == "multi-line quote" || name == "tab and CRLF" {
			continue // the lexer reports these as invalid; the parser refuses them without nesting
		}
		require.ErrorIs(t, err, ErrTooDeep, name)
	}
}

// TestDepthValidPoliciesAccepted: what a policy legitimately contains never trips the check,
// including brackets inside quotes, comments and block scalars.
func TestDepthValidPoliciesAccepted(t *testing.T) {
	example, err := os.ReadFile(examplePath)
	require.NoError(t, err)
	docs := []string{
		string(example),
		"zones:\n" + zoneYAML("a", "10.0.0.0/8", ruleYAML("{labels: {team: x}}", "b-*", "[tcp/1-2, any, icmp]")),
		"zones:\n- name: a # [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\n  cidr: \"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\"\n",
		"zones:\n- name: '{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{'\n",
		"zones:\n- name: |\n    - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - -\n    [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\n  cidr: x\n",
		"zones:\n" + strings.Repeat("- name: a\n  rules:\n  - from: {labels: {team: x}}\n    ports: [tcp/1]\n", 100),
		"zones: [\n  [a, b],   # [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\n  {c: d},\n]\n",
		"a: b[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\n",
		"- \"x\": [\"]\", ']']\n",
	}
	for _, doc := range docs {
		_, err := checkDepth("ok.yaml", []byte(doc), MaxDepth)
		require.NoError(t, err, doc)
		_, err = Parse("ok.yaml", []byte(doc))
		require.NotErrorIs(t, err, ErrTooDeep, doc)
	}
	_, err = Parse("ok.yaml", example)
	require.NoError(t, err)
}

// TestDepthEstimateCoversTree compares both estimates with the depth of the tree the parser
// actually builds: an estimate below the tree's depth would let nesting through.
func TestDepthEstimateCoversTree(t *testing.T) {
	example, err := os.ReadFile(examplePath)
	require.NoError(t, err)
	docs := []string{string(example)}
	for _, doc := range deepDocs(20) {
		docs = append(docs, doc)
	}
	docs = append(docs,
		"a:\n- b:\n  - c: [d: {e: [f]}]\n",
		"? [a, b]\n: - c\n  - d: e\n",
		"a: &x\n  b:\n    - - c\n",
		"- - - a: b\n      c:\n      - d\n",
		"{a: [b, c: d, {e: f}], g: [[h]]}\n",
		// Shapes the fuzzer found where the parser nests more than YAML says; the byte scanner
		// counts each of them.
		"-\n00:", "!0 0\n0000:\n 0:", "0:\n !0\n0:", "[!]00 []]", "...-", "...- - - -",
		"[[[[}, []]]]]", "0:\n !:\n0:\n 0:", "!0 0\n!:", "                               !0000 - 0  \n:",
		"- - - - - - - *\n0:",
	)
	for _, doc := range docs {
		requireEstimateCovers(t, []byte(doc), true)
	}
}

// requireEstimateCovers asserts that the token count is never below the depth of the tree the
// parser builds: that count is what guarantees nothing deeper than MaxDepth reaches the parser.
// With bytesToo it asserts the same of the byte scanner, the fast path; that one is checked on
// the known shapes only, since a document that fools it is still refused by the token count, at
// the cost of lexing at most MaxPolicySize bytes.
func requireEstimateCovers(t *testing.T, data []byte, bytesToo bool) {
	t.Helper()
	byBytes, err := checkDepth("x", data, 1000)
	if err != nil {
		return
	}
	tokens := lexer.Tokenize(string(data))
	byTokens, err := checkTokenDepth("x", tokens, 1000)
	if err != nil {
		return
	}
	tree, err := parseTree(data)
	if err != nil || tree == nil {
		return
	}
	depth := astDepth(tree)
	require.GreaterOrEqual(t, byTokens.max, depth, "token estimate below the tree's depth for %q", data)
	if bytesToo {
		require.GreaterOrEqual(t, byBytes.max, depth, "byte estimate below the tree's depth for %q", data)
	}
}

func parseTree(data []byte) (f *ast.File, err error) {
	defer func() {
		if r := recover(); r != nil {
			f, err = nil, errors.New("panic")
		}
	}()
	return parser.ParseBytes(data, 0)
}

// astDepth is the nesting of lists and mappings in a parsed file.
func astDepth(f *ast.File) int {
	max := 0
	for _, d := range f.Docs {
		if n := nodeDepth(d.Body); n > max {
			max = n
		}
	}
	return max
}

func nodeDepth(n ast.Node) int {
	switch v := n.(type) {
	case *ast.SequenceNode:
		max := 0
		for _, c := range v.Values {
			max = maxInt(max, nodeDepth(c))
		}
		return 1 + max
	case *ast.MappingNode:
		max := 0
		for _, mv := range v.Values {
			max = maxInt(max, maxInt(nodeDepth(mv.Key), nodeDepth(mv.Value)))
		}
		return 1 + max
	case *ast.MappingValueNode:
		return 1 + maxInt(nodeDepth(v.Key), nodeDepth(v.Value))
	case *ast.MappingKeyNode:
		return nodeDepth(v.Value)
	case *ast.AnchorNode:
		return nodeDepth(v.Value)
	case *ast.TagNode:
		return nodeDepth(v.Value)
	case *ast.DocumentNode:
		return nodeDepth(v.Body)
	}
	return 0
}

func maxInt(a, b int) int {
	if a > b {
		return a
	}
	return b
}

// FuzzDepth checks, on any input the parser accepts, that the token count is never below the
// depth of the tree the parser builds.
func FuzzDepth(f *testing.F) {
	for _, doc := range deepDocs(40) {
		f.Add([]byte(doc))
	}
	f.Add([]byte("a:\n- b:\n  - c: [d: {e: [f]}]\n"))
	f.Add([]byte("? [a, b]\n: - c\n  - d: e\n"))
	f.Add([]byte("- \"x\": [\"]\", ']']\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) > 4096 {
			return
		}
		requireEstimateCovers(t, data, false)
	})
}
