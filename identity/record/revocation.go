package record

import (
	"bytes"
	"crypto/ed25519"
	"fmt"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/ute-project/ute/identity"
)

// Version1 is the only claims format version this code understands; anything else is refused (I7).
const Version1 = 1

// Caps and defaults.
const (
	// MaxRevocationSize caps an encoded revocation record, checked before any decoding. The largest
	// legitimate record (a node revoking its agent: two certificates) is under 2 KiB.
	MaxRevocationSize = 8 << 10
	// MaxReasonLen caps the reason, in bytes (the authority's `ute revoke --reason` limit).
	MaxReasonLen = 256
	// MaxCertLen caps each certificate a record carries.
	MaxCertLen = 3072
	// DefaultSkew is how far in the future a record's issued-at may lie when MaxSkew is zero. It is
	// generous because refusing a revocation is the unsafe direction; the check only keeps a
	// signer's clock error from producing records that look issued later than they were.
	DefaultSkew = 5 * time.Minute
	// maxMillis bounds time claims to integers exactly representable in a float64.
	maxMillis = 1 << 53
)

// Revocation claim keys (docs/protocol.md, "Revocation records and policy releases").
const (
	RevKeyVersion     = 1
	RevKeyTrustDomain = 2
	RevKeySubject     = 3
	RevKeyReason      = 4
	RevKeyIssuedAt    = 5
	RevKeyExpires     = 6
	RevKeySigner      = 7
	RevKeySeq         = 8
	RevKeySignerCert  = 9
	RevKeyAgentCert   = 10
	RevKeyIssuerCert  = 11
)

// RevocationClaims is the content of a revocation record.
//
// Who may sign what (enforced by Verifier.VerifyRevocation):
//   - the authority (Signer = identity.AuthorityID(td).String(), Seq >= 1, no certificates): any
//     subject of its trust domain, with Expires no later than the authority certificate's NotAfter;
//   - a node (Signer = its node SPIFFE ID, Seq = 0, SignerCert = its node certificate DER): itself
//     (Subject = Signer, no AgentCert, Expires = SignerCert's NotAfter), or one agent certificate it
//     issued (Subject = the agent's SPIFFE ID, AgentCert = that certificate's DER, IssuerCert = the
//     issuing certificate that goes with SignerCert and signed AgentCert, Expires = AgentCert's
//     NotAfter). The latter revokes that certificate only (IssuedSerialKey), not the agent's name.
type RevocationClaims struct {
	// Version is the claims format version; zero is filled in by SignRevocation.
	Version     uint64
	TrustDomain string
	// Subject is a canonical subject (see CanonicalSubject): node ID, agent ID or "serial:<N>".
	Subject string
	// Reason is one line of printable UTF-8 text, 1 to MaxReasonLen bytes.
	Reason string
	// IssuedAt and Expires travel with millisecond precision. After Expires every certificate the
	// record covers has expired, so a holder may drop the record; the signer computes it.
	IssuedAt time.Time
	Expires  time.Time
	// Signer is the SPIFFE ID of the signer: the authority's or a node's.
	Signer string
	// Seq is the authority's monotonic revocation sequence number (from 1); 0 for node-signed.
	Seq uint64
	// SignerCert is the signing node's certificate DER (node-signed only), so that any member can
	// verify the record without a lookup.
	SignerCert []byte
	// AgentCert is the revoked agent certificate's DER, for a node revoking one of its agents.
	AgentCert []byte
	// IssuerCert is, with AgentCert, the node's issuing certificate DER that signed it: the one
	// issued with SignerCert (its claims name SignerCert's serial).
	IssuerCert []byte
}

// wireRevocation is the CBOR shape. Pointers keep "absent" and "zero" apart on decode, so an
// absent required claim is refused rather than read as zero (I7).
type wireRevocation struct {
	Version     *uint64 `cbor:"1,keyasint,omitempty"`
	TrustDomain string  `cbor:"2,keyasint,omitempty"`
	Subject     string  `cbor:"3,keyasint,omitempty"`
	Reason      string  `cbor:"4,keyasint,omitempty"`
	IssuedAt    *uint64 `cbor:"5,keyasint,omitempty"`
	Expires     *uint64 `cbor:"6,keyasint,omitempty"`
	Signer      string  `cbor:"7,keyasint,omitempty"`
	Seq         *uint64 `cbor:"8,keyasint,omitempty"`
	SignerCert  []byte  `cbor:"9,keyasint,omitempty"`
	AgentCert   []byte  `cbor:"10,keyasint,omitempty"`
	IssuerCert  []byte  `cbor:"11,keyasint,omitempty"`
}

