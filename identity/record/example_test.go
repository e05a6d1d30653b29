package record

import (
	"bytes"
	"crypto/ed25519"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fxamacker/cbor/v2"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity"
)

// exampleRecords builds the fixed examples of docs/protocol.md from a fixed authority key. Ed25519
// signatures are deterministic, so the bytes are stable and the doc can be checked against them.
func exampleRecords(t *testing.T) (rev, pol []byte, v Verifier, pub ed25519.PublicKey) {
	t.Helper()
	key := ed25519.NewKeyFromSeed(bytes.Repeat([]byte{0x41}, ed25519.SeedSize))
	issued := time.UnixMilli(1767225600123)
	auth, err := identity.NewAuthority(testTD, key, issued.Add(-time.Hour), 10*365*24*time.Hour)
	require.NoError(t, err)
	rev, err = SignRevocation(RevocationClaims{
		TrustDomain: testTD, Subject: "spiffe://acme.internal/node/n1", Reason: "host compromised",
		IssuedAt: issued, Expires: issued.Add(24 * time.Hour), Signer: "spiffe://acme.internal", Seq: 7,
	}, key)
	require.NoError(t, err)
	pol, err = SignPolicy(PolicyClaims{TrustDomain: testTD, PolicyVersion: 3, IssuedAt: issued,
		Policy: []byte("zones:\n  - name: payments\n    cidr: 100.100.1.0/24\n")}, key)
	require.NoError(t, err)
	return rev, pol, Verifier{Certs: identity.Verifier{Authority: auth}}, key.Public().(ed25519.PublicKey)
}

// TestProtocolExample keeps docs/protocol.md's revocation and policy examples honest: they verify,
// and the doc contains exactly these bytes. UTE_PROTOCOL_EXAMPLE=1 prints the text to paste.
func TestProtocolExample(t *testing.T) {
	rev, pol, v, pub := exampleRecords(t)
	now := time.UnixMilli(1767225600123).Add(time.Minute)
	r, err := v.VerifyRevocation(rev, now)
	require.NoError(t, err)
	require.Equal(t, "spiffe://acme.internal/node/n1", r.Key())
	_, err = v.VerifyPolicy(pol, now)
	require.NoError(t, err)

	dm, err := cbor.DiagOptions{ByteStringEncoding: cbor.ByteStringBase16Encoding, ByteStringEmbeddedCBOR: true}.DiagMode()
	require.NoError(t, err)
	diag := func(b []byte) string {
		s, err := dm.Diagnose(b)
		require.NoError(t, err)
		return s
	}
	var out strings.Builder
	fmt.Fprintf(&out, "authority public key: %x\n\n", []byte(pub))
	fmt.Fprintf(&out, "revocation record (%d bytes):\n%s\n\n%s\n\n", len(rev), wrapHex(rev), diag(rev))
	fmt.Fprintf(&out, "policy release (%d bytes):\n%s\n\n%s\n", len(pol), wrapHex(pol), diag(pol))
	if os.Getenv("UTE_PROTOCOL_EXAMPLE") != "" {
		fmt.Println(out.String())
	}
	doc, err := os.ReadFile(filepath.Join("..", "..", "docs", "protocol.md"))
	require.NoError(t, err)
	require.True(t, strings.Contains(string(doc), out.String()), "docs/protocol.md's revocation example is stale; regenerate it with UTE_PROTOCOL_EXAMPLE=1")
}

func wrapHex(b []byte) string {
	h := hex.EncodeToString(b)
	var lines []string
	for len(h) > 96 {
		lines = append(lines, h[:96])
		h = h[96:]
	}
	return strings.Join(append(lines, h), "\n")
}
