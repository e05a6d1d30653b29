package identity

import (
	"crypto/ed25519"
	"crypto/x509"
	"errors"
	"net/netip"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestVerifyHappyPath(t *testing.T) {
	p := newPKI(t)
	v := Verifier{Authority: p.auth}
	require.NoError(t, v.VerifyNode(p.node, t0))
	require.NoError(t, v.VerifyIssuer(p.issuer, t0))
	require.NoError(t, v.VerifyAgent(p.issuer, p.agent, t0))
	require.NoError(t, v.VerifyChain(Chain{Authority: p.auth, Node: p.issuer, Agent: p.agent}, t0))
	require.NoError(t, v.VerifyChain(Chain{Node: p.node}, t0))
	otherKey := mustKey(t)
	other, err := NewAuthority(testTD, otherKey, t0.Add(-time.Hour), time.Hour*48)
	require.NoError(t, err)
	require.ErrorIs(t, v.VerifyChain(Chain{Authority: other, Node: p.issuer, Agent: p.agent}, t0), ErrSignature,
		"a chain naming a different anchor is refused even when its node would verify")

	n, err := v.VerifyNodeDER([][]byte{p.node.Raw(), p.auth.Raw()}, t0)
	require.NoError(t, err)
	assert.Equal(t, NodeID(testTD, "n1"), n.ID)
	assert.Equal(t, nodeClaims(), n.Claims)

	ch, err := v.VerifyAgentDER(p.issuer.Raw(), p.agent.Raw(), t0)
	require.NoError(t, err)
	assert.True(t, ch.Node.Issuing)
	assert.Equal(t, NodeID(testTD, "n1"), ch.Node.ID, "the issuing certificate names its node")
	assert.Equal(t, p.node.Serial(), ch.Node.NodeSerial())
	assert.Equal(t, AgentID(testTD, "payments", "billing"), ch.Agent.ID)
	assert.Equal(t, []netip.Addr{netip.MustParseAddr("100.100.1.7")}, ch.Agent.Claims.OverlayIPs)
	assert.Equal(t, "billing", ch.Agent.Claims.Labels["app"])

	// Node and agent certificates are leaves; the node's issuing certificate is the only CA below
	// the authority, limited to path length 0 and to the trust domain's URIs.
	assert.False(t, p.node.X509.IsCA)
	assert.Equal(t, x509.KeyUsageDigitalSignature, p.node.X509.KeyUsage)
	assert.True(t, p.issuer.X509.IsCA)
	assert.True(t, p.issuer.X509.MaxPathLenZero)
	assert.Equal(t, x509.KeyUsageCertSign, p.issuer.X509.KeyUsage)
	assert.Equal(t, []string{testTD}, p.issuer.X509.PermittedURIDomains)
	assert.Equal(t, "spiffe://"+testTD, p.issuer.X509.URIs[0].String(), "a SPIFFE signing certificate's ID has no path")
	assert.False(t, p.agent.X509.IsCA)
	assert.Equal(t, t0.Add(-time.Hour).Add(12*time.Hour+30*time.Minute), p.node.RenewAt())
}

func TestCertificatesInteroperateWithX509Verify(t *testing.T) {
	// Every certificate UTE issues passes the standard library's strict path validation: no
	// unhandled critical extension, leaves for client and server authentication, the issuing
	// certificate as the intermediate of agents.
	p := newPKI(t)
	roots := x509.NewCertPool()
	roots.AddCert(p.auth.X509)
	inter := x509.NewCertPool()
	inter.AddCert(p.issuer.X509)
	for _, leaf := range []*Certificate{p.node, p.agent} {
		for _, usage := range []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth} {
			chains, err := leaf.X509.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, CurrentTime: t0,
				KeyUsages: []x509.ExtKeyUsage{usage}})
			require.NoError(t, err, "%s", leaf.ID)
			require.NotEmpty(t, chains)
			assert.Empty(t, leaf.X509.UnhandledCriticalExtensions)
		}
	}
	// The issuing certificate's URI name constraint confines it to this trust domain.
	evil := forge(t, p.issuer, p.issuerKey, AgentID("evil.internal", "payments", "billing"), p.agentKey.Public().(ed25519.PublicKey),
		agentClaims("payments", "100.100.1.9"), false, nil)
	_, err := evil.X509.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, CurrentTime: t0})
	var invalid x509.CertificateInvalidError
	require.ErrorAs(t, err, &invalid)
	assert.Equal(t, x509.CANotAuthorizedForThisName, invalid.Reason)
}

