package record

import (
	"bytes"
	"crypto/ed25519"
	"math/big"
	"strings"
	"testing"
	"time"

	"github.com/fxamacker/cbor/v2"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity"
)

func TestAuthorityRevocationRoundTrip(t *testing.T) {
	p := newTestPKI(t)
	for _, subject := range []string{p.n1.ID.String(), p.a2.ID.String(), "serial:7", SerialKey(p.a1.Serial())} {
		t.Run(subject, func(t *testing.T) {
			raw := mustSign(t, p.authClaims(subject, 3), p.authKey)
			r, err := p.v.VerifyRevocation(raw, t0.Add(time.Minute))
			require.NoError(t, err)
			assert.True(t, r.ByAuthority())
			assert.Equal(t, subject, r.Key())
			assert.Equal(t, []string{subject}, r.Keys())
			assert.Equal(t, uint64(3), r.Claims.Seq)
			assert.Equal(t, "key leaked", r.Claims.Reason)
			assert.True(t, r.Claims.IssuedAt.Equal(t0))
			assert.Equal(t, raw, r.Raw())
			assert.Nil(t, r.SignerCert)
		})
	}
}

func TestNodeSelfRevocation(t *testing.T) {
	p := newTestPKI(t)
	raw := mustSign(t, NodeRevocation(p.n1, "decommissioned", t0), p.n1Key)
	r, err := p.v.VerifyRevocation(raw, t0.Add(time.Second))
	require.NoError(t, err)
	assert.False(t, r.ByAuthority())
	assert.Equal(t, p.n1.ID.String(), r.Key())
	assert.Equal(t, p.n1.ID, r.SignerID)
	assert.True(t, r.Claims.Expires.Equal(p.n1.X509.NotAfter))
	assert.Subset(t, ChainKeys(p.n1, p.a1), r.Keys(), "revoking a node revokes its agents' chains")
	assert.NotSubset(t, ChainKeys(p.n2, p.a2), r.Keys())
}

func TestNodeAgentRevocationRevokesOnlyThatCertificate(t *testing.T) {
	p := newTestPKI(t)
	raw := mustSign(t, AgentRevocation(p.n1, p.i1, p.a1, "workload drifted", t0), p.n1Key)
	r, err := p.v.VerifyRevocation(raw, t0)
	require.NoError(t, err)
	assert.Equal(t, IssuedSerialKey(p.n1.ID, p.a1.Serial()), r.Key())
	assert.Equal(t, p.a1.ID.String(), r.Claims.Subject)
	require.NotNil(t, r.AgentCert)
	assert.Equal(t, p.a1.Raw(), r.AgentCert.Raw())
	assert.Subset(t, ChainKeys(p.n1, p.a1), r.Keys())

	// The same agent name with the same serial, issued by another node: not covered.
	twin := issueAgent(t, p.i2, p.i2Key, "billing", "100.100.1.18", p.a1.Serial())
	assert.NotSubset(t, ChainKeys(p.n2, twin), r.Keys())
	// A renewed certificate of the same agent on the same node: not covered (another serial).
	renewed := issueAgent(t, p.i1, p.i1Key, "billing", "100.100.1.1", nil)
	assert.NotSubset(t, ChainKeys(p.n1, renewed), r.Keys())
}

func TestResignedRevocationHasTheSameKey(t *testing.T) {
	p := newTestPKI(t)
	first := mustSign(t, p.authClaims(p.n1.ID.String(), 1), p.authKey)
	c := p.authClaims(p.n1.ID.String(), 2)
	c.Reason, c.IssuedAt = "again", t0.Add(time.Minute)
	second := mustSign(t, c, p.authKey)
	self := mustSign(t, NodeRevocation(p.n1, "me too", t0), p.n1Key)
	require.NotEqual(t, first, second)
	var keys []string
	for _, raw := range [][]byte{first, second, self} {
		r, err := p.v.VerifyRevocation(raw, t0.Add(2*time.Minute))
		require.NoError(t, err)
		keys = append(keys, r.Key())
	}
	assert.Equal(t, []string{p.n1.ID.String(), p.n1.ID.String(), p.n1.ID.String()}, keys)
}

