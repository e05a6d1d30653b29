package authority

import (
	"context"
	"crypto/ed25519"
	"crypto/tls"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity"
)

// A join whose answer was lost after the authority committed is retried with the same token and
// the same (staged) key: the authority must send the certificates it already issued, byte for
// byte, instead of refusing the token as used, and must allocate nothing new.
func TestJoinRetryAfterLostResponseGetsSameCertificate(t *testing.T) {
	clock := newTestClock()
	ta := startAuthority(t, clock)
	ctx := context.Background()
	p := joinParams(t, ta, ta.token(t, TokenSpec{Zones: []string{"payments"}}), "n1", clock)

	first, err := Join(ctx, p) // the answer the node never saw
	require.NoError(t, err)
	before, err := ta.Store().Meta()
	require.NoError(t, err)
	slicesBefore, err := ta.Store().Slices()
	require.NoError(t, err)

	clock.Advance(time.Minute)
	again, err := Join(ctx, p)
	require.NoError(t, err)
	assert.Equal(t, first.NodeCertDER, again.NodeCertDER, "the same node certificate, byte for byte")
	assert.Equal(t, first.IssuerCertDER, again.IssuerCertDER, "the same issuing certificate, byte for byte")
	assert.Equal(t, first.Node.Serial(), again.Node.Serial())

	after, err := ta.Store().Meta()
	require.NoError(t, err)
	assert.Equal(t, before.LastSerial, after.LastSerial, "a retry allocates no serial")
	slicesAfter, err := ta.Store().Slices()
	require.NoError(t, err)
	assert.Equal(t, slicesBefore, slicesAfter, "a retry allocates no slice")
	issued, err := ta.Store().Issued()
	require.NoError(t, err)
	require.Len(t, issued, 1)
	assert.Equal(t, identity.KeyHash(p.Key.Public().(ed25519.PublicKey)), issued[0].KeyHash)
	ikey, err := identity.IssuerKey(p.Key)
	require.NoError(t, err)
	assert.Equal(t, identity.KeyHash(ikey.Public().(ed25519.PublicKey)), issued[0].IssuerKeyHash)

	rec := lastAudit(t, ta)
	assert.Equal(t, "join", rec.Event)
	assert.Equal(t, OutcomeResent, rec.Outcome)
	assert.Equal(t, first.Node.Serial().Uint64(), rec.Serial)
	assert.Contains(t, rec.Reason, "retry of the join")

	// The node that got its certificate renews; from then on the join is answered, and its
	// retry gets nothing (the certificate it would resend is superseded).
	_, err = Renew(ctx, RenewParams{Addr: ta.addr, Authority: again.Authority, Current: again.Node, Key: p.Key, NewKey: newKey(t), Now: clock.Now})
	require.NoError(t, err)
	_, err = Join(ctx, p)
	require.ErrorIs(t, err, ErrTokenUsed)
}

// The retry answer is durable: it survives an authority restart between the lost answer and the
// retry.
func TestJoinRetryAfterAuthorityRestart(t *testing.T) {
	clock := newTestClock()
	dir := filepath.Join(t.TempDir(), "auth")
	require.NoError(t, Init(dir, "acme.internal", writePolicy(t, testPolicy), Options{Now: clock.Now}))
	ta, stop := serveAuthority(t, dir, clock)
	p := joinParams(t, ta, ta.token(t, TokenSpec{Zones: []string{"payments"}}), "n1", clock)
	first, err := Join(context.Background(), p)
	require.NoError(t, err)
	stop()

	ta2, _ := serveAuthority(t, dir, clock)
	p.Addr = ta2.addr
	again, err := Join(context.Background(), p)
	require.NoError(t, err)
	assert.Equal(t, first.NodeCertDER, again.NodeCertDER)
	assert.Equal(t, first.IssuerCertDER, again.IssuerCertDER)
	assert.Equal(t, OutcomeResent, lastAudit(t, ta2).Outcome)
}

