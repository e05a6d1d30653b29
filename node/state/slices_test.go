package state

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
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
	"github.com/ute-project/ute/identity/authority"
)

const slicePolicy = `zones:
  - name: payments
    cidr: [100.100.1.0/24, "fd00:100:1::/64"]
    regions: [eu-west-1]
    min_trust: 50
    isolate_below: 20
`

// realNode is a node directory that joined a real authority over QUIC on loopback.
type realNode struct {
	dir       *Dir
	cert      *identity.Certificate
	key       ed25519.PrivateKey
	issuer    *identity.Certificate // signs the node's agents
	issuerKey ed25519.PrivateKey
}

func startRealAuthority(t *testing.T) (*authority.Authority, string) {
	t.Helper()
	tmp := t.TempDir()
	policy := filepath.Join(tmp, "policy.yaml")
	require.NoError(t, os.WriteFile(policy, []byte(slicePolicy), 0o644))
	dir := filepath.Join(tmp, "auth")
	require.NoError(t, authority.Init(dir, "acme.internal", policy, authority.Options{}))
	a, err := authority.Open(dir, authority.Options{})
	require.NoError(t, err)
	srv, err := a.Listen("127.0.0.1:0")
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		require.NoError(t, <-done)
		require.NoError(t, a.Close())
	})
	return a, srv.Addr().String()
}

func joinReal(t *testing.T, a *authority.Authority, addr, name string) *realNode {
	t.Helper()
	ctx := context.Background()
	tok, err := a.CreateToken(ctx, authority.TokenSpec{Zones: []string{"payments"}})
	require.NoError(t, err)
	key := mustKey(t)
	fp := sha256.Sum256([]byte(name))
	j, err := authority.Join(ctx, authority.JoinParams{Addr: addr, Token: tok.Token, Key: key, Name: name, HostFingerprint: fp[:]})
	require.NoError(t, err)
	path := filepath.Join(t.TempDir(), name)
	d, err := Create(path)
	require.NoError(t, err)
	require.NoError(t, d.SaveJoin(Joined{
		Key: key, NodeCert: j.NodeCertDER, IssuerCert: j.IssuerCertDER, AuthorityCert: j.AuthorityDER, Policy: j.Policy,
		Info: Info{Name: name, Region: "eu-west-1", TrustDomain: "acme.internal", Authority: addr, JoinedAt: time.Now()},
	}))
	d, err = Open(path)
	require.NoError(t, err)
	ikey, err := identity.IssuerKey(key)
	require.NoError(t, err)
	return &realNode{dir: d, cert: j.Node, key: key, issuer: j.Issuer, issuerKey: ikey}
}

// Two nodes joined into one zone get disjoint slices, and every agent either of them can ever add
// has an overlay IP no agent of the other has.
func TestNodesOfOneZoneNeverShareAnAgentIP(t *testing.T) {
	a, addr := startRealAuthority(t)
	nodes := []*realNode{joinReal(t, a, addr, "a"), joinReal(t, a, addr, "b")}
	ga, ok := nodes[0].cert.Claims.Zone("payments")
	require.True(t, ok)
	gb, ok := nodes[1].cert.Claims.Zone("payments")
	require.True(t, ok)
	require.Len(t, ga.Prefixes, 2, "one slice per zone CIDR (IPv4 and IPv6)")
	require.Len(t, gb.Prefixes, 2)
	for _, pa := range ga.Prefixes {
		for _, pb := range gb.Prefixes {
			require.False(t, pa.Overlaps(pb), "slices %s and %s overlap", pa, pb)
		}
	}

	exe := filepath.Join(t.TempDir(), "agent-bin")
	require.NoError(t, os.WriteFile(exe, []byte("#!/bin/sh\n"), 0o755))
	v := identity.Verifier{Authority: a.Certificate()}
	owner := map[netip.Addr]string{}
	for _, n := range nodes {
		g, _ := n.cert.Claims.Zone("payments")
		// A /28 holds 14 agents; the 15th spills into the node's IPv6 slice, never into the
		// rest of the zone's IPv4 CIDR.
		for i := range 15 {
			ag, err := n.dir.AddAgent(AgentSpec{Name: fmt.Sprintf("agent-%d", i), Zone: "payments", Exe: exe})
			require.NoError(t, err)
			require.NoError(t, v.VerifyAgent(n.issuer, ag.Cert, time.Now()))
			slice := g.Prefixes[0]
			if i == 14 {
				slice = g.Prefixes[1]
			}
			require.True(t, slice.Contains(ag.IP), "%s/%s got %s outside its slice %s", n.cert.ID.Name, ag.Name, ag.IP, slice)
			if prev, dup := owner[ag.IP]; dup {
				t.Fatalf("%s was given to %s and %s/%s", ag.IP, prev, n.cert.ID.Name, ag.Name)
			}
			owner[ag.IP] = n.cert.ID.Name + "/" + ag.Name
		}
	}
	assert.Len(t, owner, 30)
}

