package state

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity"
)

// A directory joined before node certificates became SPIFFE leaves (node.crt a CA with a critical
// claims extension, no issuer.crt) is refused at Open with one line that says what to do.
func TestOpenRefusesLegacyLayoutInOneLine(t *testing.T) {
	f := newFixture(t)
	p := f.dir.Path()
	nodeKey, err := f.dir.NodeKey()
	require.NoError(t, err)
	ext, err := identity.MarshalClaims(identity.Claims{
		Zones:       []identity.ZoneGrant{{Name: "payments", Prefixes: []netip.Prefix{netip.MustParsePrefix("100.100.1.0/24")}}},
		Fingerprint: make32(1),
	})
	require.NoError(t, err)
	u, err := url.Parse(identity.NodeID("acme.internal", "n1").String())
	require.NoError(t, err)
	// The old profile: a node certificate that is also a CA, claims marked critical.
	der, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: "n1"}, URIs: []*url.URL{u},
		NotBefore: f.now.Add(-time.Minute), NotAfter: f.now.Add(time.Hour),
		BasicConstraintsValid: true, IsCA: true, MaxPathLenZero: true,
		KeyUsage:        x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:     []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth},
		ExtraExtensions: []pkix.Extension{{Id: identity.OIDClaims, Critical: true, Value: ext}},
	}, f.ca.X509, nodeKey.Public(), f.caKey)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(p, FileNodeCert), certPEM(der), 0o644))
	require.NoError(t, os.Remove(filepath.Join(p, FileIssuerCert)))

	_, err = Open(p)
	require.ErrorIs(t, err, ErrLegacyLayout)
	assert.NotContains(t, err.Error(), "\n")
	assert.Contains(t, err.Error(), "join again")
	assert.Contains(t, err.Error(), p)

	// Reading the old certificate directly names the profile too, never panics.
	_, err = f.dir.NodeCert()
	require.ErrorIs(t, err, identity.ErrLegacyProfile)
}

// issuer.crt is bound to node.key (its key is derived from it) and to node.crt (same node, its
// serial): a replaced issuing certificate is refused before anything is signed with it.
func TestNodeIssuerRefusesAReplacedIssuingCertificate(t *testing.T) {
	f := newFixture(t)
	p := f.dir.Path()
	node, nodeKey, err := f.dir.NodeIdentity()
	require.NoError(t, err)

	// Another node certificate's issuing certificate for the right key.
	stale := f.issueNode(t, nodeKey, node.Claims.Zones)
	require.NoError(t, os.WriteFile(filepath.Join(p, FileIssuerCert), certPEM(f.issuerFor(t, stale, nodeKey).Raw()), 0o644))
	_, _, err = f.dir.NodeIssuer()
	require.ErrorIs(t, err, ErrBadFile)
	assert.Contains(t, err.Error(), "one of the two files was replaced")
	_, err = f.dir.AddAgent(AgentSpec{Name: "billing", Zone: "payments", Exe: f.exe})
	require.ErrorIs(t, err, ErrBadFile)

	// The right node certificate's issuing certificate, for a key the directory does not derive.
	require.NoError(t, os.WriteFile(filepath.Join(p, FileIssuerCert), certPEM(f.issuerFor(t, node, mustKey(t)).Raw()), 0o644))
	_, _, err = f.dir.NodeIssuer()
	require.ErrorIs(t, err, identity.ErrKeyMismatch)
	assert.True(t, strings.Contains(err.Error(), FileIssuerCert) && strings.Contains(err.Error(), FileNodeKey), "names both files: %v", err)

	// The node certificate itself in place of the issuing certificate.
	require.NoError(t, os.WriteFile(filepath.Join(p, FileIssuerCert), certPEM(node.Raw()), 0o644))
	_, _, err = f.dir.NodeIssuer()
	require.ErrorIs(t, err, ErrBadFile)

	// Put back, everything works and agents chain to the issuing certificate.
	good := f.issuerFor(t, node, nodeKey)
	require.NoError(t, os.WriteFile(filepath.Join(p, FileIssuerCert), certPEM(good.Raw()), 0o644))
	a, err := f.dir.AddAgent(AgentSpec{Name: "billing", Zone: "payments", Exe: f.exe})
	require.NoError(t, err)
	require.NoError(t, identity.Verifier{Authority: f.ca}.VerifyAgent(good, a.Cert, f.now))
	assert.Equal(t, good.X509.RawSubject, a.Cert.X509.RawIssuer)
	ikey, err := identity.IssuerKey(nodeKey)
	require.NoError(t, err)
	assert.False(t, ikey.Public().(ed25519.PublicKey).Equal(nodeKey.Public()))
}