// TestVerifyAttacks checks each way a chain can be wrong from the attacker's side and the exact
// sentinel and check each produces.
func TestVerifyAttacks(t *testing.T) {
	p := newPKI(t)
	v := Verifier{Authority: p.auth}
	agentPub := p.agentKey.Public().(ed25519.PublicKey)
	nodePub := p.nodeKey.Public().(ed25519.PublicKey)

	// Another trust domain's authority, and another authority with the same trust domain name.
	rogueKey := mustKey(t)
	rogue, err := NewAuthority(testTD, rogueKey, t0.Add(-time.Hour), 48*time.Hour)
	require.NoError(t, err)
	rogueNode, err := Issue(rogue, rogueKey, IssueRequest{ID: NodeID(testTD, "n1"), PublicKey: nodePub,
		Claims: nodeClaims(), NotBefore: t0.Add(-time.Hour), NotAfter: t0.Add(time.Hour)})
	require.NoError(t, err)

	// A second, legitimate node of the same authority.
	n2Key := mustKey(t)
	n2, err := Issue(p.auth, p.authKey, IssueRequest{ID: NodeID(testTD, "n2"), PublicKey: n2Key.Public().(ed25519.PublicKey),
		Claims: nodeClaims(), NotBefore: t0.Add(-time.Hour), NotAfter: t0.Add(time.Hour)})
	require.NoError(t, err)

	tampered := *p.node.X509
	tampered.Signature = append([]byte(nil), tampered.Signature...)
	tampered.Signature[5] ^= 0x40
	tamperedNode := &Certificate{X509: &tampered, ID: p.node.ID, Claims: p.node.Claims}

	n2IssuerKey, err := IssuerKey(n2Key)
	require.NoError(t, err)
	n2Issuer, err := Issue(p.auth, p.authKey, IssueRequest{ID: NodeID(testTD, "n2"), PublicKey: n2IssuerKey.Public().(ed25519.PublicKey),
		Claims: issuerClaims(n2), NotBefore: t0.Add(-time.Hour), NotAfter: t0.Add(time.Hour), Issuing: true})
	require.NoError(t, err)

	tamperedAgentX := *p.agent.X509
	tamperedAgentX.Signature = append([]byte(nil), tamperedAgentX.Signature...)
	tamperedAgentX.Signature[0] ^= 1
	tamperedAgent := &Certificate{X509: &tamperedAgentX, ID: p.agent.ID, Claims: p.agent.Claims}

	validity := func(nb, na time.Time) func(*x509.Certificate) {
		return func(c *x509.Certificate) { c.NotBefore, c.NotAfter = nb, na }
	}
	type tc struct {
		name   string
		node   *Certificate
		agent  *Certificate // nil: verify the node only
		want   error
		check  Check
		atTime time.Time
	}
	cases := []tc{
		{name: "node from another authority", node: rogueNode, want: ErrSignature, check: CheckSignature},
		{name: "node tampered signature", node: tamperedNode, want: ErrSignature, check: CheckSignature},
		{name: "agent tampered signature", node: p.issuer, agent: tamperedAgent, want: ErrSignature, check: CheckSignature},
		{name: "agent signed by another node", node: p.issuer,
			agent: forge(t, n2Issuer, n2IssuerKey, p.agent.ID, agentPub, p.agent.Claims, false, nil),
			want:  ErrSignature, check: CheckSignature},
		{name: "agent for a zone the node lacks", node: p.issuer,
			agent: forge(t, p.issuer, p.issuerKey, AgentID(testTD, "secret", "x"), agentPub, agentClaims("secret", "100.100.1.8"), false, nil),
			want:  ErrZoneConstraint, check: CheckZone},
		{name: "agent IP outside zone CIDR", node: p.issuer,
			agent: forge(t, p.issuer, p.issuerKey, p.agent.ID, agentPub, agentClaims("payments", "100.100.2.9"), false, nil),
			want:  ErrCIDRConstraint, check: CheckCIDR},
		{name: "agent prefix wider than grant", node: p.issuer,
			agent: forge(t, p.issuer, p.issuerKey, p.agent.ID, agentPub, func() Claims {
				c := agentClaims("payments", "100.100.1.9")
				c.Zones[0].Prefixes = []netip.Prefix{netip.MustParsePrefix("100.100.0.0/16")}
				return c
			}(), false, nil),
			want: ErrCIDRConstraint, check: CheckCIDR},
		{name: "node expired", node: p.node, want: ErrExpired, check: CheckValidity, atTime: t0.Add(25 * time.Hour)},
		{name: "node not yet valid", node: p.node, want: ErrNotYetValid, check: CheckValidity, atTime: t0.Add(-2 * time.Hour)},
		{name: "agent expired", node: p.issuer, agent: p.agent, want: ErrExpired, check: CheckValidity, atTime: t0.Add(2 * time.Hour)},
		{name: "agent not yet valid", node: p.issuer,
			agent: forge(t, p.issuer, p.issuerKey, p.agent.ID, agentPub, p.agent.Claims, false, validity(t0.Add(time.Minute), t0.Add(time.Hour))),
			want:  ErrNotYetValid, check: CheckValidity},
		{name: "agent outlives its node", node: p.issuer,
			agent: forge(t, p.issuer, p.issuerKey, p.agent.ID, agentPub, p.agent.Claims, false, validity(t0.Add(-time.Hour), t0.Add(48*time.Hour))),
			want:  ErrLifetime, check: CheckLifetime},
		{name: "node of wrong trust domain",
			node: forge(t, p.auth, p.authKey, NodeID("evil.internal", "n1"), nodePub, nodeClaims(), true, nil),
			want: ErrTrustDomain, check: CheckTrustDomain},
		{name: "agent of wrong trust domain", node: p.issuer,
			agent: forge(t, p.issuer, p.issuerKey, AgentID("evil.internal", "payments", "billing"), agentPub, p.agent.Claims, false, nil),
			want:  ErrTrustDomain, check: CheckTrustDomain},
		{name: "node certificate marked CA",
			node: forge(t, p.auth, p.authKey, NodeID(testTD, "n1"), nodePub, nodeClaims(), true, nil),
			want: ErrLeafIsCA, check: CheckBasicConstraints},
		{name: "node certificate that may sign CRLs",
			node: forge(t, p.auth, p.authKey, NodeID(testTD, "n1"), nodePub, nodeClaims(), false,
				func(c *x509.Certificate) { c.KeyUsage |= x509.KeyUsageCRLSign }),
			want: ErrKeyUsage, check: CheckKeyUsage},
		{name: "issuing certificate presented as the node certificate", node: p.issuer,
			want: ErrLeafIsCA, check: CheckBasicConstraints},
		{name: "agent issued by the node certificate itself", node: p.node,
			agent: forge(t, p.node, p.nodeKey, p.agent.ID, agentPub, p.agent.Claims, false, nil),
			want:  ErrNotCA, check: CheckBasicConstraints},
		{name: "agent issued by another node's issuing certificate, chained to this node's", node: p.issuer,
			agent: forge(t, n2Issuer, n2IssuerKey, p.agent.ID, agentPub, p.agent.Claims, false, nil),
			want:  ErrSignature, check: CheckSignature},
		{name: "issuing certificate minted by an issuing key", node: forgeIssuer(t, p.issuer, p.issuerKey, "n1", issuerClaims(p.node), nil),
			agent: p.agent, want: ErrSignature, check: CheckSignature},
		{name: "issuing CA without path length zero",
			node: forgeIssuer(t, p.auth, p.authKey, "n1", issuerClaims(p.node),
				func(c *x509.Certificate) { c.MaxPathLenZero, c.MaxPathLen = false, -1 }),
			agent: p.agent, want: ErrNotCA, check: CheckBasicConstraints},
		{name: "issuing CA that is also a TLS leaf",
			node: forgeIssuer(t, p.auth, p.authKey, "n1", issuerClaims(p.node),
				func(c *x509.Certificate) { c.KeyUsage |= x509.KeyUsageDigitalSignature }),
			agent: p.agent, want: ErrKeyUsage, check: CheckKeyUsage},
		{name: "agent marked CA", node: p.issuer,
			agent: forge(t, p.issuer, p.issuerKey, p.agent.ID, agentPub, p.agent.Claims, true, nil),
			want:  ErrLeafIsCA, check: CheckBasicConstraints},
		{name: "agent ID where a node is expected",
			node: forge(t, p.auth, p.authKey, p.agent.ID, nodePub, p.agent.Claims, true, nil),
			want: ErrSPIFFEID, check: CheckSPIFFEID},
		{name: "node ID where an agent is expected", node: p.issuer,
			agent: forge(t, p.issuer, p.issuerKey, NodeID(testTD, "n2"), agentPub, nodeClaims(), false, nil),
			want:  ErrSPIFFEID, check: CheckSPIFFEID},
		{name: "agent without client auth", node: p.issuer,
			agent: forge(t, p.issuer, p.issuerKey, p.agent.ID, agentPub, p.agent.Claims, false,
				func(c *x509.Certificate) { c.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth} }),
			want: ErrKeyUsage, check: CheckKeyUsage},
	}
	// The same attacks must fail identically with a signature cache warmed by the valid chain.
	cached := Verifier{Authority: p.auth, Cache: NewSignatureCache(64)}
	require.NoError(t, cached.VerifyAgent(p.issuer, p.agent, t0))
	require.Equal(t, 2, cached.Cache.Len())
	for _, c := range cases {
		t.Run(c.name+" cached", func(t *testing.T) {
			now := c.atTime
			if now.IsZero() {
				now = t0
			}
			var err error
			if c.agent == nil {
				err = cached.VerifyNode(c.node, now)
			} else {
				err = cached.VerifyAgent(c.node, c.agent, now)
			}
			require.ErrorIs(t, err, c.want)
		})
		t.Run(c.name, func(t *testing.T) {
			now := c.atTime
			if now.IsZero() {
				now = t0
			}
			var err error
			if c.agent == nil {
				err = v.VerifyNode(c.node, now)
			} else {
				err = v.VerifyAgent(c.node, c.agent, now)
			}
			require.ErrorIs(t, err, c.want)
			var ve *VerifyError
			require.ErrorAs(t, err, &ve)
			assert.Equal(t, c.check, ve.Check, "error: %v", err)
			assert.NotEmpty(t, ve.Detail)

			// The DER path must refuse exactly the same way.
			if c.agent == nil {
				_, err = v.VerifyNodeDER([][]byte{c.node.Raw()}, now)
			} else {
				_, err = v.VerifyAgentDER(c.node.Raw(), c.agent.Raw(), now)
			}
			if c.name == "node tampered signature" || c.name == "agent tampered signature" {
				return // the tampering lives in the parsed struct, not in DER; covered below
			}
			require.ErrorIs(t, err, c.want)
		})
	}
}

