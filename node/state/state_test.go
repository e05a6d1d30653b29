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
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity"
)

type fixture struct {
	caKey  ed25519.PrivateKey
	ca     *identity.Certificate
	dir    *Dir
	now    time.Time
	exe    string
	nodeSN int64
}

func mustKey(t *testing.T) ed25519.PrivateKey {
	t.Helper()
	k, err := identity.GenerateKey()
	require.NoError(t, err)
	return k
}

// issueNode signs a node certificate for key the way the authority does.
func (f *fixture) issueNode(t *testing.T, key ed25519.PrivateKey, grants []identity.ZoneGrant) *identity.Certificate {
	t.Helper()
	f.nodeSN++
	c, err := identity.Issue(f.ca, f.caKey, identity.IssueRequest{
		ID: identity.NodeID("acme.internal", "n1"), PublicKey: key.Public().(ed25519.PublicKey),
		Claims:    identity.Claims{Zones: grants, Regions: []string{"eu-west-1"}, Fingerprint: make32(1)},
		NotBefore: f.now.Add(-time.Minute), NotAfter: f.now.Add(24 * time.Hour), Serial: big.NewInt(f.nodeSN),
	})
	require.NoError(t, err)
	return c
}

// issuerFor signs the issuing certificate that goes with node certificate node (key: its node key).
func (f *fixture) issuerFor(t *testing.T, node *identity.Certificate, key ed25519.PrivateKey) *identity.Certificate {
	t.Helper()
	ikey, err := identity.IssuerKey(key)
	require.NoError(t, err)
	c, err := identity.IssueIssuer(f.ca, f.caKey, node, ikey.Public().(ed25519.PublicKey))
	require.NoError(t, err)
	return c
}

func make32(b byte) []byte {
	out := make([]byte, 32)
	out[0] = b
	return out
}

func newFixture(t *testing.T, grants ...identity.ZoneGrant) *fixture {
	t.Helper()
	f := &fixture{caKey: mustKey(t), now: time.Now()}
	var err error
	f.ca, err = identity.NewAuthority("acme.internal", f.caKey, f.now.Add(-time.Hour), 24*365*time.Hour)
	require.NoError(t, err)
	if len(grants) == 0 {
		grants = []identity.ZoneGrant{{Name: "payments", Prefixes: []netip.Prefix{netip.MustParsePrefix("100.100.1.0/24")}}}
	}
	path := filepath.Join(t.TempDir(), "node")
	d, err := Create(path, WithClock(func() time.Time { return f.now }))
	require.NoError(t, err)
	nodeKey := mustKey(t)
	node := f.issueNode(t, nodeKey, grants)
	require.NoError(t, d.SaveJoin(Joined{
		Key: nodeKey, NodeCert: node.Raw(), IssuerCert: f.issuerFor(t, node, nodeKey).Raw(), AuthorityCert: f.ca.Raw(), Policy: []byte("zones: []\n"),
		Info: Info{Name: "n1", Region: "eu-west-1", TrustDomain: "acme.internal", Authority: "127.0.0.1:7443", JoinedAt: f.now},
	}))
	f.dir, err = Open(path, WithClock(func() time.Time { return f.now }))
	require.NoError(t, err)
	f.exe = filepath.Join(t.TempDir(), "agent-bin")
	require.NoError(t, os.WriteFile(f.exe, []byte("#!/bin/sh\necho agent\n"), 0o755))
	return f
}

func mode(t *testing.T, path string) os.FileMode {
	t.Helper()
	st, err := os.Stat(path)
	require.NoError(t, err)
	return st.Mode().Perm()
}

func TestSaveJoinLayoutAndPermissions(t *testing.T) {
	f := newFixture(t)
	p := f.dir.Path()
	assert.Equal(t, os.FileMode(0o700), mode(t, p))
	assert.Equal(t, os.FileMode(0o600), mode(t, filepath.Join(p, FileNodeKey)))
	for _, name := range []string{FileNodeCert, FileAuthorityCert, FilePolicy, FileNodeInfo} {
		assert.FileExists(t, filepath.Join(p, name))
	}
	info, err := f.dir.Info()
	require.NoError(t, err)
	assert.Equal(t, "n1", info.Name)
	node, err := f.dir.NodeCert()
	require.NoError(t, err)
	ca, err := f.dir.AuthorityCert()
	require.NoError(t, err)
	require.NoError(t, identity.Verifier{Authority: ca}.VerifyNode(node, f.now))

	_, err = Create(p)
	require.ErrorIs(t, err, ErrAlreadyJoined)
	_, err = Open(filepath.Join(t.TempDir(), "empty"))
	require.ErrorIs(t, err, ErrNotJoined)
}

