package record

import (
	"bytes"
	"crypto/ed25519"
	"encoding/hex"
	"fmt"
	"slices"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/fxamacker/cbor/v2"

	"github.com/ute-project/ute/identity"
)

// aadTrustEvent separates trust events from every other record kind (see cose.go).
const aadTrustEvent = "ute/1 trust event"

// Caps of a trust event.
const (
	// MaxTrustEventSize caps an encoded trust event, checked before any decoding: one node
	// certificate (at most MaxCertLen) and a few short claims.
	MaxTrustEventSize = 4 << 10
	// MaxTrustReasonLen caps a trust event's reason, in bytes; kept short so that an event with
	// its observer's certificate usually fits one gossip packet (a larger one is pushed directly).
	MaxTrustReasonLen = 200
	// TrustNonceLen is the length of a trust event's nonce.
	TrustNonceLen = 16
	// maxKindLen bounds a signal kind name.
	maxKindLen = 32
)

// Trust event claim keys (docs/protocol.md, "Trust events").
const (
	TEKeyVersion     = 1
	TEKeyTrustDomain = 2
	TEKeySubject     = 3
	TEKeyKind        = 4
	TEKeyWeight      = 5
	TEKeyObservedAt  = 6
	TEKeyZone        = 7
	TEKeyObserver    = 8
	TEKeyObserverCrt = 9
	TEKeyNonce       = 10
	TEKeyReason      = 11
)

// TrustEventClaims is one TrustFlow observation, signed by the node that made it: the observer
// says that Subject showed signal Kind (weighing Weight points) in Zone at ObservedAt.
//
// Who may sign what (enforced by Verifier.VerifyTrustEvent): a node, with its certificate carried
// in the record and verifying up to the anchor at ObservedAt, about a subject of a zone its
// certificate grants: an agent of Zone, or a node (that the node serves Zone is checked by the
// receiver, which knows its tunnels and members; the record alone cannot show it). The nonce makes
// each observation distinct: receivers count an event once per (observer, nonce).
type TrustEventClaims struct {
	// Version is the claims format version; zero is filled in by SignTrustEvent.
	Version     uint64
	TrustDomain string
	// Subject is a node or agent SPIFFE ID in canonical form.
	Subject string
	// Kind is the signal's name (TrustFlow's kinds, e.g. "policy_denial"): 1 to 32 of a-z and _.
	Kind string
	// Weight is the points the observer charges, 1..100; receivers cap it at their zone's weight.
	Weight uint64
	// ObservedAt travels with millisecond precision.
	ObservedAt time.Time
	// Zone is the zone the observation was made in; the event spreads in that zone's pool only.
	Zone string
	// Observer is the signing node's SPIFFE ID; ObserverCert its certificate DER.
	Observer     string
	ObserverCert []byte
	// Nonce is TrustNonceLen random bytes chosen by the observer.
	Nonce []byte
	// Reason is optional: one line of printable text, at most MaxTrustReasonLen bytes.
	Reason string
}

type wireTrustEvent struct {
	Version      *uint64 `cbor:"1,keyasint,omitempty"`
	TrustDomain  string  `cbor:"2,keyasint,omitempty"`
	Subject      string  `cbor:"3,keyasint,omitempty"`
	Kind         string  `cbor:"4,keyasint,omitempty"`
	Weight       *uint64 `cbor:"5,keyasint,omitempty"`
	ObservedAt   *uint64 `cbor:"6,keyasint,omitempty"`
	Zone         string  `cbor:"7,keyasint,omitempty"`
	Observer     string  `cbor:"8,keyasint,omitempty"`
	ObserverCert []byte  `cbor:"9,keyasint,omitempty"`
	Nonce        []byte  `cbor:"10,keyasint,omitempty"`
	Reason       string  `cbor:"11,keyasint,omitempty"`
}

// TrustEvent is a verified trust event. Only Verifier.VerifyTrustEvent produces one; its fields
// must not be modified.
type TrustEvent struct {
	Claims       TrustEventClaims
	SubjectID    identity.ID
	ObserverID   identity.ID
	ObserverCert *identity.Certificate

	raw []byte
}

// Raw returns the event exactly as received.
func (e *TrustEvent) Raw() []byte { return e.raw }