// TestRevocationAttacks presents records an attacker can produce and asserts the exact refusal.
func TestRevocationAttacks(t *testing.T) {
	p := newTestPKI(t)
	now := t0.Add(time.Minute)
	good := mustSign(t, p.authClaims(p.n2.ID.String(), 1), p.authKey)
	_, err := p.v.VerifyRevocation(good, now)
	require.NoError(t, err)
	authID := identity.AuthorityID(testTD).String()

	flip := func(b []byte, i int) []byte {
		c := bytes.Clone(b)
		c[i] ^= 0x01
		return c
	}
	w := func(c RevocationClaims) *wireRevocation { return c.toWire() }
	withUnknown := func(c RevocationClaims) any {
		type extended struct {
			wireRevocation
			Extra string `cbor:"12,keyasint"`
		}
		return &extended{wireRevocation: *c.toWire(), Extra: "surprise"}
	}
	nodeOther := RevocationClaims{Version: Version1, TrustDomain: testTD, Subject: p.n2.ID.String(), Reason: "x", IssuedAt: t0,
		Expires: p.n2.X509.NotAfter, Signer: p.n1.ID.String(), SignerCert: p.n1.Raw()}
	otherAgent := AgentRevocation(p.n1, p.i1, p.a2, "not mine", t0)
	// n1 revokes n2's agent, carrying n2's issuing certificate (which did sign it).
	othersIssuer := AgentRevocation(p.n1, p.i2, p.a2, "not mine", t0)
	noIssuer := AgentRevocation(p.n1, p.i1, p.a1, "x", t0)
	noIssuer.IssuerCert = nil
	// n1 signs with its issuing certificate in place of its node certificate.
	issuerSigns := AgentRevocation(p.n1, p.i1, p.a1, "x", t0)
	issuerSigns.SignerCert = p.i1.Raw()
	otherAgent.SignerCert, otherAgent.Signer = p.n1.Raw(), p.n1.ID.String()
	agentByName := NodeRevocation(p.n1, "x", t0)
	agentByName.Subject = p.a2.ID.String()
	serialByNode := NodeRevocation(p.n1, "x", t0)
	serialByNode.Subject = SerialKey(p.n2.Serial())
	impostor := NodeRevocation(p.n2, "x", t0) // claims n2 with n2's certificate, signed by n1's key
	foreignTD := RevocationClaims{Version: Version1, TrustDomain: "evil.internal", Subject: "spiffe://evil.internal/node/n1", Reason: "x",
		IssuedAt: t0, Expires: t0.Add(time.Hour), Signer: identity.AuthorityID("evil.internal").String(), Seq: 1}
	foreignSubject := p.authClaims("spiffe://evil.internal/node/n1", 1)
	foreignNode := NodeRevocation(p.foreignNode, "x", t0)
	foreignNode.TrustDomain = testTD
	rogueKey, rogueNodeKey := mustKey(t), mustKey(t)
	rogueCA, err := identity.NewAuthority(testTD, rogueKey, t0.Add(-time.Hour), 366*24*time.Hour)
	require.NoError(t, err)
	rogueNode := issueNode(t, rogueCA, rogueKey, rogueNodeKey, testTD, "n1", "100.100.1.0/28")
	rogue := NodeRevocation(rogueNode, "x", t0)
	rogue.Subject = rogueNode.ID.String()
	longLived := p.authClaims(p.n1.ID.String(), 1)
	longLived.Expires = p.auth.X509.NotAfter.Add(time.Hour)
	selfWrongExpiry := NodeRevocation(p.n1, "x", t0)
	selfWrongExpiry.Expires = selfWrongExpiry.Expires.Add(365 * 24 * time.Hour)
	agentWrongExpiry := AgentRevocation(p.n1, p.i1, p.a1, "x", t0)
	agentWrongExpiry.Expires = p.n1.X509.NotAfter
	backdated := NodeRevocation(p.n1, "x", p.n1.X509.NotBefore.Add(-time.Hour))
	v2 := p.authClaims(p.n1.ID.String(), 1)
	v2.Version = 2
	seq0 := p.authClaims(p.n1.ID.String(), 0)
	nodeSeq := NodeRevocation(p.n1, "x", t0)
	nodeSeq.Seq = 5
	ctrl := p.authClaims(p.n1.ID.String(), 1)
	ctrl.Reason = "line one\nline two"
	nonCanon := p.authClaims("serial:007", 1)
	authWithCert := p.authClaims(p.n1.ID.String(), 1)
	authWithCert.SignerCert = p.n1.Raw()
	authAsAuthority := p.authClaims(authID, 1)
	future := p.authClaims(p.n1.ID.String(), 1)
	future.IssuedAt, future.Expires = now.Add(DefaultSkew+time.Minute), now.Add(48*time.Hour)

	cases := []struct {
		name string
		raw  []byte
		want error
	}{
		{"forged signature", flip(good, len(good)-1), ErrSignature},
		{"tampered payload", bytes.Replace(good, []byte("key leaked"), []byte("key leakee"), 1), ErrSignature},
		{"claims to be the authority, signed by a node key", mustSign(t, p.authClaims(p.n2.ID.String(), 1), p.n1Key), ErrSignature},
		{"signed by a foreign authority", mustSign(t, p.authClaims(p.n2.ID.String(), 1), p.foreignKey), ErrSignature},
		{"node revokes another node", signWire(t, w(nodeOther), p.n1Key, aadRevocation), ErrNotAllowed},
		{"node revokes an agent issued by another node", signWire(t, w(otherAgent), p.n1Key, aadRevocation), ErrNotAllowed},
		{"node revokes an agent name without its certificate", signWire(t, w(agentByName), p.n1Key, aadRevocation), ErrNotAllowed},
		{"node revokes a serial", signWire(t, w(serialByNode), p.n1Key, aadRevocation), ErrNotAllowed},
		{"node signs with another node's certificate", signWire(t, w(impostor), p.n1Key, aadRevocation), ErrSignature},
		{"node certificate of a foreign authority", signWire(t, w(foreignNode), p.foreignNodeKey, aadRevocation), ErrTrustDomain},
		{"node certificate from a rogue CA for our trust domain", signWire(t, w(rogue), rogueNodeKey, aadRevocation), ErrSigner},
		{"foreign trust domain", signWire(t, w(foreignTD), p.foreignKey, aadRevocation), ErrTrustDomain},
		{"subject in a foreign trust domain", signWire(t, w(foreignSubject), p.authKey, aadRevocation), ErrTrustDomain},
		{"agent revocation carrying another node's issuing certificate", signWire(t, w(othersIssuer), p.n1Key, aadRevocation), ErrNotAllowed},
		{"agent revocation without the issuing certificate", signWire(t, w(noIssuer), p.n1Key, aadRevocation), ErrMalformed},
		{"signed with the issuing key as the node's certificate", signWire(t, w(issuerSigns), p.i1Key, aadRevocation), ErrSigner},
		{"unknown field, re-signed", signWire(t, withUnknown(p.authClaims(p.n1.ID.String(), 1)), p.authKey, aadRevocation), ErrUnknownField},
		{"version 2", signWire(t, w(v2), p.authKey, aadRevocation), ErrVersion},
		{"authority expiry beyond its own certificate", signWire(t, w(longLived), p.authKey, aadRevocation), ErrNotAllowed},
		{"node self-revocation outliving its certificate", signWire(t, w(selfWrongExpiry), p.n1Key, aadRevocation), ErrNotAllowed},
		{"agent revocation outliving the agent certificate", signWire(t, w(agentWrongExpiry), p.n1Key, aadRevocation), ErrNotAllowed},
		{"node record backdated before its certificate", signWire(t, w(backdated), p.n1Key, aadRevocation), ErrSigner},
		{"authority seq 0", signWire(t, w(seq0), p.authKey, aadRevocation), ErrMalformed},
		{"node-signed with a seq", signWire(t, w(nodeSeq), p.n1Key, aadRevocation), ErrMalformed},
		{"control character in reason", signWire(t, w(ctrl), p.authKey, aadRevocation), ErrMalformed},
		{"non-canonical serial subject", signWire(t, w(nonCanon), p.authKey, aadRevocation), ErrMalformed},
		{"authority record carrying a certificate", signWire(t, w(authWithCert), p.authKey, aadRevocation), ErrMalformed},
		{"authority revoking itself", signWire(t, w(authAsAuthority), p.authKey, aadRevocation), ErrMalformed},
		{"issued in the future", signWire(t, w(future), p.authKey, aadRevocation), ErrFuture},
		{"policy AAD", signWire(t, w(p.authClaims(p.n1.ID.String(), 1)), p.authKey, aadPolicy), ErrSignature},
		{"truncated", good[:len(good)-10], ErrMalformed},
		{"empty", nil, ErrMalformed},
		{"oversized", append(bytes.Clone(good), make([]byte, MaxRevocationSize)...), ErrTooLarge},
		{"trailing bytes", append(bytes.Clone(good), 0x00), ErrMalformed},
		{"untagged", good[1:], ErrMalformed},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r, err := p.v.VerifyRevocation(tc.raw, now)
			require.ErrorIs(t, err, tc.want)
			assert.Nil(t, r)
			assert.NotContains(t, err.Error(), "\n")
		})
	}
}

