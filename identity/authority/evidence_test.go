package authority

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/identity/record"
)

// presenceOf signs a presence proof as subject (cert, key) for observer.
func presenceOf(t *testing.T, cert *identity.Certificate, key ed25519.PrivateKey, observer identity.ID, instance, challenge byte, started, signed time.Time) []byte {
	t.Helper()
	raw, err := record.SignPresence(record.PresenceClaims{
		TrustDomain: cert.ID.TrustDomain, Node: cert.ID.String(), Instance: bytes.Repeat([]byte{instance}, record.PresenceInstanceLen),
		StartedAt: started, SignedAt: signed, Observer: observer.String(),
		Challenge: bytes.Repeat([]byte{challenge}, record.PresenceChallengeLen), NodeCert: cert.Raw(), Addr: "127.0.0.1:4500",
	}, key)
	require.NoError(t, err)
	return raw
}

// From the attacker's side: evidence the authority refuses, each with ErrEvidence over the wire
// and the exact cause in process; then real evidence revokes the duplicated node with a
// sequenced record, audited, and the copy can no longer renew.
func TestEvidence(t *testing.T) {
	clock := newTestClock()
	ta := startAuthority(t, clock)
	ctx := context.Background()
	obs, obsP := joinNode(t, ta, clock, "observer")
	dup, dupP := joinNode(t, ta, clock, "victim")
	third, _ := joinNode(t, ta, clock, "third")
	now := clock.Now().Truncate(time.Millisecond)
	submit := func(a, b []byte) (uint64, error) {
		return SubmitEvidence(ctx, EvidenceParams{Addr: ta.addr, Authority: obs.Authority, Current: obs.Node, Key: obsP.Key, A: a, B: b})
	}
	orig := presenceOf(t, dup.Node, dupP.Key, obs.Node.ID, 1, 1, now.Add(-time.Minute), now)

	cases := []struct {
		name  string
		a, b  []byte
		cause error
	}{
		{"a restart: the new instance started after the old one's last proof", orig,
			presenceOf(t, dup.Node, dupP.Key, obs.Node.ID, 2, 2, now.Add(time.Millisecond), now.Add(2*time.Millisecond)), record.ErrNoDuplicate},
		{"one instance twice", orig, presenceOf(t, dup.Node, dupP.Key, obs.Node.ID, 1, 3, now.Add(-time.Minute), now), record.ErrNoDuplicate},
		{"proofs made for another observer", orig,
			presenceOf(t, dup.Node, dupP.Key, third.Node.ID, 2, 4, now.Add(-30*time.Second), now), nil},
		{"a forged proof", orig, func() []byte {
			b := presenceOf(t, dup.Node, dupP.Key, obs.Node.ID, 2, 5, now.Add(-30*time.Second), now)
			b[len(b)-1] ^= 1
			return b
		}(), record.ErrSignature},
		{"the observer reporting itself", presenceOf(t, obs.Node, obsP.Key, obs.Node.ID, 1, 6, now.Add(-time.Minute), now),
			presenceOf(t, obs.Node, obsP.Key, obs.Node.ID, 2, 7, now.Add(-30*time.Second), now), nil},
		{"stale proofs", presenceOf(t, dup.Node, dupP.Key, obs.Node.ID, 1, 8, now.Add(-time.Hour), now.Add(-20*time.Minute)),
			presenceOf(t, dup.Node, dupP.Key, obs.Node.ID, 2, 9, now.Add(-50*time.Minute), now.Add(-20*time.Minute)), nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := submit(tc.a, tc.b)
			require.ErrorIs(t, err, ErrEvidence)
			rec := lastAudit(t, ta)
			assert.Equal(t, "evidence", rec.Event)
			assert.Equal(t, OutcomeRefused, rec.Outcome)
			assert.Equal(t, CodeEvidence, rec.WireCode)
			_, err = ta.VerifyEvidence(obs.Node, tc.a, tc.b)
			require.ErrorIs(t, err, ErrEvidence)
			if tc.cause != nil {
				require.ErrorIs(t, err, tc.cause)
			}
		})
	}
	_, err := Renew(ctx, dupP)
	require.NoError(t, err, "nothing was revoked by refused evidence")

	// Two instances live at once: the copy started 30 s ago, the original signed after that.
	dupP.Current = dup.Node
	copyLive := presenceOf(t, dup.Node, dupP.Key, obs.Node.ID, 2, 10, now.Add(-30*time.Second), now)
	seq, err := submit(orig, copyLive)
	require.NoError(t, err)
	assert.Positive(t, seq)
	rec := lastAudit(t, ta)
	assert.Equal(t, "evidence", rec.Event)
	assert.Equal(t, OutcomeRevoked, rec.Outcome)
	assert.Equal(t, dup.Node.ID.String(), rec.Subject)
	// The identity is revoked: the copy (or the original) cannot renew its way out.
	dupP.NewKey = newKey(t)
	_, err = Renew(ctx, dupP)
	require.ErrorIs(t, err, ErrRevoked)
}

func FuzzDecodeEvidenceRequest(f *testing.F) {
	good, err := wireEnc.Marshal(EvidenceRequest{A: []byte{1}, B: []byte{2}})
	require.NoError(f, err)
	f.Add(good)
	f.Add([]byte{0xa0})
	f.Fuzz(func(t *testing.T, b []byte) {
		req, err := DecodeEvidenceRequest(b)
		if err != nil {
			require.ErrorIs(t, err, ErrProtocol)
			return
		}
		require.NotEmpty(t, req.A)
		require.NotEmpty(t, req.B)
	})
}
