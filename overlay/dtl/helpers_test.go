package dtl

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"errors"
	"fmt"
	"math/big"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// The tests build real X.509 chains (authority → node CA → agent) and verify them with a small
// ChainVerifier written against crypto/x509, standing in for package identity, which dtl must not
// import. The agent's workload fingerprint sits in a private extension, as identity puts its claims.

var oidTestFingerprint = asn1.ObjectIdentifier{1, 3, 6, 1, 4, 1, 99999, 1}

const td = "acme.internal"

type testAuthority struct {
	key  ed25519.PrivateKey
	cert *x509.Certificate
}

type testNode struct {
	name string
	key  ed25519.PrivateKey
	der  []byte
	cert *x509.Certificate
}

type testAgent struct {
	node        *testNode
	zone, name  string
	key         ed25519.PrivateKey
	der         []byte
	fingerprint []byte
}

func (a *testAgent) id() string {
	return fmt.Sprintf("spiffe://%s/zone/%s/agent/%s", td, a.zone, a.name)
}
func (n *testNode) id() string        { return fmt.Sprintf("spiffe://%s/node/%s", td, n.name) }
func (a *testAgent) chain() CertChain { return CertChain{Node: a.node.der, Agent: a.der} }

func newKey(t testing.TB) ed25519.PrivateKey {
	t.Helper()
	_, k, err := ed25519.GenerateKey(rand.Reader)
	require.NoError(t, err)
	return k
}

func newAuthority(t testing.TB) *testAuthority {
	t.Helper()
	key := newKey(t)
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "authority"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
		URIs:                  []*url.URL{{Scheme: "spiffe", Host: td}},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	require.NoError(t, err)
	cert, err := x509.ParseCertificate(der)
	require.NoError(t, err)
	return &testAuthority{key: key, cert: cert}
}

func (a *testAuthority) node(t testing.TB, name string) *testNode {
	t.Helper()
	key := newKey(t)
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(time.Now().UnixNano()),
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		URIs:                  []*url.URL{{Scheme: "spiffe", Host: td, Path: "/node/" + name}},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, a.cert, key.Public(), a.key)
	require.NoError(t, err)
	cert, err := x509.ParseCertificate(der)
	require.NoError(t, err)
	return &testNode{name: name, key: key, der: der, cert: cert}
}

func (n *testNode) agent(t testing.TB, zone, name string, notAfter time.Time) *testAgent {
	t.Helper()
	key := newKey(t)
	fp := make([]byte, 32)
	_, err := rand.Read(fp)
	require.NoError(t, err)
	tmpl := &x509.Certificate{
		SerialNumber:    big.NewInt(time.Now().UnixNano()),
		NotBefore:       time.Now().Add(-time.Hour),
		NotAfter:        notAfter,
		KeyUsage:        x509.KeyUsageDigitalSignature,
		URIs:            []*url.URL{{Scheme: "spiffe", Host: td, Path: "/zone/" + zone + "/agent/" + name}},
		ExtraExtensions: []pkix.Extension{{Id: oidTestFingerprint, Value: fp}},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, n.cert, key.Public(), n.key)
	require.NoError(t, err)
	return &testAgent{node: n, zone: zone, name: name, key: key, der: der, fingerprint: fp}
}

var errTestChain = errors.New("test chain verifier: refused")

// x509Chains verifies a chain with crypto/x509 against one authority certificate.
type x509Chains struct {
	authority *x509.Certificate
	regions   []string
}

func (v x509Chains) VerifyAgentChain(nodeDER, agentDER []byte, now time.Time) (AgentInfo, error) {
	node, err := x509.ParseCertificate(nodeDER)
	if err != nil {
		return AgentInfo{}, fmt.Errorf("%w: node: %v", errTestChain, err)
	}
	agent, err := x509.ParseCertificate(agentDER)
	if err != nil {
		return AgentInfo{}, fmt.Errorf("%w: agent: %v", errTestChain, err)
	}
	if err := node.CheckSignatureFrom(v.authority); err != nil {
		return AgentInfo{}, fmt.Errorf("%w: node not signed by authority: %v", errTestChain, err)
	}
	if err := agent.CheckSignatureFrom(node); err != nil {
		return AgentInfo{}, fmt.Errorf("%w: agent not signed by node: %v", errTestChain, err)
	}
	for _, c := range []*x509.Certificate{node, agent} {
		if now.Before(c.NotBefore) || now.After(c.NotAfter) {
			return AgentInfo{}, fmt.Errorf("%w: certificate expired or not yet valid", errTestChain)
		}
	}
	if len(agent.URIs) != 1 || len(node.URIs) != 1 {
		return AgentInfo{}, fmt.Errorf("%w: want one URI SAN", errTestChain)
	}
	parts := strings.Split(strings.TrimPrefix(agent.URIs[0].Path, "/"), "/")
	if len(parts) != 4 || parts[0] != "zone" || parts[2] != "agent" {
		return AgentInfo{}, fmt.Errorf("%w: agent ID", errTestChain)
	}
	var fp []byte
	for _, e := range agent.Extensions {
		if e.Id.Equal(oidTestFingerprint) {
			fp = e.Value
		}
	}
	notAfter := agent.NotAfter
	if node.NotAfter.Before(notAfter) {
		notAfter = node.NotAfter
	}
	return AgentInfo{
		Agent:       agent.URIs[0].String(),
		Node:        node.URIs[0].String(),
		Zone:        parts[1],
		AgentKey:    agent.PublicKey.(ed25519.PublicKey),
		Fingerprint: fp,
		Regions:     v.regions,
		AgentSerial: agent.SerialNumber.String(),
		NodeSerial:  node.SerialNumber.String(),
		NotAfter:    notAfter,
	}, nil
}

func aad(t testing.TB) []byte {
	t.Helper()
	b := make([]byte, ExporterLen)
	_, err := rand.Read(b)
	require.NoError(t, err)
	return b
}

func claimsFor(a *testAgent, seq uint64, now time.Time) *Claims {
	ch := a.chain()
	return &Claims{
		Version:     Version1,
		Zone:        a.zone,
		Agent:       a.id(),
		Chain:       &ch,
		Node:        a.node.id(),
		Fingerprint: a.fingerprint,
		Region:      "eu-west-1",
		Trust:       90,
		Destination: Destination{Agent: "ledger", Port: 443, Proto: ProtoTCP},
		FlowID:      7,
		Seq:         seq,
		IssuedAt:    now,
	}
}

func mustSign(t testing.TB, c *Claims, key ed25519.PrivateKey, aad []byte) []byte {
	t.Helper()
	b, err := Sign(c, key, aad)
	require.NoError(t, err)
	return b
}
