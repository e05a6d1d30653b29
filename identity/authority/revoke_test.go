package authority

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity"
)

func TestParseSubject(t *testing.T) {
	tests := []struct {
		in   string
		want Subject
		err  error
	}{
		{in: "serial:7", want: Subject{Serial: 7}},
		{in: "serial:18446744073709551615", want: Subject{Serial: 1<<64 - 1}},
		{in: "spiffe://acme.internal/node/n1", want: Subject{Node: identity.NodeID("acme.internal", "n1")}},
		{in: "", err: ErrRevocationMalformed},
		{in: "serial:", err: ErrRevocationMalformed},
		{in: "serial:0", err: ErrRevocationMalformed},
		{in: "serial:-1", err: ErrRevocationMalformed},
		{in: "serial:+1", err: ErrRevocationMalformed},
		{in: "serial:007", err: ErrRevocationMalformed},
		{in: "serial: 7", err: ErrRevocationMalformed},
		{in: "serial:18446744073709551616", err: ErrRevocationMalformed},
		{in: "n1", err: ErrRevocationMalformed},
		{in: "node/n1", err: ErrRevocationMalformed},
		{in: "spiffe://acme.internal/node/N1", err: ErrRevocationMalformed},
		{in: "spiffe://acme.internal/node/n1/", err: ErrRevocationMalformed},
		{in: "spiffe://acme.internal", err: ErrRevocationMalformed},
		{in: "spiffe://acme.internal/zone/payments/agent/billing", want: Subject{Agent: identity.AgentID("acme.internal", "payments", "billing")}},
	}
	for _, tc := range tests {
		t.Run(tc.in, func(t *testing.T) {
			got, err := ParseSubject(tc.in)
			if tc.err != nil {
				require.ErrorIs(t, err, tc.err)
				assert.NotContains(t, err.Error(), "\n")
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.want, got)
			assert.Equal(t, tc.in, got.String(), "the subject prints as it parses")
		})
	}
}

func TestValidateRevokeReason(t *testing.T) {
	for _, ok := range []string{"key leaked", "décommissionné", strings.Repeat("x", MaxRevokeReason)} {
		require.NoError(t, ValidateRevokeReason(ok), ok)
	}
	for _, bad := range []string{"", "   ", "two\nlines", "tab\there", "\x1b[31mred", strings.Repeat("x", MaxRevokeReason+1), "\xff"} {
		require.ErrorIs(t, ValidateRevokeReason(bad), ErrRevocationMalformed, "%q", bad)
	}
}

func FuzzParseSubject(f *testing.F) {
	for _, s := range []string{"serial:1", "serial:18446744073709551616", "serial:007", "spiffe://acme.internal/node/n1",
		"spiffe://acme.internal/zone/z/agent/a", "spiffe://acme.internal", "spiffe://ACME/node/x", "", "serial:"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		sub, err := ParseSubject(s)
		if err != nil {
			require.Zero(t, sub)
			return
		}
		// What parses prints back to exactly the input: no two spellings name one subject.
		require.Equal(t, s, sub.String())
		kinds := 0
		for _, set := range []bool{sub.Serial != 0, sub.Node.Kind == identity.KindNode, sub.Agent.Kind == identity.KindAgent} {
			if set {
				kinds++
			}
		}
		require.Equal(t, 1, kinds, "exactly one kind of subject")
	})
}

