package tunnel

import (
	"context"
	"crypto/ed25519"
	"crypto/tls"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/overlay/dtl"
)

// dtlAdmitter wires the real dtl.Verifier in, the way the node does: one dtl.Session per tunnel,
// keyed by the tunnel's session binding.
type dtlAdmitter struct {
	v        *dtl.Verifier
	mu       sync.Mutex
	sessions map[string]*dtl.Session
}

func newDTLAdmitter(pki *testPKI) *dtlAdmitter {
	iv := identity.Verifier{Authority: pki.cert}
	return &dtlAdmitter{
		sessions: map[string]*dtl.Session{},
		v: &dtl.Verifier{
			Chains: dtl.ChainVerifierFunc(func(nodeDER, agentDER []byte, now time.Time) (dtl.AgentInfo, error) {
				ch, err := iv.VerifyAgentDER(nodeDER, agentDER, now)
				if err != nil {
					return dtl.AgentInfo{}, err
				}
				return dtl.AgentInfo{
					Agent: ch.Agent.ID.String(), Node: ch.Node.ID.String(), Zone: ch.Agent.ID.Zone,
					AgentKey: ch.Agent.PublicKey(), Fingerprint: ch.Agent.Claims.Fingerprint,
					AgentSerial: ch.Agent.Serial().String(), NodeSerial: ch.Node.NodeSerial().String(),
					NotAfter: ch.Agent.X509.NotAfter,
				}, nil
			}),
			Revocation: dtl.RevocationFunc(func(...string) bool { return false }),
			Policy:     dtl.PolicyFunc(func(*dtl.AgentInfo, *dtl.Claims) error { return nil }),
			MinTrust:   func(string) (int, bool) { return 50, true },
		},
	}
}

func (d *dtlAdmitter) Admit(_ context.Context, req FlowRequest) (Admission, error) {
	d.mu.Lock()
	s := d.sessions[string(req.Exporter)]
	if s == nil {
		s = &dtl.Session{AAD: req.Exporter, PeerNode: req.Peer.NodeID, Zone: req.Zone,
			Replay: &dtl.ReplayWindow{}, Chains: dtl.NewChainCache(16)}
		d.sessions[string(req.Exporter)] = s
	}
	d.mu.Unlock()
	adm, err := d.v.Admit(s, req.Record)
	if err != nil {
		return Admission{}, err
	}
	kind := KindStream
	if adm.Claims().Destination.Proto != dtl.ProtoTCP {
		kind = KindPacket
	}
	return Admission{Agent: adm.Agent.Agent, Kind: kind, FlowID: adm.Claims().FlowID, Info: adm}, nil
}

type agentFixture struct {
	id    identity.ID
	key   ed25519.PrivateKey
	chain dtl.CertChain
	node  string
}

// issueAgent issues an agent of the node whose TLS certificate is nodeTLS, the way a node does:
// with the node's issuing certificate (signed by the authority) and key (derived from the node key).
func issueAgent(t *testing.T, pki *testPKI, nodeTLS tls.Certificate, td, zone, name string) agentFixture {
	t.Helper()
	nodeCert, err := identity.ParseCertificate(nodeTLS.Certificate[0])
	require.NoError(t, err)
	issuerKey, err := identity.IssuerKey(nodeTLS.PrivateKey.(ed25519.PrivateKey))
	require.NoError(t, err)
	issuer, err := identity.IssueIssuer(pki.cert, pki.key, nodeCert, issuerKey.Public().(ed25519.PublicKey))
	require.NoError(t, err)
	key, err := identity.GenerateKey()
	require.NoError(t, err)
	grant, ok := issuer.Claims.Zone(zone)
	require.True(t, ok)
	id := identity.AgentID(td, zone, name)
	agent, err := identity.Issue(issuer, issuerKey, identity.IssueRequest{
		ID:        id,
		PublicKey: key.Public().(ed25519.PublicKey),
		Claims: identity.Claims{
			Zones:       []identity.ZoneGrant{{Name: zone}},
			OverlayIPs:  []netip.Addr{grant.Prefixes[0].Addr().Next()},
			Fingerprint: make([]byte, 32),
		},
		NotBefore: time.Now().Add(-time.Minute),
		NotAfter:  time.Now().Add(time.Hour),
	})
	require.NoError(t, err)
	return agentFixture{id: id, key: key, node: nodeCert.ID.String(),
		chain: dtl.CertChain{Node: issuer.Raw(), Agent: agent.Raw()}}
}

func (a agentFixture) record(t *testing.T, tun *Tunnel, seq uint64) []byte {
	t.Helper()
	chain := a.chain
	b, err := dtl.Sign(&dtl.Claims{
		Zone: a.id.Zone, Agent: a.id.String(), Chain: &chain, Node: a.node,
		Fingerprint: make([]byte, 32), Trust: 90,
		Destination: dtl.Destination{Agent: "ledger", Port: 443, Proto: dtl.ProtoTCP},
		FlowID:      tun.NewFlowID(), Seq: seq, IssuedAt: time.Now(),
	}, a.key, tun.Exporter())
	require.NoError(t, err)
	return b
}

// TestDTLRecordsBoundToSession runs the real dtl verification behind the tunnel: a record is
// admitted once on its session, refused as a replay on the same session and as a bad signature on
// any other session, and a refused flow delivers nothing.
func TestDTLRecordsBoundToSession(t *testing.T) {
	pki := newPKI(t, testTD)
	aTLS := pki.node(t, "a", "payments")
	a := startNode(t, pki, "a", aTLS, []string{"payments"}, "")
	b := startNode(t, pki, "b", pki.node(t, "b", "payments"), []string{"payments"}, "",
		func(c *Config) { c.Admitter = newDTLAdmitter(pki) })
	agent := issueAgent(t, pki, aTLS, testTD, "payments", "billing")

	first, err := a.ep.Dial(ctxT(t), b.addr, b.id, "payments")
	require.NoError(t, err)
	record := agent.record(t, first, 1)
	c, err := first.OpenFlow(ctxT(t), record, nil, nil)
	require.NoError(t, err)
	defer c.Close()
	s := recvStream(t, b)
	adm, _ := s.Admission()
	assert.Equal(t, agent.id.String(), adm.Info.(*dtl.Admitted).Agent.Agent, "WhoIs sees the verified caller")
	_ = s.Close()

	_, err = first.OpenFlow(ctxT(t), record, nil, nil)
	require.ErrorIs(t, err, dtl.ErrReplay, "same session")

	require.NoError(t, first.Close())
	<-first.Done()
	second, err := a.ep.Dial(ctxT(t), b.addr, b.id, "payments")
	require.NoError(t, err)
	require.NotEqual(t, first.Exporter(), second.Exporter())
	_, err = second.OpenFlow(ctxT(t), record, nil, nil)
	require.ErrorIs(t, err, dtl.ErrSignature, "captured on one session, replayed on another")

	assert.Equal(t, uint64(1), b.ep.Stats().FlowsAdmitted)
	assert.Equal(t, uint64(2), b.ep.Stats().FlowsDenied)
	select {
	case <-b.streams:
		t.Fatal("a refused record reached the handler")
	default:
	}
}
