package identity

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net/url"
	"os"
	"time"
)

// Certificate is a parsed UTE certificate: the X.509 certificate with its SPIFFE ID and claims
// already extracted and validated against its kind.
//
// Issuing is true for a node's issuing certificate, the CA that signs the node's agents. As
// SPIFFE requires of a signing certificate, its URI SAN is the bare trust domain; ID is the node
// it belongs to, taken from its claims (Claims.Node), so that "issued by node X" reads the same
// for every chain.
type Certificate struct {
	X509    *x509.Certificate
	ID      ID
	Claims  Claims
	Issuing bool
}

const (
	// MaxCertificateSize bounds the DER ParseCertificate accepts; a UTE certificate is well under 2 KiB.
	MaxCertificateSize = 16 << 10
	maxCertFile        = 1 << 20
	pemCertificate     = "CERTIFICATE"
)

// Raw returns the certificate's DER.
func (c *Certificate) Raw() []byte { return c.X509.Raw }

// PublicKey returns the certificate's Ed25519 public key.
func (c *Certificate) PublicKey() ed25519.PublicKey {
	pub, _ := c.X509.PublicKey.(ed25519.PublicKey)
	return pub
}

// KeyHash returns the pin of the certificate's public key (see KeyHash).
func (c *Certificate) KeyHash() string { return KeyHash(c.PublicKey()) }

// Serial returns the certificate serial number.
func (c *Certificate) Serial() *big.Int { return c.X509.SerialNumber }

// NodeSerial returns the serial of the node certificate this certificate stands for: its own for
// a node certificate, the one its claims name for a node's issuing certificate. Revoking a node
// by serial names this serial, so it reaches the node's agents through their issuing certificate.
func (c *Certificate) NodeSerial() *big.Int {
	if c.Issuing {
		return c.Claims.NodeSerial
	}
	return c.X509.SerialNumber
}

// RenewAt returns the half-life point of the validity window, when a holder should renew.
func (c *Certificate) RenewAt() time.Time {
	return c.X509.NotBefore.Add(c.X509.NotAfter.Sub(c.X509.NotBefore) / 2)
}

// ParseCertificate parses DER and extracts the SPIFFE ID and UTE claims. It requires Ed25519,
// exactly one URI SAN holding a valid UTE SPIFFE ID, the claims extension, not critical, on node,
// issuing and agent certificates (absent on the authority's), claims valid for the kind, and no
// critical extension Go does not handle. A certificate whose URI SAN is the bare trust domain is
// the authority's without claims and a node's issuing certificate with them. It checks no
// signature or time: that is the Verifier's job.
func ParseCertificate(der []byte) (*Certificate, error) {
	if len(der) > MaxCertificateSize {
		return nil, fmt.Errorf("%w: %d bytes; the limit is %d", ErrMalformedCertificate, len(der), MaxCertificateSize)
	}
	x, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrMalformedCertificate, err)
	}
	if _, ok := x.PublicKey.(ed25519.PublicKey); !ok || x.SignatureAlgorithm != x509.PureEd25519 {
		return nil, fmt.Errorf("%w: key %T, signature %v", ErrKeyAlgorithm, x.PublicKey, x.SignatureAlgorithm)
	}
	if len(x.URIs) != 1 {
		return nil, fmt.Errorf("%w: certificate has %d URI SANs; a UTE certificate has exactly one", ErrSPIFFEID, len(x.URIs))
	}
	id, err := parseURISAN(x.URIs[0])
	if err != nil {
		return nil, err
	}
	var raw []byte
	found := false
	for _, ext := range x.Extensions {
		if !ext.Id.Equal(OIDClaims) {
			continue
		}
		if found {
			return nil, fmt.Errorf("%w: %s: claims extension appears twice", ErrClaims, id)
		}
		if ext.Critical {
			return nil, fmt.Errorf("%w: %s: %w", ErrClaims, id, ErrLegacyProfile)
		}
		found, raw = true, ext.Value
	}
	if len(x.UnhandledCriticalExtensions) > 0 {
		return nil, fmt.Errorf("%w: %s: unsupported critical extension %s", ErrMalformedCertificate, id, x.UnhandledCriticalExtensions[0])
	}
	var claims Claims
	switch {
	case id.Kind != KindAuthority && !found:
		return nil, fmt.Errorf("%w: %s: claims extension %s is missing", ErrClaims, id, OIDClaims)
	case found:
		if claims, err = ParseClaims(raw); err != nil {
			return nil, fmt.Errorf("%s: %w", id, err)
		}
	}
	if id.Kind == KindAuthority && found {
		node := NodeID(id.TrustDomain, claims.Node)
		if err := claims.ValidateIssuer(node); err != nil {
			return nil, fmt.Errorf("%s: %w", id, err)
		}
		return &Certificate{X509: x, ID: node, Claims: claims, Issuing: true}, nil
	}
	if err := claims.ValidateFor(id); err != nil {
		return nil, err
	}
	return &Certificate{X509: x, ID: id, Claims: claims}, nil
}