// Revoking a node by SPIFFE ID revokes every unexpired certificate issued to it (the superseded
// one included, since a copy of it may still be presented to peers), stops renewal, frees the
// name for a rejoin, and is idempotent.
func TestRevokeNodeStopsRenewalAndClosesName(t *testing.T) {
	clock := newTestClock()
	ta := startAuthority(t, clock)
	ctx := context.Background()
	j, rp := joinNode(t, ta, clock, "n1")
	_, other := joinNode(t, ta, clock, "n2")
	clock.Advance(time.Hour)
	r, err := Renew(ctx, rp)
	require.NoError(t, err)

	rev, err := ta.RevokeSubject(ctx, "spiffe://acme.internal/node/n1", "key leaked")
	require.NoError(t, err)
	assert.Equal(t, "spiffe://acme.internal/node/n1", rev.Subject)
	require.Len(t, rev.Serials, 2)
	assert.Equal(t, []uint64{j.Node.Serial().Uint64(), r.Node.Serial().Uint64()}, []uint64{rev.Serials[0].Serial, rev.Serials[1].Serial})
	for _, s := range rev.Serials {
		assert.False(t, s.Already)
		assert.Equal(t, "key leaked", s.Reason)
		assert.Equal(t, "spiffe://acme.internal/node/n1", s.SPIFFEID)
		revoked, err := ta.Store().IsRevoked(s.Serial)
		require.NoError(t, err)
		assert.True(t, revoked)
	}
	rec := lastAudit(t, ta)
	assert.Equal(t, "revoke", rec.Event)
	assert.Equal(t, OutcomeRevoked, rec.Outcome)
	assert.Equal(t, r.Node.Serial().Uint64(), rec.Serial)

	// The revoked node cannot renew, not from its newest certificate, not by retrying the old one.
	_, err = Renew(ctx, RenewParams{Addr: ta.addr, Authority: ta.Certificate(), Current: r.Node, Key: rp.NewKey, NewKey: newKey(t), Now: clock.Now})
	require.ErrorIs(t, err, ErrRevoked)
	_, err = Renew(ctx, rp)
	require.ErrorIs(t, err, ErrRevoked)
	// Another node is untouched.
	_, err = Renew(ctx, other)
	require.NoError(t, err)

	// Idempotent: the first revocation stays, reported as such.
	clock.Advance(time.Minute)
	again, err := ta.RevokeSubject(ctx, "spiffe://acme.internal/node/n1", "second opinion")
	require.NoError(t, err)
	require.Len(t, again.Serials, 2)
	for _, s := range again.Serials {
		assert.True(t, s.Already)
		assert.Equal(t, "key leaked", s.Reason)
	}
	assert.Contains(t, lastAudit(t, ta).Reason, "already revoked")

	// The name is closed until the operator releases it; then a rejoin under it works, and
	// revoking the name again reaches the new one.
	_, err = Join(ctx, joinParams(t, ta, ta.token(t, TokenSpec{Zones: []string{"payments"}}), "n1", clock))
	require.ErrorIs(t, err, ErrNameRevoked)
	_, err = ta.ReleaseName(ctx, "n1", "rebuilt")
	require.NoError(t, err)
	rejoined, err := Join(ctx, joinParams(t, ta, ta.token(t, TokenSpec{Zones: []string{"payments"}}), "n1", clock))
	require.NoError(t, err)
	third, err := ta.RevokeSubject(ctx, "spiffe://acme.internal/node/n1", "decommissioned")
	require.NoError(t, err)
	require.Len(t, third.Serials, 3)
	assert.Equal(t, rejoined.Node.Serial().Uint64(), third.Serials[2].Serial)
	assert.False(t, third.Serials[2].Already)

	// Expired certificates are not live: nothing left to revoke is a success with no serials.
	clock.Advance(49 * time.Hour)
	none, err := ta.RevokeSubject(ctx, "spiffe://acme.internal/node/n1", "cleanup")
	require.NoError(t, err)
	assert.Empty(t, none.Serials)
	assert.NotNil(t, none.Serials, "JSON shows [] rather than null")
}

