package revstore

import (
	"crypto/ed25519"
	"crypto/sha256"
	"fmt"
	"net/netip"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/identity/record"
)

const testTD = "acme.internal"

// t0 is a fixed instant so tests never depend on the wall clock.
var t0 = time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)

// clock is an injected clock tests move by hand.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) Set(t time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = t
}

// pki is a real trust domain: the authority and two nodes of zone payments.
type pki struct {
	authKey, n1Key, n2Key ed25519.PrivateKey
	auth, n1, n2          *identity.Certificate
	i1                    *identity.Certificate // n1's issuing certificate, which signs its agents
	i1Key                 ed25519.PrivateKey
	v                     record.Verifier
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

func newPKI(t testing.TB) *pki {
	t.Helper()
	p := &pki{authKey: mustKey(t), n1Key: mustKey(t), n2Key: mustKey(t)}
	var err error
	p.auth, err = identity.NewAuthority(testTD, p.authKey, t0.Add(-time.Hour), 366*24*time.Hour)
	require.NoError(t, err)
	p.n1 = p.node(t, "n1", p.n1Key, "100.100.1.0/28")
	p.n2 = p.node(t, "n2", p.n2Key, "100.100.1.16/28")
	p.i1Key, err = identity.IssuerKey(p.n1Key)
	require.NoError(t, err)
	p.i1, err = identity.IssueIssuer(p.auth, p.authKey, p.n1, p.i1Key.Public().(ed25519.PublicKey))
	require.NoError(t, err)
	p.v = record.Verifier{Certs: identity.Verifier{Authority: p.auth}}
	return p
}

func (p *pki) node(t testing.TB, name string, key ed25519.PrivateKey, cidr string) *identity.Certificate {
	t.Helper()
	c, err := identity.Issue(p.auth, p.authKey, identity.IssueRequest{
		ID: identity.NodeID(testTD, name), PublicKey: key.Public().(ed25519.PublicKey),
		Claims: identity.Claims{
			Zones:       []identity.ZoneGrant{{Name: "payments", Prefixes: []netip.Prefix{netip.MustParsePrefix(cidr)}}},
			Fingerprint: digest("host " + name),
		},
		NotBefore: t0.Add(-time.Hour), NotAfter: t0.Add(24 * time.Hour),
	})
	require.NoError(t, err)
	return c
}

// agent issues an agent certificate on node n1 expiring at notAfter.
func (p *pki) agent(t testing.TB, name string, notAfter time.Time) *identity.Certificate {
	t.Helper()
	c, err := identity.Issue(p.i1, p.i1Key, identity.IssueRequest{
		ID: identity.AgentID(testTD, "payments", name), PublicKey: mustKey(t).Public().(ed25519.PublicKey),
		Claims: identity.Claims{
			Zones:       []identity.ZoneGrant{{Name: "payments"}},
			OverlayIPs:  []netip.Addr{netip.MustParseAddr("100.100.1.1")},
			Fingerprint: digest("workload " + name),
		},
		NotBefore: t0.Add(-time.Hour), NotAfter: notAfter,
	})
	require.NoError(t, err)
	return c
}

// byAuthority signs an authority revocation of subject, issued at t0, expiring after ttl.
func (p *pki) byAuthority(t testing.TB, subject string, seq uint64, ttl time.Duration) []byte {
	t.Helper()
	raw, err := record.SignRevocation(record.RevocationClaims{
		TrustDomain: testTD, Subject: subject, Reason: "test", IssuedAt: t0, Expires: t0.Add(ttl),
		Signer: identity.AuthorityID(testTD).String(), Seq: seq,
	}, p.authKey)
	require.NoError(t, err)
	return raw
}

func (p *pki) policy(t testing.TB, version uint64, body string) []byte {
	t.Helper()
	raw, err := record.SignPolicy(record.PolicyClaims{TrustDomain: testTD, PolicyVersion: version, IssuedAt: t0, Policy: []byte(body)}, p.authKey)
	require.NoError(t, err)
	return raw
}

func serial(n int) string { return fmt.Sprintf("serial:%d", n) }

// open opens the store at dir/FileName with the clock and closes it at cleanup.
func open(t testing.TB, path string, p *pki, clk *clock) (*Store, OpenReport) {
	t.Helper()
	s, rep, err := Open(path, Options{Verifier: p.v, Now: clk.Now})
	require.NoError(t, err)
	t.Cleanup(func() { _ = s.Close() })
	return s, rep
}

func storePath(t testing.TB) string { return filepath.Join(t.TempDir(), FileName) }
