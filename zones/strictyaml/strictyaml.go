// Package strictyaml is what the policy loader (zones) and the node config loader (node/config)
// share to read YAML strictly from a syntax tree: positions, names of node kinds for messages,
// the refusal of YAML features whose meaning is not obvious in a security file (anchors, aliases,
// tags, merge keys), and mappings whose keys are checked against the fields allowed there.
//
// It is pure: no I/O, no decoding into structs by reflection. It never builds a located error
// of its own kind: it returns a Problem (the node, the field path and one of its sentinels) that
// each loader places in its own error type, so that both keep their file:line:column messages.
package strictyaml

import (
	"errors"
	"fmt"
	"strings"

	"github.com/goccy/go-yaml"
	"github.com/goccy/go-yaml/ast"
	"github.com/goccy/go-yaml/parser"
	"github.com/goccy/go-yaml/token"
)

// Sentinels; the loaders re-export them under their own names.
var (
	ErrSyntax       = errors.New("YAML syntax error")
	ErrUnsupported  = errors.New("unsupported YAML feature")
	ErrUnknownField = errors.New("unknown field")
	ErrBadValue     = errors.New("bad value")
)

// Pos is a place in the source; the zero Pos means unknown.
type Pos struct{ Line, Col int }

// PosOf is where node n starts.
func PosOf(n ast.Node) Pos {
	if n == nil {
		return Pos{}
	}
	if _, ok := n.(*ast.DocumentNode); ok {
		// DocumentNode.GetToken dereferences a nil start token when there is no "---".
		return Pos{}
	}
	return TokenPos(n.GetToken())
}

// TokenPos is where token tk starts.
func TokenPos(tk *token.Token) Pos {
	if tk == nil || tk.Position == nil {
		return Pos{}
	}
	return Pos{tk.Position.Line, tk.Position.Column}
}

// Kind names a node's type for error messages ("a string", "a list", ...).
func Kind(n ast.Node) string {
	switch n.(type) {
	case nil, *ast.NullNode:
		return "nothing"
	case *ast.StringNode:
		return "a string"
	case *ast.IntegerNode:
		return "an integer"
	case *ast.FloatNode, *ast.InfinityNode, *ast.NanNode:
		return "a number"
	case *ast.BoolNode:
		return "a boolean"
	case *ast.MappingNode, *ast.MappingValueNode:
		return "a mapping"
	case *ast.SequenceNode:
		return "a list"
	case *ast.LiteralNode:
		return "a block string"
	default:
		return "an unsupported YAML node"
	}
}

// Problem is an error about node At, at the field path Field; Err wraps one of the sentinels.
type Problem struct {
	At    ast.Node
	Field string
	Err   error
}

func (p *Problem) Error() string { return p.Field + ": " + p.Err.Error() }

func problem(at ast.Node, field string, sentinel error, format string, args ...any) *Problem {
	return &Problem{At: at, Field: field, Err: fmt.Errorf("%w: %s", sentinel, fmt.Sprintf(format, args...))}
}

// Unsupported refuses anchors, aliases, tags and merge keys; nil when n is none of them.
func Unsupported(n ast.Node, field string) *Problem {
	switch n.(type) {
	case *ast.AnchorNode, *ast.AliasNode:
		return problem(n, field, ErrUnsupported, "anchors and aliases are not supported; write the value out")
	case *ast.TagNode:
		return problem(n, field, ErrUnsupported, "YAML tags are not supported; remove the !tag")
	case *ast.MergeKeyNode:
		return problem(n, field, ErrUnsupported, "merge keys (<<) are not supported; write the fields out")
	}
	return nil
}

// Entry is one key of a mapping, in file order.
type Entry struct {
	Key   string
	Pair  *ast.MappingValueNode
	Value ast.Node
}

// Fields reads the mapping n at field path field, refusing keys outside allowed, duplicate keys,
// keys that are not plain names, and unsupported features in keys and values.
func Fields(n ast.Node, field string, allowed ...string) ([]Entry, *Problem) {
	if p := Unsupported(n, field); p != nil {
		return nil, p
	}
	var pairs []*ast.MappingValueNode
	switch m := n.(type) {
	case *ast.MappingNode:
		pairs = m.Values
	case *ast.MappingValueNode:
		pairs = []*ast.MappingValueNode{m}
	default:
		return nil, problem(n, field, ErrBadValue, "expected a mapping of %s, got %s", strings.Join(allowed, ", "), Kind(n))
	}
	out := make([]Entry, 0, len(pairs))
	seen := make(map[string]bool, len(pairs))
	for _, mv := range pairs {
		if p := Unsupported(mv.Key, field); p != nil {
			return nil, p
		}
		k, ok := mv.Key.(*ast.StringNode)
		if !ok {
			return nil, problem(mv.Key, field, ErrBadValue, "keys must be plain names, got %s", Kind(mv.Key))
		}
		sub := Join(field, k.Value)
		if !contains(allowed, k.Value) {
			return nil, problem(mv.Key, sub, ErrUnknownField, "%q is not a field here; allowed: %s", k.Value, strings.Join(allowed, ", "))
		}
		if seen[k.Value] {
			return nil, problem(mv.Key, sub, ErrBadValue, "field %q is given twice", k.Value)
		}
		seen[k.Value] = true
		if p := Unsupported(mv.Value, sub); p != nil {
			return nil, p
		}
		out = append(out, Entry{Key: k.Value, Pair: mv, Value: mv.Value})
	}
	return out, nil
}

// Join extends a field path: Join("zones[0]", "rules") is "zones[0].rules".
func Join(parent, name string) string {
	if parent == "" {
		return name
	}
	return parent + "." + name
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// Parse runs the parser on tokens, turning a panic inside it into an error: it is fed bytes an
// attacker or a careless operator may control, and the daemon must not crash on them.
func Parse(tokens token.Tokens) (f *ast.File, err error) {
	defer func() {
		if r := recover(); r != nil {
			f, err = nil, fmt.Errorf("the YAML parser failed on this input (%v)", r)
		}
	}()
	return parser.Parse(tokens, 0)
}

// Syntax turns a parser error into its position (zero when unknown) and a one-line message.
func Syntax(err error) (Pos, string) {
	var se *yaml.SyntaxError
	if errors.As(err, &se) && se.Token != nil && se.Token.Position != nil {
		return TokenPos(se.Token), se.Message
	}
	return Pos{}, strings.ReplaceAll(err.Error(), "\n", " ")
}
