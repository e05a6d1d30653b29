package authority

import (
	"context"
	"crypto/tls"
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
	// The issuing CA is renewed with the node certificate: the new node serial, the issuing key
	// derived from the new node key, the same window.
	require.NoError(t, identity.Verifier{Authority: ta.Certificate()}.VerifyIssuer(r.Issuer, clock.Now()))
	assert.Equal(t, r.Node.Serial(), r.Issuer.NodeSerial())
	ikey, err := identity.IssuerKey(rp.NewKey)
	require.NoError(t, err)
	assert.True(t, r.Issuer.PublicKey().Equal(ikey.Public()))
	assert.Equal(t, r.Node.X509.NotAfter, r.Issuer.X509.NotAfter)
	rec := lastAudit(t, ta)
	assert.Equal(t, "renew", rec.Event)
	assert.Equal(t, OutcomeIssued, rec.Outcome)

	// A retry after a lost answer gets the same node certificate and an issuing CA for it.
	again, err := Renew(context.Background(), rp)
	require.NoError(t, err)
	assert.Equal(t, r.NodeCertDER, again.NodeCertDER)
	assert.Equal(t, r.Node.Serial(), again.Issuer.NodeSerial())
	assert.Equal(t, OutcomeResent, lastAudit(t, ta).Outcome)
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
		key := newKey(t)
		csr, err := createCSR(key, "anon", "", fingerprint("anon"))
		require.NoError(t, err)
		icsr, err := createIssuerCSR(key, "anon", "", fingerprint("anon"))
		require.NoError(t, err)
		_, err = roundTrip(ctx, ta.addr, func(tls.ConnectionState) error { return nil }, nil, OpRenew, RenewRequest{CSR: csr, IssuerCSR: icsr})
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