func TestRevocationHeaderProfile(t *testing.T) {
	p := newTestPKI(t)
	good := mustSign(t, p.authClaims(p.n1.ID.String(), 1), p.authKey)
	var arr []cbor.RawMessage
	require.NoError(t, cbor.Unmarshal(good[1:], &arr)) // strip tag 18
	require.Len(t, arr, 4)
	rebuild := func(protected, unprotected []byte) []byte {
		b, err := encMode.Marshal([]cbor.RawMessage{protected, unprotected, arr[2], arr[3]})
		require.NoError(t, err)
		return append([]byte{0xd2}, b...)
	}
	es256, _ := encMode.Marshal([]byte{0xa1, 0x01, 0x26})                     // {1: -7}
	withKid, _ := encMode.Marshal([]byte{0xa2, 0x01, 0x27, 0x04, 0x41, 0x00}) // {1: -8, 4: h'00'}
	unprot, _ := encMode.Marshal(map[int][]byte{4: {0}})
	for name, raw := range map[string][]byte{
		"ES256 protected header":       rebuild(es256, arr[1]),
		"extra protected header":       rebuild(withKid, arr[1]),
		"non-empty unprotected header": rebuild(arr[0], unprot),
	} {
		t.Run(name, func(t *testing.T) {
			_, err := p.v.VerifyRevocation(raw, t0)
			require.ErrorIs(t, err, ErrHeader)
			require.ErrorIs(t, err, ErrMalformed)
		})
	}
	_, err := p.v.VerifyRevocation(rebuild(arr[0], arr[1]), t0)
	require.NoError(t, err, "the rebuilt original must still verify, else the cases above prove nothing")
}