// Key identifies the observation for dedupe and replay detection: the observer and its nonce,
// never the signature bytes.
func (e *TrustEvent) Key() string { return TrustEventKey(e.Claims.Observer, e.Claims.Nonce) }

// TrustEventKey is the dedupe key of an observer's event with nonce.
func TrustEventKey(observer string, nonce []byte) string {
	return observer + "#" + hex.EncodeToString(nonce)
}

// IsTrustEvent reports whether raw is shaped like a trust event (a COSE_Sign1 of this profile
// whose claims carry the trust event's kind key): a cheap test to route bytes, not a
// verification.
func IsTrustEvent(raw []byte) bool {
	if len(raw) > MaxTrustEventSize {
		return false
	}
	msg, err := parseCOSE(bytes.Clone(raw))
	if err != nil {
		return false
	}
	// Key 4 is text in a trust event and a revocation but an integer in a policy release; key 10
	// is a 16-byte nonce in a trust event and a certificate (never 16 bytes) in a revocation.
	var probe struct {
		Kind  string `cbor:"4,keyasint,omitempty"`
		Nonce []byte `cbor:"10,keyasint,omitempty"`
	}
	if err := lenientDec.Unmarshal(msg.Payload, &probe); err != nil {
		return false
	}
	return probe.Kind != "" && len(probe.Nonce) == TrustNonceLen
}

// lenientDec decodes a probe: unknown keys are expected there (the full decode is strict), the
// other caps are the strict decoder's.
var lenientDec = mustLenientDec()

func mustLenientDec() cbor.DecMode {
	m, err := cbor.DecOptions{
		DupMapKey: cbor.DupMapKeyEnforcedAPF, IndefLength: cbor.IndefLengthForbidden, TagsMd: cbor.TagsForbidden,
		MaxNestedLevels: 4, MaxArrayElements: 16, MaxMapPairs: 16,
	}.DecMode()
	if err != nil {
		panic(fmt.Sprintf("record: cbor decoder options: %v", err)) // static options; cannot fail at run time
	}
	return m
}

// SignTrustEvent signs c with the observer's node key (the key of c.ObserverCert) as a tagged
// COSE_Sign1. It refuses what verification would refuse for its shape, a key that is not the
// certificate's, and a zone or subject outside the observer's certificate. A zero Version is
// set to Version1.
func SignTrustEvent(c TrustEventClaims, key ed25519.PrivateKey) ([]byte, error) {
	if c.Version == 0 {
		c.Version = Version1
	}
	if len(key) != ed25519.PrivateKeySize {
		return nil, fmt.Errorf("record: sign: key is %d bytes, want an Ed25519 private key", len(key))
	}
	p, err := c.check()
	if err != nil {
		return nil, err
	}
	if !bytes.Equal(key.Public().(ed25519.PublicKey), p.observerCert.PublicKey()) {
		return nil, fmt.Errorf("%w: the signing key is not the key of %s's certificate", ErrSigner, p.observer)
	}
	if err := p.observerMay(); err != nil {
		return nil, err
	}
	return seal("trust event", c.toWire(), key, aadTrustEvent, MaxTrustEventSize)
}