// Concurrent sends of one join (a node whose requests all time out and are re-sent) all get the
// one certificate; exactly one is issued.
func TestJoinConcurrentRetriesOneCertificate(t *testing.T) {
	clock := newTestClock()
	ta := startAuthority(t, clock)
	p := joinParams(t, ta, ta.token(t, TokenSpec{Zones: []string{"payments"}}), "n1", clock)

	const n = 6
	var (
		wg   sync.WaitGroup
		errs = make([]error, n)
		got  = make([]*Joined, n)
	)
	for i := range n {
		wg.Go(func() { got[i], errs[i] = Join(context.Background(), p) })
	}
	wg.Wait()
	for i := range n {
		require.NoError(t, errs[i])
		assert.Equal(t, got[0].NodeCertDER, got[i].NodeCertDER)
		assert.Equal(t, got[0].IssuerCertDER, got[i].IssuerCertDER)
	}
	issued, err := ta.Store().Issued()
	require.NoError(t, err)
	assert.Len(t, issued, 1)
	var issuedN, resent int
	recs, err := ta.Audit()
	require.NoError(t, err)
	for _, r := range recs {
		if r.Event == "join" && r.Outcome == OutcomeIssued {
			issuedN++
		}
		if r.Event == "join" && r.Outcome == OutcomeResent {
			resent++
		}
	}
	assert.Equal(t, 1, issuedN)
	assert.Equal(t, n-1, resent)
}

// The attacker's side: someone holding the token (secret included), but not the node's staged
// key, gets nothing from the retry path; and a certificate that is no longer live is not sent
// again to anyone.
func TestJoinRetryRefusesThief(t *testing.T) {
	clock := newTestClock()
	ta := startAuthority(t, clock)
	ctx := context.Background()
	joined := func(t *testing.T, name string) (JoinParams, *Joined) {
		t.Helper()
		p := joinParams(t, ta, ta.token(t, TokenSpec{Zones: []string{"payments"}}), name, clock)
		j, err := Join(ctx, p)
		require.NoError(t, err)
		return p, j
	}
	refusedUsed := func(t *testing.T, p JoinParams) {
		t.Helper()
		_, err := Join(ctx, p)
		require.ErrorIs(t, err, ErrTokenUsed)
		rec := lastAudit(t, ta)
		assert.Equal(t, OutcomeRefused, rec.Outcome)
		assert.Equal(t, CodeTokenUsed, rec.WireCode)
	}

	t.Run("token and its secret with another key", func(t *testing.T) {
		p, _ := joined(t, "victim1")
		thief := p
		thief.Key = newKey(t)
		refusedUsed(t, thief)
	})
	t.Run("same key under another name", func(t *testing.T) {
		p, _ := joined(t, "victim2")
		other := p
		other.Name = "other2"
		other.HostFingerprint = fingerprint("other2")
		refusedUsed(t, other)
	})
	t.Run("CSR claiming the node's key without holding it", func(t *testing.T) {
		p, _ := joined(t, "victim3")
		tok, err := identity.ParseToken(p.Token)
		require.NoError(t, err)
		thiefKey := newKey(t)
		csr, err := createCSR(thiefKey, "victim3", "", p.HostFingerprint)
		require.NoError(t, err)
		issuerCSR, err := createIssuerCSR(thiefKey, "victim3", "", p.HostFingerprint)
		require.NoError(t, err)
		forged := forgeCSRKey(t, csr, p.Key.Public().(ed25519.PublicKey))
		_, err = roundTrip(ctx, ta.addr, func(tls.ConnectionState) error { return nil }, nil, OpJoin,
			JoinRequest{TokenID: tok.ID, Secret: tok.Secret, CSR: forged, IssuerCSR: issuerCSR})
		require.ErrorIs(t, err, ErrCSR, "the CSR's signature is the proof of possession of the key")
	})
	t.Run("the node's key with a wrong secret", func(t *testing.T) {
		p, _ := joined(t, "victim4")
		tok, err := identity.ParseToken(p.Token)
		require.NoError(t, err)
		tok.Secret[0] ^= 1
		wrong := p
		wrong.Token = tok.String()
		_, err = Join(ctx, wrong)
		require.ErrorIs(t, err, ErrTokenUnknown)
	})
	t.Run("retry after the issued certificate was revoked", func(t *testing.T) {
		p, j := joined(t, "victim5")
		require.NoError(t, ta.Revoke(j.Node.Serial().Uint64(), "compromised"))
		refusedUsed(t, p)
	})
	t.Run("retry after the issued certificate expired", func(t *testing.T) {
		local := newTestClock()
		ta2 := startAuthority(t, local)
		p := joinParams(t, ta2, ta2.token(t, TokenSpec{Zones: []string{"payments"}}), "victim6", local)
		_, err := Join(ctx, p)
		require.NoError(t, err)
		local.Advance(DefaultNodeLifetime + time.Minute)
		_, err = Join(ctx, p)
		require.ErrorIs(t, err, ErrTokenUsed)
	})
}

