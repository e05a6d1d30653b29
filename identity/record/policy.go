package record

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"fmt"
	"time"

	"github.com/ute-project/ute/identity"
)

// Policy release caps.
const (
	// MaxPolicyLen caps the policy YAML a release carries.
	MaxPolicyLen = 1 << 20
	// MaxPolicyReleaseSize caps an encoded policy release, checked before any decoding.
	MaxPolicyReleaseSize = MaxPolicyLen + 1024
)

// Policy release claim keys (docs/protocol.md).
const (
	PolKeyVersion       = 1
	PolKeyTrustDomain   = 2
	PolKeyPolicyVersion = 3
	PolKeyIssuedAt      = 4
	PolKeyPolicy        = 5
	PolKeySHA256        = 6
)

// PolicyClaims is the content of a policy release, signed by the authority only.
type PolicyClaims struct {
	// Version is the claims format version; zero is filled in by SignPolicy.
	Version     uint64
	TrustDomain string
	// PolicyVersion is the authority's monotonic policy version, from 1. A node refuses a release
	// whose PolicyVersion is not above the one it holds (node/revstore).
	PolicyVersion uint64
	IssuedAt      time.Time // millisecond precision
	// Policy is the policy YAML, 1 to MaxPolicyLen bytes. It is not parsed here: zones does that.
	Policy []byte
}

type wirePolicy struct {
	Version       *uint64 `cbor:"1,keyasint,omitempty"`
	TrustDomain   string  `cbor:"2,keyasint,omitempty"`
	PolicyVersion *uint64 `cbor:"3,keyasint,omitempty"`
	IssuedAt      *uint64 `cbor:"4,keyasint,omitempty"`
	Policy        []byte  `cbor:"5,keyasint,omitempty"`
	SHA256        []byte  `cbor:"6,keyasint,omitempty"`
}

// PolicyRelease is a verified policy release. Only Verifier.VerifyPolicy (and ReverifyPolicy)
// produce one; its fields must not be modified.
type PolicyRelease struct {
	Claims PolicyClaims
	// SHA256 is the digest of Claims.Policy, as signed and checked.
	SHA256 [sha256.Size]byte
	raw    []byte
}

// Raw returns the release exactly as received.
func (p *PolicyRelease) Raw() []byte { return p.raw }

// SignPolicy validates c, adds the policy's SHA-256, and signs the release with the authority key.
// A zero Version is set to Version1.
func SignPolicy(c PolicyClaims, key ed25519.PrivateKey) ([]byte, error) {
	if c.Version == 0 {
		c.Version = Version1
	}
	if err := c.check(); err != nil {
		return nil, err
	}
	sum := sha256.Sum256(c.Policy)
	return seal("policy release", &wirePolicy{
		Version:       u64(c.Version),
		TrustDomain:   c.TrustDomain,
		PolicyVersion: u64(c.PolicyVersion),
		IssuedAt:      u64(uint64(c.IssuedAt.UnixMilli())),
		Policy:        c.Policy,
		SHA256:        sum[:],
	}, key, aadPolicy, MaxPolicyReleaseSize)
}

func (c *PolicyClaims) check() error {
	if c.Version != Version1 {
		return fmt.Errorf("%w: %d (this node speaks %d)", ErrVersion, c.Version, Version1)
	}
	if err := identity.ValidateTrustDomain(c.TrustDomain); err != nil {
		return fmt.Errorf("%w: trust domain (key %d): %w", ErrMalformed, PolKeyTrustDomain, err)
	}
	if c.PolicyVersion == 0 {
		return fmt.Errorf("%w: policy version must be 1 or more", ErrMalformed)
	}
	if iat := c.IssuedAt.UnixMilli(); iat <= 0 || iat > maxMillis {
		return fmt.Errorf("%w: issued-at must lie between 1970 and year 287396", ErrMalformed)
	}
	if len(c.Policy) == 0 {
		return fmt.Errorf("%w: the policy is empty", ErrMalformed)
	}
	if len(c.Policy) > MaxPolicyLen {
		return fmt.Errorf("%w: the policy is %d bytes, limit %d", ErrTooLarge, len(c.Policy), MaxPolicyLen)
	}
	return nil
}

// VerifyPolicy parses and verifies a received policy release at now: size cap, COSE profile,
// strict claims, trust domain, issued-at within MaxSkew of the future, the signature with the
// authority key (anchor valid at issued-at), and the SHA-256 of the policy. Version monotonicity is
// the holder's check (node/revstore refuses a version it does not need).
func (v Verifier) VerifyPolicy(raw []byte, now time.Time) (*PolicyRelease, error) {
	return v.verifyPolicy(raw, now, true)
}

// ReverifyPolicy verifies a release accepted earlier: VerifyPolicy without ErrFuture.
func (v Verifier) ReverifyPolicy(raw []byte, now time.Time) (*PolicyRelease, error) {
	return v.verifyPolicy(raw, now, false)
}

func (v Verifier) verifyPolicy(b []byte, now time.Time, future bool) (*PolicyRelease, error) {
	var w wirePolicy
	raw, msg, err := open("policy release", b, MaxPolicyReleaseSize, &w)
	if err != nil {
		return nil, err
	}
	if err := checkWireVersion(w.Version, PolKeyVersion); err != nil {
		return nil, err
	}
	switch {
	case w.PolicyVersion == nil:
		return nil, fmt.Errorf("%w: missing claim policy version (key %d)", ErrMalformed, PolKeyPolicyVersion)
	case w.IssuedAt == nil || *w.IssuedAt > maxMillis:
		return nil, fmt.Errorf("%w: missing or out-of-range issued-at (key %d)", ErrMalformed, PolKeyIssuedAt)
	case len(w.SHA256) != sha256.Size:
		return nil, fmt.Errorf("%w: policy digest (key %d) must be %d bytes", ErrMalformed, PolKeySHA256, sha256.Size)
	}
	c := PolicyClaims{
		Version: *w.Version, TrustDomain: w.TrustDomain, PolicyVersion: *w.PolicyVersion,
		IssuedAt: time.UnixMilli(int64(*w.IssuedAt)), Policy: w.Policy,
	}
	if err := c.check(); err != nil {
		return nil, err
	}
	anchor, err := v.anchor()
	if err != nil {
		return nil, err
	}
	if c.TrustDomain != anchor.ID.TrustDomain {
		return nil, fmt.Errorf("%w: release for %q, this anchor is %q", ErrTrustDomain, c.TrustDomain, anchor.ID.TrustDomain)
	}
	if future && c.IssuedAt.After(now.Add(v.skew())) {
		return nil, fmt.Errorf("%w: issued at %s, now is %s; check the clocks", ErrFuture, fmtTime(c.IssuedAt), fmtTime(now))
	}
	if err := checkAnchorAt(anchor, c.IssuedAt); err != nil {
		return nil, err
	}
	if err := verifySig(msg, anchor.PublicKey(), aadPolicy, "authority"); err != nil {
		return nil, err
	}
	sum := sha256.Sum256(c.Policy)
	if !bytes.Equal(sum[:], w.SHA256) {
		return nil, fmt.Errorf("%w: the policy digest does not match the policy", ErrMalformed)
	}
	return &PolicyRelease{Claims: c, SHA256: sum, raw: raw}, nil
}