func TestVerifyTamperedDER(t *testing.T) {
	p := newPKI(t)
	v := Verifier{Authority: p.auth}
	for _, raw := range [][]byte{p.node.Raw(), p.agent.Raw()} {
		der := append([]byte(nil), raw...)
		der[len(der)-3] ^= 0x01 // inside the signature BIT STRING at the end
		var err error
		if raw[0] == p.node.Raw()[0] && len(raw) == len(p.node.Raw()) {
			_, err = v.VerifyNodeDER([][]byte{der}, t0)
		} else {
			_, err = v.VerifyAgentDER(p.issuer.Raw(), der, t0)
		}
		require.ErrorIs(t, err, ErrSignature)
	}
}

func TestVerifyRefusesTwoURISANs(t *testing.T) {
	p := newPKI(t)
	u2 := *p.node.X509.URIs[0]
	u2.Path = "/node/other"
	der := forgeDER(t, p, func(c *x509.Certificate) { c.URIs = append(c.URIs, &u2) })
	_, err := ParseCertificate(der)
	require.ErrorIs(t, err, ErrSPIFFEID)
	_, err = Verifier{Authority: p.auth}.VerifyNodeDER([][]byte{der}, t0)
	require.ErrorIs(t, err, ErrSPIFFEID)
	var ve *VerifyError
	require.ErrorAs(t, err, &ve)
	assert.Equal(t, CheckParse, ve.Check)
}

