package identity

import (
	"bytes"
	"crypto/ed25519"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func testPin(t testing.TB) string { return KeyHash(mustKey(t).Public().(ed25519.PublicKey)) }

func TestTokenRoundTrip(t *testing.T) {
	pin := testPin(t)
	tok, err := NewToken(pin)
	require.NoError(t, err)
	s := tok.String()
	assert.Len(t, s, TokenLen)
	assert.True(t, strings.HasPrefix(s, "ute1."+pin+"."))
	got, err := ParseToken(s)
	require.NoError(t, err)
	assert.Equal(t, tok, got)
	assert.Len(t, got.Secret, 32)

	other, err := NewToken(pin)
	require.NoError(t, err)
	assert.NotEqual(t, tok.ID, other.ID)
	assert.NotEqual(t, tok.Secret, other.Secret)

	h := SecretHash(tok.Secret)
	assert.True(t, SecretMatches(h, tok.Secret))
	assert.False(t, SecretMatches(h, other.Secret))
	assert.False(t, SecretMatches(h, nil))

	_, err = NewToken("not-a-pin")
	require.ErrorIs(t, err, ErrMalformedToken)
}

func TestTokenPinsKey(t *testing.T) {
	k := mustKey(t)
	tok, err := NewToken(KeyHash(k.Public().(ed25519.PublicKey)))
	require.NoError(t, err)
	assert.True(t, tok.MatchesKey(k.Public().(ed25519.PublicKey)))
	assert.False(t, tok.MatchesKey(mustKey(t).Public().(ed25519.PublicKey)))
}

func TestTokenNeverLogsSecret(t *testing.T) {
	tok, err := NewToken(testPin(t))
	require.NoError(t, err)
	var buf bytes.Buffer
	slog.New(slog.NewJSONHandler(&buf, nil)).Info("made", "token", tok)
	assert.NotContains(t, buf.String(), b32.EncodeToString(tok.Secret))
	assert.Contains(t, buf.String(), tok.ID)
}

func TestParseTokenMalformed(t *testing.T) {
	tok, err := NewToken(testPin(t))
	require.NoError(t, err)
	good := tok.String()
	parts := strings.Split(good, ".")
	join := func(p ...string) string { return strings.Join(p, ".") }
	secret := parts[3]
	// The secret's last character carries 1 data bit and 4 unused bits ('a' or 'q'); +1 sets an
	// unused bit, giving a second spelling of the same secret.
	nonCanonical := secret[:len(secret)-1] + string(rune(secret[len(secret)-1]+1))
	cases := []struct{ name, in, msg string }{
		{"empty", "", "1 dot-separated parts"},
		{"wrong prefix", join("ute2", parts[1], parts[2], parts[3]), "does not start"},
		{"uppercase prefix", join("UTE1", parts[1], parts[2], parts[3]), "does not start"},
		{"three parts", join(parts[0], parts[1], parts[2]), "3 dot-separated"},
		{"five parts", good + ".x", "5 dot-separated"},
		{"uppercase", strings.ToUpper(good), "does not start"},
		{"uppercase secret", join(parts[0], parts[1], parts[2], strings.ToUpper(parts[3])), "outside a-z"},
		{"short pin", join(parts[0], parts[1][1:], parts[2], parts[3]), "authority pin is 31"},
		{"long id", join(parts[0], parts[1], parts[2]+"a", parts[3]), "token id is 17"},
		{"short secret", join(parts[0], parts[1], parts[2], parts[3][1:]), "secret is 51"},
		{"bad alphabet pin", join(parts[0], "0"+parts[1][1:], parts[2], parts[3]), "outside a-z"},
		{"padding", join(parts[0], parts[1], parts[2], parts[3][:len(parts[3])-1]+"="), "outside a-z"},
		{"non-canonical secret", join(parts[0], parts[1], parts[2], nonCanonical), "not canonical"},
		{"leading space", " " + good, "whitespace"},
		{"trailing newline", good + "\n", "whitespace"},
		{"empty part", join(parts[0], "", parts[2], parts[3]), "authority pin is 0"},
		{"huge", strings.Repeat("a", 10*TokenLen), "characters"},
		{"unicode", join(parts[0], parts[1], parts[2], strings.Repeat("é", 26)), "outside a-z"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := ParseToken(c.in)
			require.ErrorIs(t, err, ErrMalformedToken)
			assert.Contains(t, err.Error(), c.msg)
			assert.NotContains(t, err.Error(), secret, "errors must not echo the secret")
		})
	}
}

func FuzzParseToken(f *testing.F) {
	tok, err := NewToken(KeyHash(make([]byte, 32)))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(tok.String())
	f.Add("")
	f.Add("ute1....")
	f.Add("ute1." + strings.Repeat("a", 32) + "." + strings.Repeat("a", 16) + "." + strings.Repeat("b", 52))
	f.Fuzz(func(t *testing.T, s string) {
		tok, err := ParseToken(s)
		if err != nil {
			require.ErrorIs(t, err, ErrMalformedToken)
			return
		}
		// One spelling per token: a parsed token prints back as exactly its input.
		require.Equal(t, s, tok.String())
		require.Len(t, tok.Secret, 32)
	})
}

func BenchmarkParseToken(b *testing.B) {
	tok, err := NewToken(testPin(b))
	if err != nil {
		b.Fatal(err)
	}
	s := tok.String()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := ParseToken(s); err != nil {
			b.Fatal(err)
		}
	}
}

// docs/identity.md states the token's length; it must be the true one.
func TestDocsStateTokenLength(t *testing.T) {
	tok, err := NewToken(KeyHash(mustKey(t).Public().(ed25519.PublicKey)))
	require.NoError(t, err)
	require.Len(t, tok.String(), TokenLen)
	doc, err := os.ReadFile("../docs/identity.md")
	require.NoError(t, err)
	assert.Contains(t, strings.Join(strings.Fields(string(doc)), " "), fmt.Sprintf("a token is %d characters in all", TokenLen))
}
