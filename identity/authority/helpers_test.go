package authority

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/sha256"
	"crypto/x509"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	bolt "go.etcd.io/bbolt"

	"github.com/ute-project/ute/identity"
)

const testPolicy = `zones:
  - name: payments
    cidr: 100.100.1.0/24
    regions: [eu-west-1]
    min_trust: 50
    isolate_below: 20
    rules:
      - from: billing-*
        to: ledger
        ports: [tcp/443]
  - name: research
    cidr: 100.100.2.0/24
    regions: [eu-west-1, us-east-1]
    min_trust: 40
    isolate_below: 10
`

// testClock is a settable clock shared by the authority under test and its clients.
type testClock struct {
	mu  sync.Mutex
	now time.Time
}

func newTestClock() *testClock { return &testClock{now: time.Now()} }

func (c *testClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *testClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

type testAuthority struct {
	*Authority
	dir  string
	addr string
}

func writePolicy(t testing.TB, policy string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "policy.yaml")
	require.NoError(t, os.WriteFile(p, []byte(policy), 0o644))
	return p
}

// startAuthority initializes an authority with testPolicy in a temp dir and serves it on an
// ephemeral loopback port until the test ends.
func startAuthority(t testing.TB, clock *testClock) *testAuthority {
	return startAuthorityWith(t, clock, testPolicy)
}

func startAuthorityWith(t testing.TB, clock *testClock, policy string) *testAuthority {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "auth")
	require.NoError(t, Init(dir, "acme.internal", writePolicy(t, policy), Options{Now: clock.Now}))
	ta, _ := serveAuthority(t, dir, clock)
	return ta
}

// serveAuthority opens the authority in dir and serves it until stop is called or the test ends.
func serveAuthority(t testing.TB, dir string, clock *testClock) (ta *testAuthority, stop func()) {
	t.Helper()
	a, err := Open(dir, Options{Now: clock.Now})
	require.NoError(t, err)
	srv, err := a.Listen("127.0.0.1:0")
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			require.NoError(t, <-done)
			require.NoError(t, a.Close())
		})
	}
	t.Cleanup(stop)
	return &testAuthority{Authority: a, dir: dir, addr: srv.Addr().String()}, stop
}

func (ta *testAuthority) token(t testing.TB, spec TokenSpec) string {
	t.Helper()
	tok, err := ta.CreateToken(context.Background(), spec)
	require.NoError(t, err)
	return tok.Token
}

func fingerprint(s string) []byte { h := sha256.Sum256([]byte(s)); return h[:] }

func newKey(t testing.TB) ed25519.PrivateKey {
	t.Helper()
	k, err := identity.GenerateKey()
	require.NoError(t, err)
	return k
}

func joinParams(t testing.TB, ta *testAuthority, token, name string, clock *testClock) JoinParams {
	return JoinParams{Addr: ta.addr, Token: token, Key: newKey(t), Name: name, HostFingerprint: fingerprint(name), Now: clock.Now}
}

// forgeCSRKey swaps the public key inside a signed CSR for pub: the result claims a key its
// signer does not hold, which is what an attacker replaying someone else's key would send.
func forgeCSRKey(t testing.TB, csr []byte, pub []byte) []byte {
	t.Helper()
	parsed, err := x509.ParseCertificateRequest(csr)
	require.NoError(t, err)
	old := parsed.PublicKey.(ed25519.PublicKey)
	require.Equal(t, 1, bytes.Count(csr, old))
	return bytes.Replace(csr, old, pub, 1)
}

// Consume is the token half of ConsumeAndIssue in a transaction of its own, for the store's
// tests of tokens and slices.
func (s *Store) Consume(req ConsumeRequest) (Consumed, error) {
	var out Consumed
	err := s.db.Update(func(tx *bolt.Tx) error {
		var err error
		out, err = consume(tx, req)
		return err
	})
	return out, err
}