func TestRevocationStrictPayload(t *testing.T) {
	p := newTestPKI(t)
	c := p.authClaims(p.n1.ID.String(), 1)
	payload, err := encMode.Marshal(c.toWire())
	require.NoError(t, err)
	require.Equal(t, byte(0xa8), payload[0], "8-entry map with one-byte header")
	dupKey := append([]byte{0xa9}, payload[1:]...)
	dupKey = append(dupKey, 0x01, 0x01) // key 1 again
	indef := append([]byte{0xbf}, payload[1:]...)
	indef = append(indef, 0xff)
	// version encoded as 0x18 0x01 (non-shortest) instead of 0x01
	nonShortest := append([]byte{0xa8, 0x01, 0x18, 0x01}, payload[3:]...)
	tagged := append([]byte{0xc1}, payload...)
	for name, pl := range map[string][]byte{
		"duplicate key":        dupKey,
		"indefinite length":    indef,
		"non-shortest integer": nonShortest,
		"tag":                  tagged,
		"array":                {0x80},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := p.v.VerifyRevocation(signPayload(t, pl, p.authKey, aadRevocation), t0)
			require.ErrorIs(t, err, ErrMalformed)
		})
	}
	_, err = p.v.VerifyRevocation(signPayload(t, payload, p.authKey, aadRevocation), t0)
	require.NoError(t, err)
}

func TestRevocationTime(t *testing.T) {
	p := newTestPKI(t)
	raw := mustSign(t, AgentRevocation(p.n1, p.i1, p.a1, "x", t0), p.n1Key)
	_, err := p.v.VerifyRevocation(raw, p.a1.X509.NotAfter)
	require.NoError(t, err, "in force up to and including its expiry")
	_, err = p.v.VerifyRevocation(raw, p.a1.X509.NotAfter.Add(time.Millisecond))
	require.ErrorIs(t, err, ErrExpired)
	_, err = p.v.ReverifyRevocation(raw, p.a1.X509.NotAfter.Add(time.Millisecond))
	require.ErrorIs(t, err, ErrExpired)

	// Issued by a clock ahead of ours: refused on receipt, kept when reloaded.
	c := p.authClaims(p.n1.ID.String(), 1)
	c.IssuedAt = t0.Add(time.Hour)
	early := mustSign(t, c, p.authKey)
	_, err = p.v.VerifyRevocation(early, t0)
	require.ErrorIs(t, err, ErrFuture)
	_, err = Verifier{Certs: p.v.Certs, MaxSkew: 2 * time.Hour}.VerifyRevocation(early, t0)
	require.NoError(t, err)
	_, err = p.v.ReverifyRevocation(early, t0)
	require.NoError(t, err)

	// A node record is checked against the node certificate at issued-at, not now: it stays valid
	// after the certificate is superseded, e.g. by a renewal with another key.
	raw = mustSign(t, NodeRevocation(p.n1, "x", p.n1.X509.NotAfter.Add(-time.Minute)), p.n1Key)
	_, err = p.v.VerifyRevocation(raw, p.n1.X509.NotAfter)
	require.NoError(t, err)
}