func TestParseCertificateRefusals(t *testing.T) {
	p := newPKI(t)
	cases := []struct {
		name   string
		mutate func(*x509.Certificate)
		want   error
	}{
		{"no URI SAN", func(c *x509.Certificate) { c.URIs = nil }, ErrSPIFFEID},
		{"claims missing", func(c *x509.Certificate) { c.ExtraExtensions = nil }, ErrClaims},
		{"claims critical (the profile before SPIFFE compatibility)", func(c *x509.Certificate) { c.ExtraExtensions[0].Critical = true }, ErrLegacyProfile},
		{"claims garbage", func(c *x509.Certificate) { c.ExtraExtensions[0].Value = []byte{0xff} }, ErrClaims},
		{"unknown critical extension", func(c *x509.Certificate) {
			c.ExtraExtensions = append(c.ExtraExtensions, pkixExt([]int{1, 2, 3, 4}, true))
		}, ErrMalformedCertificate},
		{"bad SPIFFE path", func(c *x509.Certificate) { c.URIs[0].Path = "/workload/x" }, ErrSPIFFEID},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := ParseCertificate(forgeDER(t, p, c.mutate))
			require.ErrorIs(t, err, c.want)
		})
	}
	_, err := ParseCertificate([]byte("not a certificate"))
	require.ErrorIs(t, err, ErrMalformedCertificate)
	_, err = ParseCertificate(make([]byte, MaxCertificateSize+1))
	require.ErrorIs(t, err, ErrMalformedCertificate)
}

