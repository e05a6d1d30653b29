package identity

import (
	"crypto/ed25519"
	"crypto/x509"
	"errors"
	"fmt"
	"slices"
	"time"
)

// Verification sentinels. A failed verification returns a *VerifyError whose Err is one of these,
// so callers test with errors.Is(err, identity.ErrZoneConstraint) and read the check and subject
// from the VerifyError. ErrSPIFFEID and ErrClaims are declared beside the parsers that produce them.
var (
	ErrSignature            = errors.New("signature does not verify against the issuer")
	ErrExpired              = errors.New("certificate has expired")
	ErrNotYetValid          = errors.New("certificate is not yet valid")
	ErrTrustDomain          = errors.New("trust domain differs from the authority's")
	ErrNotCA                = errors.New("issuer is not an issuing certificate (a CA limited to path length 0)")
	ErrLeafIsCA             = errors.New("leaf certificate is marked as a CA")
	ErrKeyUsage             = errors.New("key usage does not match the certificate's role")
	ErrZoneConstraint       = errors.New("zone is not granted to the issuing node")
	ErrCIDRConstraint       = errors.New("overlay address is outside the issuing node's zone CIDRs")
	ErrLifetime             = errors.New("validity extends beyond the issuer's")
	ErrKeyAlgorithm         = errors.New("key or signature algorithm is not Ed25519")
	ErrMalformedCertificate = errors.New("malformed certificate")
	ErrNoTrustAnchor        = errors.New("no usable trust anchor")
	ErrKeyMismatch          = errors.New("private key does not match the certificate")
)

// Check names the verification step that failed. The values are stable strings fit for logs,
// metrics labels and JSON.
type Check string

// Checks in the order Verifier runs them for each certificate of a chain.
const (
	CheckAnchor           Check = "trust-anchor"
	CheckParse            Check = "parse"
	CheckSPIFFEID         Check = "spiffe-id"
	CheckTrustDomain      Check = "trust-domain"
	CheckSignature        Check = "signature"
	CheckValidity         Check = "validity"
	CheckBasicConstraints Check = "basic-constraints"
	CheckKeyUsage         Check = "key-usage"
	CheckClaims           Check = "claims"
	CheckLifetime         Check = "lifetime"
	CheckZone             Check = "zone"
	CheckCIDR             Check = "cidr"
)

// VerifyError reports which check failed for which certificate. Err is a sentinel; Detail says
// what exactly was wrong.
type VerifyError struct {
	Check   Check
	Subject string // SPIFFE ID of the certificate that failed, or "node"/"agent" when unparsable
	Err     error
	Detail  string
}

func (e *VerifyError) Error() string {
	msg := e.Subject + ": " + string(e.Check) + ": " + e.Err.Error()
	if e.Detail != "" {
		msg += ": " + e.Detail
	}
	return msg
}

func (e *VerifyError) Unwrap() error { return e.Err }

func verr(check Check, subject string, err error, format string, args ...any) *VerifyError {
	return &VerifyError{Check: check, Subject: subject, Err: err, Detail: fmt.Sprintf(format, args...)}
}

// Chain is a verified (or to-be-verified) path authority → node, or authority → node's issuing
// certificate → agent. With an Agent, Node is the issuing certificate (Node.Issuing), whose ID is
// the node's.
type Chain struct {
	Authority, Node, Agent *Certificate // Agent is nil for a node on its own
}

// role is what a certificate must be at its place in a chain.
type role uint8

const (
	roleNode   role = iota + 1 // a node certificate: a TLS leaf
	roleIssuer                 // a node's issuing certificate: a CA for its agents, never a leaf
	roleAgent                  // an agent certificate: a leaf
)

// Verifier checks certificates against one trust anchor, the authority certificate. The trust
// domain is the authority's. A Verifier is safe for concurrent use; its only mutable state is the
// optional signature cache, which locks itself.
type Verifier struct {
	Authority *Certificate
	// Cache, if set, remembers verified signatures (shared by copies of the Verifier).
	Cache *SignatureCache
}

// TrustDomain returns the trust anchor's trust domain, or "" without an anchor.
func (v Verifier) TrustDomain() string {
	if v.Authority == nil {
		return ""
	}
	return v.Authority.ID.TrustDomain
}

