package record

import (
	"bytes"
	"crypto/ed25519"
	"errors"
	"fmt"
	"time"

	"github.com/ute-project/ute/identity"
)

// aadPresence separates presence proofs from every other record kind.
const aadPresence = "ute/1 presence"

// Caps of a presence proof.
const (
	MaxPresenceSize = 4 << 10
	// PresenceInstanceLen and PresenceChallengeLen are the lengths of the instance ID and of the
	// observer's challenge.
	PresenceInstanceLen  = 16
	PresenceChallengeLen = 16
	maxPresenceAddr      = 64
)

// Presence claim keys (docs/protocol.md, "Presence proofs and duplicate evidence").
const (
	PrKeyVersion     = 1
	PrKeyTrustDomain = 2
	PrKeyNode        = 3
	PrKeyInstance    = 4
	PrKeyStartedAt   = 5
	PrKeySignedAt    = 6
	PrKeyObserver    = 7
	PrKeyChallenge   = 8
	PrKeyNodeCert    = 9
	PrKeyAddr        = 10
)

// ErrNoDuplicate: two presence proofs do not show one identity live twice at once (same
// instance, different nodes, no overlap of the two instances' lives, or not fresh).
var ErrNoDuplicate = errors.New("record: presence proofs do not show a duplicate")

// PresenceClaims is a node's answer to an observer's challenge on one tunnel: "I, instance
// Instance of Node, running since StartedAt, am live at SignedAt, answering Challenge from
// Observer." Instance is random per process start and never stored, so two processes holding the
// same node key at once sign two instances whose lives overlap; a restarted node signs a new
// instance that started after the old one's last proof.
type PresenceClaims struct {
	Version     uint64
	TrustDomain string
	Node        string // the signer's node SPIFFE ID
	Instance    []byte
	StartedAt   time.Time
	SignedAt    time.Time
	Observer    string // the node that sent the challenge
	Challenge   []byte
	NodeCert    []byte // the signer's certificate DER
	// Addr is the underlay address the observer saw the tunnel come from (the observer's word,
	// echoed; informative).
	Addr string
}

type wirePresence struct {
	Version     *uint64 `cbor:"1,keyasint,omitempty"`
	TrustDomain string  `cbor:"2,keyasint,omitempty"`
	Node        string  `cbor:"3,keyasint,omitempty"`
	Instance    []byte  `cbor:"4,keyasint,omitempty"`
	StartedAt   *uint64 `cbor:"5,keyasint,omitempty"`
	SignedAt    *uint64 `cbor:"6,keyasint,omitempty"`
	Observer    string  `cbor:"7,keyasint,omitempty"`
	Challenge   []byte  `cbor:"8,keyasint,omitempty"`
	NodeCert    []byte  `cbor:"9,keyasint,omitempty"`
	Addr        string  `cbor:"10,keyasint,omitempty"`
}

// Presence is a verified presence proof.
type Presence struct {
	Claims     PresenceClaims
	NodeID     identity.ID
	ObserverID identity.ID
	NodeCert   *identity.Certificate
	raw        []byte
}

// Raw returns the proof exactly as received.
func (p *Presence) Raw() []byte { return p.raw }

// SignPresence signs c with the node key of c.NodeCert.
func SignPresence(c PresenceClaims, key ed25519.PrivateKey) ([]byte, error) {
	if c.Version == 0 {
		c.Version = Version1
	}
	if len(key) != ed25519.PrivateKeySize {
		return nil, fmt.Errorf("record: sign: key is %d bytes, want an Ed25519 private key", len(key))
	}
	cert, _, _, err := c.check()
	if err != nil {
		return nil, err
	}
	if !bytes.Equal(key.Public().(ed25519.PublicKey), cert.PublicKey()) {
		return nil, fmt.Errorf("%w: the signing key is not the key of %s's certificate", ErrSigner, cert.ID)
	}
	return seal("presence", c.toWire(), key, aadPresence, MaxPresenceSize)
}

