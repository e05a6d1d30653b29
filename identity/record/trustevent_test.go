package record

import (
	"bytes"
	"crypto/ed25519"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity"
)

// newEventPKI is the authority and nodes n1, n2 of zone payments, without agent certificates
// (trust events and presence proofs name agents, never carry their certificates).
func newEventPKI(t testing.TB) *testPKI {
	t.Helper()
	p := &testPKI{authKey: mustKey(t), n1Key: mustKey(t), n2Key: mustKey(t)}
	var err error
	p.auth, err = identity.NewAuthority(testTD, p.authKey, t0.Add(-time.Hour), 366*24*time.Hour)
	require.NoError(t, err)
	p.n1 = issueNode(t, p.auth, p.authKey, p.n1Key, testTD, "n1", "100.100.1.0/28")
	p.n2 = issueNode(t, p.auth, p.authKey, p.n2Key, testTD, "n2", "100.100.1.16/28")
	p.v = Verifier{Certs: identity.Verifier{Authority: p.auth}}
	return p
}

var billing = identity.AgentID(testTD, "payments", "billing")

func anHour(TrustEventClaims) time.Duration { return time.Hour }

func (p *testPKI) event(subject, zone string) TrustEventClaims {
	return TrustEventClaims{
		TrustDomain: testTD, Subject: subject, Kind: "policy_denial", Weight: 10, ObservedAt: t0, Zone: zone,
		Observer: p.n2.ID.String(), ObserverCert: p.n2.Raw(), Nonce: bytes.Repeat([]byte{7}, TrustNonceLen),
		Reason: "flow to ledger:22 refused",
	}
}

func TestTrustEventRoundTrip(t *testing.T) {
	p := newEventPKI(t)
	raw, err := SignTrustEvent(p.event(billing.String(), "payments"), p.n2Key)
	require.NoError(t, err)
	assert.Less(t, len(raw), 1184, "an event with its observer's certificate fits one gossip packet")
	assert.True(t, IsTrustEvent(raw))
	ev, err := p.v.VerifyTrustEvent(raw, t0.Add(time.Minute), anHour)
	require.NoError(t, err)
	assert.Equal(t, billing, ev.SubjectID)
	assert.Equal(t, p.n2.ID, ev.ObserverID)
	assert.Equal(t, uint64(10), ev.Claims.Weight)
	assert.Equal(t, TrustEventKey(p.n2.ID.String(), bytes.Repeat([]byte{7}, TrustNonceLen)), ev.Key())
	assert.Equal(t, raw, ev.Raw())

	// Other record kinds are never taken for a trust event.
	rev := mustSign(t, NodeRevocation(p.n1, "drifted", t0), p.n1Key)
	assert.False(t, IsTrustEvent(rev))
	rel, err := SignPolicy(PolicyClaims{TrustDomain: testTD, PolicyVersion: 1, IssuedAt: t0, Policy: []byte("zones: []\n")}, p.authKey)
	require.NoError(t, err)
	assert.False(t, IsTrustEvent(rel))
	assert.False(t, IsTrustEvent([]byte("garbage")))
	// And a trust event never verifies as a revocation (its AAD and its shape differ).
	_, err = p.v.VerifyRevocation(raw, t0)
	require.Error(t, err)
}

