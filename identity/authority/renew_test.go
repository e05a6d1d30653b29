package authority

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity"
)

func joinNode(t *testing.T, ta *testAuthority, clock *testClock, name string) (*Joined, RenewParams) {
	t.Helper()
	p := joinParams(t, ta, ta.token(t, TokenSpec{Zones: []string{"payments"}}), name, clock)
	j, err := Join(context.Background(), p)
	require.NoError(t, err)
	return j, RenewParams{Addr: ta.addr, Authority: j.Authority, Current: j.Node, Key: p.Key, NewKey: newKey(t), Now: clock.Now}
}

func TestRenewIssuesFreshCertificateForNewKey(t *testing.T) {
	clock := newTestClock()
	ta := startAuthority(t, clock)
	j, rp := joinNode(t, ta, clock, "n1")
	clock.Advance(13 * time.Hour)
	require.True(t, NeedsRenewal(j.Node, clock.Now()))

	r, err := Renew(context.Background(), rp)
	require.NoError(t, err)
	assert.Equal(t, j.Node.ID, r.Node.ID)
	assert.Equal(t, j.Node.Claims, r.Node.Claims)
	assert.Greater(t, r.Node.Serial().Uint64(), j.Node.Serial().Uint64())
	assert.True(t, r.Node.PublicKey().Equal(rp.NewKey.Public()))
	assert.False(t, NeedsRenewal(r.Node, clock.Now()))
	require.NoError(t, identity.Verifier{Authority: ta.Certificate()}.VerifyNode(r.Node, clock.Now()))
	rec := lastAudit(t, ta)
	assert.Equal(t, "renew", rec.Event)
	assert.Equal(t, OutcomeIssued, rec.Outcome)
}

func TestRenewRefusals(t *testing.T) {
	clock := newTestClock()
	ta := startAuthority(t, clock)
	other := startAuthority(t, clock)
	ctx := context.Background()

	t.Run("certificate from another authority", func(t *testing.T) {
		_, rp := joinNode(t, other, clock, "spy")
		rp.Addr, rp.Authority = ta.addr, ta.Certificate()
		_, err := Renew(ctx, rp)
		require.ErrorIs(t, err, ErrRenewalRefused)
		assert.Equal(t, CodeRenewalRefused, lastAudit(t, ta).WireCode)
	})
	t.Run("expired certificate", func(t *testing.T) {
		c := newTestClock()
		c.now = clock.Now()
		_, rp := joinNode(t, ta, c, "late")
		c.Advance(25 * time.Hour)
		// The authority's clock is the shared one: move it too.
		clock.Advance(25 * time.Hour)
		_, err := Renew(ctx, rp)
		require.ErrorIs(t, err, ErrRenewalRefused)
	})
	t.Run("revoked serial", func(t *testing.T) {
		j, rp := joinNode(t, ta, clock, "bad")
		require.NoError(t, ta.Revoke(j.Node.Serial().Uint64(), "test"))
		_, err := Renew(ctx, rp)
		require.ErrorIs(t, err, ErrRevoked)
	})
	t.Run("no client certificate", func(t *testing.T) {
		csr, err := createCSR(newKey(t), "anon", "", fingerprint("anon"))
		require.NoError(t, err)
		_, err = roundTrip(ctx, ta.addr, func(tls.ConnectionState) error { return nil }, nil, OpRenew, RenewRequest{CSR: csr})
		require.ErrorIs(t, err, ErrRenewalRefused)
	})
	t.Run("CSR for another name", func(t *testing.T) {
		_, rp := joinNode(t, ta, clock, "honest")
		tlsCert, err := identity.TLSCertificate(rp.Key, rp.Current)
		require.NoError(t, err)
		csr, err := createCSR(newKey(t), "victim", "", fingerprint("x"))
		require.NoError(t, err)
		_, err = roundTrip(ctx, ta.addr, func(tls.ConnectionState) error { return nil }, &tlsCert, OpRenew, RenewRequest{CSR: csr})
		require.ErrorIs(t, err, ErrCSR)
	})
	t.Run("impostor authority", func(t *testing.T) {
		_, rp := joinNode(t, ta, clock, "careful")
		rp.Addr = other.addr
		_, err := Renew(ctx, rp)
		require.ErrorIs(t, err, ErrPinMismatch)
	})
}

// fakeClock drives the Renewer without sleeping: After returns a channel the test fires.
type fakeClock struct {
	now   atomic.Int64
	waits chan time.Duration
	fire  chan time.Time
}

func (f *fakeClock) Now() time.Time { return time.Unix(0, f.now.Load()) }
func (f *fakeClock) After(d time.Duration) <-chan time.Time {
	f.waits <- d
	return f.fire
}

func TestRenewerRenewsAtHalfLifeAndRetries(t *testing.T) {
	clock := newTestClock()
	ta := startAuthority(t, clock)
	j, _ := joinNode(t, ta, clock, "n1")

	fc := &fakeClock{waits: make(chan time.Duration), fire: make(chan time.Time)}
	fc.now.Store(j.Node.X509.NotBefore.UnixNano())
	var (
		current = j.Node
		calls   atomic.Int32
	)
	r := &Renewer{
		Current: func() (*identity.Certificate, error) { return current, nil },
		Renew: func(context.Context) error {
			if calls.Add(1) == 1 {
				return ErrInternal
			}
			// The renewed certificate starts now: move its window forward.
			current = &identity.Certificate{X509: cloneWindow(current, fc.Now())}
			return nil
		},
		Now: fc.Now, After: fc.After, MinRetry: time.Second, MaxRetry: time.Minute,
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()

	half := j.Node.RenewAt().Sub(j.Node.X509.NotBefore)
	assert.Equal(t, half, <-fc.waits, "first wait is until half-life")
	fc.now.Add(int64(half))
	fc.fire <- fc.Now()
	assert.Equal(t, time.Second, <-fc.waits, "a failed renewal retries after MinRetry")
	assert.Equal(t, int32(1), calls.Load())
	fc.now.Add(int64(time.Second))
	fc.fire <- fc.Now()
	next := <-fc.waits
	assert.Equal(t, int32(2), calls.Load())
	assert.Equal(t, half, next, "after success the wait is the new certificate's half-life")
	cancel()
	require.NoError(t, <-done)
}

func cloneWindow(c *identity.Certificate, from time.Time) *x509.Certificate {
	x := *c.X509
	life := x.NotAfter.Sub(x.NotBefore)
	x.NotBefore, x.NotAfter = from, from.Add(life)
	return &x
}