func TestAddAgentAllocatesDistinctIPsInsideCIDR(t *testing.T) {
	f := newFixture(t)
	cidr := netip.MustParsePrefix("100.100.1.0/24")
	a1, err := f.dir.AddAgent(AgentSpec{Name: "billing", Zone: "payments", Exe: f.exe, UID: 1000, GID: 1000, Labels: map[string]string{"team": "pay"}})
	require.NoError(t, err)
	a2, err := f.dir.AddAgent(AgentSpec{Name: "ledger", Zone: "payments", Exe: f.exe, UID: 1000, GID: 1000})
	require.NoError(t, err)
	assert.Equal(t, "100.100.1.1", a1.IP.String())
	assert.Equal(t, "100.100.1.2", a2.IP.String())
	assert.True(t, cidr.Contains(a1.IP) && cidr.Contains(a2.IP))
	assert.Equal(t, os.FileMode(0o600), mode(t, a1.KeyPath))

	issuer, err := f.dir.IssuerCert()
	require.NoError(t, err)
	v := identity.Verifier{Authority: f.ca}
	require.NoError(t, v.VerifyAgent(issuer, a1.Cert, f.now))
	assert.Equal(t, []netip.Addr{a1.IP}, a1.Cert.Claims.OverlayIPs)
	assert.Equal(t, map[string]string{"team": "pay"}, a1.Cert.Claims.Labels)
	w, err := identity.WorkloadOfExe(f.exe, 1000, 1000)
	require.NoError(t, err)
	d := w.Digest()
	assert.Equal(t, d[:], a1.Cert.Claims.Fingerprint)
	assert.WithinDuration(t, f.now.Add(DefaultAgentLifetime), a1.Cert.X509.NotAfter, time.Second)

	got, err := f.dir.Agent("payments", "billing")
	require.NoError(t, err)
	assert.Equal(t, a1.IP, got.IP)
	all, err := f.dir.Agents()
	require.NoError(t, err)
	require.Len(t, all, 2)
	assert.Equal(t, "billing", all[0].Name)

	_, err = f.dir.AddAgent(AgentSpec{Name: "billing", Zone: "payments", Exe: f.exe})
	require.ErrorIs(t, err, ErrAgentExists)
	_, err = f.dir.Agent("payments", "ghost")
	require.ErrorIs(t, err, ErrAgentUnknown)
}

func TestAddAgentLifetimeCappedByNode(t *testing.T) {
	f := newFixture(t)
	a, err := f.dir.AddAgent(AgentSpec{Name: "long", Zone: "payments", Exe: f.exe, Lifetime: 100 * time.Hour})
	require.NoError(t, err)
	node, err := f.dir.NodeCert()
	require.NoError(t, err)
	assert.Equal(t, node.X509.NotAfter, a.Cert.X509.NotAfter)
}

func TestAddAgentRefusesZoneNodeLacks(t *testing.T) {
	f := newFixture(t)
	_, err := f.dir.AddAgent(AgentSpec{Name: "spy", Zone: "research", Exe: f.exe})
	require.ErrorIs(t, err, ErrZoneNotHeld)
	assert.Contains(t, err.Error(), "node n1 does not hold zone research")
	assert.Contains(t, err.Error(), "join with a token for research")
	_, statErr := os.Stat(filepath.Join(f.dir.Path(), DirAgents, "research"))
	assert.True(t, os.IsNotExist(statErr), "nothing written for a refused agent")
}

// A node that bypasses AddAgent and signs an agent certificate by hand for a zone it lacks (or an
// IP outside its CIDR) produces a certificate every verifier refuses.
func TestHandForgedAgentCertificateRefusedByVerifier(t *testing.T) {
	f := newFixture(t)
	node, nodeKey, err := f.dir.NodeIssuer()
	require.NoError(t, err)
	forge := func(zone string, ip string) *identity.Certificate {
		ext, err := identity.MarshalClaims(identity.Claims{
			Zones: []identity.ZoneGrant{{Name: zone}}, OverlayIPs: []netip.Addr{netip.MustParseAddr(ip)}, Fingerprint: make32(2),
		})
		require.NoError(t, err)
		u, err := url.Parse(identity.AgentID("acme.internal", zone, "spy").String())
		require.NoError(t, err)
		agentKey := mustKey(t)
		der, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
			SerialNumber: big.NewInt(99), Subject: pkix.Name{CommonName: "spy"},
			NotBefore: f.now.Add(-time.Minute), NotAfter: f.now.Add(time.Hour), URIs: []*url.URL{u},
			BasicConstraintsValid: true, KeyUsage: x509.KeyUsageDigitalSignature,
			ExtKeyUsage:     []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth},
			ExtraExtensions: []pkix.Extension{{Id: identity.OIDClaims, Value: ext}},
		}, node.X509, agentKey.Public(), nodeKey)
		require.NoError(t, err)
		c, err := identity.ParseCertificate(der)
		require.NoError(t, err)
		return c
	}
	v := identity.Verifier{Authority: f.ca}
	require.ErrorIs(t, v.VerifyAgent(node, forge("research", "100.100.2.5"), f.now), identity.ErrZoneConstraint)
	require.ErrorIs(t, v.VerifyAgent(node, forge("payments", "100.100.2.5"), f.now), identity.ErrCIDRConstraint)
}