func TestRevokeSerialAndRefusals(t *testing.T) {
	clock := newTestClock()
	ta := startAuthority(t, clock)
	ctx := context.Background()
	j, rp := joinNode(t, ta, clock, "n1")
	serial := j.Node.Serial().Uint64()

	rev, err := ta.RevokeSubject(ctx, "serial:"+j.Node.Serial().String(), "lost laptop")
	require.NoError(t, err)
	require.Len(t, rev.Serials, 1)
	assert.Equal(t, serial, rev.Serials[0].Serial)
	assert.Equal(t, "spiffe://acme.internal/node/n1", rev.Serials[0].SPIFFEID)
	_, err = Renew(ctx, rp)
	require.ErrorIs(t, err, ErrRevoked)

	tests := []struct {
		subject, reason string
		err             error
		msg             string
	}{
		{"serial:99", "x", ErrSubjectUnknown, "serial 99 was never issued (the last serial is 1)"},
		{"spiffe://acme.internal/node/ghost", "x", ErrSubjectUnknown, "no certificate was ever issued to spiffe://acme.internal/node/ghost"},
		{"spiffe://other.internal/node/n1", "x", ErrSubjectUnknown, "trust domain other.internal"},
		{"spiffe://other.internal/zone/payments/agent/billing", "x", ErrSubjectUnknown, "trust domain other.internal"},
		{"serial:1x", "x", ErrRevocationMalformed, "serial:1x"},
		{"serial:1", "", ErrRevocationMalformed, "--reason"},
	}
	for _, tc := range tests {
		t.Run(tc.subject+"/"+tc.reason, func(t *testing.T) {
			before, err := ta.Audit()
			require.NoError(t, err)
			_, err = ta.RevokeSubject(ctx, tc.subject, tc.reason)
			require.ErrorIs(t, err, tc.err)
			assert.Contains(t, err.Error(), tc.msg)
			recs, err := ta.Audit()
			require.NoError(t, err)
			require.Len(t, recs, len(before)+1, "a refused revocation is audited")
			assert.Equal(t, OutcomeRefused, recs[len(recs)-1].Outcome)
		})
	}
}

// Revocation is durable before it returns, and the admin socket gives the same answers, errors
// included, as the store opened directly.
func TestRevokeThroughAdminSocketAndRestart(t *testing.T) {
	clock := newTestClock()
	dir := filepath.Join(t.TempDir(), "auth")
	require.NoError(t, Init(dir, "acme.internal", writePolicy(t, testPolicy), Options{Now: clock.Now}))
	ta, stop := serveAuthority(t, dir, clock)
	j, rp := joinNode(t, ta, clock, "n1")

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
	require.IsType(t, &adminClient{}, adm, "the running daemon answers on its socket")
	rev, err := adm.Revoke(ctx, "spiffe://acme.internal/node/n1", "compromised")
	require.NoError(t, err)
	require.Len(t, rev.Serials, 1)
	assert.Equal(t, j.Node.Serial().Uint64(), rev.Serials[0].Serial)
	_, err = adm.Revoke(ctx, "spiffe://acme.internal/node/ghost", "x")
	require.ErrorIs(t, err, ErrSubjectUnknown)
	agent, err := adm.Revoke(ctx, "spiffe://acme.internal/zone/payments/agent/a", "x")
	require.NoError(t, err, "the authority revokes an agent by a signed record")
	assert.NotZero(t, agent.Seq)
	_, err = adm.Revoke(ctx, "serial:0", "x")
	require.ErrorIs(t, err, ErrRevocationMalformed)
	_, err = Renew(context.Background(), rp)
	require.ErrorIs(t, err, ErrRevoked)

	cancel()
	require.NoError(t, <-adminDone)
	adminDone <- nil
	stop()
	local, err := OpenAdmin(context.Background(), dir, Options{})
	require.NoError(t, err)
	t.Cleanup(func() { _ = local.Close() })
	again, err := local.Revoke(context.Background(), "spiffe://acme.internal/node/n1", "after restart")
	require.NoError(t, err)
	require.Len(t, again.Serials, 1)
	assert.True(t, again.Serials[0].Already, "the revocation survived the restart")
	assert.Equal(t, "compromised", again.Serials[0].Reason)
}