// Revocation is a verified revocation record. Only Verifier.VerifyRevocation (and
// ReverifyRevocation) produce one; its fields must not be modified.
type Revocation struct {
	Claims RevocationClaims
	// SignerID is the parsed signer: the authority, or a node.
	SignerID identity.ID
	// SignerCert is the signing node's verified certificate; nil for the authority.
	SignerCert *identity.Certificate
	// AgentCert is the revoked agent certificate, verified as issued by SignerCert's node through
	// IssuerCert, its issuing certificate; both nil otherwise.
	AgentCert  *identity.Certificate
	IssuerCert *identity.Certificate

	raw []byte
	key string
}

// Raw returns the record exactly as received (the bytes to store and gossip).
func (r *Revocation) Raw() []byte { return r.raw }

// Key is the record's canonical identity, for dedupe: derived from what it revokes, never from the
// signature, so the same revocation signed twice (or by the authority and by the node itself) is
// one entry (I5). It is the subject for authority-signed and self-revoking records, and
// IssuedSerialKey(node, agent serial) for a node revoking one of its agent certificates.
func (r *Revocation) Key() string { return r.key }

// Keys lists the canonical keys the record revokes; a certificate chain is revoked when one of
// ChainKeys(node, agent) is among them. Today it is exactly Key().
func (r *Revocation) Keys() []string { return []string{r.key} }

// ByAuthority reports whether the authority signed the record (it then carries a Seq >= 1).
func (r *Revocation) ByAuthority() bool { return r.SignerID.Kind == identity.KindAuthority }

// NodeRevocation returns the claims of a node revoking itself at now: subject and signer are the
// node's ID, Expires its certificate's NotAfter. Sign them with the node key.
func NodeRevocation(node *identity.Certificate, reason string, now time.Time) RevocationClaims {
	return RevocationClaims{
		Version: Version1, TrustDomain: node.ID.TrustDomain, Subject: node.ID.String(), Reason: reason,
		IssuedAt: now, Expires: node.X509.NotAfter, Signer: node.ID.String(), SignerCert: node.Raw(),
	}
}

// AgentRevocation returns the claims of node revoking the agent certificate it issued with its
// issuing certificate issuer, at now. Expires is the agent certificate's NotAfter. Sign them with
// the node key.
func AgentRevocation(node, issuer, agent *identity.Certificate, reason string, now time.Time) RevocationClaims {
	return RevocationClaims{
		Version: Version1, TrustDomain: node.ID.TrustDomain, Subject: agent.ID.String(), Reason: reason,
		IssuedAt: now, Expires: agent.X509.NotAfter, Signer: node.ID.String(),
		SignerCert: node.Raw(), AgentCert: agent.Raw(), IssuerCert: issuer.Raw(),
	}
}

// SignRevocation validates c, encodes it deterministically and signs it as a tagged COSE_Sign1
// with key (the authority's key, or the node key of c.SignerCert). It refuses what its own
// verification would refuse for reasons it can see without the trust anchor: bad shapes, a node
// key that is not SignerCert's, a node revoking anything but itself or an agent certificate it
// names as issuer, an Expires other than the covered certificate's. A zero Version is set to
// Version1.
func SignRevocation(c RevocationClaims, key ed25519.PrivateKey) ([]byte, error) {
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
	if p.signer.Kind == identity.KindNode {
		if !bytes.Equal(key.Public().(ed25519.PublicKey), p.signerCert.PublicKey()) {
			return nil, fmt.Errorf("%w: the signing key is not the key of %s's certificate", ErrSigner, p.signer)
		}
		if err := p.nodeMay(nil); err != nil {
			return nil, err
		}
	}
	return seal("revocation", c.toWire(), key, aadRevocation, MaxRevocationSize)
}

func (c *RevocationClaims) toWire() *wireRevocation {
	return &wireRevocation{
		Version:     u64(c.Version),
		TrustDomain: c.TrustDomain,
		Subject:     c.Subject,
		Reason:      c.Reason,
		IssuedAt:    u64(uint64(c.IssuedAt.UnixMilli())),
		Expires:     u64(uint64(c.Expires.UnixMilli())),
		Signer:      c.Signer,
		Seq:         u64(c.Seq),
		SignerCert:  c.SignerCert,
		AgentCert:   c.AgentCert,
		IssuerCert:  c.IssuerCert,
	}
}