// ErrLegacyProfile marks a certificate of the profile before SPIFFE compatibility (a critical
// claims extension, a node certificate that was also a CA). Its holder must join again.
var ErrLegacyProfile = errors.New("certificate uses the profile before SPIFFE compatibility (critical claims extension); the node must join again (docs/identity.md, \"Upgrading a node directory\")")

// parseURISAN re-validates the URI as text: url.URL accepts far more than a SPIFFE ID may be.
func parseURISAN(u *url.URL) (ID, error) {
	if u.User != nil || u.RawQuery != "" || u.Fragment != "" || u.Opaque != "" || u.ForceQuery {
		return ID{}, fmt.Errorf("%w: URI SAN %q has parts a SPIFFE ID may not have", ErrSPIFFEID, u.String())
	}
	return ParseID(u.String())
}

// NewAuthority creates the self-signed root certificate of trust domain td, valid from now for
// lifetime. Path length 1 allows exactly authority → node → agent.
func NewAuthority(td string, key ed25519.PrivateKey, now time.Time, lifetime time.Duration) (*Certificate, error) {
	id := AuthorityID(td)
	if err := id.Validate(); err != nil {
		return nil, fmt.Errorf("new authority: %w", err)
	}
	if len(key) != ed25519.PrivateKeySize {
		return nil, fmt.Errorf("new authority: %w: not an Ed25519 private key", ErrKeyAlgorithm)
	}
	if lifetime <= 0 {
		return nil, fmt.Errorf("new authority: lifetime %s must be positive", lifetime)
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, fmt.Errorf("new authority: %w", err)
	}
	u, err := url.Parse(id.String())
	if err != nil {
		return nil, fmt.Errorf("new authority: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: td, Organization: []string{"UTE authority"}},
		NotBefore:             now.Truncate(time.Second).UTC(),
		NotAfter:              now.Add(lifetime).Truncate(time.Second).UTC(),
		URIs:                  []*url.URL{u},
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLen:            1,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
	}
	pub := key.Public().(ed25519.PublicKey)
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, pub, key)
	if err != nil {
		return nil, fmt.Errorf("new authority: %w", err)
	}
	return ParseCertificate(der)
}

// IssueRequest describes a certificate to issue. Serial nil means a random 128-bit serial.
//
// Issuing asks the authority for a node's issuing certificate instead of its node certificate:
// ID is then the node's ID, and Claims carry the node's zone grants and regions, and in NodeSerial
// the serial of the node certificate issued with it (Claims.Node is filled in from ID).
type IssueRequest struct {
	ID        ID
	PublicKey ed25519.PublicKey
	Claims    Claims
	NotBefore time.Time
	NotAfter  time.Time
	Serial    *big.Int
	Issuing   bool
}

