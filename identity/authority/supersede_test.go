package authority

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity"
)

// An attacker who copied a node's key and certificate must not be able to keep the identity alive
// once the node has rotated its key: the certificate it holds was superseded by the renewal, so it
// can no longer renew, even though it is still inside its validity window.
func TestRenewRefusesSupersededCertificate(t *testing.T) {
	clock := newTestClock()
	ta := startAuthority(t, clock)
	ctx := context.Background()
	_, stolen := joinNode(t, ta, clock, "n1")
	clock.Advance(13 * time.Hour)

	honest := stolen
	honest.NewKey = newKey(t)
	_, err := Renew(ctx, honest)
	require.NoError(t, err)

	stolen.NewKey = newKey(t)
	_, err = Renew(ctx, stolen)
	require.ErrorIs(t, err, ErrSuperseded)
	assert.Contains(t, err.Error(), "already renewed")
	rec := lastAudit(t, ta)
	assert.Equal(t, OutcomeRefused, rec.Outcome)
	assert.Equal(t, CodeSuperseded, rec.WireCode)
}

// Of any number of concurrent renewals from one certificate (the node and a clone racing), exactly
// one gets a certificate.
func TestRenewConcurrentFromOneCertificateOnlyOneWins(t *testing.T) {
	clock := newTestClock()
	ta := startAuthority(t, clock)
	_, rp := joinNode(t, ta, clock, "n1")
	clock.Advance(13 * time.Hour)

	const n = 8
	var (
		wg   sync.WaitGroup
		errs = make([]error, n)
	)
	for i := range n {
		p := rp
		p.NewKey = newKey(t)
		wg.Go(func() { _, errs[i] = Renew(context.Background(), p) })
	}
	wg.Wait()
	ok := 0
	for _, err := range errs {
		if err == nil {
			ok++
			continue
		}
		require.ErrorIs(t, err, ErrSuperseded)
	}
	assert.Equal(t, 1, ok)
}

// Revoking a node's serial must also stop the certificates it was renewed into: otherwise an
// operator who revokes the serial they saw at join leaves the node renewing forever.
func TestRenewRefusesDescendantOfRevokedSerial(t *testing.T) {
	clock := newTestClock()
	ta := startAuthority(t, clock)
	ctx := context.Background()
	j, rp := joinNode(t, ta, clock, "n1")
	clock.Advance(13 * time.Hour)
	r1, err := Renew(ctx, rp)
	require.NoError(t, err)

	require.NoError(t, ta.Revoke(j.Node.Serial().Uint64(), "compromised"))

	clock.Advance(13 * time.Hour)
	next := RenewParams{Addr: ta.addr, Authority: ta.Certificate(), Current: r1.Node, Key: rp.NewKey, NewKey: newKey(t), Now: clock.Now}
	_, err = Renew(ctx, next)
	require.ErrorIs(t, err, ErrRevoked)
	assert.Contains(t, err.Error(), "revoked")
	assert.Equal(t, CodeRevoked, lastAudit(t, ta).WireCode)
}

// The chain of renewals survives a restart of the authority.
func TestSupersededSurvivesRestart(t *testing.T) {
	clock := newTestClock()
	dir := t.TempDir() + "/auth"
	require.NoError(t, Init(dir, "acme.internal", writePolicy(t, testPolicy), Options{Now: clock.Now}))
	ta, stop := serveAuthority(t, dir, clock)
	_, rp := joinNode(t, ta, clock, "n1")
	clock.Advance(13 * time.Hour)
	_, err := Renew(context.Background(), rp)
	require.NoError(t, err)
	stop()

	ta2, _ := serveAuthority(t, dir, clock)
	rp.Addr, rp.NewKey = ta2.addr, newKey(t)
	_, err = Renew(context.Background(), rp)
	require.ErrorIs(t, err, ErrSuperseded)
}

// A token for one zone must not mint a second certificate with the SPIFFE ID of a live node of
// another zone: peers, revocation by ID and duplicate-identity detection would confuse the two.
// The refused join leaves the token unused.
func TestJoinRefusesNameHeldByLiveNode(t *testing.T) {
	clock := newTestClock()
	ta := startAuthority(t, clock)
	ctx := context.Background()
	victim, err := Join(ctx, joinParams(t, ta, ta.token(t, TokenSpec{Zones: []string{"payments"}}), "n1", clock))
	require.NoError(t, err)

	squat := ta.token(t, TokenSpec{Zones: []string{"research"}, Regions: []string{"eu-west-1"}})
	_, err = Join(ctx, joinParams(t, ta, squat, "n1", clock))
	require.ErrorIs(t, err, ErrNameTaken)
	assert.Contains(t, err.Error(), `node "n1"`)
	assert.Equal(t, CodeNameTaken, lastAudit(t, ta).WireCode)
	parsed, err := identity.ParseToken(squat)
	require.NoError(t, err)
	stored, err := ta.Store().Token(parsed.ID)
	require.NoError(t, err)
	assert.Empty(t, stored.ConsumedBy, "a refused join leaves the token unused")

	// Revoking the live certificate closes the name; the operator's release reopens it: the
	// documented way to rejoin under it.
	require.NoError(t, ta.Revoke(victim.Node.Serial().Uint64(), "decommissioned"))
	_, err = Join(ctx, joinParams(t, ta, squat, "n1", clock))
	require.ErrorIs(t, err, ErrNameRevoked)
	_, err = ta.ReleaseName(ctx, "n1", "decommissioned host rebuilt")
	require.NoError(t, err)
	_, err = Join(ctx, joinParams(t, ta, squat, "n1", clock))
	require.NoError(t, err)
}

// A renewal keeps holding the name for the renewed certificate's lifetime, and expiry frees it.
func TestNameHeldThroughRenewalUntilExpiry(t *testing.T) {
	clock := newTestClock()
	ta := startAuthority(t, clock)
	ctx := context.Background()
	_, rp := joinNode(t, ta, clock, "n1")
	clock.Advance(13 * time.Hour)
	r, err := Renew(ctx, rp)
	require.NoError(t, err)

	clock.Advance(13 * time.Hour) // past the first certificate's expiry, inside the renewed one's
	_, err = Join(ctx, joinParams(t, ta, ta.token(t, TokenSpec{Zones: []string{"payments"}}), "n1", clock))
	require.ErrorIs(t, err, ErrNameTaken)

	clock.Advance(r.Node.X509.NotAfter.Sub(clock.Now()) + time.Second)
	_, err = Join(ctx, joinParams(t, ta, ta.token(t, TokenSpec{Zones: []string{"payments"}}), "n1", clock))
	require.NoError(t, err, "an expired name can be joined again")
}
