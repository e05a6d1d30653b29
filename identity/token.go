package identity

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"fmt"
	"log/slog"
	"strings"
)

// ErrMalformedToken marks a join token that does not have the ute1 shape. Its messages never
// repeat the token: it is a secret.
var ErrMalformedToken = errors.New("malformed join token")

// Join token layout: ute1.<pin>.<id>.<secret>, every part lowercase unpadded base32.
const (
	TokenPrefix   = "ute1"
	tokenIDBytes  = 10 // 80 bits: collision-free for any realistic number of outstanding tokens
	tokenSecBytes = 32 // 256 bits
	// TokenIDLen and tokenSecretLen are the encoded lengths of the id and secret parts.
	TokenIDLen     = (tokenIDBytes*8 + 4) / 5
	tokenSecretLen = (tokenSecBytes*8 + 4) / 5
	// TokenLen is the length of a well-formed token string.
	TokenLen = len(TokenPrefix) + 1 + KeyHashLen + 1 + TokenIDLen + 1 + tokenSecretLen
)

// Token is a join token. Pin is the KeyHash of the authority key the joining node must find; ID
// names the token in the authority's store; Secret is the bearer secret, stored there only as
// SecretHash(Secret).
type Token struct {
	Pin    string
	ID     string
	Secret []byte
}

// NewToken makes a token pinned to pin (an authority KeyHash) with a fresh random ID and secret.
func NewToken(pin string) (Token, error) {
	if err := checkB32(pin, KeyHashLen, "authority pin"); err != nil {
		return Token{}, err
	}
	buf := make([]byte, tokenIDBytes+tokenSecBytes)
	if _, err := rand.Read(buf); err != nil {
		return Token{}, fmt.Errorf("new token: %w", err)
	}
	return Token{Pin: pin, ID: b32.EncodeToString(buf[:tokenIDBytes]), Secret: buf[tokenIDBytes:]}, nil
}

// String returns the printable token. It contains the secret: print it once, never log it.
func (t Token) String() string {
	return TokenPrefix + "." + t.Pin + "." + t.ID + "." + b32.EncodeToString(t.Secret)
}

// LogValue keeps the secret out of structured logs.
func (t Token) LogValue() slog.Value {
	return slog.GroupValue(slog.String("pin", t.Pin), slog.String("id", t.ID), slog.String("secret", "REDACTED"))
}

// ParseToken parses a token strictly: the ute1 prefix, exactly four dot-separated parts, the
// lowercase base32 alphabet, the exact lengths and canonical encodings. Errors wrap
// ErrMalformedToken and say which part is wrong without echoing the token.
func ParseToken(s string) (Token, error) {
	if len(s) > 4*TokenLen {
		return Token{}, fmt.Errorf("%w: %d characters; a token has %d", ErrMalformedToken, len(s), TokenLen)
	}
	if strings.TrimSpace(s) != s {
		return Token{}, fmt.Errorf("%w: leading or trailing whitespace; pass the token exactly as printed", ErrMalformedToken)
	}
	parts := strings.Split(s, ".")
	if len(parts) != 4 {
		return Token{}, fmt.Errorf("%w: %d dot-separated parts; want 4 (ute1.<pin>.<id>.<secret>)", ErrMalformedToken, len(parts))
	}
	if parts[0] != TokenPrefix {
		return Token{}, fmt.Errorf("%w: does not start with %q; was it copied whole?", ErrMalformedToken, TokenPrefix+".")
	}
	if err := checkB32(parts[1], KeyHashLen, "authority pin"); err != nil {
		return Token{}, err
	}
	if err := checkB32(parts[2], TokenIDLen, "token id"); err != nil {
		return Token{}, err
	}
	if err := checkB32(parts[3], tokenSecretLen, "secret"); err != nil {
		return Token{}, err
	}
	secret, _ := b32.DecodeString(parts[3]) // checkB32 proved it decodes
	return Token{Pin: parts[1], ID: parts[2], Secret: secret}, nil
}

// checkB32 checks that s is exactly n characters of canonical lowercase unpadded base32: the unused
// low bits of the last character must be zero, so that one value has one spelling.
func checkB32(s string, n int, what string) error {
	if len(s) != n {
		return fmt.Errorf("%w: %s is %d characters; want %d", ErrMalformedToken, what, len(s), n)
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= '2' && c <= '7') {
			return fmt.Errorf("%w: %s contains a character outside a-z, 2-7 at position %d", ErrMalformedToken, what, i+1)
		}
	}
	raw, err := b32.DecodeString(s)
	if err != nil || b32.EncodeToString(raw) != s {
		return fmt.Errorf("%w: %s is not canonical base32", ErrMalformedToken, what)
	}
	return nil
}

// SecretHash is what the authority stores for a token secret: SHA-256 of the secret.
func SecretHash(secret []byte) [32]byte { return sha256.Sum256(secret) }

// SecretMatches reports, in constant time, whether secret hashes to stored.
func SecretMatches(stored [32]byte, secret []byte) bool {
	h := SecretHash(secret)
	return subtle.ConstantTimeCompare(stored[:], h[:]) == 1
}

// MatchesKey reports, in constant time, whether the token pins pub.
func (t Token) MatchesKey(pub ed25519.PublicKey) bool { return PinMatches(t.Pin, pub) }
