package authority

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity"
)

// TestRevokedSerialRevokesLineage is the lineage attack from the attacker's side: a node
// revoked by one serial tries to live on through its renewal lineage and through its name.
// Renewal with the revoked certificate's key, renewal with the successor's key, and a rejoin under
// the same name with a fresh token are each refused with a sentinel; only the operator's audited
// release reopens the name.
func TestRevokedSerialRevokesLineage(t *testing.T) {
	clock := newTestClock()
	ta := startAuthority(t, clock)
	ctx := context.Background()
	j, rp := joinNode(t, ta, clock, "n1")
	clock.Advance(13 * time.Hour)
	succ, err := Renew(ctx, rp) // the routine renewal that used to carry the identity past a revocation
	require.NoError(t, err)
	s1, s2 := j.Node.Serial().Uint64(), succ.Node.Serial().Uint64()

	// The operator revokes the serial seen in an old log: the first one.
	rev, err := ta.RevokeSubject(ctx, "serial:"+j.Node.Serial().String(), "key leaked")
	require.NoError(t, err)
	require.Len(t, rev.Serials, 2, "the live successor is revoked with the serial it descends from")
	assert.Equal(t, s1, rev.Serials[0].Serial)
	assert.Zero(t, rev.Serials[0].Via)
	assert.Equal(t, s2, rev.Serials[1].Serial)
	assert.Equal(t, s1, rev.Serials[1].Via)
	revoked, err := ta.Store().IsRevoked(s2)
	require.NoError(t, err)
	assert.True(t, revoked)

	// Peers check a certificate's own serial: the successor has a signed record of its own.
	recs, err := ta.Store().RevocationRecords(0, 10)
	require.NoError(t, err)
	var subjects []string
	for _, r := range recs {
		got, err := verifier(ta).VerifyRevocation(r.Raw, clock.Now())
		require.NoError(t, err)
		subjects = append(subjects, got.Claims.Subject)
	}
	assert.ElementsMatch(t, []string{"serial:" + j.Node.Serial().String(), "serial:" + succ.Node.Serial().String()}, subjects)

	// Renewal with the revoked certificate and its key.
	successorKey := rp.NewKey
	rp.NewKey = newKey(t)
	_, err = Renew(ctx, rp)
	require.ErrorIs(t, err, ErrRevoked)
	// Renewal with the successor's certificate and key.
	_, err = Renew(ctx, RenewParams{Addr: ta.addr, Authority: ta.Certificate(), Current: succ.Node, Key: successorKey, NewKey: newKey(t), Now: clock.Now})
	require.ErrorIs(t, err, ErrRevoked)
	assert.Contains(t, err.Error(), "revoked")

	// A rejoin under the same name with a fresh token: refused, token unspent, audited.
	tok := ta.token(t, TokenSpec{Zones: []string{"payments"}, TTL: 72 * time.Hour})
	_, err = Join(ctx, joinParams(t, ta, tok, "n1", clock))
	require.ErrorIs(t, err, ErrNameRevoked)
	assert.Contains(t, err.Error(), "ute authority release")
	last := lastAudit(t, ta)
	assert.Equal(t, "join", last.Event)
	assert.Equal(t, CodeNameRevoked, last.WireCode)
	parsed, err := identity.ParseToken(tok)
	require.NoError(t, err)
	stored, err := ta.Store().Token(parsed.ID)
	require.NoError(t, err)
	assert.Empty(t, stored.ConsumedBy, "a refused join leaves the token unused")

	// Expiry does not reopen the name either.
	clock.Advance(49 * time.Hour)
	_, err = Join(ctx, joinParams(t, ta, tok, "n1", clock))
	require.ErrorIs(t, err, ErrNameRevoked)

	// The lineage shows who revoked what.
	lin, err := ta.Lineage(ctx, "n1")
	require.NoError(t, err)
	require.Len(t, lin, 2)
	assert.Equal(t, s1, lin[0].Serial)
	assert.True(t, lin[0].Revoked)
	assert.Equal(t, s1, lin[0].RevokedBy)
	assert.Equal(t, s2, lin[1].Serial)
	assert.Equal(t, s1, lin[1].Renews)
	assert.Equal(t, s1, lin[1].RevokedBy)

	// The operator's release: audited, and then the join works (a new lineage).
	rel, err := ta.ReleaseName(ctx, "n1", "host rebuilt with a new key")
	require.NoError(t, err)
	assert.Equal(t, s2, rel.Serial)
	assert.Equal(t, s1, rel.RevokedSerial)
	last = lastAudit(t, ta)
	assert.Equal(t, EventRelease, last.Event)
	assert.Equal(t, OutcomeReleased, last.Outcome)
	assert.Equal(t, "spiffe://acme.internal/node/n1", last.Subject)
	assert.Contains(t, last.Reason, "host rebuilt with a new key")
	rejoined, err := Join(ctx, joinParams(t, ta, tok, "n1", clock))
	require.NoError(t, err)
	lin, err = ta.Lineage(ctx, "n1")
	require.NoError(t, err)
	require.Len(t, lin, 3)
	assert.Equal(t, rejoined.Node.Serial().Uint64(), lin[2].Serial)
	assert.Zero(t, lin[2].RevokedBy, "the new lineage is not revoked")

	// The new holder is live: releasing it is refused.
	_, err = ta.ReleaseName(ctx, "n1", "again")
	require.ErrorIs(t, err, ErrReleaseRefused)
}

