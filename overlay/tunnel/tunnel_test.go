package tunnel

import (
	"crypto/rand"
	"crypto/sha256"
	"io"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/overlay/dtl"
)

// exchange sends size random bytes each way over one flow and checks both digests.
func exchange(t *testing.T, size int64) {
	a, b, tun := pair(t, "payments")
	ctx := ctxT(t)
	c, err := tun.OpenFlow(ctx, rec(t, testRecord{Agent: "billing"}), overlayAddr("billing.payments"), overlayAddr("ledger.payments"))
	require.NoError(t, err)
	defer c.Close()
	assert.Equal(t, "ledger.payments", c.RemoteAddr().String())

	s := recvStream(t, b)
	defer s.Close()
	adm, ok := s.Admission()
	require.True(t, ok)
	assert.Equal(t, "billing", adm.Agent)
	assert.Equal(t, "billing.payments", s.RemoteAddr().String(), "receiver sees the caller's overlay address")
	assert.Equal(t, "dst.payments", s.LocalAddr().String())
	assert.Equal(t, a.id, s.Tunnel().Peer().NodeID)

	var wg sync.WaitGroup
	var sentAB, gotAB, sentBA, gotBA [32]byte
	var errs [4]error
	wg.Add(4)
	go func() { defer wg.Done(); sentAB, errs[0] = sendRandom(c, size); _ = c.CloseWrite() }()
	go func() { defer wg.Done(); gotAB, errs[1] = digest(s) }()
	go func() { defer wg.Done(); sentBA, errs[2] = sendRandom(s, size); _ = s.CloseWrite() }()
	go func() { defer wg.Done(); gotBA, errs[3] = digest(c) }()
	wg.Wait()
	for _, err := range errs {
		require.NoError(t, err)
	}
	assert.Equal(t, sentAB, gotAB, "a→b digest")
	assert.Equal(t, sentBA, gotBA, "b→a digest")
	assert.Equal(t, uint64(1), b.ep.Stats().FlowsAdmitted)
}

func sendRandom(w io.Writer, size int64) ([32]byte, error) {
	h := sha256.New()
	buf := make([]byte, 256<<10)
	_, _ = rand.Read(buf)
	for size > 0 {
		n := min(int64(len(buf)), size)
		// Vary the bytes cheaply so a stuck or repeated chunk changes the digest.
		buf[0]++
		if _, err := w.Write(buf[:n]); err != nil {
			return [32]byte{}, err
		}
		h.Write(buf[:n])
		size -= n
	}
	var d [32]byte
	copy(d[:], h.Sum(nil))
	return d, nil
}

func digest(r io.Reader) ([32]byte, error) {
	h := sha256.New()
	_, err := io.Copy(h, r)
	var d [32]byte
	copy(d[:], h.Sum(nil))
	return d, err
}

func TestFlowCarriesDataBothWays1MiB(t *testing.T) {
	exchange(t, 1<<20)
}

// TestFlowCarriesDataBothWaysLarge moves 1 GiB each way with UTE_LONG=1 (about a minute under
// -race on two cores) and 32 MiB otherwise.
func TestFlowCarriesDataBothWaysLarge(t *testing.T) {
	size := int64(32 << 20)
	if os.Getenv("UTE_LONG") == "1" {
		size = 1 << 30
	} else if testing.Short() {
		size = 8 << 20
	}
	exchange(t, size)
}

func TestDialReusesAndDeduplicates(t *testing.T) {
	a, b, first := pair(t, "payments")
	ctx := ctxT(t)
	got := dialConcurrently(t, a, b, "payments", 8)
	for _, tun := range got {
		assert.Same(t, first, tun)
	}
	assert.Equal(t, uint64(1), a.ep.Stats().TunnelsOpened)
	// The accepting side reuses the inbound tunnel instead of dialing back.
	back, err := b.ep.Dial(ctx, a.addr, a.id, "payments")
	require.NoError(t, err)
	assert.False(t, back.Outbound())
	assert.Equal(t, uint64(1), b.ep.Stats().TunnelsOpened)
}