func (w *wireRevocation) toClaims() (RevocationClaims, error) {
	if err := checkWireVersion(w.Version, RevKeyVersion); err != nil {
		return RevocationClaims{}, err
	}
	switch {
	case w.IssuedAt == nil:
		return RevocationClaims{}, missingClaim("issued-at", RevKeyIssuedAt)
	case w.Expires == nil:
		return RevocationClaims{}, missingClaim("expires", RevKeyExpires)
	case w.Seq == nil:
		return RevocationClaims{}, missingClaim("seq", RevKeySeq)
	case *w.IssuedAt > maxMillis || *w.Expires > maxMillis:
		return RevocationClaims{}, fmt.Errorf("%w: issued-at or expires out of range", ErrMalformed)
	}
	return RevocationClaims{
		Version:     *w.Version,
		TrustDomain: w.TrustDomain,
		Subject:     w.Subject,
		Reason:      w.Reason,
		IssuedAt:    time.UnixMilli(int64(*w.IssuedAt)),
		Expires:     time.UnixMilli(int64(*w.Expires)),
		Signer:      w.Signer,
		Seq:         *w.Seq,
		SignerCert:  w.SignerCert,
		AgentCert:   w.AgentCert,
		IssuerCert:  w.IssuerCert,
	}, nil
}

// parsedRevocation is what check learned from the claims alone (no anchor, no signature).
type parsedRevocation struct {
	c          *RevocationClaims
	subject    identity.ID // zero for a serial subject
	signer     identity.ID
	signerCert *identity.Certificate // node-signed only
	agentCert  *identity.Certificate // node revoking an agent only
	issuerCert *identity.Certificate // node revoking an agent only
}

// check validates every claim's presence, shape and bounds, and the claim combinations each
// signer kind must carry. It is shared by the signer and the verifier, so that nothing is signed
// that verification would refuse for its shape.
func (c *RevocationClaims) check() (*parsedRevocation, error) {
	if c.Version != Version1 {
		return nil, fmt.Errorf("%w: %d (this node speaks %d)", ErrVersion, c.Version, Version1)
	}
	if err := identity.ValidateTrustDomain(c.TrustDomain); err != nil {
		return nil, fmt.Errorf("%w: trust domain (key %d): %w", ErrMalformed, RevKeyTrustDomain, err)
	}
	p := &parsedRevocation{c: c}
	subj, err := CanonicalSubject(c.Subject)
	if err != nil {
		return nil, err
	}
	if subj != c.Subject {
		return nil, fmt.Errorf("%w: subject %q is not in canonical form %q", ErrMalformed, truncate(c.Subject), subj)
	}
	if !strings.HasPrefix(subj, SerialPrefix) {
		p.subject, _ = identity.ParseID(subj) // CanonicalSubject parsed it already
	}
	if err := CheckReason(c.Reason); err != nil {
		return nil, err
	}
	iat, exp := c.IssuedAt.UnixMilli(), c.Expires.UnixMilli()
	switch {
	case iat <= 0 || iat > maxMillis || exp <= 0 || exp > maxMillis:
		return nil, fmt.Errorf("%w: issued-at and expires must lie between 1970 and year 287396", ErrMalformed)
	case exp <= iat:
		return nil, fmt.Errorf("%w: expires %s is not after issued-at %s", ErrMalformed, fmtTime(c.Expires), fmtTime(c.IssuedAt))
	}
	if p.signer, err = identity.ParseID(c.Signer); err != nil {
		return nil, fmt.Errorf("%w: signer (key %d): %w", ErrSigner, RevKeySigner, err)
	}
	for _, der := range [][]byte{c.SignerCert, c.AgentCert, c.IssuerCert} {
		if len(der) > MaxCertLen {
			return nil, fmt.Errorf("%w: certificate of %d bytes, limit %d", ErrTooLarge, len(der), MaxCertLen)
		}
	}
	switch p.signer.Kind {
	case identity.KindAuthority:
		switch {
		case c.Seq == 0:
			return nil, fmt.Errorf("%w: an authority-signed revocation needs seq >= 1", ErrMalformed)
		case c.SignerCert != nil || c.AgentCert != nil || c.IssuerCert != nil:
			return nil, fmt.Errorf("%w: an authority-signed revocation carries no certificates", ErrMalformed)
		}
	case identity.KindNode:
		switch {
		case c.Seq != 0:
			return nil, fmt.Errorf("%w: a node-signed revocation has seq 0, not %d", ErrMalformed, c.Seq)
		case c.SignerCert == nil:
			return nil, fmt.Errorf("%w: a node-signed revocation must carry the node certificate (key %d)", ErrMalformed, RevKeySignerCert)
		}
		if p.signerCert, err = identity.ParseCertificate(c.SignerCert); err != nil {
			return nil, fmt.Errorf("%w: signer certificate: %w", ErrSigner, err)
		}
		if p.signerCert.ID != p.signer {
			return nil, fmt.Errorf("%w: signer claim %s, certificate %s", ErrSigner, p.signer, p.signerCert.ID)
		}
		if p.signerCert.Issuing {
			return nil, fmt.Errorf("%w: signer certificate is %s's issuing certificate, which signs nothing but certificates", ErrSigner, p.signer)
		}
		switch {
		case c.AgentCert != nil && c.IssuerCert == nil:
			return nil, fmt.Errorf("%w: a node revoking an agent certificate must carry its issuing certificate (key %d)", ErrMalformed, RevKeyIssuerCert)
		case c.AgentCert == nil && c.IssuerCert != nil:
			return nil, fmt.Errorf("%w: an issuing certificate (key %d) without an agent certificate", ErrMalformed, RevKeyIssuerCert)
		}
		if c.AgentCert != nil {
			if p.agentCert, err = identity.ParseCertificate(c.AgentCert); err != nil {
				return nil, fmt.Errorf("%w: agent certificate: %w", ErrNotAllowed, err)
			}
			if p.issuerCert, err = identity.ParseCertificate(c.IssuerCert); err != nil {
				return nil, fmt.Errorf("%w: issuing certificate: %w", ErrNotAllowed, err)
			}
			if !p.issuerCert.Issuing || p.issuerCert.ID != p.signer || p.issuerCert.NodeSerial().Cmp(p.signerCert.Serial()) != 0 {
				return nil, fmt.Errorf("%w: the issuing certificate carried is not the one issued with %s's certificate serial %s", ErrNotAllowed, p.signer, p.signerCert.Serial())
			}
		}
	default:
		return nil, fmt.Errorf("%w: signer %s is neither the authority nor a node", ErrSigner, p.signer)
	}
	return p, nil
}

