package authority

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/identity/record"
)

func verifier(ta *testAuthority) record.Verifier {
	return record.Verifier{Certs: identity.Verifier{Authority: ta.Certificate()}}
}

// Each revocation that revokes something new writes one authority-signed record with the next
// sequence number, durable with the revocation; its expiry covers every certificate it names.
func TestRevocationRecordsSignedSequencedDurable(t *testing.T) {
	clock := newTestClock()
	dir := filepath.Join(t.TempDir(), "auth")
	require.NoError(t, Init(dir, "acme.internal", writePolicy(t, testPolicy), Options{Now: clock.Now}))
	ta, stop := serveAuthority(t, dir, clock)
	ctx := context.Background()
	v := verifier(ta)

	_, rp := joinNode(t, ta, clock, "n1")
	clock.Advance(time.Hour)
	renewed, err := Renew(ctx, rp) // n1 now has two live certificates; the renewed one ends later
	require.NoError(t, err)
	j2, _ := joinNode(t, ta, clock, "n2")

	rev, err := ta.RevokeSubject(ctx, "spiffe://acme.internal/node/n1", "key leaked")
	require.NoError(t, err)
	assert.Equal(t, uint64(1), rev.Seq)
	assert.False(t, rev.Already)
	r, err := v.VerifyRevocation(rev.Record, clock.Now())
	require.NoError(t, err)
	assert.True(t, r.ByAuthority())
	assert.Equal(t, uint64(1), r.Claims.Seq)
	assert.Equal(t, "spiffe://acme.internal/node/n1", r.Claims.Subject)
	assert.Equal(t, "key leaked", r.Claims.Reason)
	assert.Equal(t, renewed.Node.X509.NotAfter.UnixMilli(), r.Claims.Expires.UnixMilli(), "the latest NotAfter of the node's certificates")
	assert.Equal(t, rev.Expires.UnixMilli(), r.Claims.Expires.UnixMilli())

	serial, err := ta.RevokeSubject(ctx, "serial:"+j2.Node.Serial().String(), "lost")
	require.NoError(t, err)
	assert.Equal(t, uint64(2), serial.Seq)
	r, err = v.VerifyRevocation(serial.Record, clock.Now())
	require.NoError(t, err)
	assert.Equal(t, "serial:"+j2.Node.Serial().String(), r.Claims.Subject)
	assert.Equal(t, j2.Node.X509.NotAfter.UnixMilli(), r.Claims.Expires.UnixMilli())

	// An agent: no serial of the authority's, only the record, expiring no earlier than any node
	// certificate of its zone (n2's renewed one ends latest here) and than now + node lifetime.
	agent, err := ta.RevokeSubject(ctx, "spiffe://acme.internal/zone/payments/agent/billing", "exfiltration")
	require.NoError(t, err)
	assert.Equal(t, uint64(3), agent.Seq)
	assert.Empty(t, agent.Serials)
	r, err = v.VerifyRevocation(agent.Record, clock.Now())
	require.NoError(t, err)
	assert.Equal(t, "spiffe://acme.internal/zone/payments/agent/billing", r.Claims.Subject)
	assert.False(t, r.Claims.Expires.Before(clock.Now().Add(DefaultNodeLifetime).Truncate(time.Millisecond)))
	assert.False(t, r.Claims.Expires.Before(j2.Node.X509.NotAfter))

	// Idempotent: again, nothing new is written and the first record is named.
	for _, s := range []string{"spiffe://acme.internal/node/n1", "spiffe://acme.internal/zone/payments/agent/billing"} {
		again, err := ta.RevokeSubject(ctx, s, "again")
		require.NoError(t, err)
		assert.True(t, again.Already, s)
		assert.Nil(t, again.Record, s)
	}
	last, err := ta.Store().LastRevocationSeq()
	require.NoError(t, err)
	assert.Equal(t, uint64(3), last)

	// Durable: a restarted authority serves the same bytes and continues the sequence.
	stop()
	a, err := Open(dir, Options{Now: clock.Now})
	require.NoError(t, err)
	defer func() { require.NoError(t, a.Close()) }()
	recs, err := a.Store().RevocationRecords(0, 10)
	require.NoError(t, err)
	require.Len(t, recs, 3)
	assert.Equal(t, rev.Record, recs[0].Raw)
	assert.Equal(t, agent.Record, recs[2].Raw)
	tail, err := a.Store().RevocationRecords(2, 10)
	require.NoError(t, err)
	require.Len(t, tail, 1)
	assert.Equal(t, uint64(3), tail[0].Seq)
	covered, err := a.RevokeSubject(ctx, "spiffe://acme.internal/node/n2", "decommissioned")
	require.NoError(t, err)
	assert.True(t, covered.Already, "n2's only certificate was revoked by serial already")
	assert.Zero(t, covered.Seq, "so no record names n2 itself: the serial record covers it")
	next, err := a.RevokeSubject(ctx, "spiffe://acme.internal/zone/research/agent/x", "next")
	require.NoError(t, err)
	assert.Equal(t, uint64(4), next.Seq, "the sequence continues after a restart")
}

// A record is written in the revocation's transaction: when signing fails, nothing is revoked.
func TestRevocationRecordSignFailureRevokesNothing(t *testing.T) {
	clock := newTestClock()
	ta := startAuthority(t, clock)
	j, _ := joinNode(t, ta, clock, "n1")
	sub, err := ParseSubject(j.Node.ID.String())
	require.NoError(t, err)
	_, err = ta.Store().revokeSubject(sub, "x", clock.Now(), clock.Now(), func(uint64, string, time.Time) ([]byte, error) {
		return nil, os.ErrDeadlineExceeded
	})
	require.ErrorIs(t, err, os.ErrDeadlineExceeded)
	revoked, err := ta.Store().IsRevoked(j.Node.Serial().Uint64())
	require.NoError(t, err)
	assert.False(t, revoked)
	last, err := ta.Store().LastRevocationSeq()
	require.NoError(t, err)
	assert.Zero(t, last)
}

