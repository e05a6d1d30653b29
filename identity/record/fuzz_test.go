package record

import (
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// FuzzRevocation feeds arbitrary bytes to the verifier: it must refuse with a sentinel or accept a
// record whose key is one of the shapes a revocation may have, never panic.
func FuzzRevocation(f *testing.F) {
	p := newTestPKI(f)
	f.Add(mustSign(f, p.authClaims(p.n1.ID.String(), 1), p.authKey))
	f.Add(mustSign(f, p.authClaims("serial:42", 9), p.authKey))
	f.Add(mustSign(f, NodeRevocation(p.n1, "decommissioned", t0), p.n1Key))
	f.Add(mustSign(f, AgentRevocation(p.n2, p.i2, p.a2, "drift", t0), p.n2Key))
	f.Add([]byte{0xd2, 0x84, 0x43, 0xa1, 0x01, 0x27, 0xa0, 0x40, 0x40})
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := p.v.VerifyRevocation(b, t0.Add(time.Minute))
		if err != nil {
			require.Nil(t, r)
			require.True(t, isSentinel(err), "unclassified error: %v", err)
			return
		}
		again, err := p.v.VerifyRevocation(r.Raw(), t0.Add(time.Minute))
		require.NoError(t, err)
		require.Equal(t, r.Key(), again.Key())
		require.NotEmpty(t, r.Key())
	})
}

// FuzzPolicyRelease does the same for policy releases.
func FuzzPolicyRelease(f *testing.F) {
	p := newTestPKI(f)
	raw, err := SignPolicy(policyClaims(3), p.authKey)
	require.NoError(f, err)
	f.Add(raw)
	f.Add(mustSign(f, p.authClaims(p.n1.ID.String(), 1), p.authKey))
	f.Add([]byte{0xd2, 0x84, 0x43, 0xa1, 0x01, 0x27, 0xa0, 0x41, 0xa0, 0x40})
	f.Fuzz(func(t *testing.T, b []byte) {
		rel, err := p.v.VerifyPolicy(b, t0)
		if err != nil {
			require.Nil(t, rel)
			require.True(t, isSentinel(err), "unclassified error: %v", err)
			return
		}
		require.NotZero(t, rel.Claims.PolicyVersion)
		require.NotEmpty(t, rel.Claims.Policy)
	})
}

func isSentinel(err error) bool {
	for _, s := range []error{ErrTooLarge, ErrMalformed, ErrVersion, ErrTrustDomain, ErrSigner, ErrSignature, ErrNotAllowed, ErrExpired, ErrFuture} {
		if errors.Is(err, s) {
			return true
		}
	}
	return false
}