// nodeMay checks what a node may revoke, given its (verified, when v is set) certificate: itself
// until its certificate's expiry, or one agent certificate it issued until that certificate's
// expiry. With v set, the agent certificate must verify as issued by the signer at issued-at.
func (p *parsedRevocation) nodeMay(v *identity.Verifier) error {
	c, node := p.c, p.signerCert
	if p.agentCert == nil {
		if c.Subject != node.ID.String() {
			return fmt.Errorf("%w: node %s may revoke only itself and the agent certificates it issued, not %s", ErrNotAllowed, node.ID, truncate(c.Subject))
		}
		if !c.Expires.Equal(node.X509.NotAfter) {
			return fmt.Errorf("%w: a node revoking itself expires with its certificate at %s, not %s", ErrNotAllowed, fmtTime(node.X509.NotAfter), fmtTime(c.Expires))
		}
		return nil
	}
	agent := p.agentCert
	if agent.ID.Kind != identity.KindAgent || c.Subject != agent.ID.String() {
		return fmt.Errorf("%w: subject %s is not the carried agent certificate's %s", ErrNotAllowed, truncate(c.Subject), agent.ID)
	}
	if v != nil {
		if err := v.VerifyAgent(p.issuerCert, agent, c.IssuedAt); err != nil {
			return fmt.Errorf("%w: the agent certificate was not issued by %s: %w", ErrNotAllowed, node.ID, err)
		}
	} else if !bytes.Equal(agent.X509.RawIssuer, p.issuerCert.X509.RawSubject) {
		return fmt.Errorf("%w: the agent certificate names another issuer than %s's issuing certificate", ErrNotAllowed, node.ID)
	}
	if agent.Serial().Sign() <= 0 {
		return fmt.Errorf("%w: the agent certificate's serial is not positive", ErrNotAllowed)
	}
	if !c.Expires.Equal(agent.X509.NotAfter) {
		return fmt.Errorf("%w: revoking an agent certificate expires with it at %s, not %s", ErrNotAllowed, fmtTime(agent.X509.NotAfter), fmtTime(c.Expires))
	}
	return nil
}

// CheckReason validates a revocation reason: required, one line of printable UTF-8 text, at most
// MaxReasonLen bytes (it is stored and shown in one-line audit output). Errors wrap ErrMalformed,
// or ErrTooLarge for length.
func CheckReason(reason string) error {
	switch {
	case strings.TrimSpace(reason) == "":
		return fmt.Errorf("%w: the reason is empty", ErrMalformed)
	case len(reason) > MaxReasonLen:
		return fmt.Errorf("%w: the reason is %d bytes; the limit is %d", ErrTooLarge, len(reason), MaxReasonLen)
	case !utf8.ValidString(reason):
		return fmt.Errorf("%w: the reason is not UTF-8 text", ErrMalformed)
	}
	for _, r := range reason {
		if !unicode.IsPrint(r) {
			return fmt.Errorf("%w: the reason contains the control character %q", ErrMalformed, r)
		}
	}
	return nil
}

func fmtTime(t time.Time) string { return t.UTC().Format("2006-01-02T15:04:05.000Z07:00") }
