package record

import (
	"crypto/ed25519"
	"crypto/sha256"
	"math/big"
	"net/netip"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity"
)

const testTD = "acme.internal"

// t0 is a fixed instant so tests never depend on the wall clock.
var t0 = time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)

// testPKI is a real trust domain: authority, nodes n1 and n2 (zone payments, disjoint slices),
// each with one agent, and a foreign trust domain with its own node.
type testPKI struct {
	authKey, n1Key, n2Key, foreignKey, foreignNodeKey ed25519.PrivateKey
	auth, n1, n2, a1, a2, foreign, foreignNode        *identity.Certificate
	i1, i2                                            *identity.Certificate // n1's and n2's issuing certificates
	i1Key, i2Key                                      ed25519.PrivateKey
	v                                                 Verifier
}

func mustKey(t testing.TB) ed25519.PrivateKey {
	t.Helper()
	k, err := identity.GenerateKey()
	require.NoError(t, err)
	return k
}

func digest(s string) []byte {
	d := sha256.Sum256([]byte(s))
	return d[:]
}

func issueNode(t testing.TB, auth *identity.Certificate, authKey, key ed25519.PrivateKey, td, name, cidr string) *identity.Certificate {
	t.Helper()
	c, err := identity.Issue(auth, authKey, identity.IssueRequest{
		ID: identity.NodeID(td, name), PublicKey: key.Public().(ed25519.PublicKey),
		Claims: identity.Claims{
			Zones:       []identity.ZoneGrant{{Name: "payments", Prefixes: []netip.Prefix{netip.MustParsePrefix(cidr)}}},
			Regions:     []string{"eu-west-1"},
			Fingerprint: digest("host " + name),
		},
		NotBefore: t0.Add(-time.Hour), NotAfter: t0.Add(24 * time.Hour),
	})
	require.NoError(t, err)
	return c
}

// issueIssuer signs node's issuing certificate for the issuing key derived from nodeKey.
func issueIssuer(t testing.TB, auth *identity.Certificate, authKey ed25519.PrivateKey, node *identity.Certificate, nodeKey ed25519.PrivateKey) (*identity.Certificate, ed25519.PrivateKey) {
	t.Helper()
	ikey, err := identity.IssuerKey(nodeKey)
	require.NoError(t, err)
	c, err := identity.IssueIssuer(auth, authKey, node, ikey.Public().(ed25519.PublicKey))
	require.NoError(t, err)
	return c, ikey
}

func issueAgent(t testing.TB, node *identity.Certificate, nodeKey ed25519.PrivateKey, name, ip string, serial *big.Int) *identity.Certificate {
	t.Helper()
	c, err := identity.Issue(node, nodeKey, identity.IssueRequest{
		ID: identity.AgentID(node.ID.TrustDomain, "payments", name), PublicKey: mustKey(t).Public().(ed25519.PublicKey),
		Claims: identity.Claims{
			Zones:       []identity.ZoneGrant{{Name: "payments"}},
			OverlayIPs:  []netip.Addr{netip.MustParseAddr(ip)},
			Fingerprint: digest("workload " + name),
		},
		NotBefore: t0.Add(-time.Hour), NotAfter: t0.Add(time.Hour), Serial: serial,
	})
	require.NoError(t, err)
	return c
}

func newTestPKI(t testing.TB) *testPKI {
	t.Helper()
	p := &testPKI{authKey: mustKey(t), n1Key: mustKey(t), n2Key: mustKey(t), foreignKey: mustKey(t), foreignNodeKey: mustKey(t)}
	var err error
	p.auth, err = identity.NewAuthority(testTD, p.authKey, t0.Add(-time.Hour), 366*24*time.Hour)
	require.NoError(t, err)
	p.foreign, err = identity.NewAuthority("evil.internal", p.foreignKey, t0.Add(-time.Hour), 366*24*time.Hour)
	require.NoError(t, err)
	p.n1 = issueNode(t, p.auth, p.authKey, p.n1Key, testTD, "n1", "100.100.1.0/28")
	p.n2 = issueNode(t, p.auth, p.authKey, p.n2Key, testTD, "n2", "100.100.1.16/28")
	p.foreignNode = issueNode(t, p.foreign, p.foreignKey, p.foreignNodeKey, "evil.internal", "n1", "100.100.1.0/28")
	p.i1, p.i1Key = issueIssuer(t, p.auth, p.authKey, p.n1, p.n1Key)
	p.i2, p.i2Key = issueIssuer(t, p.auth, p.authKey, p.n2, p.n2Key)
	p.a1 = issueAgent(t, p.i1, p.i1Key, "billing", "100.100.1.1", nil)
	p.a2 = issueAgent(t, p.i2, p.i2Key, "ledger", "100.100.1.17", nil)
	p.v = Verifier{Certs: identity.Verifier{Authority: p.auth}}
	return p
}

// authClaims is an authority-signed revocation of subject at t0.
func (p *testPKI) authClaims(subject string, seq uint64) RevocationClaims {
	return RevocationClaims{
		Version: Version1, TrustDomain: testTD, Subject: subject, Reason: "key leaked", IssuedAt: t0,
		Expires: t0.Add(24 * time.Hour), Signer: identity.AuthorityID(testTD).String(), Seq: seq,
	}
}

func mustSign(t testing.TB, c RevocationClaims, key ed25519.PrivateKey) []byte {
	t.Helper()
	raw, err := SignRevocation(c, key)
	require.NoError(t, err)
	return raw
}

// signWire signs any claims value as this profile's COSE_Sign1 with the revocation AAD, bypassing
// SignRevocation's checks: what a malicious signer holding key can produce.
func signWire(t testing.TB, claims any, key ed25519.PrivateKey, aad string) []byte {
	t.Helper()
	payload, err := encMode.Marshal(claims)
	require.NoError(t, err)
	raw, err := sign(payload, key, aad)
	require.NoError(t, err)
	return raw
}

// signPayload signs raw payload bytes (which may be non-deterministic or malformed CBOR).
func signPayload(t testing.TB, payload []byte, key ed25519.PrivateKey, aad string) []byte {
	t.Helper()
	raw, err := sign(payload, key, aad)
	require.NoError(t, err)
	return raw
}
