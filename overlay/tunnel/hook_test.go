package tunnel

import (
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// hookRecorder collects the tunnels an OnTunnel hook saw.
type hookRecorder struct {
	mu   sync.Mutex
	seen []*Tunnel
}

func (h *hookRecorder) hook(t *Tunnel) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.seen = append(h.seen, t)
}

func (h *hookRecorder) list() []*Tunnel {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]*Tunnel(nil), h.seen...)
}

func withHook(h *hookRecorder) nodeOpt { return func(c *Config) { c.OnTunnel = h.hook } }

func TestOnTunnelRunsOncePerTunnelOnBothSides(t *testing.T) {
	pki := newPKI(t, testTD)
	var ha, hb hookRecorder
	a := startNode(t, pki, "a", pki.node(t, "a", "payments", "support"), []string{"payments", "support"}, "", withHook(&ha))
	b := startNode(t, pki, "b", pki.node(t, "b", "payments", "support"), []string{"payments", "support"}, "", withHook(&hb))

	tp, err := a.ep.Dial(ctxT(t), b.addr, b.id, "payments")
	require.NoError(t, err)
	again, err := a.ep.Dial(ctxT(t), b.addr, b.id, "payments")
	require.NoError(t, err)
	require.Same(t, tp, again, "a reused tunnel is not a new tunnel")
	ts, err := a.ep.Dial(ctxT(t), b.addr, b.id, "support")
	require.NoError(t, err)

	require.Eventually(t, func() bool { return len(ha.list()) == 2 && len(hb.list()) == 2 }, 5*time.Second, 5*time.Millisecond)
	seenA := ha.list()
	assert.ElementsMatch(t, []*Tunnel{tp, ts}, seenA)
	for _, tun := range seenA {
		assert.True(t, tun.Outbound())
	}
	zones := map[string]bool{}
	for _, tun := range hb.list() {
		assert.False(t, tun.Outbound())
		assert.Equal(t, a.id, tun.Peer().NodeID)
		zones[tun.Zone()] = true
	}
	assert.Equal(t, map[string]bool{"payments": true, "support": true}, zones)
	// Nothing more arrives later.
	time.Sleep(50 * time.Millisecond)
	assert.Len(t, ha.list(), 2)
	assert.Len(t, hb.list(), 2)
}

// A hook that blocks until its tunnel closes must not keep Endpoint.Close from returning.
func TestOnTunnelBlockingHookEndsWithClose(t *testing.T) {
	pki := newPKI(t, testTD)
	entered := make(chan struct{}, 2)
	block := func(c *Config) {
		c.OnTunnel = func(tun *Tunnel) {
			entered <- struct{}{}
			<-tun.Done()
		}
	}
	a := startNode(t, pki, "a", pki.node(t, "a", "payments"), []string{"payments"}, "", block)
	b := startNode(t, pki, "b", pki.node(t, "b", "payments"), []string{"payments"}, "")
	_, err := a.ep.Dial(ctxT(t), b.addr, b.id, "payments")
	require.NoError(t, err)
	<-entered
	done := make(chan error, 1)
	go func() { done <- a.ep.Close() }()
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(5 * time.Second):
		t.Fatal("Endpoint.Close did not return while a hook waited for its tunnel")
	}
}