func (v Verifier) checkAnchor(now time.Time) error {
	a := v.Authority
	if a == nil || a.X509 == nil {
		return verr(CheckAnchor, "authority", ErrNoTrustAnchor, "the verifier has no authority certificate")
	}
	if a.ID.Kind != KindAuthority {
		return verr(CheckAnchor, a.ID.String(), ErrNoTrustAnchor, "trust anchor is a %s, not an authority", a.ID.Kind)
	}
	if a.Issuing || !a.X509.BasicConstraintsValid || !a.X509.IsCA {
		return verr(CheckAnchor, a.ID.String(), ErrNotCA, "the authority certificate is not a CA")
	}
	return checkTime(a, now)
}

// VerifyNode checks a node certificate against the authority at time now. A node certificate is
// a leaf: a node's issuing certificate presented in its place is refused (ErrLeafIsCA).
func (v Verifier) VerifyNode(node *Certificate, now time.Time) error {
	if err := v.checkAnchor(now); err != nil {
		return err
	}
	return verifyLink(v.Authority, node, roleNode, now, v.Cache)
}

// VerifyIssuer checks a node's issuing certificate against the authority at time now.
func (v Verifier) VerifyIssuer(issuer *Certificate, now time.Time) error {
	if err := v.checkAnchor(now); err != nil {
		return err
	}
	return verifyLink(v.Authority, issuer, roleIssuer, now, v.Cache)
}

// VerifyAgent checks the whole chain authority → node's issuing certificate → agent at time now,
// including the zone and CIDR constraints the issuing certificate puts on the agent. issuer must
// be the node's issuing certificate: a node certificate issues nothing (ErrNotCA).
func (v Verifier) VerifyAgent(issuer, agent *Certificate, now time.Time) error {
	if err := v.VerifyIssuer(issuer, now); err != nil {
		return err
	}
	return verifyLink(issuer, agent, roleAgent, now, v.Cache)
}

// VerifyChain verifies c against v: c.Node always, c.Agent when present. c.Authority, if set, must
// be the verifier's own anchor (same DER).
func (v Verifier) VerifyChain(c Chain, now time.Time) error {
	if c.Authority != nil && (v.Authority == nil || !slices.Equal(c.Authority.Raw(), v.Authority.Raw())) {
		return verr(CheckAnchor, c.Authority.ID.String(), ErrSignature, "the chain names a different authority certificate")
	}
	if c.Agent == nil {
		return v.VerifyNode(c.Node, now)
	}
	return v.VerifyAgent(c.Node, c.Agent, now)
}

// VerifyNodeDER parses and verifies a peer's TLS certificate list as a node: der[0] must be the node
// certificate; anything after it is ignored, because the only anchor is the verifier's own
// authority. Meant for tls.Config.VerifyConnection.
func (v Verifier) VerifyNodeDER(der [][]byte, now time.Time) (*Certificate, error) {
	if len(der) == 0 {
		return nil, verr(CheckParse, "node", ErrMalformedCertificate, "the peer presented no certificate")
	}
	node, err := parseFor(der[0], "node")
	if err != nil {
		return nil, err
	}
	if err := v.VerifyNode(node, now); err != nil {
		return nil, err
	}
	return node, nil
}

// VerifyAgentDER parses and verifies a node's issuing certificate and an agent certificate as one
// chain; the returned Chain's Node is the issuing certificate.
func (v Verifier) VerifyAgentDER(issuerDER, agentDER []byte, now time.Time) (*Chain, error) {
	node, err := parseFor(issuerDER, "issuer")
	if err != nil {
		return nil, err
	}
	agent, err := parseFor(agentDER, "agent")
	if err != nil {
		return nil, err
	}
	if err := v.VerifyAgent(node, agent, now); err != nil {
		return nil, err
	}
	return &Chain{Authority: v.Authority, Node: node, Agent: agent}, nil
}

// parseFor parses der and turns a parse failure into a *VerifyError keeping the parser's sentinel.
func parseFor(der []byte, role string) (*Certificate, error) {
	c, err := ParseCertificate(der)
	if err == nil {
		return c, nil
	}
	sentinel := ErrMalformedCertificate
	for _, s := range []error{ErrSPIFFEID, ErrClaims, ErrKeyAlgorithm} {
		if errors.Is(err, s) {
			sentinel = s
			break
		}
	}
	return nil, &VerifyError{Check: CheckParse, Subject: role, Err: sentinel, Detail: err.Error()}
}

