package identity

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"math/big"
	"net/netip"
	"net/url"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

const testTD = "acme.internal"

// t0 is a fixed instant so tests never depend on the wall clock.
var t0 = time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)

type pki struct {
	authKey, nodeKey, issuerKey, agentKey ed25519.PrivateKey
	auth, node, issuer, agent             *Certificate
}

func mustKey(t testing.TB) ed25519.PrivateKey {
	t.Helper()
	k, err := GenerateKey()
	require.NoError(t, err)
	return k
}

func digest(s string) []byte {
	d := sha256.Sum256([]byte(s))
	return d[:]
}

func nodeClaims() Claims {
	return Claims{
		Zones: []ZoneGrant{
			{Name: "payments", Prefixes: []netip.Prefix{netip.MustParsePrefix("100.100.1.0/24")}},
			{Name: "ml", Prefixes: []netip.Prefix{netip.MustParsePrefix("100.100.2.0/24"), netip.MustParsePrefix("fd00:7e::/64")}},
		},
		Regions:      []string{"eu-west-1"},
		Fingerprint:  digest("host"),
		WireGuardKey: digest("wg"),
	}
}

func agentClaims(zone string, ip string) Claims {
	return Claims{
		Zones:       []ZoneGrant{{Name: zone}},
		OverlayIPs:  []netip.Addr{netip.MustParseAddr(ip)},
		Fingerprint: digest("workload"),
		Labels:      map[string]string{"app": "billing", "tier": "backend"},
	}
}

// issuerClaims are the claims of the node's issuing certificate for a node certificate.
func issuerClaims(node *Certificate) Claims {
	return Claims{Zones: node.Claims.Zones, Regions: node.Claims.Regions, NodeSerial: node.Serial()}
}

// newPKI builds authority (t0-1h .. t0+365d), node and its issuing certificate (t0-1h .. t0+24h),
// agent (t0-1h .. t0+1h) issued by the node's issuing certificate.
func newPKI(t testing.TB) *pki {
	t.Helper()
	p := &pki{authKey: mustKey(t), nodeKey: mustKey(t), agentKey: mustKey(t)}
	var err error
	p.issuerKey, err = IssuerKey(p.nodeKey)
	require.NoError(t, err)
	p.auth, err = NewAuthority(testTD, p.authKey, t0.Add(-time.Hour), 366*24*time.Hour)
	require.NoError(t, err)
	p.node, err = Issue(p.auth, p.authKey, IssueRequest{
		ID: NodeID(testTD, "n1"), PublicKey: p.nodeKey.Public().(ed25519.PublicKey), Claims: nodeClaims(),
		NotBefore: t0.Add(-time.Hour), NotAfter: t0.Add(24 * time.Hour),
	})
	require.NoError(t, err)
	p.issuer, err = Issue(p.auth, p.authKey, IssueRequest{
		ID: NodeID(testTD, "n1"), PublicKey: p.issuerKey.Public().(ed25519.PublicKey), Claims: issuerClaims(p.node),
		NotBefore: t0.Add(-time.Hour), NotAfter: t0.Add(24 * time.Hour), Issuing: true,
	})
	require.NoError(t, err)
	p.agent, err = Issue(p.issuer, p.issuerKey, IssueRequest{
		ID: AgentID(testTD, "payments", "billing"), PublicKey: p.agentKey.Public().(ed25519.PublicKey),
		Claims:    agentClaims("payments", "100.100.1.7"),
		NotBefore: t0.Add(-time.Hour), NotAfter: t0.Add(time.Hour),
	})
	require.NoError(t, err)
	return p
}

// forge signs an arbitrary certificate with x509 directly, bypassing Issue's checks: this is what
// an attacker holding (or pretending to hold) some key can produce. mutate edits the template.
func forge(t testing.TB, parent *Certificate, parentKey ed25519.PrivateKey, id ID, pub ed25519.PublicKey,
	claims Claims, isCA bool, mutate func(*x509.Certificate)) *Certificate {
	t.Helper()
	u, err := url.Parse(id.String())
	require.NoError(t, err)
	var ext []byte
	if claims.Validate() == nil {
		ext, err = MarshalClaims(claims)
		require.NoError(t, err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(42),
		Subject:               pkix.Name{CommonName: id.Name},
		NotBefore:             t0.Add(-time.Hour),
		NotAfter:              t0.Add(time.Hour),
		URIs:                  []*url.URL{u},
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth},
		ExtraExtensions:       []pkix.Extension{{Id: OIDClaims, Value: ext}},
	}
	if isCA {
		tmpl.IsCA, tmpl.MaxPathLenZero = true, true
		tmpl.KeyUsage = x509.KeyUsageCertSign
		tmpl.ExtKeyUsage = nil
	}
	if mutate != nil {
		mutate(tmpl)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent.X509, pub, parentKey)
	require.NoError(t, err)
	c, err := ParseCertificate(der)
	require.NoError(t, err)
	return c
}

// forgeDER re-signs a copy of the node certificate's template after mutate, with the authority key.
func forgeDER(t testing.TB, p *pki, mutate func(*x509.Certificate)) []byte {
	t.Helper()
	ext, err := MarshalClaims(nodeClaims())
	require.NoError(t, err)
	u := *p.node.X509.URIs[0]
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(7),
		NotBefore:             t0.Add(-time.Hour),
		NotAfter:              t0.Add(time.Hour),
		URIs:                  []*url.URL{&u},
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth},
		ExtraExtensions:       []pkix.Extension{{Id: OIDClaims, Value: ext}},
	}
	mutate(tmpl)
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.auth.X509, p.nodeKey.Public(), p.authKey)
	require.NoError(t, err)
	return der
}

func pkixExt(oid []int, critical bool) pkix.Extension {
	return pkix.Extension{Id: oid, Critical: critical, Value: []byte{0x05, 0x00}}
}

func errorsIsAny(err error, targets ...error) bool {
	for _, t := range targets {
		if errors.Is(err, t) {
			return true
		}
	}
	return false
}

// forgeIssuer signs an issuing-certificate-shaped CA for node name with parentKey, bypassing
// Issue: what an attacker holding parentKey could mint.
func forgeIssuer(t testing.TB, parent *Certificate, parentKey ed25519.PrivateKey, name string, claims Claims, mutate func(*x509.Certificate)) *Certificate {
	t.Helper()
	claims.Node = name
	return forge(t, parent, parentKey, AuthorityID(parent.ID.TrustDomain), mustKey(t).Public().(ed25519.PublicKey), claims, true, mutate)
}