// VerifyTrustEvent parses and verifies a received trust event at now. retention, when set, is
// how long an event with these claims is held: one observed longer ago than that is void
// (ErrExpired), which is what makes a replay of an event its receivers have forgotten harmless. In order: size cap (ErrTooLarge); profile and
// strict claims (ErrMalformed, ErrHeader, ErrUnknownField, ErrVersion); trust domains
// (ErrTrustDomain); observed-at no later than now + MaxSkew (ErrFuture) and no earlier than
// now − maxAge (ErrExpired); the observer certificate up to the anchor at observed-at (ErrSigner);
// the signature (ErrSignature); the zone granted to the observer and an agent subject of that zone
// (ErrNotAllowed).
func (v Verifier) VerifyTrustEvent(b []byte, now time.Time, retention func(TrustEventClaims) time.Duration) (*TrustEvent, error) {
	var w wireTrustEvent
	raw, msg, err := open("trust event", b, MaxTrustEventSize, &w)
	if err != nil {
		return nil, err
	}
	c, err := w.toClaims()
	if err != nil {
		return nil, err
	}
	p, err := c.check()
	if err != nil {
		return nil, err
	}
	anchor, err := v.anchor()
	if err != nil {
		return nil, err
	}
	td := anchor.ID.TrustDomain
	switch {
	case c.TrustDomain != td:
		return nil, fmt.Errorf("%w: event for %q, this anchor is %q", ErrTrustDomain, c.TrustDomain, td)
	case p.observer.TrustDomain != td || p.subject.TrustDomain != td:
		return nil, fmt.Errorf("%w: observer %s, subject %s, this anchor is %q", ErrTrustDomain, p.observer, p.subject, td)
	}
	if c.ObservedAt.After(now.Add(v.skew())) {
		return nil, fmt.Errorf("%w: observed at %s, now is %s; check the clocks", ErrFuture, fmtTime(c.ObservedAt), fmtTime(now))
	}
	if retention != nil {
		if maxAge := retention(c); c.ObservedAt.Before(now.Add(-maxAge)) {
			return nil, fmt.Errorf("%w: observed at %s, more than its retention %s ago", ErrExpired, fmtTime(c.ObservedAt), maxAge)
		}
	}
	if err := v.Certs.VerifyNode(p.observerCert, c.ObservedAt); err != nil {
		return nil, fmt.Errorf("%w: observer certificate at %s: %w", ErrSigner, fmtTime(c.ObservedAt), err)
	}
	if err := verifySig(msg, p.observerCert.PublicKey(), aadTrustEvent, p.observer.String()); err != nil {
		return nil, err
	}
	if err := p.observerMay(); err != nil {
		return nil, err
	}
	return &TrustEvent{Claims: c, SubjectID: p.subject, ObserverID: p.observer, ObserverCert: p.observerCert, raw: raw}, nil
}

func (c *TrustEventClaims) toWire() *wireTrustEvent {
	return &wireTrustEvent{
		Version: u64(c.Version), TrustDomain: c.TrustDomain, Subject: c.Subject, Kind: c.Kind,
		Weight: u64(c.Weight), ObservedAt: u64(uint64(c.ObservedAt.UnixMilli())), Zone: c.Zone,
		Observer: c.Observer, ObserverCert: c.ObserverCert, Nonce: c.Nonce, Reason: c.Reason,
	}
}

func (w *wireTrustEvent) toClaims() (TrustEventClaims, error) {
	if err := checkWireVersion(w.Version, TEKeyVersion); err != nil {
		return TrustEventClaims{}, err
	}
	switch {
	case w.Weight == nil:
		return TrustEventClaims{}, missingClaim("weight", TEKeyWeight)
	case w.ObservedAt == nil:
		return TrustEventClaims{}, missingClaim("observed-at", TEKeyObservedAt)
	case *w.ObservedAt > maxMillis:
		return TrustEventClaims{}, fmt.Errorf("%w: observed-at out of range", ErrMalformed)
	}
	return TrustEventClaims{
		Version: *w.Version, TrustDomain: w.TrustDomain, Subject: w.Subject, Kind: w.Kind, Weight: *w.Weight,
		ObservedAt: time.UnixMilli(int64(*w.ObservedAt)), Zone: w.Zone, Observer: w.Observer,
		ObserverCert: w.ObserverCert, Nonce: w.Nonce, Reason: w.Reason,
	}, nil
}

type parsedTrustEvent struct {
	c            *TrustEventClaims
	subject      identity.ID
	observer     identity.ID
	observerCert *identity.Certificate
}

