// Package attack holds what the demo and the simulator do as an attacker would: the pieces of an
// attack that need a key the attacker is assumed to hold, built without UTE's own safeguards.
// It owns no defence and must never be imported by node, overlay or identity.
package attack

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net/netip"
	"net/url"
	"time"

	"github.com/ute-project/ute/identity"
)

// ForgeAgentCert signs an agent certificate with a node key directly, skipping identity.Issue's
// constraint checks, as a compromised node could.
func ForgeAgentCert(issuer *identity.Certificate, issuerKey ed25519.PrivateKey, zone, name string, ip netip.Addr) (*identity.Certificate, ed25519.PrivateKey, error) {
	pub, key, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	fp := sha256.Sum256([]byte(name))
	ext, err := identity.MarshalClaims(identity.Claims{Zones: []identity.ZoneGrant{{Name: zone}}, OverlayIPs: []netip.Addr{ip}, Fingerprint: fp[:]})
	if err != nil {
		return nil, nil, err
	}
	u, err := url.Parse(identity.AgentID(issuer.ID.TrustDomain, zone, name).String())
	if err != nil {
		return nil, nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(now.UnixNano()), Subject: pkix.Name{CommonName: name},
		NotBefore: now.Add(-time.Minute), NotAfter: now.Add(time.Hour),
		URIs: []*url.URL{u}, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage:     []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth},
		ExtraExtensions: []pkix.Extension{{Id: identity.OIDClaims, Value: ext}},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, issuer.X509, pub, issuerKey)
	if err != nil {
		return nil, nil, err
	}
	c, err := identity.ParseCertificate(der)
	return c, key, err
}