const researchOnlyPolicy = `zones:
  - name: research
    cidr: 100.100.2.0/24
    regions: [eu-west-1, us-east-1]
    min_trust: 40
    isolate_below: 10
`

// Applying a policy twice gives two new versions, signed, handed out at join, and pushed to a
// watcher in order; an invalid policy is refused with its file and line and changes nothing.
func TestApplyPolicyVersionsAndPush(t *testing.T) {
	clock := newTestClock()
	ta := startAuthority(t, clock)
	ctx := context.Background()
	v := verifier(ta)

	version, first, err := ta.PolicyRelease()
	require.NoError(t, err)
	require.Equal(t, uint64(1), version, "the first open released the initial policy")
	rel, err := v.VerifyPolicy(first, clock.Now())
	require.NoError(t, err)
	assert.Equal(t, testPolicy, string(rel.Claims.Policy))

	j, rp := joinNode(t, ta, clock, "w")
	assert.Equal(t, first, j.PolicyRelease, "join hands out the signed release with the policy")
	w := startWatch(t, ta.addr, j.Authority, j.Node, rp.Key, 0, 1)
	require.Eventually(t, func() bool { return ta.Watchers() == 1 }, 5*time.Second, 10*time.Millisecond)

	second := testPolicy + "    max_cert_lifetime: 12h\n"
	applied, err := ta.ApplyPolicy(ctx, "second.yaml", []byte(second))
	require.NoError(t, err)
	assert.Equal(t, PolicyApplied{Version: 2, Zones: []string{"payments", "research"}, Bytes: len(second)}, applied)
	applied, err = ta.ApplyPolicy(ctx, "third.yaml", []byte(researchOnlyPolicy))
	require.NoError(t, err)
	assert.Equal(t, uint64(3), applied.Version)

	p := nextPolicy(t, w)
	assert.Equal(t, uint64(2), p.Claims.PolicyVersion)
	assert.Equal(t, second, string(p.Claims.Policy))
	p = nextPolicy(t, w)
	assert.Equal(t, uint64(3), p.Claims.PolicyVersion)
	assert.Equal(t, researchOnlyPolicy, string(p.Claims.Policy))

	// The new policy is what the authority now uses and hands out.
	_, err = ta.CreateToken(ctx, TokenSpec{Zones: []string{"payments"}})
	require.ErrorIs(t, err, ErrZoneUnknown)
	p3 := joinParams(t, ta, ta.token(t, TokenSpec{Zones: []string{"research"}}), "r1", clock)
	p3.Region = "eu-west-1"
	j3, err := Join(ctx, p3)
	require.NoError(t, err)
	assert.Equal(t, researchOnlyPolicy, string(j3.Policy))
	rel, err = v.VerifyPolicy(j3.PolicyRelease, clock.Now())
	require.NoError(t, err)
	assert.Equal(t, uint64(3), rel.Claims.PolicyVersion)

	// Invalid: refused with file:line, nothing changes, nothing is pushed.
	_, err = ta.ApplyPolicy(ctx, "broken.yaml", []byte("zones:\n  - name: x\n    cidr: not-a-cidr\n    regions: [eu-west-1]\n    min_trust: 1\n    isolate_below: 0\n"))
	require.ErrorIs(t, err, ErrPolicyInvalid)
	assert.Contains(t, err.Error(), "broken.yaml:3")
	version, raw, err := ta.PolicyRelease()
	require.NoError(t, err)
	assert.Equal(t, uint64(3), version)
	assert.Equal(t, j3.PolicyRelease, raw)
	assert.Len(t, ta.Policy().Zones, 1)
	assertQuiet(t, w)
	assert.Equal(t, OutcomeRefused, lastAudit(t, ta).Outcome)
}

// Through the admin socket a running daemon applies the policy and pushes it to its watchers.
func TestApplyPolicyThroughAdminSocket(t *testing.T) {
	clock := newTestClock()
	ta := startAuthority(t, clock)
	ctx, cancel := context.WithCancel(context.Background())
	admin, err := ta.ListenAdmin()
	require.NoError(t, err)
	done := make(chan error, 1)
	go func() { done <- admin.Serve(ctx) }()
	t.Cleanup(func() { cancel(); require.NoError(t, <-done) })

	j, rp := joinNode(t, ta, clock, "w")
	w := startWatch(t, ta.addr, j.Authority, j.Node, rp.Key, 0, 1)
	adm, err := OpenAdmin(ctx, ta.dir, Options{})
	require.NoError(t, err)
	require.IsType(t, &adminClient{}, adm)
	applied, err := adm.ApplyPolicy(ctx, "p.yaml", []byte(researchOnlyPolicy))
	require.NoError(t, err)
	assert.Equal(t, uint64(2), applied.Version)
	assert.Equal(t, uint64(2), nextPolicy(t, w).Claims.PolicyVersion)

	_, err = adm.ApplyPolicy(ctx, "p.yaml", []byte("zones: [\n"))
	require.ErrorIs(t, err, ErrPolicyInvalid)
	assert.True(t, strings.HasPrefix(err.Error(), ErrPolicyInvalid.Error()+": p.yaml:"), err.Error())
}