func TestVerifierWithoutAnchorRefuses(t *testing.T) {
	p := newTestPKI(t)
	raw := mustSign(t, p.authClaims(p.n1.ID.String(), 1), p.authKey)
	_, err := Verifier{}.VerifyRevocation(raw, t0)
	require.ErrorIs(t, err, ErrSigner)
	_, err = Verifier{Certs: identity.Verifier{Authority: p.n1}}.VerifyRevocation(raw, t0)
	require.ErrorIs(t, err, ErrSigner)
}

func TestSignRevocationRefusesWhatVerifyWould(t *testing.T) {
	p := newTestPKI(t)
	wrongKey := NodeRevocation(p.n1, "x", t0)
	_, err := SignRevocation(wrongKey, p.n2Key)
	require.ErrorIs(t, err, ErrSigner)

	other := AgentRevocation(p.n1, p.i1, p.a2, "x", t0)
	_, err = SignRevocation(other, p.n1Key)
	require.ErrorIs(t, err, ErrNotAllowed)

	longReason := p.authClaims(p.n1.ID.String(), 1)
	longReason.Reason = strings.Repeat("x", MaxReasonLen+1)
	_, err = SignRevocation(longReason, p.authKey)
	require.ErrorIs(t, err, ErrTooLarge)

	inverted := p.authClaims(p.n1.ID.String(), 1)
	inverted.Expires = inverted.IssuedAt
	_, err = SignRevocation(inverted, p.authKey)
	require.ErrorIs(t, err, ErrMalformed)

	_, err = SignRevocation(p.authClaims("spiffe://acme.internal/node/UPPER", 1), p.authKey)
	require.ErrorIs(t, err, ErrMalformed)

	_, err = SignRevocation(p.authClaims(p.n1.ID.String(), 1), ed25519.PrivateKey{1, 2})
	require.Error(t, err)
}

func TestCanonicalSubject(t *testing.T) {
	for _, ok := range []string{"serial:1", "serial:18446744073709551616", "spiffe://acme.internal/node/n1",
		"spiffe://acme.internal/zone/payments/agent/billing", "serial:" + strings.Repeat("9", 48)} {
		got, err := CanonicalSubject(ok)
		require.NoError(t, err, ok)
		assert.Equal(t, ok, got)
	}
	for _, bad := range []string{"", "serial:", "serial:0", "serial:01", "serial:+1", "serial:-1", "serial:1a",
		"serial:" + strings.Repeat("9", 49), "spiffe://acme.internal", "spiffe://acme.internal/node/N1",
		"spiffe://acme.internal/node/n1/", "n1", "SERIAL:1"} {
		_, err := CanonicalSubject(bad)
		require.ErrorIs(t, err, ErrMalformed, bad)
	}
	assert.Equal(t, "serial:42@spiffe://acme.internal/node/n1", IssuedSerialKey(identity.NodeID(testTD, "n1"), big.NewInt(42)))
	// An issued-serial key is never a valid subject, so no operator spelling can collide with it.
	_, err := CanonicalSubject(IssuedSerialKey(identity.NodeID(testTD, "n1"), big.NewInt(42)))
	require.ErrorIs(t, err, ErrMalformed)
}

func TestChainKeys(t *testing.T) {
	p := newTestPKI(t)
	assert.Equal(t, []string{p.n1.ID.String(), SerialKey(p.n1.Serial())}, ChainKeys(p.n1, nil))
	assert.Equal(t, []string{p.n1.ID.String(), SerialKey(p.n1.Serial()), p.a1.ID.String(), SerialKey(p.a1.Serial()),
		IssuedSerialKey(p.n1.ID, p.a1.Serial())}, ChainKeys(p.n1, p.a1))
}
