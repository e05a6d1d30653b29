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
type Certificate struct {
	X509   *x509.Certificate
	ID     ID
	Claims Claims
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

// RenewAt returns the half-life point of the validity window, when a holder should renew.
func (c *Certificate) RenewAt() time.Time {
	return c.X509.NotBefore.Add(c.X509.NotAfter.Sub(c.X509.NotBefore) / 2)
}

// ParseCertificate parses DER and extracts the SPIFFE ID and UTE claims. It requires Ed25519,
// exactly one URI SAN holding a valid UTE SPIFFE ID, the critical claims extension on node and
// agent certificates (absent on the authority's), claims valid for the ID's kind, and no other
// critical extension Go does not handle. It checks no signature or time: that is the Verifier's job.
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
	for _, oid := range x.UnhandledCriticalExtensions {
		if !oid.Equal(OIDClaims) {
			return nil, fmt.Errorf("%w: %s: unsupported critical extension %s", ErrMalformedCertificate, id, oid)
		}
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
		if !ext.Critical {
			return nil, fmt.Errorf("%w: %s: claims extension is not marked critical", ErrClaims, id)
		}
		found, raw = true, ext.Value
	}
	var claims Claims
	switch {
	case id.Kind == KindAuthority && found:
		return nil, fmt.Errorf("%w: %s: an authority certificate carries no claims extension", ErrClaims, id)
	case id.Kind != KindAuthority && !found:
		return nil, fmt.Errorf("%w: %s: claims extension %s is missing", ErrClaims, id, OIDClaims)
	case found:
		if claims, err = ParseClaims(raw); err != nil {
			return nil, fmt.Errorf("%s: %w", id, err)
		}
	}
	if err := claims.ValidateFor(id); err != nil {
		return nil, err
	}
	return &Certificate{X509: x, ID: id, Claims: claims}, nil
}

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
type IssueRequest struct {
	ID        ID
	PublicKey ed25519.PublicKey
	Claims    Claims
	NotBefore time.Time
	NotAfter  time.Time
	Serial    *big.Int
}

// Issue signs a certificate for req with issuer's key: a node certificate when the issuer is the
// authority, an agent certificate when the issuer is a node. Before signing it runs the same
// profile and constraint checks the Verifier runs, and refuses with the same *VerifyError, so no
// certificate leaves Issue that verification would refuse.
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
	var kind Kind
	switch issuer.ID.Kind {
	case KindAuthority:
		kind = KindNode
	case KindNode:
		kind = KindAgent
	default:
		return nil, fmt.Errorf("issue for %s: %w: a %s cannot issue certificates", req.ID, ErrNotCA, issuer.ID.Kind)
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
	u, err := url.Parse(req.ID.String())
	if err != nil {
		return nil, fmt.Errorf("issue for %s: %w: %w", req.ID, ErrSPIFFEID, err)
	}
	ext, err := MarshalClaims(req.Claims)
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
		ExtraExtensions:       []pkix.Extension{{Id: OIDClaims, Critical: true, Value: ext}},
		PublicKey:             req.PublicKey,
	}
	if kind == KindNode {
		tmpl.IsCA = true
		tmpl.MaxPathLen = 0
		tmpl.MaxPathLenZero = true
		tmpl.KeyUsage |= x509.KeyUsageCertSign
	}
	candidate := &Certificate{X509: tmpl, ID: req.ID, Claims: req.Claims}
	if err := checkProfile(candidate, kind, issuer.ID.TrustDomain); err != nil {
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