// Each forgery is refused with its exact sentinel.
func TestTrustEventRefusals(t *testing.T) {
	p := newEventPKI(t)
	// A node of a look-alike authority: same trust domain name, another key (a non-member).
	impostorKey := mustKey(t)
	impostor, err := identity.NewAuthority(testTD, impostorKey, t0.Add(-time.Hour), 366*24*time.Hour)
	require.NoError(t, err)
	strangerKey := mustKey(t)
	stranger := issueNode(t, impostor, impostorKey, strangerKey, testTD, "n2", "100.100.1.16/28")
	// A member of zone ops only.
	opsKey := mustKey(t)
	ops, err := identity.Issue(p.auth, p.authKey, identity.IssueRequest{
		ID: identity.NodeID(testTD, "ops1"), PublicKey: opsKey.Public().(ed25519.PublicKey),
		Claims:    identity.Claims{Zones: []identity.ZoneGrant{{Name: "ops", Prefixes: []netip.Prefix{netip.MustParsePrefix("100.100.9.0/28")}}}, Regions: []string{"eu-west-1"}, Fingerprint: digest("ops1")},
		NotBefore: t0.Add(-time.Hour), NotAfter: t0.Add(24 * time.Hour),
	})
	require.NoError(t, err)

	good := p.event(billing.String(), "payments")
	cases := []struct {
		name string
		raw  func() []byte
		want error
	}{
		{"signed by a non-member", func() []byte {
			c := good
			c.ObserverCert = stranger.Raw()
			raw, err := SignTrustEvent(c, strangerKey)
			require.NoError(t, err)
			return raw
		}, ErrSigner},
		{"signed with another key than the certificate's", func() []byte {
			c := good
			c.Version = Version1
			return signWire(t, c.toWire(), p.n1Key, aadTrustEvent)
		}, ErrSignature},
		{"a revocation's signature", func() []byte {
			c := good
			c.Version = Version1
			return signWire(t, c.toWire(), p.n2Key, aadRevocation)
		}, ErrSignature},
		{"a zone the observer does not serve", func() []byte {
			c := good
			c.Zone, c.Subject, c.Observer, c.ObserverCert = "payments", billing.String(), ops.ID.String(), ops.Raw()
			c.Version = Version1
			return signWire(t, c.toWire(), opsKey, aadTrustEvent)
		}, ErrNotAllowed},
		{"an agent outside the event's zone", func() []byte {
			c := good
			c.Subject = identity.AgentID(testTD, "ops", "x").String()
			c.Version = Version1
			return signWire(t, c.toWire(), p.n2Key, aadTrustEvent)
		}, ErrNotAllowed},
		{"observed longer ago than the retention", func() []byte {
			c := good
			c.ObservedAt = t0.Add(-2 * time.Hour)
			raw, err := SignTrustEvent(c, p.n2Key)
			require.NoError(t, err)
			return raw
		}, ErrExpired},
		{"from the future", func() []byte {
			c := good
			c.ObservedAt = t0.Add(time.Hour)
			raw, err := SignTrustEvent(c, p.n2Key)
			require.NoError(t, err)
			return raw
		}, ErrFuture},
		{"weight out of range", func() []byte {
			c := good
			c.Weight, c.Version = 101, Version1
			return signWire(t, c.toWire(), p.n2Key, aadTrustEvent)
		}, ErrMalformed},
		{"no nonce", func() []byte {
			c := good
			c.Nonce, c.Version = nil, Version1
			return signWire(t, c.toWire(), p.n2Key, aadTrustEvent)
		}, ErrMalformed},
		{"foreign trust domain", func() []byte {
			c := good
			c.TrustDomain, c.Version = "evil.internal", Version1
			return signWire(t, c.toWire(), p.n2Key, aadTrustEvent)
		}, ErrTrustDomain},
		{"too large", func() []byte { return make([]byte, MaxTrustEventSize+1) }, ErrTooLarge},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := p.v.VerifyTrustEvent(tc.raw(), t0, anHour)
			require.ErrorIs(t, err, tc.want)
		})
	}
	// The signer refuses what verification would: a zone not granted, a subject outside it.
	c := good
	c.Zone, c.Subject, c.Observer, c.ObserverCert = "payments", billing.String(), ops.ID.String(), ops.Raw()
	_, err = SignTrustEvent(c, opsKey)
	require.ErrorIs(t, err, ErrNotAllowed)
	_, err = SignTrustEvent(good, p.n1Key)
	require.ErrorIs(t, err, ErrSigner)
}

func TestFitTrustReason(t *testing.T) {
	s := FitTrustReason("a\nb" + strings.Repeat("é", 200))
	require.NoError(t, checkTrustReason(s))
	assert.LessOrEqual(t, len(s), MaxTrustReasonLen)
	assert.True(t, strings.HasPrefix(s, "a b"))
}

