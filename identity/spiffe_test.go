package identity

import (
	"crypto/ed25519"
	"crypto/x509"
	"net/netip"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// spiffeBundle is the zone's trust bundle as a SPIFFE library sees it.
func spiffeBundle(t *testing.T, p *pki) *x509bundle.Bundle {
	t.Helper()
	td, err := spiffeid.TrustDomainFromString(testTD)
	require.NoError(t, err)
	return x509bundle.FromX509Authorities(td, []*x509.Certificate{p.auth.X509})
}

// TestSPIFFEVerifierAcceptsNodeAndAgent: go-spiffe's X509-SVID verifier accepts the certificate a
// node presents (alone) and an agent's certificate with its node's issuing certificate.
func TestSPIFFEVerifierAcceptsNodeAndAgent(t *testing.T) {
	p := newPKI(t)
	b := spiffeBundle(t, p)

	id, chains, err := x509svid.Verify([]*x509.Certificate{p.node.X509}, b, x509svid.WithTime(t0))
	require.NoError(t, err)
	assert.Equal(t, "spiffe://acme.internal/node/n1", id.String())
	require.Len(t, chains, 1)
	assert.Len(t, chains[0], 2, "node -> authority")

	id, chains, err = x509svid.ParseAndVerify([][]byte{p.agent.Raw(), p.issuer.Raw()}, b, x509svid.WithTime(t0))
	require.NoError(t, err)
	assert.Equal(t, "spiffe://acme.internal/zone/payments/agent/billing", id.String())
	require.Len(t, chains, 1)
	assert.Len(t, chains[0], 3, "agent -> node's issuing certificate -> authority")
}

// TestSPIFFEVerifierRefusesIssuingCertificateAsLeaf: a node that presents its issuing
// certificate (with the issuing key) as its TLS certificate is refused by SPIFFE libraries and by
// UTE's own verifier.
func TestSPIFFEVerifierRefusesIssuingCertificateAsLeaf(t *testing.T) {
	p := newPKI(t)
	_, _, err := x509svid.Verify([]*x509.Certificate{p.issuer.X509}, spiffeBundle(t, p), x509svid.WithTime(t0))
	require.ErrorContains(t, err, "leaf certificate with CA flag set to true")

	_, err = Verifier{Authority: p.auth}.VerifyNodeDER([][]byte{p.issuer.Raw()}, t0)
	require.ErrorIs(t, err, ErrLeafIsCA)
	var ve *VerifyError
	require.ErrorAs(t, err, &ve)
	assert.Equal(t, CheckBasicConstraints, ve.Check)
}

// TestIssuingKeyCannotMintANode: an attacker holding a node's issuing key signs a node
// certificate for another node. UTE refuses it wherever a node certificate is checked: nodes are
// issued by the authority only. (A SPIFFE-only verifier accepts any SVID of the trust domain
// under a valid issuing certificate: X.509 URI name constraints cannot tell paths apart;
// docs/identity.md says so.)
func TestIssuingKeyCannotMintANode(t *testing.T) {
	p := newPKI(t)
	v := Verifier{Authority: p.auth}
	stolen := mustKey(t)
	n2 := forge(t, p.issuer, p.issuerKey, NodeID(testTD, "n2"), stolen.Public().(ed25519.PublicKey), nodeClaims(), false, nil)

	_, err := v.VerifyNodeDER([][]byte{n2.Raw(), p.issuer.Raw()}, t0)
	require.ErrorIs(t, err, ErrSignature, "intermediates a peer sends are ignored: nodes chain to the authority directly")
	var ve *VerifyError
	require.ErrorAs(t, err, &ve)
	assert.Equal(t, CheckSignature, ve.Check)

	// Issue refuses to produce it in the first place.
	_, err = Issue(p.issuer, p.issuerKey, IssueRequest{ID: NodeID(testTD, "n2"), PublicKey: stolen.Public().(ed25519.PublicKey),
		Claims: nodeClaims(), NotBefore: t0.Add(-time.Hour), NotAfter: t0.Add(time.Hour)})
	require.ErrorIs(t, err, ErrSPIFFEID)
}

// TestAgentOfNodeAClaimingNodeB: node A's issuing key signs an agent inside node B's slice, and
// the attacker chains it to B's issuing certificate or to A's: refused either way.
func TestAgentOfNodeAClaimingNodeB(t *testing.T) {
	p := newPKI(t) // node A = n1 holds 100.100.1.0/24 in payments
	v := Verifier{Authority: p.auth}
	bKey := mustKey(t)
	bClaims := nodeClaims()
	bClaims.Zones = []ZoneGrant{{Name: "payments", Prefixes: []netip.Prefix{netip.MustParsePrefix("100.100.9.0/24")}}}
	nodeB, err := Issue(p.auth, p.authKey, IssueRequest{ID: NodeID(testTD, "n2"), PublicKey: bKey.Public().(ed25519.PublicKey),
		Claims: bClaims, NotBefore: t0.Add(-time.Hour), NotAfter: t0.Add(time.Hour)})
	require.NoError(t, err)
	bIssuerKey, err := IssuerKey(bKey)
	require.NoError(t, err)
	issuerB, err := Issue(p.auth, p.authKey, IssueRequest{ID: nodeB.ID, PublicKey: bIssuerKey.Public().(ed25519.PublicKey),
		Claims: issuerClaims(nodeB), NotBefore: t0.Add(-time.Hour), NotAfter: t0.Add(time.Hour), Issuing: true})
	require.NoError(t, err)

	agentPub := p.agentKey.Public().(ed25519.PublicKey)
	forged := forge(t, p.issuer, p.issuerKey, AgentID(testTD, "payments", "impostor"), agentPub, agentClaims("payments", "100.100.9.5"), false, nil)

	_, err = v.VerifyAgentDER(issuerB.Raw(), forged.Raw(), t0)
	require.ErrorIs(t, err, ErrSignature, "A's issuing key did not sign under B's issuing certificate")
	_, err = v.VerifyAgentDER(p.issuer.Raw(), forged.Raw(), t0)
	require.ErrorIs(t, err, ErrCIDRConstraint, "under A's own issuing certificate, B's addresses are outside A's grant")

	// And a legitimate agent of A is attributed to A, never to B.
	ch, err := v.VerifyAgentDER(p.issuer.Raw(), p.agent.Raw(), t0)
	require.NoError(t, err)
	assert.Equal(t, p.node.ID, ch.Node.ID)
	assert.NotEqual(t, nodeB.ID, ch.Node.ID)
}

// TestSPIFFEBundleExportParses: the exported bundle is read by go-spiffe's bundle parsers and
// verifies the node's and the agent's certificates.
func TestSPIFFEBundleExportParses(t *testing.T) {
	p := newPKI(t)
	doc, err := MarshalSPIFFEBundle([]*Certificate{p.auth}, 3, 5*time.Minute)
	require.NoError(t, err)
	td := spiffeid.RequireTrustDomainFromString(testTD)
	b, err := spiffebundle.Parse(td, doc)
	require.NoError(t, err)
	require.Len(t, b.X509Authorities(), 1)
	assert.Equal(t, p.auth.Raw(), b.X509Authorities()[0].Raw)
	seq, ok := b.SequenceNumber()
	require.True(t, ok)
	assert.Equal(t, uint64(3), seq)
	hint, ok := b.RefreshHint()
	require.True(t, ok)
	assert.Equal(t, 5*time.Minute, hint)

	_, _, err = x509svid.ParseAndVerify([][]byte{p.agent.Raw(), p.issuer.Raw()}, b, x509svid.WithTime(t0))
	require.NoError(t, err)
	_, _, err = x509svid.Verify([]*x509.Certificate{p.node.X509}, b, x509svid.WithTime(t0))
	require.NoError(t, err)

	pemBundle, err := x509bundle.Parse(td, EncodePEM(p.auth))
	require.NoError(t, err)
	assert.True(t, pemBundle.HasX509Authority(p.auth.X509))

	_, err = MarshalSPIFFEBundle([]*Certificate{p.issuer}, 0, 0)
	require.ErrorIs(t, err, ErrNoTrustAnchor, "an issuing certificate is not a trust anchor")
	_, err = MarshalSPIFFEBundle(nil, 0, 0)
	require.ErrorIs(t, err, ErrNoTrustAnchor)
}