// verifyLink checks child, issued by parent, as a certificate of the given role at time now.
func verifyLink(parent, child *Certificate, r role, now time.Time, cache *SignatureCache) error {
	if child == nil || child.X509 == nil {
		return verr(CheckParse, r.String(), ErrMalformedCertificate, "no %s certificate given", r)
	}
	if r == roleAgent && !parent.Issuing {
		return verr(CheckBasicConstraints, child.ID.String(), ErrNotCA,
			"issued by %s, which is not a node's issuing certificate; agents are issued only by their node's issuing certificate", parent.ID)
	}
	if err := checkProfile(child, r, parent.ID.TrustDomain); err != nil {
		return err
	}
	if err := checkSignature(parent, child, cache); err != nil {
		return err
	}
	if err := checkTime(child, now); err != nil {
		return err
	}
	return checkConstraints(parent, child)
}

func (r role) String() string {
	switch r {
	case roleNode:
		return "node"
	case roleIssuer:
		return "issuer"
	case roleAgent:
		return "agent"
	default:
		return "certificate"
	}
}

// checkProfile checks what a certificate must be on its own for its role: ID kind and trust domain,
// basic constraints, key usage, key algorithm and per-kind claims. Issue runs it on the template
// before signing, so nothing is signed that verification would refuse. Leaves (node, agent) follow
// the X509-SVID leaf rules: not a CA, digitalSignature, neither keyCertSign nor cRLSign, client and
// server authentication. An issuing certificate follows the signing-certificate rules: a CA of
// path length 0 with keyCertSign, and nothing a leaf would need.
func checkProfile(c *Certificate, r role, td string) error {
	subj := c.ID.String()
	if err := c.ID.Validate(); err != nil {
		return verr(CheckSPIFFEID, subj, ErrSPIFFEID, "%v", err)
	}
	kind := KindAgent
	if r != roleAgent {
		kind = KindNode
	}
	if c.ID.Kind != kind {
		return verr(CheckSPIFFEID, subj, ErrSPIFFEID, "this is a %s ID where a %s ID is required", c.ID.Kind, kind)
	}
	if c.ID.TrustDomain != td {
		return verr(CheckTrustDomain, subj, ErrTrustDomain, "certificate is for %q, the authority for %q", c.ID.TrustDomain, td)
	}
	if _, ok := c.X509.PublicKey.(ed25519.PublicKey); !ok {
		return verr(CheckSignature, subj, ErrKeyAlgorithm, "public key is %T", c.X509.PublicKey)
	}
	x := c.X509
	if r == roleIssuer {
		if !c.Issuing {
			return verr(CheckBasicConstraints, subj, ErrNotCA, "a node certificate where the node's issuing certificate is required")
		}
		if !x.BasicConstraintsValid || !x.IsCA || x.MaxPathLen != 0 || !x.MaxPathLenZero {
			return verr(CheckBasicConstraints, subj, ErrNotCA, "want CA with path length 0, have CA=%t pathlen=%d", x.IsCA, x.MaxPathLen)
		}
		if x.KeyUsage != x509.KeyUsageCertSign {
			return verr(CheckKeyUsage, subj, ErrKeyUsage, "an issuing certificate has key usage keyCertSign only, has %#x", x.KeyUsage)
		}
		if len(x.ExtKeyUsage) != 0 || len(x.UnknownExtKeyUsage) != 0 {
			return verr(CheckKeyUsage, subj, ErrKeyUsage, "an issuing certificate carries no extended key usage")
		}
		if err := c.Claims.ValidateIssuer(c.ID); err != nil {
			return verr(CheckClaims, subj, ErrClaims, "%v", err)
		}
		return nil
	}
	if c.Issuing {
		return verr(CheckBasicConstraints, subj, ErrLeafIsCA, "the node's issuing certificate is a CA and is never a leaf; present the node certificate")
	}
	if x.IsCA {
		return verr(CheckBasicConstraints, subj, ErrLeafIsCA, "a %s certificate must be a leaf", r)
	}
	if x.KeyUsage&(x509.KeyUsageCertSign|x509.KeyUsageCRLSign) != 0 {
		return verr(CheckKeyUsage, subj, ErrKeyUsage, "a %s certificate must not sign certificates or CRLs", r)
	}
	if x.KeyUsage&x509.KeyUsageDigitalSignature == 0 {
		return verr(CheckKeyUsage, subj, ErrKeyUsage, "key usage lacks digital signature")
	}
	if !slices.Contains(x.ExtKeyUsage, x509.ExtKeyUsageClientAuth) || !slices.Contains(x.ExtKeyUsage, x509.ExtKeyUsageServerAuth) {
		return verr(CheckKeyUsage, subj, ErrKeyUsage, "extended key usage must include client and server authentication")
	}
	if err := c.Claims.ValidateFor(c.ID); err != nil {
		return verr(CheckClaims, subj, ErrClaims, "%v", err)
	}
	return nil
}