func TestIssueRefusesWhatVerifyRefuses(t *testing.T) {
	p := newPKI(t)
	agentPub := p.agentKey.Public().(ed25519.PublicKey)
	base := IssueRequest{ID: p.agent.ID, PublicKey: agentPub, Claims: agentClaims("payments", "100.100.1.9"),
		NotBefore: t0.Add(-time.Hour), NotAfter: t0.Add(time.Hour)}
	cases := []struct {
		name   string
		issuer *Certificate
		key    ed25519.PrivateKey
		edit   func(*IssueRequest)
		want   error
	}{
		{"zone not granted", p.issuer, p.issuerKey, func(r *IssueRequest) {
			r.ID = AgentID(testTD, "secret", "x")
			r.Claims = agentClaims("secret", "100.100.1.9")
		}, ErrZoneConstraint},
		{"IP outside CIDR", p.issuer, p.issuerKey, func(r *IssueRequest) { r.Claims = agentClaims("payments", "10.0.0.1") }, ErrCIDRConstraint},
		{"validity beyond node", p.issuer, p.issuerKey, func(r *IssueRequest) { r.NotAfter = t0.Add(25 * time.Hour) }, ErrLifetime},
		{"not before after not after", p.issuer, p.issuerKey, func(r *IssueRequest) { r.NotBefore = r.NotAfter }, ErrLifetime},
		{"wrong trust domain", p.issuer, p.issuerKey, func(r *IssueRequest) { r.ID.TrustDomain = "evil.internal" }, ErrTrustDomain},
		{"issuing key minting a node certificate", p.issuer, p.issuerKey, func(r *IssueRequest) { r.ID = NodeID(testTD, "n2") }, ErrSPIFFEID},
		{"issuing key minting an issuing certificate", p.issuer, p.issuerKey, func(r *IssueRequest) { r.ID, r.Issuing = NodeID(testTD, "n2"), true }, ErrNotCA},
		{"node certificate issuing an agent", p.node, p.nodeKey, nil, ErrNotCA},
		{"agent cannot issue", p.agent, p.agentKey, nil, ErrNotCA},
		{"issuer key mismatch", p.node, p.agentKey, nil, ErrKeyMismatch},
		{"claims zone differs from ID zone", p.issuer, p.issuerKey, func(r *IssueRequest) { r.Claims = agentClaims("ml", "100.100.2.3") }, ErrClaims},
		{"agent with no fingerprint", p.issuer, p.issuerKey, func(r *IssueRequest) { r.Claims.Fingerprint = nil }, ErrClaims},
		{"authority issuing an agent", p.auth, p.authKey, nil, ErrSPIFFEID},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := base
			r.Claims = agentClaims("payments", "100.100.1.9")
			if c.edit != nil {
				c.edit(&r)
			}
			_, err := Issue(c.issuer, c.key, r)
			require.ErrorIs(t, err, c.want)
		})
	}
}

func TestVerifierWithoutAnchor(t *testing.T) {
	p := newPKI(t)
	err := Verifier{}.VerifyNode(p.node, t0)
	require.ErrorIs(t, err, ErrNoTrustAnchor)
	err = Verifier{Authority: p.node}.VerifyNode(p.node, t0)
	require.ErrorIs(t, err, ErrNoTrustAnchor)
	err = Verifier{Authority: p.issuer}.VerifyNode(p.node, t0)
	require.ErrorIs(t, err, ErrNoTrustAnchor, "an issuing certificate is never a trust anchor")
	err = Verifier{Authority: p.auth}.VerifyNode(p.node, t0.Add(400*24*time.Hour))
	require.ErrorIs(t, err, ErrExpired)
	var ve *VerifyError
	require.True(t, errors.As(err, &ve))
	assert.Equal(t, "spiffe://"+testTD, ve.Subject)
}