// VerifyPresence parses and verifies a presence proof at now: shape, trust domain, signed-at
// no later than now + MaxSkew (ErrFuture), the node certificate up to the anchor at signed-at
// (ErrSigner), the signature (ErrSignature).
func (v Verifier) VerifyPresence(b []byte, now time.Time) (*Presence, error) {
	var w wirePresence
	raw, msg, err := open("presence", b, MaxPresenceSize, &w)
	if err != nil {
		return nil, err
	}
	c, err := w.toClaims()
	if err != nil {
		return nil, err
	}
	cert, node, obs, err := c.check()
	if err != nil {
		return nil, err
	}
	anchor, err := v.anchor()
	if err != nil {
		return nil, err
	}
	if td := anchor.ID.TrustDomain; c.TrustDomain != td || node.TrustDomain != td || obs.TrustDomain != td {
		return nil, fmt.Errorf("%w: presence of %s for %s, this anchor is %q", ErrTrustDomain, node, obs, td)
	}
	if c.SignedAt.After(now.Add(v.skew())) {
		return nil, fmt.Errorf("%w: signed at %s, now is %s; check the clocks", ErrFuture, fmtTime(c.SignedAt), fmtTime(now))
	}
	if err := v.Certs.VerifyNode(cert, c.SignedAt); err != nil {
		return nil, fmt.Errorf("%w: node certificate at %s: %w", ErrSigner, fmtTime(c.SignedAt), err)
	}
	if err := verifySig(msg, cert.PublicKey(), aadPresence, node.String()); err != nil {
		return nil, err
	}
	return &Presence{Claims: c, NodeID: node, ObserverID: obs, NodeCert: cert, raw: raw}, nil
}

// CheckDuplicate reports whether a and b (verified) prove that two instances of one node were
// live at once: same node, distinct instances, each signed at least overlap after the other
// instance started (so neither can be a restart of the other, even with clocks off by less than
// overlap), both for the same observer. Otherwise it returns ErrNoDuplicate saying why.
func CheckDuplicate(a, b *Presence, overlap time.Duration) error {
	ca, cb := a.Claims, b.Claims
	switch {
	case a.NodeID != b.NodeID:
		return fmt.Errorf("%w: the proofs are of two nodes, %s and %s", ErrNoDuplicate, a.NodeID, b.NodeID)
	case a.ObserverID != b.ObserverID:
		return fmt.Errorf("%w: the proofs answer two observers, %s and %s", ErrNoDuplicate, a.ObserverID, b.ObserverID)
	case bytes.Equal(ca.Instance, cb.Instance):
		return fmt.Errorf("%w: both proofs come from one instance of %s", ErrNoDuplicate, a.NodeID)
	case bytes.Equal(ca.Challenge, cb.Challenge):
		return fmt.Errorf("%w: both proofs answer one challenge", ErrNoDuplicate)
	case ca.SignedAt.Sub(cb.StartedAt) < overlap || cb.SignedAt.Sub(ca.StartedAt) < overlap:
		return fmt.Errorf("%w: instance lives [%s, %s] and [%s, %s] overlap by less than %s (a restart, not a copy)",
			ErrNoDuplicate, fmtTime(ca.StartedAt), fmtTime(ca.SignedAt), fmtTime(cb.StartedAt), fmtTime(cb.SignedAt), overlap)
	}
	return nil
}

func (c *PresenceClaims) toWire() *wirePresence {
	return &wirePresence{
		Version: u64(c.Version), TrustDomain: c.TrustDomain, Node: c.Node, Instance: c.Instance,
		StartedAt: u64(uint64(c.StartedAt.UnixMilli())), SignedAt: u64(uint64(c.SignedAt.UnixMilli())),
		Observer: c.Observer, Challenge: c.Challenge, NodeCert: c.NodeCert, Addr: c.Addr,
	}
}