// A join whose signature fails consumes nothing: the certificate is signed inside the
// transaction that consumes the token, so the token stays usable and no serial, slice or name is
// spent. And a record for another serial is never stored.
func TestConsumeAndIssueSignFailureRollsBack(t *testing.T) {
	s, err := OpenStore(filepath.Join(t.TempDir(), "a.db"), time.Second)
	require.NoError(t, err)
	t.Cleanup(func() { _ = s.Close() })
	require.NoError(t, s.Init("acme.internal", []byte("zones: []\n"), time.Unix(1, 0)))
	now := time.Unix(1000, 0)
	require.NoError(t, s.PutToken(TokenRecord{ID: "t1", SecretHash: hashOf("s1"), Zones: []string{"payments"}, ExpiresAt: now.Add(time.Hour)}))
	req := ConsumeRequest{ID: "t1", SecretHash: hashOf("s1"), Consumer: "n1", Now: now, KeyHash: "key-a", IssuerKeyHash: "ikey-a",
		HoldUntil: func() time.Time { return now.Add(time.Hour) }}

	_, err = s.ConsumeAndIssue(req, func(uint64, []SliceRecord) (IssuedRecord, error) { return IssuedRecord{}, assert.AnError })
	require.ErrorIs(t, err, assert.AnError)
	tok, err := s.Token("t1")
	require.NoError(t, err)
	assert.Empty(t, tok.ConsumedBy, "the failed signature left the token unused")
	meta, err := s.Meta()
	require.NoError(t, err)
	assert.Zero(t, meta.LastSerial, "no serial spent")

	_, err = s.ConsumeAndIssue(req, func(serial uint64, _ []SliceRecord) (IssuedRecord, error) {
		return IssuedRecord{Serial: serial + 1}, nil
	})
	require.ErrorContains(t, err, "signed record has serial")

	sign := func(serial uint64, _ []SliceRecord) (IssuedRecord, error) {
		return IssuedRecord{Serial: serial, SPIFFEID: "spiffe://acme.internal/node/n1", TokenID: "t1", KeyHash: "key-a", IssuerKeyHash: "ikey-a",
			NotAfter: now.Add(time.Hour), CertDER: []byte{1}, IssuerCertDER: []byte{2}}, nil
	}
	r, err := s.ConsumeAndIssue(req, sign)
	require.NoError(t, err)
	assert.False(t, r.Retry)
	assert.Equal(t, uint64(1), r.Serial)

	again, err := s.ConsumeAndIssue(req, sign)
	require.NoError(t, err)
	assert.True(t, again.Retry)
	assert.Equal(t, r.Issued, again.Issued)

	otherIssuer := req
	otherIssuer.IssuerKeyHash = "ikey-b"
	_, err = s.ConsumeAndIssue(otherIssuer, sign)
	require.ErrorIs(t, err, ErrTokenUsed, "both keys must match")
	noKeys := req
	noKeys.KeyHash, noKeys.IssuerKeyHash = "", ""
	_, err = s.ConsumeAndIssue(noKeys, sign)
	require.ErrorIs(t, err, ErrTokenUsed)
}
