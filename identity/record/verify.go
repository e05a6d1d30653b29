package record

import (
	"fmt"
	"time"

	"github.com/ute-project/ute/identity"
)

// Verifier verifies records against one trust anchor. It is a value; copies share nothing mutable
// but Certs' optional signature cache, which locks itself, so it is safe for concurrent use.
type Verifier struct {
	// Certs holds the trust anchor (the authority certificate) and verifies node and agent
	// certificates carried by node-signed records.
	Certs identity.Verifier
	// MaxSkew is how far in the future issued-at may lie; DefaultSkew when zero.
	MaxSkew time.Duration
}

func (v Verifier) skew() time.Duration {
	if v.MaxSkew > 0 {
		return v.MaxSkew
	}
	return DefaultSkew
}

// VerifyRevocation parses and verifies a received revocation record at now. In order: size cap
// (ErrTooLarge); COSE_Sign1 profile and strict deterministic claims (ErrMalformed, ErrHeader,
// ErrUnknownField, ErrVersion); trust domain of record, subject and signer (ErrTrustDomain);
// issued-at no later than now + MaxSkew (ErrFuture); now not after expires (ErrExpired); the
// signer: the anchor, or a node certificate verifying up to the anchor at issued-at (ErrSigner);
// the signature over the exact received bytes (ErrSignature); and what the signer may revoke
// (ErrNotAllowed, see RevocationClaims).
func (v Verifier) VerifyRevocation(raw []byte, now time.Time) (*Revocation, error) {
	return v.verifyRevocation(raw, now, true)
}

// ReverifyRevocation verifies a record that was accepted earlier, such as one a store reloads:
// every check of VerifyRevocation except ErrFuture, because the local clock may have been set
// back since the record arrived, and losing a revocation to that is the unsafe direction.
func (v Verifier) ReverifyRevocation(raw []byte, now time.Time) (*Revocation, error) {
	return v.verifyRevocation(raw, now, false)
}

func (v Verifier) verifyRevocation(b []byte, now time.Time, future bool) (*Revocation, error) {
	var w wireRevocation
	raw, msg, err := open("revocation", b, MaxRevocationSize, &w)
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
		return nil, fmt.Errorf("%w: record for %q, this anchor is %q", ErrTrustDomain, c.TrustDomain, td)
	case p.signer.TrustDomain != td:
		return nil, fmt.Errorf("%w: signer %s, this anchor is %q", ErrTrustDomain, p.signer, td)
	case !p.subject.IsZero() && p.subject.TrustDomain != td:
		return nil, fmt.Errorf("%w: subject %s, this anchor is %q", ErrTrustDomain, p.subject, td)
	}
	if future && c.IssuedAt.After(now.Add(v.skew())) {
		return nil, fmt.Errorf("%w: issued at %s, now is %s; check the clocks", ErrFuture, fmtTime(c.IssuedAt), fmtTime(now))
	}
	if now.After(c.Expires) {
		return nil, fmt.Errorf("%w: at %s every certificate it covers had expired", ErrExpired, fmtTime(c.Expires))
	}
	r := &Revocation{Claims: c, SignerID: p.signer, raw: raw}
	switch p.signer.Kind {
	case identity.KindAuthority:
		if err := checkAnchorAt(anchor, c.IssuedAt); err != nil {
			return nil, err
		}
		if err := verifySig(msg, anchor.PublicKey(), aadRevocation, "authority"); err != nil {
			return nil, err
		}
		if c.Expires.After(anchor.X509.NotAfter) {
			return nil, fmt.Errorf("%w: expires %s is after the authority certificate's own expiry %s, beyond anything it issued",
				ErrNotAllowed, fmtTime(c.Expires), fmtTime(anchor.X509.NotAfter))
		}
		r.key = c.Subject
	default: // identity.KindNode; check refused every other kind
		if err := v.Certs.VerifyNode(p.signerCert, c.IssuedAt); err != nil {
			return nil, fmt.Errorf("%w: node certificate at issued-at %s: %w", ErrSigner, fmtTime(c.IssuedAt), err)
		}
		if err := verifySig(msg, p.signerCert.PublicKey(), aadRevocation, p.signer.String()); err != nil {
			return nil, err
		}
		if err := p.nodeMay(&v.Certs); err != nil {
			return nil, err
		}
		r.SignerCert, r.AgentCert, r.IssuerCert = p.signerCert, p.agentCert, p.issuerCert
		r.key = c.Subject
		if p.agentCert != nil {
			r.key = IssuedSerialKey(p.signer, p.agentCert.Serial())
		}
	}
	return r, nil
}

func (v Verifier) anchor() (*identity.Certificate, error) {
	a := v.Certs.Authority
	if a == nil || a.X509 == nil || a.ID.Kind != identity.KindAuthority {
		return nil, fmt.Errorf("%w: the verifier has no authority certificate", ErrSigner)
	}
	return a, nil
}

// checkAnchorAt refuses an authority record issued outside the anchor's validity.
func checkAnchorAt(a *identity.Certificate, at time.Time) error {
	if at.Before(a.X509.NotBefore) || at.After(a.X509.NotAfter) {
		return fmt.Errorf("%w: issued at %s, outside the authority certificate's validity %s..%s",
			ErrSigner, fmtTime(at), fmtTime(a.X509.NotBefore), fmtTime(a.X509.NotAfter))
	}
	return nil
}
