package record

import (
	"bytes"
	"crypto/sha256"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const testPolicy = "zones:\n  - name: payments\n    cidr: 100.100.1.0/24\n"

func policyClaims(version uint64) PolicyClaims {
	return PolicyClaims{Version: Version1, TrustDomain: testTD, PolicyVersion: version, IssuedAt: t0, Policy: []byte(testPolicy)}
}

func TestPolicyRoundTrip(t *testing.T) {
	p := newTestPKI(t)
	raw, err := SignPolicy(policyClaims(4), p.authKey)
	require.NoError(t, err)
	rel, err := p.v.VerifyPolicy(raw, t0)
	require.NoError(t, err)
	assert.Equal(t, uint64(4), rel.Claims.PolicyVersion)
	assert.Equal(t, testPolicy, string(rel.Claims.Policy))
	assert.Equal(t, sha256.Sum256([]byte(testPolicy)), rel.SHA256)
	assert.Equal(t, raw, rel.Raw())

	big := policyClaims(5)
	big.Policy = bytes.Repeat([]byte("#"), MaxPolicyLen)
	raw, err = SignPolicy(big, p.authKey)
	require.NoError(t, err)
	_, err = p.v.VerifyPolicy(raw, t0)
	require.NoError(t, err, "a policy at the cap fits a release")
}

func TestPolicyAttacks(t *testing.T) {
	p := newTestPKI(t)
	good, err := SignPolicy(policyClaims(2), p.authKey)
	require.NoError(t, err)
	byNode, err := SignPolicy(policyClaims(2), p.n1Key)
	require.NoError(t, err)
	foreign := policyClaims(2)
	foreign.TrustDomain = "evil.internal"
	foreignRaw, err := SignPolicy(foreign, p.foreignKey)
	require.NoError(t, err)
	future := policyClaims(2)
	future.IssuedAt = t0.Add(time.Hour)
	futureRaw, err := SignPolicy(future, p.authKey)
	require.NoError(t, err)
	wrongDigest := &wirePolicy{Version: u64(1), TrustDomain: testTD, PolicyVersion: u64(2), IssuedAt: u64(uint64(t0.UnixMilli())),
		Policy: []byte(testPolicy), SHA256: make([]byte, 32)}
	type extended struct {
		wirePolicy
		Extra uint64 `cbor:"7,keyasint"`
	}
	sum := sha256.Sum256([]byte(testPolicy))
	ok := wirePolicy{Version: u64(1), TrustDomain: testTD, PolicyVersion: u64(2), IssuedAt: u64(uint64(t0.UnixMilli())),
		Policy: []byte(testPolicy), SHA256: sum[:]}
	zeroVersion := ok
	zeroVersion.PolicyVersion = u64(0)
	revAsPolicy := mustSign(t, p.authClaims(p.n1.ID.String(), 1), p.authKey)
	tampered := bytes.Replace(good, []byte("payments"), []byte("paymentz"), 1)
	require.NotEqual(t, good, tampered)

	cases := []struct {
		name string
		raw  []byte
		want error
	}{
		{"signed by a node", byNode, ErrSignature},
		{"foreign trust domain", foreignRaw, ErrTrustDomain},
		{"tampered policy", tampered, ErrSignature},
		{"issued in the future", futureRaw, ErrFuture},
		{"digest mismatch, re-signed", signWire(t, wrongDigest, p.authKey, aadPolicy), ErrMalformed},
		{"unknown field, re-signed", signWire(t, &extended{wirePolicy: ok, Extra: 1}, p.authKey, aadPolicy), ErrUnknownField},
		{"policy version 0", signWire(t, &zeroVersion, p.authKey, aadPolicy), ErrMalformed},
		{"revocation AAD", signWire(t, &ok, p.authKey, aadRevocation), ErrSignature},
		{"a revocation record", revAsPolicy, ErrUnknownField},
		{"truncated", good[:len(good)/2], ErrMalformed},
		{"oversized", make([]byte, MaxPolicyReleaseSize+1), ErrTooLarge},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			rel, err := p.v.VerifyPolicy(tc.raw, t0)
			require.ErrorIs(t, err, tc.want)
			assert.Nil(t, rel)
		})
	}
	_, err = p.v.VerifyPolicy(signWire(t, &ok, p.authKey, aadPolicy), t0)
	require.NoError(t, err, "the untampered hand-built release verifies, so the cases above test what they name")
	_, err = p.v.ReverifyPolicy(futureRaw, t0)
	require.NoError(t, err)

	tooBig := policyClaims(3)
	tooBig.Policy = []byte(strings.Repeat("#", MaxPolicyLen+1))
	_, err = SignPolicy(tooBig, p.authKey)
	require.ErrorIs(t, err, ErrTooLarge)
	_, err = SignPolicy(policyClaims(0), p.authKey)
	require.ErrorIs(t, err, ErrMalformed)
}