func TestClosePeerEndsEveryTunnelAndFlowOfThePeer(t *testing.T) {
	pki := newPKI(t, testTD)
	zones := []string{"payments", "support"}
	a := startNode(t, pki, "a", pki.node(t, "a", zones...), zones, "")
	b := startNode(t, pki, "b", pki.node(t, "b", zones...), zones, "")
	c := startNode(t, pki, "c", pki.node(t, "c", zones...), zones, "")
	tp, err := a.ep.Dial(ctxT(t), b.addr, b.id, "payments")
	require.NoError(t, err)
	ts, err := a.ep.Dial(ctxT(t), b.addr, b.id, "support")
	require.NoError(t, err)
	tc, err := c.ep.Dial(ctxT(t), b.addr, b.id, "payments")
	require.NoError(t, err)

	fa, err := tp.OpenFlow(ctxT(t), rec(t, testRecord{Agent: "billing"}), nil, nil)
	require.NoError(t, err)
	fb := recvStream(t, b)
	_, err = fa.Write([]byte("before"))
	require.NoError(t, err)
	buf := make([]byte, 6)
	_, err = fb.Read(buf)
	require.NoError(t, err)
	// c's flow on its own tunnel must survive a's removal.
	fc, err := tc.OpenFlow(ctxT(t), rec(t, testRecord{Agent: "helpdesk"}), nil, nil)
	require.NoError(t, err)
	fcb := recvStream(t, b)

	require.Equal(t, 2, b.ep.ClosePeer(a.id))

	for _, tun := range []*Tunnel{tp, ts} {
		select {
		case <-tun.Done():
		case <-time.After(2 * time.Second):
			t.Fatal("a's tunnel still open after b closed the peer")
		}
	}
	_ = fb.SetReadDeadline(time.Now().Add(2 * time.Second))
	_, err = fb.Read(buf)
	require.Error(t, err, "b's side of the flow ends")
	var ae *quic.ApplicationError
	_ = fa.SetReadDeadline(time.Now().Add(2 * time.Second))
	_, err = fa.Read(buf)
	require.ErrorAs(t, err, &ae, "a's side sees the connection closed by b")
	assert.Equal(t, codePeerClosed, ae.ErrorCode)
	assert.True(t, ae.Remote)

	assert.True(t, tc.Alive())
	_, err = fc.Write([]byte("still"))
	require.NoError(t, err)
	_ = fcb.SetReadDeadline(time.Now().Add(2 * time.Second))
	_, err = fcb.Read(buf[:5])
	require.NoError(t, err)
	assert.Equal(t, "still", string(buf[:5]))
	assert.Zero(t, b.ep.ClosePeer("spiffe://acme.internal/node/nobody"))
}

func TestCloseFlowsResetsMatchingFlowsOnBothSides(t *testing.T) {
	a, b, tun := pair(t, "payments")
	_ = a
	open := func(agent string) (*FlowConn, *FlowConn) {
		c, err := tun.OpenFlow(ctxT(t), rec(t, testRecord{Agent: agent}), nil, nil)
		require.NoError(t, err)
		return c, recvStream(t, b)
	}
	mOut, mIn := open("mallory")
	okOut, okIn := open("billing")
	pf, err := tun.OpenPacketFlow(ctxT(t), tun.NewFlowID(), nil, nil, nil)
	require.Error(t, err, "an empty record is refused locally")
	require.Nil(t, pf)
	id := tun.NewFlowID()
	pf, err = tun.OpenPacketFlow(ctxT(t), id, rec(t, testRecord{Agent: "mallory", Kind: uint8(KindPacket), Flow: id}), nil, nil)
	require.NoError(t, err)
	var pin *PacketFlow
	select {
	case pin = <-b.packets:
	case <-time.After(5 * time.Second):
		t.Fatal("packet flow not delivered")
	}

	n := b.ep.CloseFlows(func(peer string, adm Admission) bool { return adm.Agent == "mallory" && peer == a.id })
	require.Equal(t, 2, n)

	buf := make([]byte, 8)
	_, err = mIn.Read(buf)
	require.ErrorIs(t, err, ErrFlowAborted, "the receiver's conn says why")
	var se *quic.StreamError
	_ = mOut.SetReadDeadline(time.Now().Add(2 * time.Second))
	_, err = mOut.Read(buf)
	require.ErrorAs(t, err, &se, "the opener sees a reset, not end-of-stream")
	assert.Equal(t, streamCodeAborted, se.ErrorCode)
	for {
		_, err = mOut.Write(buf)
		if err != nil {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	require.ErrorAs(t, err, &se)
	select {
	case <-pin.Done():
	case <-time.After(2 * time.Second):
		t.Fatal("receiver's packet flow still open")
	}
	select {
	case <-pf.Done():
	case <-time.After(2 * time.Second):
		t.Fatal("opener's packet flow still open")
	}
	require.True(t, errors.Is(pf.Send([]byte("x")), ErrClosed))

	// The other agent's flow is untouched.
	_, err = okOut.Write([]byte("fine"))
	require.NoError(t, err)
	_ = okIn.SetReadDeadline(time.Now().Add(2 * time.Second))
	_, err = okIn.Read(buf[:4])
	require.NoError(t, err)
	assert.Equal(t, 1, b.ep.Stats().ActiveFlows)
}

func TestSendRawDatagramForUnadmittedFlowIsDropped(t *testing.T) {
	_, b, tun := pair(t, "payments")
	require.NoError(t, tun.SendRawDatagram(tun.NewFlowID(), []byte("never admitted")))
	require.Eventually(t, func() bool { return b.ep.Stats().DatagramsDropped == 1 }, 2*time.Second, 5*time.Millisecond)
	require.Error(t, tun.SendRawDatagram(1<<62, nil), "ids beyond a QUIC varint are refused")
}