// check validates every claim's presence, shape and bounds without the anchor.
func (c *TrustEventClaims) check() (*parsedTrustEvent, error) {
	if c.Version != Version1 {
		return nil, fmt.Errorf("%w: %d (this node speaks %d)", ErrVersion, c.Version, Version1)
	}
	if err := identity.ValidateTrustDomain(c.TrustDomain); err != nil {
		return nil, fmt.Errorf("%w: trust domain (key %d): %w", ErrMalformed, TEKeyTrustDomain, err)
	}
	p := &parsedTrustEvent{c: c}
	var err error
	if p.subject, err = identity.ParseID(c.Subject); err != nil {
		return nil, fmt.Errorf("%w: subject: %w", ErrMalformed, err)
	}
	if p.subject.String() != c.Subject {
		return nil, fmt.Errorf("%w: subject %q is not in canonical form", ErrMalformed, truncate(c.Subject))
	}
	if p.subject.Kind != identity.KindNode && p.subject.Kind != identity.KindAgent {
		return nil, fmt.Errorf("%w: subject %s is neither a node nor an agent", ErrMalformed, p.subject)
	}
	if !validKind(c.Kind) {
		return nil, fmt.Errorf("%w: kind %q is not 1 to %d of a-z and _", ErrMalformed, truncate(c.Kind), maxKindLen)
	}
	if c.Weight < 1 || c.Weight > 100 {
		return nil, fmt.Errorf("%w: weight %d outside 1..100", ErrMalformed, c.Weight)
	}
	if ms := c.ObservedAt.UnixMilli(); ms <= 0 || ms > maxMillis {
		return nil, fmt.Errorf("%w: observed-at must lie between 1970 and year 287396", ErrMalformed)
	}
	if c.Zone == "" || len(c.Zone) > 63 {
		return nil, fmt.Errorf("%w: zone (key %d) must be 1 to 63 bytes", ErrMalformed, TEKeyZone)
	}
	if len(c.Nonce) != TrustNonceLen {
		return nil, fmt.Errorf("%w: nonce is %d bytes, want %d", ErrMalformed, len(c.Nonce), TrustNonceLen)
	}
	if err := checkTrustReason(c.Reason); err != nil {
		return nil, err
	}
	if p.observer, err = identity.ParseID(c.Observer); err != nil {
		return nil, fmt.Errorf("%w: observer (key %d): %w", ErrSigner, TEKeyObserver, err)
	}
	if p.observer.Kind != identity.KindNode {
		return nil, fmt.Errorf("%w: observer %s is not a node", ErrSigner, p.observer)
	}
	switch {
	case len(c.ObserverCert) == 0:
		return nil, fmt.Errorf("%w: a trust event must carry the observer's certificate (key %d)", ErrMalformed, TEKeyObserverCrt)
	case len(c.ObserverCert) > MaxCertLen:
		return nil, fmt.Errorf("%w: certificate of %d bytes, limit %d", ErrTooLarge, len(c.ObserverCert), MaxCertLen)
	}
	if p.observerCert, err = identity.ParseCertificate(c.ObserverCert); err != nil {
		return nil, fmt.Errorf("%w: observer certificate: %w", ErrSigner, err)
	}
	if p.observerCert.ID != p.observer {
		return nil, fmt.Errorf("%w: observer claim %s, certificate %s", ErrSigner, p.observer, p.observerCert.ID)
	}
	return p, nil
}

// observerMay refuses a zone the observer's certificate does not grant, and an agent of another
// zone than the event's: an observer reports only on subjects of its own zones.
func (p *parsedTrustEvent) observerMay() error {
	c := p.c
	if !slices.Contains(p.observerCert.Claims.ZoneNames(), c.Zone) {
		return fmt.Errorf("%w: %s reports in zone %q, which its certificate does not grant", ErrNotAllowed, p.observer, truncate(c.Zone))
	}
	if p.subject.Kind == identity.KindAgent && p.subject.Zone != c.Zone {
		return fmt.Errorf("%w: subject %s is outside zone %s of the report", ErrNotAllowed, p.subject, c.Zone)
	}
	return nil
}

func validKind(k string) bool {
	if k == "" || len(k) > maxKindLen {
		return false
	}
	for i := 0; i < len(k); i++ {
		if (k[i] < 'a' || k[i] > 'z') && k[i] != '_' {
			return false
		}
	}
	return true
}

func checkTrustReason(s string) error {
	switch {
	case len(s) > MaxTrustReasonLen:
		return fmt.Errorf("%w: the reason is %d bytes; the limit is %d", ErrTooLarge, len(s), MaxTrustReasonLen)
	case !utf8.ValidString(s):
		return fmt.Errorf("%w: the reason is not UTF-8 text", ErrMalformed)
	}
	for _, r := range s {
		if !unicode.IsPrint(r) {
			return fmt.Errorf("%w: the reason contains the control character %q", ErrMalformed, r)
		}
	}
	return nil
}

// FitTrustReason shortens s to a valid trust event reason: printable, at most MaxTrustReasonLen
// bytes, cut on a rune boundary.
func FitTrustReason(s string) string {
	s = string(bytes.Map(func(r rune) rune {
		if unicode.IsPrint(r) {
			return r
		}
		return ' '
	}, []byte(s)))
	if len(s) <= MaxTrustReasonLen {
		return s
	}
	n := MaxTrustReasonLen
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n]
}
