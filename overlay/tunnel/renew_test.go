package tunnel

import (
	"context"
	"crypto/ed25519"
	"crypto/tls"
	"io"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity"
)

// nodeCertUntil issues a node certificate for name (a fresh key) valid until notAfter: what a
// renewal hands the node.
func (p *testPKI) nodeCertUntil(t testing.TB, name string, notAfter time.Time, zones ...string) tls.Certificate {
	t.Helper()
	key, err := identity.GenerateKey()
	require.NoError(t, err)
	var grants []identity.ZoneGrant
	for _, z := range zones {
		grants = append(grants, identity.ZoneGrant{Name: z, Prefixes: []netip.Prefix{netip.MustParsePrefix("100.100.1.0/24")}})
	}
	cert, err := identity.Issue(p.cert, p.key, identity.IssueRequest{
		ID:        identity.NodeID(p.cert.ID.TrustDomain, name),
		PublicKey: key.Public().(ed25519.PublicKey),
		Claims:    identity.Claims{Zones: grants, Regions: []string{"eu-west-1"}, Fingerprint: make([]byte, 32)},
		NotBefore: p.now.Add(-time.Minute),
		NotAfter:  notAfter,
	})
	require.NoError(t, err)
	tc, err := identity.TLSCertificate(key, cert)
	require.NoError(t, err)
	return tc
}

// settable is a clock a test moves forward.
type settable struct {
	mu  sync.Mutex
	off time.Duration
}

func (c *settable) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return time.Now().Add(c.off)
}

func (c *settable) advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.off += d
}

// echo copies everything read from c back to it until EOF.
func echo(c *FlowConn) {
	defer func() { _ = c.Close() }()
	_, _ = io.Copy(c, c)
}

func roundTrip(t *testing.T, c *FlowConn, msg string) {
	t.Helper()
	require.NoError(t, c.SetDeadline(time.Now().Add(5*time.Second)))
	_, err := c.Write([]byte(msg))
	require.NoError(t, err)
	got := make([]byte, len(msg))
	_, err = io.ReadFull(c, got)
	require.NoError(t, err)
	assert.Equal(t, msg, string(got))
}

// A renewed certificate is presented by every handshake after SetCertificate, on both the dialing
// and the accepting side, while the tunnel established with the old one keeps carrying its flow
// until the old certificate expires.
func TestSetCertificateNewHandshakesPresentNewChain(t *testing.T) {
	pki := newPKI(t, testTD)
	clk := &settable{}
	oldCert := pki.nodeCertUntil(t, "a", pki.now.Add(2*time.Hour), "payments")
	a := startNode(t, pki, "a", oldCert, []string{"payments"}, "", withClock(clk.now))
	b := startNode(t, pki, "b", pki.node(t, "b", "payments"), []string{"payments"}, "")
	c := startNode(t, pki, "c", pki.node(t, "c", "payments"), []string{"payments"}, "")
	ctx := ctxT(t)

	old, err := a.ep.Dial(ctx, b.addr, b.id, "payments")
	require.NoError(t, err)
	assert.Equal(t, oldCert.Leaf.SerialNumber, old.LocalCertificate().SerialNumber)
	flow, err := old.OpenFlow(ctx, rec(t, testRecord{Agent: "billing"}), nil, nil)
	require.NoError(t, err)
	defer func() { _ = flow.Close() }()
	go echo(recvStream(t, b))
	roundTrip(t, flow, "before renewal")

	newCert := pki.nodeCertUntil(t, "a", pki.now.Add(24*time.Hour), "payments")
	require.NoError(t, a.ep.SetCertificate(newCert))
	assert.True(t, old.Stale())
	assert.True(t, old.Alive(), "a renewal does not close established tunnels")

	// Outbound: a's next Dial handshakes afresh and b verifies the new serial.
	fresh, err := a.ep.Dial(ctx, b.addr, b.id, "payments")
	require.NoError(t, err)
	require.NotSame(t, old, fresh)
	assert.False(t, fresh.Stale())
	assert.Equal(t, newCert.Leaf.SerialNumber, fresh.LocalCertificate().SerialNumber)
	inbound := inboundFrom(t, b, a.id, newCert.Leaf.SerialNumber.String())
	assert.Equal(t, newCert.Leaf.SerialNumber, inbound.Peer().Certificate.SerialNumber)

	// Inbound: a third node dialing a now sees the new chain.
	fromC, err := c.ep.Dial(ctx, a.addr, a.id, "payments")
	require.NoError(t, err)
	assert.Equal(t, newCert.Leaf.SerialNumber, fromC.Peer().Certificate.SerialNumber)

	// The old tunnel still carries its flow, and new flows on it from either side.
	roundTrip(t, flow, "after renewal")
	again, err := old.OpenFlow(ctx, rec(t, testRecord{Agent: "billing"}), nil, nil)
	require.NoError(t, err)
	go echo(recvStream(t, b))
	roundTrip(t, again, "new flow on the old tunnel")
	_ = again.Close()

	// The sweep leaves it alone until the certificate it proved expires by a's clock.
	a.ep.SweepIdle()
	assert.True(t, old.Alive())
	clk.advance(3 * time.Hour)
	a.ep.SweepIdle()
	select {
	case <-old.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the stale tunnel outlived its certificate")
	}
	assert.True(t, fresh.Alive(), "tunnels with the current certificate stay up")
}

