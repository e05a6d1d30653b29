package tunnel

import (
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// gatedVerifier holds the first verification it is asked for until the test releases it.
type gatedVerifier struct {
	inner   PeerVerifier
	once    sync.Once
	entered chan struct{}
	release chan struct{}
}

func (g *gatedVerifier) VerifyPeer(zone string, raw [][]byte) (Peer, error) {
	g.once.Do(func() {
		close(g.entered)
		<-g.release
	})
	return g.inner.VerifyPeer(zone, raw)
}

// A handshake that presented the old certificate and completes after SetCertificate yields a
// stale tunnel: Dial must not hand it out (its peer would check everything sent on it against the
// superseded certificate), but handshake afresh with the new one, for the leader and for every
// caller that waited on the same dial.
func TestDialDuringSetCertificateReturnsFreshTunnel(t *testing.T) {
	pki := newPKI(t, testTD)
	gate := &gatedVerifier{entered: make(chan struct{}), release: make(chan struct{})}
	a := startNode(t, pki, "a", pki.node(t, "a", "payments"), []string{"payments"}, "")
	b := startNode(t, pki, "b", pki.node(t, "b", "payments"), []string{"payments"}, "", func(c *Config) {
		gate.inner = c.Verifier
		c.Verifier = gate
	})
	ctx := ctxT(t)

	type result struct {
		t   *Tunnel
		err error
	}
	results := make(chan result, 2)
	go func() {
		tun, err := a.ep.Dial(ctx, b.addr, b.id, "payments")
		results <- result{tun, err}
	}()
	select {
	case <-gate.entered: // a has presented its old certificate; b is checking it
	case <-time.After(5 * time.Second):
		t.Fatal("b never verified a")
	}
	go func() { // joins the dial under way
		tun, err := a.ep.Dial(ctx, b.addr, b.id, "payments")
		results <- result{tun, err}
	}()
	require.Eventually(t, func() bool {
		a.ep.mu.Lock()
		defer a.ep.mu.Unlock()
		return a.ep.dials[tunnelKey{b.id, "payments"}] != nil
	}, 5*time.Second, time.Millisecond)
	time.Sleep(20 * time.Millisecond) // let the second caller reach the shared dial
	newCert := pki.nodeCertUntil(t, "a", pki.now.Add(24*time.Hour), "payments")
	require.NoError(t, a.ep.SetCertificate(newCert))
	close(gate.release)

	for range 2 {
		r := <-results
		require.NoError(t, r.err)
		assert.False(t, r.t.Stale(), "Dial handed out a tunnel that presented the superseded certificate")
		assert.Equal(t, newCert.Leaf.SerialNumber, r.t.LocalCertificate().SerialNumber)
	}
}

// Once a renewed peer has handshaked with its new certificate, this side's Dial must use that
// tunnel, not the one verified against the peer's superseded certificate: the peer no longer
// opens flows on its stale tunnels and refuses directory exchanges there, and the stale one lives
// on until the old certificate expires (half a lifetime).
func TestDialPrefersPeersRenewedCertificate(t *testing.T) {
	pki := newPKI(t, testTD)
	a := startNode(t, pki, "a", pki.nodeCertUntil(t, "a", pki.now.Add(2*time.Hour), "payments"), []string{"payments"}, "")
	b := startNode(t, pki, "b", pki.node(t, "b", "payments"), []string{"payments"}, "")
	ctx := ctxT(t)

	old, err := a.ep.Dial(ctx, b.addr, b.id, "payments")
	require.NoError(t, err)
	oldSerial := old.LocalCertificate().SerialNumber.String()
	fromB, err := b.ep.Dial(ctx, a.addr, a.id, "payments")
	require.NoError(t, err)
	require.Equal(t, oldSerial, fromB.Peer().Certificate.SerialNumber.String())

	newCert := pki.nodeCertUntil(t, "a", pki.now.Add(24*time.Hour), "payments")
	require.NoError(t, a.ep.SetCertificate(newCert))
	_, err = a.ep.Dial(ctx, b.addr, b.id, "payments")
	require.NoError(t, err)
	inboundFrom(t, b, a.id, newCert.Leaf.SerialNumber.String())

	got, err := b.ep.Dial(ctx, a.addr, a.id, "payments")
	require.NoError(t, err)
	assert.Equal(t, newCert.Leaf.SerialNumber, got.Peer().Certificate.SerialNumber,
		"b still uses the tunnel that verified a's superseded certificate")
	assert.True(t, old.Alive(), "the old tunnel keeps its flows")
}
