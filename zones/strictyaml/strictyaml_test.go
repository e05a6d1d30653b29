package strictyaml

import (
	"testing"

	"github.com/goccy/go-yaml/lexer"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func body(t *testing.T, src string) *Problem {
	t.Helper()
	f, err := Parse(lexer.Tokenize(src))
	require.NoError(t, err)
	require.Len(t, f.Docs, 1)
	_, p := Fields(f.Docs[0].Body, "top", "a", "b")
	return p
}

func TestFieldsRefusals(t *testing.T) {
	for _, tc := range []struct {
		name, src string
		want      error
		field     string
		line      int
	}{
		{"unknown key", "a: 1\nc: 2\n", ErrUnknownField, "top.c", 2},
		{"anchor", "a: &x 1\nb: *x\n", ErrUnsupported, "top.a", 1},
		{"tag", "a: !!str 1\n", ErrUnsupported, "top.a", 1},
		{"merge key", "a: {x: 1}\n<<: {b: 2}\n", ErrUnsupported, "top", 2},
		{"not a mapping", "- a\n- b\n", ErrBadValue, "top", 1},
		{"number as key", "1: x\n", ErrBadValue, "top", 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := body(t, tc.src)
			require.NotNil(t, p, "must be refused")
			assert.ErrorIs(t, p.Err, tc.want)
			assert.Equal(t, tc.field, p.Field)
			assert.Equal(t, tc.line, PosOf(p.At).Line)
		})
	}
}

func TestFieldsKeepsFileOrder(t *testing.T) {
	f, err := Parse(lexer.Tokenize("b: 2\na: 1\n"))
	require.NoError(t, err)
	es, p := Fields(f.Docs[0].Body, "", "a", "b")
	require.Nil(t, p)
	require.Len(t, es, 2)
	assert.Equal(t, "b", es[0].Key)
	assert.Equal(t, "a", es[1].Key)
	assert.Equal(t, Pos{2, 1}, PosOf(es[1].Pair.Key))
}

func TestSyntaxPosition(t *testing.T) {
	for _, src := range []string{"a: [1, 2\nb: 3\n", "a: 1\na: 2\n"} {
		_, err := Parse(lexer.Tokenize(src))
		require.Error(t, err, src)
		at, msg := Syntax(err)
		assert.NotZero(t, at.Line, src)
		assert.NotContains(t, msg, "\n")
	}
}

// Parse and Fields never panic on any input (the lexer is the callers' to guard).
func FuzzParseFields(f *testing.F) {
	f.Add("a: 1\nb: [x, y]\n")
	f.Add("a: &x {b: *x}\n")
	f.Add("<<: {a: 1}\n")
	f.Add("- [[[[{a: !!binary x}]]]]\n")
	f.Fuzz(func(t *testing.T, src string) {
		if len(src) > 4096 {
			return
		}
		defer func() {
			if r := recover(); r != nil {
				t.Skip("the lexer panicked; callers guard it")
			}
		}()
		tokens := lexer.Tokenize(src)
		file, err := Parse(tokens)
		if err != nil {
			_, msg := Syntax(err)
			require.NotContains(t, msg, "\n")
			return
		}
		for _, d := range file.Docs {
			if es, p := Fields(d.Body, "", "a", "b"); p == nil {
				for _, e := range es {
					require.Contains(t, []string{"a", "b"}, e.Key)
				}
			}
		}
	})
}