func (p *testPKI) presence(instance byte, started, signed time.Time, challenge byte) []byte {
	raw, err := SignPresence(PresenceClaims{
		TrustDomain: testTD, Node: p.n1.ID.String(), Instance: bytes.Repeat([]byte{instance}, PresenceInstanceLen),
		StartedAt: started, SignedAt: signed, Observer: p.n2.ID.String(),
		Challenge: bytes.Repeat([]byte{challenge}, PresenceChallengeLen), NodeCert: p.n1.Raw(), Addr: "10.0.0.1:4500",
	}, p.n1Key)
	if err != nil {
		panic(err)
	}
	return raw
}

// Two live copies overlap; a restart does not, even when the old instance's last proof is
// recent; one instance twice is no evidence.
func TestCheckDuplicate(t *testing.T) {
	p := newEventPKI(t)
	verify := func(raw []byte) *Presence {
		pr, err := p.v.VerifyPresence(raw, t0.Add(time.Hour))
		require.NoError(t, err)
		return pr
	}
	orig := verify(p.presence(1, t0, t0.Add(10*time.Minute), 1))
	copyLive := verify(p.presence(2, t0.Add(time.Minute), t0.Add(10*time.Minute), 2))
	require.NoError(t, CheckDuplicate(orig, copyLive, 5*time.Second))

	// A restart: the new instance started after the old one's last proof.
	before := verify(p.presence(1, t0, t0.Add(10*time.Minute), 3))
	after := verify(p.presence(3, t0.Add(10*time.Minute+time.Second), t0.Add(11*time.Minute), 4))
	require.ErrorIs(t, CheckDuplicate(before, after, 5*time.Second), ErrNoDuplicate)
	// A copy that lies about its start (claims to have started just now) is caught once the
	// original signs again after that.
	liar := verify(p.presence(2, t0.Add(10*time.Minute), t0.Add(10*time.Minute), 5))
	require.ErrorIs(t, CheckDuplicate(orig, liar, 5*time.Second), ErrNoDuplicate)
	origLater := verify(p.presence(1, t0, t0.Add(11*time.Minute), 6))
	require.NoError(t, CheckDuplicate(origLater, liar, 5*time.Second))

	require.ErrorIs(t, CheckDuplicate(orig, verify(p.presence(1, t0, t0.Add(12*time.Minute), 7)), time.Second), ErrNoDuplicate, "one instance")
	require.ErrorIs(t, CheckDuplicate(orig, orig, time.Second), ErrNoDuplicate)

	// A forged proof is refused before any comparison.
	bad := p.presence(2, t0, t0.Add(time.Minute), 9)
	bad[len(bad)-1] ^= 1
	_, err := p.v.VerifyPresence(bad, t0.Add(time.Hour))
	require.ErrorIs(t, err, ErrSignature)
	_, err = p.v.VerifyPresence(p.presence(2, t0, t0.Add(2*time.Hour), 9), t0)
	require.ErrorIs(t, err, ErrFuture)
}

func FuzzVerifyTrustEvent(f *testing.F) {
	p := newEventPKI(f)
	good, err := SignTrustEvent(p.event(billing.String(), "payments"), p.n2Key)
	require.NoError(f, err)
	f.Add(good)
	f.Add(p.presence(1, t0, t0.Add(time.Minute), 1))
	f.Add([]byte{0xd2, 0x84})
	f.Fuzz(func(t *testing.T, raw []byte) {
		_ = IsTrustEvent(raw)
		if ev, err := p.v.VerifyTrustEvent(raw, t0, anHour); err == nil {
			require.Equal(t, p.n2.ID, ev.ObserverID)
		}
		if pr, err := p.v.VerifyPresence(raw, t0.Add(time.Hour)); err == nil {
			require.Equal(t, p.n1.ID, pr.NodeID)
		}
	})
}