func checkSignature(parent, child *Certificate, cache *SignatureCache) error {
	subj := child.ID.String()
	pub, ok := parent.X509.PublicKey.(ed25519.PublicKey)
	if !ok || child.X509.SignatureAlgorithm != x509.PureEd25519 {
		return verr(CheckSignature, subj, ErrKeyAlgorithm, "issuer key %T, signature algorithm %v", parent.X509.PublicKey, child.X509.SignatureAlgorithm)
	}
	var key [32]byte
	if cache != nil {
		key = sigKey(pub, child.X509.RawTBSCertificate, child.X509.Signature)
		if cache.has(key) {
			return nil
		}
	}
	if !ed25519.Verify(pub, child.X509.RawTBSCertificate, child.X509.Signature) {
		return verr(CheckSignature, subj, ErrSignature, "not signed by %s (key %s)", parent.ID, KeyHash(pub))
	}
	cache.add(key)
	return nil
}

func checkTime(c *Certificate, now time.Time) error {
	subj := c.ID.String()
	if now.Before(c.X509.NotBefore) {
		return verr(CheckValidity, subj, ErrNotYetValid, "valid from %s, now is %s; check the clocks",
			c.X509.NotBefore.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339))
	}
	if now.After(c.X509.NotAfter) {
		return verr(CheckValidity, subj, ErrExpired, "expired at %s, now is %s",
			c.X509.NotAfter.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339))
	}
	return nil
}

// checkConstraints checks what the issuer allows its child: a validity window inside the issuer's,
// and for an agent, a zone the node holds and overlay IPs inside that zone's CIDRs.
func checkConstraints(parent, child *Certificate) error {
	subj := child.ID.String()
	p, c := parent.X509, child.X509
	if !c.NotBefore.Before(c.NotAfter) {
		return verr(CheckLifetime, subj, ErrLifetime, "NotBefore %s is not before NotAfter %s",
			c.NotBefore.UTC().Format(time.RFC3339), c.NotAfter.UTC().Format(time.RFC3339))
	}
	if c.NotBefore.Before(p.NotBefore) || c.NotAfter.After(p.NotAfter) {
		return verr(CheckLifetime, subj, ErrLifetime, "valid %s..%s but issuer %s only %s..%s",
			c.NotBefore.UTC().Format(time.RFC3339), c.NotAfter.UTC().Format(time.RFC3339), parent.ID,
			p.NotBefore.UTC().Format(time.RFC3339), p.NotAfter.UTC().Format(time.RFC3339))
	}
	if child.ID.Kind != KindAgent {
		return nil
	}
	if !parent.Issuing {
		return verr(CheckBasicConstraints, subj, ErrNotCA, "issued by %s, which is not a node's issuing certificate", parent.ID)
	}
	zone := child.ID.Zone
	grant, ok := parent.Claims.Zone(zone)
	if !ok {
		return verr(CheckZone, subj, ErrZoneConstraint, "zone %q is not among node %s's zones %v", zone, parent.ID, parent.Claims.ZoneNames())
	}
	for _, ip := range child.Claims.OverlayIPs {
		if !grant.Contains(ip) {
			return verr(CheckCIDR, subj, ErrCIDRConstraint, "overlay IP %s is outside zone %q CIDRs %v", ip, zone, grant.Prefixes)
		}
	}
	for _, pfx := range child.Claims.Zones[0].Prefixes {
		if !grant.covers(pfx) {
			return verr(CheckCIDR, subj, ErrCIDRConstraint, "prefix %s is outside zone %q CIDRs %v", pfx, zone, grant.Prefixes)
		}
	}
	return nil
}