func TestConcurrentFirstDialsShareOneHandshake(t *testing.T) {
	pki := newPKI(t, testTD)
	a := startNode(t, pki, "a", pki.node(t, "a", "payments"), []string{"payments"}, "")
	b := startNode(t, pki, "b", pki.node(t, "b", "payments"), []string{"payments"}, "")
	got := dialConcurrently(t, a, b, "payments", 8)
	for _, tun := range got[1:] {
		assert.Same(t, got[0], tun)
	}
	assert.Equal(t, uint64(1), a.ep.Stats().TunnelsOpened)
}

func TestNo0RTTNoResumption(t *testing.T) {
	a, b, tun := pair(t, "payments")
	cs := tun.conn.ConnectionState()
	assert.False(t, cs.Used0RTT)
	assert.False(t, cs.TLS.DidResume)
	require.NoError(t, tun.Close())
	<-tun.Done()
	// A second handshake to the same peer is a full one: no ticket was ever issued.
	again, err := a.ep.Dial(ctxT(t), b.addr, b.id, "payments")
	require.NoError(t, err)
	require.NotSame(t, tun, again)
	cs = again.conn.ConnectionState()
	assert.False(t, cs.Used0RTT)
	assert.False(t, cs.TLS.DidResume)
	assert.True(t, a.ep.baseTLS(nil).SessionTicketsDisabled)
	assert.Nil(t, a.ep.baseTLS(nil).ClientSessionCache)
	assert.False(t, a.ep.qconf.Allow0RTT)
}

func TestTunnelBindingMatchesBothSides(t *testing.T) {
	before := time.Now()
	_, b, tun := pair(t, "payments")
	assert.False(t, tun.Opened().Before(before), "opened when registered, not earlier")
	assert.False(t, tun.Opened().After(time.Now()))
	var inbound *Tunnel
	require.Eventually(t, func() bool {
		b.ep.mu.Lock()
		defer b.ep.mu.Unlock()
		for tt := range b.ep.tunnels {
			inbound = tt
		}
		return inbound != nil
	}, 2*time.Second, 10*time.Millisecond)
	assert.Len(t, tun.Exporter(), dtl.ExporterLen)
	assert.Equal(t, tun.Exporter(), inbound.Exporter(), "both ends derive the same session binding")
	assert.False(t, inbound.Opened().Before(before))
}

func TestCloseStopsEverything(t *testing.T) {
	a, b, tun := pair(t, "payments")
	c, err := tun.OpenFlow(ctxT(t), rec(t, testRecord{Agent: "x"}), nil, nil)
	require.NoError(t, err)
	s := recvStream(t, b)
	require.NoError(t, b.ep.Close())
	// The flow and tunnel die with the endpoint; the handler's conn is closed for it.
	_, err = s.Read(make([]byte, 1))
	require.Error(t, err)
	_, err = io.ReadAll(c)
	require.Error(t, err)
	require.NoError(t, a.ep.Close())
	_, err = a.ep.Dial(ctxT(t), b.addr, b.id, "payments")
	require.ErrorIs(t, err, ErrClosed)
	assert.Equal(t, 0, b.ep.Stats().Tunnels)
	assert.Equal(t, 0, b.ep.Stats().ActiveFlows)
}

func TestConfigValidation(t *testing.T) {
	_, err := New(Config{Zones: []string{"bad/zone"}})
	require.Error(t, err)
	for _, want := range []string{"PacketConn", "certificate", "PeerVerifier", "Admitter", `"bad/zone"`} {
		assert.Contains(t, err.Error(), want)
	}
}

func TestSetZonesClosesDroppedZoneTunnels(t *testing.T) {
	pki := newPKI(t, testTD)
	zones := []string{"payments", "support"}
	a := startNode(t, pki, "a", pki.node(t, "a", zones...), zones, "")
	b := startNode(t, pki, "b", pki.node(t, "b", zones...), zones, "")
	pay, err := a.ep.Dial(ctxT(t), b.addr, b.id, "payments")
	require.NoError(t, err)
	sup, err := a.ep.Dial(ctxT(t), b.addr, b.id, "support")
	require.NoError(t, err)
	require.NotSame(t, pay, sup, "one tunnel per zone")

	b.ep.SetZones([]string{"support"})
	assert.Equal(t, []string{"support"}, b.ep.Zones())
	select {
	case <-pay.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("payments tunnel survived b leaving the zone")
	}
	assert.True(t, sup.Alive())
	_, err = a.ep.Dial(ctxT(t), b.addr, b.id, "payments")
	require.ErrorIs(t, err, ErrZoneNotOffered)
}
