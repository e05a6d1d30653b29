package authority

import (
	"context"
	"crypto/ed25519"
	"crypto/tls"
	"errors"
	"net/netip"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity"
)

// A renewal whose response was lost is retried with the same current certificate and the same
// (staged) new key: the authority must send the certificate it already issued, not refuse the
// node as superseded, and must allocate nothing new.
func TestRenewRetryAfterLostResponseGetsSameCertificate(t *testing.T) {
	clock := newTestClock()
	ta := startAuthority(t, clock)
	ctx := context.Background()
	j, rp := joinNode(t, ta, clock, "n1")
	clock.Advance(13 * time.Hour)

	first, err := Renew(ctx, rp) // the response the node never saw
	require.NoError(t, err)
	before, err := ta.Store().Meta()
	require.NoError(t, err)

	clock.Advance(time.Minute)
	again, err := Renew(ctx, rp)
	require.NoError(t, err)
	assert.Equal(t, first.NodeCertDER, again.NodeCertDER, "the same certificate, byte for byte")
	assert.Equal(t, first.Node.Serial(), again.Node.Serial())
	assert.Greater(t, again.Node.Serial().Uint64(), j.Node.Serial().Uint64())
	after, err := ta.Store().Meta()
	require.NoError(t, err)
	assert.Equal(t, before.LastSerial, after.LastSerial, "a retry allocates no serial")
	rec := lastAudit(t, ta)
	assert.Equal(t, OutcomeResent, rec.Outcome)
	assert.Equal(t, first.Node.Serial().Uint64(), rec.Serial)
	assert.Contains(t, rec.Reason, "retry")

	// Once the node has used its successor to renew, the successor is superseded too: the old
	// certificate's retry no longer gets anything (the old certificate is still inside its window).
	clock.Advance(time.Hour)
	next := RenewParams{Addr: ta.addr, Authority: ta.Certificate(), Current: again.Node, Key: rp.NewKey, NewKey: newKey(t), Now: clock.Now}
	_, err = Renew(ctx, next)
	require.NoError(t, err)
	_, err = Renew(ctx, rp)
	require.ErrorIs(t, err, ErrSuperseded)
}

// The retry answer is durable: it survives an authority restart between the lost response and
// the retry.
func TestRenewRetryAfterAuthorityRestart(t *testing.T) {
	clock := newTestClock()
	dir := filepath.Join(t.TempDir(), "auth")
	require.NoError(t, Init(dir, "acme.internal", writePolicy(t, testPolicy), Options{Now: clock.Now}))
	ta, stop := serveAuthority(t, dir, clock)
	_, rp := joinNode(t, ta, clock, "n1")
	clock.Advance(13 * time.Hour)
	first, err := Renew(context.Background(), rp)
	require.NoError(t, err)
	stop()

	ta2, _ := serveAuthority(t, dir, clock)
	rp.Addr = ta2.addr
	again, err := Renew(context.Background(), rp)
	require.NoError(t, err)
	assert.Equal(t, first.NodeCertDER, again.NodeCertDER)
}

// Concurrent retries of one renewal with one key (a node whose requests all time out and are
// re-sent) all get the one certificate.
func TestRenewConcurrentRetriesOneCertificate(t *testing.T) {
	clock := newTestClock()
	ta := startAuthority(t, clock)
	_, rp := joinNode(t, ta, clock, "n1")
	clock.Advance(13 * time.Hour)

	const n = 6
	var (
		wg   sync.WaitGroup
		errs = make([]error, n)
		got  = make([]*Joined, n)
	)
	for i := range n {
		wg.Go(func() { got[i], errs[i] = Renew(context.Background(), rp) })
	}
	wg.Wait()
	for i := range n {
		require.NoError(t, errs[i])
		assert.Equal(t, got[0].NodeCertDER, got[i].NodeCertDER)
	}
}