// Issue signs a certificate for req with issuer's key: the authority issues node certificates
// (leaves) and node issuing certificates (CAs limited to path length 0); a node's issuing
// certificate issues agent certificates (leaves). A node certificate issues nothing. Before
// signing it runs the same profile and constraint checks the Verifier runs, and refuses with the
// same *VerifyError, so no certificate leaves Issue that verification would refuse.
func Issue(issuer *Certificate, issuerKey ed25519.PrivateKey, req IssueRequest) (*Certificate, error) {
	if issuer == nil || issuer.X509 == nil {
		return nil, fmt.Errorf("issue: %w: no issuer certificate", ErrNoTrustAnchor)
	}
	if len(issuerKey) != ed25519.PrivateKeySize || !issuerKey.Public().(ed25519.PublicKey).Equal(issuer.PublicKey()) {
		return nil, fmt.Errorf("issue for %s: %w: the key given is not %s's", req.ID, ErrKeyMismatch, issuer.ID)
	}
	if len(req.PublicKey) != ed25519.PublicKeySize {
		return nil, fmt.Errorf("issue for %s: %w: public key is %d bytes", req.ID, ErrKeyAlgorithm, len(req.PublicKey))
	}
	var r role
	switch {
	case issuer.ID.Kind == KindAuthority && !issuer.Issuing && req.Issuing:
		r = roleIssuer
	case issuer.ID.Kind == KindAuthority && !issuer.Issuing:
		r = roleNode
	case issuer.Issuing && !req.Issuing:
		r = roleAgent
	case issuer.Issuing:
		return nil, fmt.Errorf("issue for %s: %w: an issuing certificate cannot issue another (path length 0)", req.ID, ErrNotCA)
	default:
		return nil, fmt.Errorf("issue for %s: %w: a %s certificate cannot issue certificates; agents are issued with the node's issuing certificate", req.ID, ErrNotCA, issuer.ID.Kind)
	}
	serial := req.Serial
	if serial == nil {
		var err error
		if serial, err = randomSerial(); err != nil {
			return nil, fmt.Errorf("issue for %s: %w", req.ID, err)
		}
	} else if serial.Sign() <= 0 || serial.BitLen() > 159 {
		return nil, fmt.Errorf("issue for %s: serial must be positive and at most 159 bits", req.ID)
	}
	claims := req.Claims
	uriID := req.ID
	if r == roleIssuer {
		claims.Node = req.ID.Name
		uriID = AuthorityID(req.ID.TrustDomain)
	}
	u, err := url.Parse(uriID.String())
	if err != nil {
		return nil, fmt.Errorf("issue for %s: %w: %w", req.ID, ErrSPIFFEID, err)
	}
	ext, err := MarshalClaims(claims)
	if err != nil {
		return nil, fmt.Errorf("issue for %s: %w", req.ID, err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: req.ID.Name},
		// X.509 times have one-second resolution; checking the truncated values checks what is signed.
		NotBefore:             req.NotBefore.Truncate(time.Second).UTC(),
		NotAfter:              req.NotAfter.Truncate(time.Second).UTC(),
		URIs:                  []*url.URL{u},
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth},
		ExtraExtensions:       []pkix.Extension{{Id: OIDClaims, Value: ext}},
		PublicKey:             req.PublicKey,
	}
	if r == roleIssuer {
		// A SPIFFE signing certificate: CA, certificate signing only, no EKU (intermediate EKU
		// handling differs between libraries), and a URI name constraint to the trust domain,
		// the finest X.509 can express (URI constraints match the host only, not the path).
		tmpl.Subject = pkix.Name{CommonName: req.ID.Name, Organization: []string{"UTE node issuing CA"}}
		tmpl.IsCA = true
		tmpl.MaxPathLen = 0
		tmpl.MaxPathLenZero = true
		tmpl.KeyUsage = x509.KeyUsageCertSign
		tmpl.ExtKeyUsage = nil
		tmpl.PermittedURIDomains = []string{req.ID.TrustDomain}
	}
	candidate := &Certificate{X509: tmpl, ID: req.ID, Claims: claims, Issuing: r == roleIssuer}
	if err := checkProfile(candidate, r, issuer.ID.TrustDomain); err != nil {
		return nil, err
	}
	if err := checkConstraints(issuer, candidate); err != nil {
		return nil, err
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, issuer.X509, req.PublicKey, issuerKey)
	if err != nil {
		return nil, fmt.Errorf("issue for %s: %w", req.ID, err)
	}
	return ParseCertificate(der)
}

func randomSerial() (*big.Int, error) {
	s, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		return nil, fmt.Errorf("random serial: %w", err)
	}
	return s.Add(s, big.NewInt(1)), nil // never zero
}