func inboundFrom(t *testing.T, n *testNode, peer, serial string) *Tunnel {
	t.Helper()
	var found *Tunnel
	require.Eventually(t, func() bool {
		n.ep.mu.Lock()
		defer n.ep.mu.Unlock()
		for tt := range n.ep.tunnels {
			if tt.Peer().NodeID == peer && tt.Peer().Certificate.SerialNumber.String() == serial {
				found = tt
				return true
			}
		}
		return false
	}, 5*time.Second, 5*time.Millisecond)
	return found
}

// A certificate that is not for its key, or has no chain, is refused and the old one stays.
func TestSetCertificateRefusesBrokenCertificate(t *testing.T) {
	pki := newPKI(t, testTD)
	cert := pki.node(t, "a", "payments")
	a := startNode(t, pki, "a", cert, []string{"payments"}, "")
	other := pki.node(t, "a", "payments")
	mismatched := tls.Certificate{Certificate: other.Certificate, PrivateKey: cert.PrivateKey}

	err := a.ep.SetCertificate(mismatched)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "not for its private key")
	err = a.ep.SetCertificate(tls.Certificate{PrivateKey: cert.PrivateKey})
	require.Error(t, err)
	assert.Contains(t, err.Error(), "needs a chain")
	assert.Equal(t, cert.Leaf.SerialNumber, a.ep.Certificate().Leaf.SerialNumber)
}

// The stateless reset key is derived once from the starting key: a renewal must not change the
// key the live connections' reset tokens were computed from.
func TestSetCertificateKeepsResetKey(t *testing.T) {
	pki := newPKI(t, testTD)
	cert := pki.node(t, "a", "payments")
	a := startNode(t, pki, "a", cert, []string{"payments"}, "")
	before := *a.ep.tr.StatelessResetKey
	require.NoError(t, a.ep.SetCertificate(pki.node(t, "a", "payments")))
	assert.Equal(t, before, *a.ep.tr.StatelessResetKey)
	assert.Equal(t, *resetKey(cert), before)
}

// A peer that keeps its tunnel past its own certificate's expiry (it stopped renewing, or was
// modified never to sweep) is cut by this side's sweep, by this side's clock, with its flow.
func TestSweepClosesTunnelOfExpiredPeer(t *testing.T) {
	pki := newPKI(t, testTD)
	clk := &settable{}
	// a's clock is the real one: by it, its certificate never expires during the test, so a
	// never closes the tunnel itself.
	a := startNode(t, pki, "a", pki.nodeCertUntil(t, "a", pki.now.Add(2*time.Hour), "payments"), []string{"payments"}, "")
	b := startNode(t, pki, "b", pki.node(t, "b", "payments"), []string{"payments"}, "", withClock(clk.now))
	ctx := ctxT(t)

	tun, err := a.ep.Dial(ctx, b.addr, b.id, "payments")
	require.NoError(t, err)
	flow, err := tun.OpenFlow(ctx, rec(t, testRecord{Agent: "billing"}), nil, nil)
	require.NoError(t, err)
	defer func() { _ = flow.Close() }()
	go echo(recvStream(t, b))
	roundTrip(t, flow, "before expiry")
	atB := inboundFrom(t, b, a.id, tun.LocalCertificate().SerialNumber.String())

	b.ep.SweepIdle()
	require.True(t, atB.Alive(), "the peer's certificate is still valid")
	clk.advance(3 * time.Hour)
	b.ep.SweepIdle()
	select {
	case <-tun.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("b kept a tunnel whose peer's certificate had expired")
	}
	assert.False(t, atB.Alive())
	var appErr *quic.ApplicationError
	require.ErrorAs(t, context.Cause(tun.conn.Context()), &appErr)
	assert.Equal(t, codeShutdown, appErr.ErrorCode)
	assert.Equal(t, "the peer's certificate expired", appErr.ErrorMessage)
	require.NoError(t, flow.SetDeadline(time.Now().Add(5*time.Second)))
	_, err = flow.Write([]byte("after expiry"))
	if err == nil {
		_, err = flow.Read(make([]byte, 16))
	}
	require.Error(t, err, "the flow on the cut tunnel still carries bytes")
}