// The attacker's side: someone holding a copy of the node's old key and certificate, but not the
// node's staged new key, gets nothing from the retry path.
func TestRenewRetryRefusesThief(t *testing.T) {
	clock := newTestClock()
	ta := startAuthority(t, clock)
	ctx := context.Background()

	t.Run("own new key after the node renewed", func(t *testing.T) {
		_, rp := joinNode(t, ta, clock, "victim1")
		_, err := Renew(ctx, rp)
		require.NoError(t, err)
		thief := rp
		thief.NewKey = newKey(t)
		_, err = Renew(ctx, thief)
		require.ErrorIs(t, err, ErrSuperseded)
		assert.Equal(t, CodeSuperseded, lastAudit(t, ta).WireCode)
	})
	t.Run("CSR claiming the node's new key without holding it", func(t *testing.T) {
		_, rp := joinNode(t, ta, clock, "victim2")
		_, err := Renew(ctx, rp)
		require.NoError(t, err)
		tlsCert, err := identity.TLSCertificate(rp.Key, rp.Current)
		require.NoError(t, err)
		csr, err := createCSR(newKey(t), "victim2", "", rp.Current.Claims.Fingerprint)
		require.NoError(t, err)
		forged := forgeCSRKey(t, csr, rp.NewKey.Public().(ed25519.PublicKey))
		_, err = roundTrip(ctx, ta.addr, func(tls.ConnectionState) error { return nil }, &tlsCert, OpRenew, RenewRequest{CSR: forged})
		require.ErrorIs(t, err, ErrCSR, "the CSR's signature is the proof of possession of the new key")
	})
	t.Run("retry after the successor was revoked", func(t *testing.T) {
		_, rp := joinNode(t, ta, clock, "victim3")
		r, err := Renew(ctx, rp)
		require.NoError(t, err)
		require.NoError(t, ta.Revoke(r.Node.Serial().Uint64(), "compromised"))
		_, err = Renew(ctx, rp)
		require.ErrorIs(t, err, ErrRevoked)
		assert.Equal(t, CodeRevoked, lastAudit(t, ta).WireCode)
	})
}

// The certificate is signed inside the renewal's transaction: a signing failure leaves no
// successor recorded and no serial spent, so the node's next attempt renews normally instead of
// meeting a successor it never received.
func TestRenewAndIssueSignFailureRollsBack(t *testing.T) {
	s, err := OpenStore(filepath.Join(t.TempDir(), "a.db"), time.Second)
	require.NoError(t, err)
	t.Cleanup(func() { _ = s.Close() })
	require.NoError(t, s.Init("acme.internal", []byte("zones: []\n"), time.Unix(1, 0)))
	now := time.Unix(1000, 0)
	want := []SliceRequest{{Zone: "payments", CIDR: netip.MustParsePrefix("100.100.1.0/24"), Bits: 28}}
	req := RenewalRequest{Node: "n1", Want: want, Now: now, Renews: 0, HoldUntil: now.Add(time.Hour)}
	first, _, err := s.Renewal(req)
	require.NoError(t, err)

	boom := errors.New("signer unavailable")
	req.Renews, req.KeyHash = first, "key-a"
	_, err = s.RenewAndIssue(req, func(uint64, []SliceRecord) (IssuedRecord, error) { return IssuedRecord{}, boom })
	require.ErrorIs(t, err, boom)
	meta, err := s.Meta()
	require.NoError(t, err)
	assert.Equal(t, first, meta.LastSerial, "no serial spent")

	sign := func(serial uint64, _ []SliceRecord) (IssuedRecord, error) {
		return IssuedRecord{Serial: serial, SPIFFEID: "spiffe://acme.internal/node/n1", Renewal: first, KeyHash: "key-a",
			NotAfter: now.Add(time.Hour), CertDER: []byte{1}}, nil
	}
	r, err := s.RenewAndIssue(req, sign)
	require.NoError(t, err, "the failed attempt left no successor behind")
	assert.False(t, r.Retry)
	assert.Equal(t, first+1, r.Serial)

	again, err := s.RenewAndIssue(req, sign)
	require.NoError(t, err)
	assert.True(t, again.Retry)
	assert.Equal(t, r.Issued, again.Issued)

	other := req
	other.KeyHash = "key-b"
	_, err = s.RenewAndIssue(other, sign)
	require.ErrorIs(t, err, ErrSuperseded)

	late := req
	late.Now = now.Add(2 * time.Hour)
	_, err = s.RenewAndIssue(late, sign)
	require.ErrorIs(t, err, ErrSuperseded, "an expired successor is not sent again")

	bad := req
	bad.Renews, bad.KeyHash = r.Serial, "key-c"
	_, err = s.RenewAndIssue(bad, func(serial uint64, _ []SliceRecord) (IssuedRecord, error) {
		return IssuedRecord{Serial: serial + 1}, nil
	})
	require.ErrorContains(t, err, "signed record has serial", "a record for another serial is never stored")
}