// EncodePEM returns the certificates as concatenated PEM blocks.
func EncodePEM(certs ...*Certificate) []byte {
	var buf bytes.Buffer
	for _, c := range certs {
		_ = pem.Encode(&buf, &pem.Block{Type: pemCertificate, Bytes: c.Raw()})
	}
	return buf.Bytes()
}

// ParsePEM parses every CERTIFICATE block in data with ParseCertificate. Anything but CERTIFICATE
// blocks and whitespace is an error.
func ParsePEM(data []byte) ([]*Certificate, error) {
	var out []*Certificate
	rest := data
	for {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			break
		}
		if block.Type != pemCertificate {
			return nil, fmt.Errorf("%w: PEM block %q where a CERTIFICATE was expected", ErrMalformedCertificate, block.Type)
		}
		c, err := ParseCertificate(block.Bytes)
		if err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	if len(bytes.TrimSpace(rest)) != 0 {
		return nil, fmt.Errorf("%w: data that is not PEM after certificate %d", ErrMalformedCertificate, len(out))
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%w: no CERTIFICATE PEM block found", ErrMalformedCertificate)
	}
	return out, nil
}

// WriteCertificates stores certificates as PEM with mode 0644, atomically (see WriteKey).
func WriteCertificates(path string, certs ...*Certificate) error {
	if len(certs) == 0 {
		return errors.New("write certificates: none given")
	}
	return WriteFileAtomic(path, EncodePEM(certs...), 0o644)
}

// ReadCertificates reads a PEM file written by WriteCertificates.
func ReadCertificates(path string) ([]*Certificate, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read certificates: %w", err)
	}
	defer func() { _ = f.Close() }()
	data, err := io.ReadAll(io.LimitReader(f, maxCertFile+1))
	if err != nil {
		return nil, fmt.Errorf("read certificates %s: %w", path, err)
	}
	if len(data) > maxCertFile {
		return nil, fmt.Errorf("read certificates %s: %w: larger than %d bytes", path, ErrMalformedCertificate, maxCertFile)
	}
	certs, err := ParsePEM(data)
	if err != nil {
		return nil, fmt.Errorf("read certificates %s: %w", path, err)
	}
	return certs, nil
}

// TLSCertificate builds the tls.Certificate a node or authority presents: leaf first, then any
// intermediates, with its private key. It refuses a key that does not match the leaf.
func TLSCertificate(key ed25519.PrivateKey, chain ...*Certificate) (tls.Certificate, error) {
	if len(chain) == 0 {
		return tls.Certificate{}, errors.New("tls certificate: no certificate given")
	}
	if len(key) != ed25519.PrivateKeySize || !key.Public().(ed25519.PublicKey).Equal(chain[0].PublicKey()) {
		return tls.Certificate{}, fmt.Errorf("tls certificate for %s: %w", chain[0].ID, ErrKeyMismatch)
	}
	tc := tls.Certificate{PrivateKey: key, Leaf: chain[0].X509}
	for _, c := range chain {
		tc.Certificate = append(tc.Certificate, c.Raw())
	}
	return tc, nil
}

// IssueIssuer signs, with the authority's certificate and key, the issuing certificate that goes
// with node certificate node, for issuerPub (the public half of IssuerKey of the node's key): the
// node's zone grants and regions, its name and serial, exactly its validity.
func IssueIssuer(authority *Certificate, authorityKey ed25519.PrivateKey, node *Certificate, issuerPub ed25519.PublicKey) (*Certificate, error) {
	if node == nil || node.X509 == nil || node.Issuing || node.ID.Kind != KindNode {
		return nil, fmt.Errorf("issue issuing certificate: %w: not a node certificate", ErrSPIFFEID)
	}
	if issuerPub.Equal(node.PublicKey()) {
		return nil, fmt.Errorf("issue issuing certificate for %s: %w: the issuing key must differ from the node key", node.ID, ErrKeyMismatch)
	}
	return Issue(authority, authorityKey, IssueRequest{
		ID: node.ID, PublicKey: issuerPub, Issuing: true,
		Claims:    Claims{Zones: node.Claims.Zones, Regions: node.Claims.Regions, NodeSerial: node.Serial()},
		NotBefore: node.X509.NotBefore, NotAfter: node.X509.NotAfter,
	})
}
