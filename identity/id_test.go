package identity

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestParseID(t *testing.T) {
	good := []struct {
		in   string
		want ID
	}{
		{"spiffe://acme.internal/node/n1", NodeID("acme.internal", "n1")},
		{"spiffe://acme.internal/zone/payments/agent/billing", AgentID("acme.internal", "payments", "billing")},
		{"spiffe://acme.internal", AuthorityID("acme.internal")},
		{"spiffe://x/node/a-b-9", NodeID("x", "a-b-9")},
		{"spiffe://a1.b-2.c/zone/z/agent/" + strings.Repeat("a", 63), AgentID("a1.b-2.c", "z", strings.Repeat("a", 63))},
	}
	for _, g := range good {
		t.Run(g.in, func(t *testing.T) {
			id, err := ParseID(g.in)
			require.NoError(t, err)
			assert.Equal(t, g.want, id)
			assert.Equal(t, g.in, id.String(), "format must invert parse")
		})
	}
	bad := []struct{ in, msg string }{
		{"", "does not start with"},
		{"https://acme.internal/node/n1", "does not start with"},
		{"SPIFFE://acme.internal/node/n1", "does not start with"},
		{"spiffe://", "trust domain is empty"},
		{"spiffe://Acme.internal/node/n1", "uppercase"},
		{"spiffe://acme.internal/", "has path"},
		{"spiffe://acme.internal/node/", "node name"},
		{"spiffe://acme.internal/node/N1", "uppercase"},
		{"spiffe://acme.internal/node/n1/", "has path"},
		{"spiffe://acme.internal//node/n1", "has path"},
		{"spiffe://acme.internal/node/n_1", "contains"},
		{"spiffe://acme.internal/node/-n1", "starts or ends"},
		{"spiffe://acme.internal/node/n1-", "starts or ends"},
		{"spiffe://acme.internal/node/%6e1", "contains"},
		{"spiffe://acme.internal/node/n1?x=1", "contains"},
		{"spiffe://acme.internal/node/n1#f", "contains"},
		{"spiffe://acme.internal:443/node/n1", "contains"},
		{"spiffe://user@acme.internal/node/n1", "contains"},
		{"spiffe://acme..internal/node/n1", "is empty"},
		{"spiffe://acme.internal./node/n1", "is empty"},
		{"spiffe://acme.internal/agent/a", "has path"},
		{"spiffe://acme.internal/zone/z/agent", "has path"},
		{"spiffe://acme.internal/zone/z/node/n", "has path"},
		{"spiffe://acme.internal/zone//agent/a", "zone name"},
		{"spiffe://acme.internal/node/" + strings.Repeat("a", 64), "64 characters"},
		{"spiffe://" + strings.Repeat("a", 2048), "limit is 2048"},
		{"spiffe://" + strings.Repeat("abcdefgh.", 30) + "x", "limit is 253"},
		{"spiffe://acme.internal/node/n1\x00", "contains"},
	}
	for _, b := range bad {
		t.Run("bad "+b.in, func(t *testing.T) {
			_, err := ParseID(b.in)
			require.ErrorIs(t, err, ErrSPIFFEID)
			assert.Contains(t, err.Error(), b.msg)
		})
	}
}

func TestIDValidate(t *testing.T) {
	require.NoError(t, NodeID("acme.internal", "n1").Validate())
	require.ErrorIs(t, ID{}.Validate(), ErrSPIFFEID)
	require.ErrorIs(t, ID{TrustDomain: "a", Kind: KindNode, Zone: "z", Name: "n"}.Validate(), ErrSPIFFEID)
	require.ErrorIs(t, ID{TrustDomain: "a", Kind: KindAuthority, Name: "n"}.Validate(), ErrSPIFFEID)
	require.ErrorIs(t, ID{TrustDomain: "a", Kind: Kind(9), Name: "n"}.Validate(), ErrSPIFFEID)
	assert.Equal(t, "agent", KindAgent.String())
	assert.Equal(t, "kind(9)", Kind(9).String())
}

func FuzzParseID(f *testing.F) {
	f.Add("spiffe://acme.internal/node/n1")
	f.Add("spiffe://acme.internal/zone/payments/agent/billing")
	f.Add("spiffe://acme.internal")
	f.Add("spiffe://a/zone//agent/")
	f.Fuzz(func(t *testing.T, s string) {
		id, err := ParseID(s)
		if err != nil {
			require.ErrorIs(t, err, ErrSPIFFEID)
			return
		}
		require.NoError(t, id.Validate())
		require.Equal(t, s, id.String(), "one spelling per ID")
	})
}

// A name with non-ASCII letters is refused with the character shown as text, not byte by byte,
// and with the rule that names are ASCII.
func TestValidateNameNonASCII(t *testing.T) {
	for name, want := range map[string]string{
		"café":                  `contains 'é' (U+00E9), which is not ASCII; names are ASCII only`,
		"straße":                `contains 'ß' (U+00DF), which is not ASCII`,
		"Ωmega":                 `contains 'Ω' (U+03A9), which is not ASCII`,
		"a\xffb":                `contains the byte 0xff, which is not UTF-8 text`,
		"node-" + "ü":           `contains 'ü' (U+00FC)`,
		strings.Repeat("é", 40): `contains 'é' (U+00E9)`,
	} {
		err := ValidateName("node name", name)
		require.ErrorIs(t, err, ErrSPIFFEID, name)
		assert.Contains(t, err.Error(), want, name)
		assert.Contains(t, err.Error(), "use 1-63 lowercase letters, digits or '-'", name)
		assert.NotContains(t, err.Error(), "Ã", "shown as text, not byte by byte")
	}
	err := ValidateName("node name", strings.Repeat("a", 64))
	require.ErrorIs(t, err, ErrSPIFFEID)
	assert.Contains(t, err.Error(), "is 64 characters long (limit 63)")
}