func TestPEMRoundTrip(t *testing.T) {
	p := newPKI(t)
	path := t.TempDir() + "/chain.pem"
	require.NoError(t, WriteCertificates(path, p.agent, p.issuer))
	got, err := ReadCertificates(path)
	require.NoError(t, err)
	require.Len(t, got, 2)
	assert.Equal(t, p.agent.Raw(), got[0].Raw())
	assert.Equal(t, p.issuer.Raw(), got[1].Raw())
	assert.True(t, got[1].Issuing)

	_, err = ParsePEM([]byte("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"))
	require.ErrorIs(t, err, ErrMalformedCertificate)

	tc, err := TLSCertificate(p.nodeKey, p.node)
	require.NoError(t, err)
	assert.Len(t, tc.Certificate, 1)
	_, err = TLSCertificate(p.agentKey, p.node)
	require.ErrorIs(t, err, ErrKeyMismatch)
}

func BenchmarkVerifyAgent(b *testing.B) {
	p := newPKI(b)
	v := Verifier{Authority: p.auth}
	b.ReportAllocs()
	for b.Loop() {
		if err := v.VerifyAgent(p.issuer, p.agent, t0); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkVerifyAgentDER(b *testing.B) {
	p := newPKI(b)
	v := Verifier{Authority: p.auth}
	nd, ad := p.issuer.Raw(), p.agent.Raw()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := v.VerifyAgentDER(nd, ad, t0); err != nil {
			b.Fatal(err)
		}
	}
}

func FuzzParseCertificate(f *testing.F) {
	p := newPKI(f)
	f.Add(p.auth.Raw())
	f.Add(p.node.Raw())
	f.Add(p.issuer.Raw())
	f.Add(p.agent.Raw())
	f.Add([]byte{0x30, 0x00})
	v := Verifier{Authority: p.auth}
	f.Fuzz(func(t *testing.T, der []byte) {
		c, err := ParseCertificate(der)
		if err != nil {
			require.True(t, errorsIsAny(err, ErrMalformedCertificate, ErrSPIFFEID, ErrClaims, ErrKeyAlgorithm), "unclassified error: %v", err)
			return
		}
		require.NoError(t, c.ID.Validate())
		if c.Issuing {
			require.NoError(t, c.Claims.ValidateIssuer(c.ID))
		} else {
			require.NoError(t, c.Claims.ValidateFor(c.ID))
		}
		// Verification of arbitrary input never panics and, for anything but the fixtures' own
		// bytes, has to fail with a VerifyError.
		if c.ID.Kind == KindNode {
			err := v.VerifyNode(c, t0)
			if err != nil {
				var ve *VerifyError
				require.ErrorAs(t, err, &ve)
			}
		}
	})
}

func TestSignatureCacheEviction(t *testing.T) {
	p := newPKI(t)
	v := Verifier{Authority: p.auth, Cache: NewSignatureCache(1)}
	require.NoError(t, v.VerifyAgent(p.issuer, p.agent, t0))
	assert.Equal(t, 1, v.Cache.Len())
	require.NoError(t, v.VerifyAgent(p.issuer, p.agent, t0))
	assert.Equal(t, 1, v.Cache.Len())
	// A cached signature never excuses an expired certificate.
	require.ErrorIs(t, v.VerifyAgent(p.issuer, p.agent, t0.Add(2*time.Hour)), ErrExpired)
}

func BenchmarkVerifyAgentCached(b *testing.B) {
	p := newPKI(b)
	v := Verifier{Authority: p.auth, Cache: NewSignatureCache(1024)}
	b.ReportAllocs()
	for b.Loop() {
		if err := v.VerifyAgent(p.issuer, p.agent, t0); err != nil {
			b.Fatal(err)
		}
	}
}

func TestIssueSubSecondTimes(t *testing.T) {
	// Callers pass time.Now()-style instants; what gets signed (and checked) is whole seconds.
	key := mustKey(t)
	now := t0.Add(123456789 * time.Nanosecond)
	auth, err := NewAuthority(testTD, key, now, time.Hour)
	require.NoError(t, err)
	node, err := Issue(auth, key, IssueRequest{ID: NodeID(testTD, "n1"), PublicKey: mustKey(t).Public().(ed25519.PublicKey),
		Claims: nodeClaims(), NotBefore: now, NotAfter: now.Add(time.Hour)})
	require.NoError(t, err)
	require.NoError(t, Verifier{Authority: auth}.VerifyNode(node, now))
	assert.Equal(t, auth.X509.NotAfter, node.X509.NotAfter)
}