func (w *wirePresence) toClaims() (PresenceClaims, error) {
	if err := checkWireVersion(w.Version, PrKeyVersion); err != nil {
		return PresenceClaims{}, err
	}
	switch {
	case w.StartedAt == nil || w.SignedAt == nil:
		return PresenceClaims{}, fmt.Errorf("%w: missing claim started-at or signed-at", ErrMalformed)
	case *w.StartedAt > maxMillis || *w.SignedAt > maxMillis:
		return PresenceClaims{}, fmt.Errorf("%w: started-at or signed-at out of range", ErrMalformed)
	}
	return PresenceClaims{
		Version: *w.Version, TrustDomain: w.TrustDomain, Node: w.Node, Instance: w.Instance,
		StartedAt: time.UnixMilli(int64(*w.StartedAt)), SignedAt: time.UnixMilli(int64(*w.SignedAt)),
		Observer: w.Observer, Challenge: w.Challenge, NodeCert: w.NodeCert, Addr: w.Addr,
	}, nil
}

func (c *PresenceClaims) check() (cert *identity.Certificate, node, obs identity.ID, err error) {
	if c.Version != Version1 {
		return nil, node, obs, fmt.Errorf("%w: %d (this node speaks %d)", ErrVersion, c.Version, Version1)
	}
	if err := identity.ValidateTrustDomain(c.TrustDomain); err != nil {
		return nil, node, obs, fmt.Errorf("%w: trust domain: %w", ErrMalformed, err)
	}
	if node, err = identity.ParseID(c.Node); err != nil || node.Kind != identity.KindNode {
		return nil, node, obs, fmt.Errorf("%w: node %q is not a node SPIFFE ID", ErrSigner, truncate(c.Node))
	}
	if obs, err = identity.ParseID(c.Observer); err != nil || obs.Kind != identity.KindNode {
		return nil, node, obs, fmt.Errorf("%w: observer %q is not a node SPIFFE ID", ErrMalformed, truncate(c.Observer))
	}
	s, t := c.StartedAt.UnixMilli(), c.SignedAt.UnixMilli()
	switch {
	case len(c.Instance) != PresenceInstanceLen:
		return nil, node, obs, fmt.Errorf("%w: instance is %d bytes, want %d", ErrMalformed, len(c.Instance), PresenceInstanceLen)
	case len(c.Challenge) != PresenceChallengeLen:
		return nil, node, obs, fmt.Errorf("%w: challenge is %d bytes, want %d", ErrMalformed, len(c.Challenge), PresenceChallengeLen)
	case len(c.Addr) > maxPresenceAddr:
		return nil, node, obs, fmt.Errorf("%w: address of %d bytes, limit %d", ErrTooLarge, len(c.Addr), maxPresenceAddr)
	case s <= 0 || t <= 0 || s > maxMillis || t > maxMillis || t < s:
		return nil, node, obs, fmt.Errorf("%w: signed-at %s is before started-at %s or out of range", ErrMalformed, fmtTime(c.SignedAt), fmtTime(c.StartedAt))
	case len(c.NodeCert) == 0:
		return nil, node, obs, fmt.Errorf("%w: a presence proof carries the node certificate (key %d)", ErrMalformed, PrKeyNodeCert)
	case len(c.NodeCert) > MaxCertLen:
		return nil, node, obs, fmt.Errorf("%w: certificate of %d bytes, limit %d", ErrTooLarge, len(c.NodeCert), MaxCertLen)
	}
	if err := checkTrustReason(c.Addr); err != nil {
		return nil, node, obs, err
	}
	if cert, err = identity.ParseCertificate(c.NodeCert); err != nil {
		return nil, node, obs, fmt.Errorf("%w: node certificate: %w", ErrSigner, err)
	}
	if cert.ID != node {
		return nil, node, obs, fmt.Errorf("%w: node claim %s, certificate %s", ErrSigner, node, cert.ID)
	}
	return cert, node, obs, nil
}