// forgeAgent signs an agent certificate with a node key by hand, skipping identity.Issue's
// constraint checks, as a compromised node could.
func forgeAgent(t *testing.T, node *identity.Certificate, nodeKey ed25519.PrivateKey, zone, name string, ip netip.Addr) *identity.Certificate {
	t.Helper()
	ext, err := identity.MarshalClaims(identity.Claims{
		Zones: []identity.ZoneGrant{{Name: zone}}, OverlayIPs: []netip.Addr{ip}, Fingerprint: make32(7),
	})
	require.NoError(t, err)
	u, err := url.Parse(identity.AgentID(node.ID.TrustDomain, zone, name).String())
	require.NoError(t, err)
	now := time.Now()
	der, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: big.NewInt(now.UnixNano()), Subject: pkix.Name{CommonName: name},
		NotBefore: now.Add(-time.Minute), NotAfter: now.Add(time.Hour), URIs: []*url.URL{u},
		BasicConstraintsValid: true, KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage:     []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth},
		ExtraExtensions: []pkix.Extension{{Id: identity.OIDClaims, Value: ext}},
	}, node.X509, mustKey(t).Public(), nodeKey)
	require.NoError(t, err)
	c, err := identity.ParseCertificate(der)
	require.NoError(t, err)
	return c
}

// Node A holds the zone but not node B's slice: an agent certificate it signs for an IP in B's
// slice (here, the IP of one of B's real agents) is refused by every verifier.
func TestNodeCannotMintAgentInAnotherNodesSlice(t *testing.T) {
	a, addr := startRealAuthority(t)
	na, nb := joinReal(t, a, addr, "a"), joinReal(t, a, addr, "b")
	exe := filepath.Join(t.TempDir(), "agent-bin")
	require.NoError(t, os.WriteFile(exe, []byte("#!/bin/sh\n"), 0o755))
	victim, err := nb.dir.AddAgent(AgentSpec{Name: "ledger", Zone: "payments", Exe: exe})
	require.NoError(t, err)
	gb, _ := nb.cert.Claims.Zone("payments")
	v := identity.Verifier{Authority: a.Certificate()}

	for _, ip := range []netip.Addr{victim.IP, gb.Prefixes[0].Addr().Next().Next(), gb.Prefixes[1].Addr().Next()} {
		forged := forgeAgent(t, na.issuer, na.issuerKey, "payments", "ledger", ip)
		err := v.VerifyAgent(na.issuer, forged, time.Now())
		require.ErrorIs(t, err, identity.ErrCIDRConstraint, "A minted %s inside B's slice", ip)
		assert.Contains(t, err.Error(), ip.String())

		// The honest path refuses too: identity.Issue checks the same constraint before signing.
		_, err = identity.Issue(na.issuer, na.issuerKey, identity.IssueRequest{
			ID: identity.AgentID("acme.internal", "payments", "ledger"), PublicKey: mustKey(t).Public().(ed25519.PublicKey),
			Claims:    identity.Claims{Zones: []identity.ZoneGrant{{Name: "payments"}}, OverlayIPs: []netip.Addr{ip}, Fingerprint: make32(7)},
			NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		})
		require.ErrorIs(t, err, identity.ErrCIDRConstraint)
	}
	// The same forgery inside A's own slice verifies: the refusal above is the slice, nothing else.
	ga, _ := na.cert.Claims.Zone("payments")
	own := forgeAgent(t, na.issuer, na.issuerKey, "payments", "ledger", ga.Prefixes[0].Addr().Next())
	require.NoError(t, v.VerifyAgent(na.issuer, own, time.Now()))
}