func TestReleaseNameRefusals(t *testing.T) {
	clock := newTestClock()
	ta := startAuthority(t, clock)
	ctx := context.Background()
	_, _ = joinNode(t, ta, clock, "live")
	for name, tc := range map[string]struct{ node, reason string }{
		"unknown name":      {"ghost", "x"},
		"live holder":       {"live", "x"},
		"empty reason":      {"live", ""},
		"malformed name":    {"a/b", "x"},
		"control in reason": {"live", "a\nb"},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := ta.ReleaseName(ctx, tc.node, tc.reason)
			require.Error(t, err)
			assert.Equal(t, OutcomeRefused, lastAudit(t, ta).Outcome)
		})
	}
	_, err := ta.ReleaseName(ctx, "ghost", "x")
	require.ErrorIs(t, err, ErrReleaseRefused)
	_, err = ta.ReleaseName(ctx, "live", "x")
	require.ErrorIs(t, err, ErrReleaseRefused)
	_, err = ta.ReleaseName(ctx, "live", "")
	require.ErrorIs(t, err, ErrRevocationMalformed)

	// Expired and never revoked: nothing to release, the name is free.
	clock.Advance(25 * time.Hour)
	_, err = ta.ReleaseName(ctx, "live", "x")
	require.ErrorIs(t, err, ErrReleaseRefused)
	assert.Contains(t, err.Error(), "free already")
}

// Release and lineage work through the running daemon's admin socket too.
func TestReleaseThroughAdminSocket(t *testing.T) {
	clock := newTestClock()
	dir := filepath.Join(t.TempDir(), "auth")
	require.NoError(t, Init(dir, "acme.internal", writePolicy(t, testPolicy), Options{Now: clock.Now}))
	ta, _ := serveAuthority(t, dir, clock)
	j, _ := joinNode(t, ta, clock, "n1")

	ctx, cancel := context.WithCancel(context.Background())
	adminDone := make(chan error, 1)
	admin, err := ta.ListenAdmin()
	require.NoError(t, err)
	go func() { adminDone <- admin.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		<-adminDone
	})
	adm, err := OpenAdmin(ctx, dir, Options{})
	require.NoError(t, err)
	require.IsType(t, &adminClient{}, adm)

	_, err = adm.Release(ctx, "n1", "too early")
	require.ErrorIs(t, err, ErrReleaseRefused)
	_, err = adm.Revoke(ctx, "serial:"+j.Node.Serial().String(), "stolen")
	require.NoError(t, err)
	lin, err := adm.Lineage(ctx, "n1")
	require.NoError(t, err)
	require.Len(t, lin, 1)
	assert.True(t, lin[0].Revoked)
	_, err = adm.Lineage(ctx, "ghost")
	require.ErrorIs(t, err, ErrSubjectUnknown)
	rel, err := adm.Release(ctx, "n1", "rebuilt")
	require.NoError(t, err)
	assert.Equal(t, j.Node.Serial().Uint64(), rel.RevokedSerial)
}