func TestAddAgentExhaustsSmallCIDR(t *testing.T) {
	f := newFixture(t, identity.ZoneGrant{Name: "tiny", Prefixes: []netip.Prefix{netip.MustParsePrefix("10.9.0.0/30")}})
	for _, n := range []string{"a", "b"} {
		_, err := f.dir.AddAgent(AgentSpec{Name: n, Zone: "tiny", Exe: f.exe})
		require.NoError(t, err)
	}
	_, err := f.dir.AddAgent(AgentSpec{Name: "c", Zone: "tiny", Exe: f.exe})
	require.ErrorIs(t, err, ErrNoFreeIP)
}

func TestInstallRenewalThenReissueAgents(t *testing.T) {
	f := newFixture(t)
	a, err := f.dir.AddAgent(AgentSpec{Name: "billing", Zone: "payments", Exe: f.exe})
	require.NoError(t, err)
	old, err := f.dir.NodeCert()
	require.NoError(t, err)

	newKey := mustKey(t)
	renewed := f.issueNode(t, newKey, old.Claims.Zones)
	other := mustKey(t)
	require.Error(t, f.dir.InstallRenewal(other, renewed.Raw(), f.issuerFor(t, renewed, other).Raw()), "a certificate for another key is refused")
	require.ErrorIs(t, f.dir.InstallRenewal(newKey, renewed.Raw(), f.issuerFor(t, renewed, other).Raw()), ErrBadFile,
		"an issuing certificate for another key is refused")
	require.ErrorIs(t, f.dir.InstallRenewal(newKey, renewed.Raw(), f.issuerFor(t, old, newKey).Raw()), ErrBadFile,
		"an issuing certificate of another node certificate is refused")
	require.NoError(t, f.dir.InstallRenewal(newKey, renewed.Raw(), f.issuerFor(t, renewed, newKey).Raw()))
	node, err := f.dir.NodeCert()
	require.NoError(t, err)
	require.True(t, node.PublicKey().Equal(newKey.Public()))
	issuer, _, err := f.dir.NodeIssuer()
	require.NoError(t, err)
	assert.Equal(t, node.Serial(), issuer.NodeSerial())

	v := identity.Verifier{Authority: f.ca}
	require.Error(t, v.VerifyAgent(issuer, a.Cert, f.now), "the old agent certificate was signed by the old issuing key")
	re, err := f.dir.ReissueAgent("payments", "billing")
	require.NoError(t, err)
	require.NoError(t, v.VerifyAgent(issuer, re.Cert, f.now))
	assert.Equal(t, a.IP, re.IP)
}

func TestOpenFinishesInterruptedRenewal(t *testing.T) {
	f := newFixture(t)
	old, err := f.dir.NodeCert()
	require.NoError(t, err)
	newKey := mustKey(t)
	renewed := f.issueNode(t, newKey, old.Claims.Zones)
	p := f.dir.Path()
	// Crash after the staged files were written but before any rename.
	require.NoError(t, os.WriteFile(filepath.Join(p, FileIssuerCert+suffixNext), certPEM(f.issuerFor(t, renewed, newKey).Raw()), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(p, FileNodeCert+suffixNext), certPEM(renewed.Raw()), 0o644))
	require.NoError(t, identity.WriteKey(filepath.Join(p, FileNodeKey+suffixNext), newKey))
	d, err := Open(p)
	require.NoError(t, err)
	node, err := d.NodeCert()
	require.NoError(t, err)
	key, err := d.NodeKey()
	require.NoError(t, err)
	assert.True(t, node.PublicKey().Equal(key.Public()))
	assert.True(t, key.Public().(ed25519.PublicKey).Equal(newKey.Public()))
	_, _, err = d.NodeIssuer()
	require.NoError(t, err, "the staged issuing certificate was installed with the node certificate")

	// Crash with only a staged certificate and no staged key: rolled back.
	other := f.issueNode(t, mustKey(t), old.Claims.Zones)
	require.NoError(t, os.WriteFile(filepath.Join(p, FileNodeCert+suffixNext), certPEM(other.Raw()), 0o644))
	d, err = Open(p)
	require.NoError(t, err)
	node, err = d.NodeCert()
	require.NoError(t, err)
	assert.True(t, node.PublicKey().Equal(newKey.Public()))
	assert.NoFileExists(t, filepath.Join(p, FileNodeCert+suffixNext))
}
