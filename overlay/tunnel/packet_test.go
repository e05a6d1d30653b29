package tunnel

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/overlay/dtl"
)

func recvPacketFlow(t *testing.T, n *testNode) *PacketFlow {
	t.Helper()
	select {
	case p := <-n.packets:
		return p
	case <-time.After(5 * time.Second):
		t.Fatal("no packet flow delivered")
		return nil
	}
}

func receive(t *testing.T, p *PacketFlow) []byte {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	b, err := p.Receive(ctx)
	require.NoError(t, err)
	return b
}

// rawDatagram sends a datagram on the tunnel's connection bypassing any flow.
func rawDatagram(t *testing.T, tun *Tunnel, id uint64, payload string) {
	t.Helper()
	b, err := dtl.AppendDatagramHeader(nil, id)
	require.NoError(t, err)
	require.NoError(t, tun.conn.SendDatagram(append(b, payload...)))
}

func TestPacketFlowBothWays(t *testing.T) {
	_, b, tun := pair(t, "payments")
	id := tun.NewFlowID()
	assert.Zero(t, id&1, "the dialing side opens even flow ids")
	pf, err := tun.OpenPacketFlow(ctxT(t), id, rec(t, testRecord{Agent: "dns", Kind: uint8(KindPacket), Flow: id}), nil, nil)
	require.NoError(t, err)
	srv := recvPacketFlow(t, b)
	assert.Equal(t, id, srv.ID())
	adm, ok := srv.Admission()
	require.True(t, ok)
	assert.Equal(t, "dns", adm.Agent)

	for i := range 5 {
		require.NoError(t, pf.Send(fmt.Appendf(nil, "query %d", i)))
		assert.Equal(t, fmt.Sprintf("query %d", i), string(receive(t, srv)))
		require.NoError(t, srv.Send(fmt.Appendf(nil, "answer %d", i)))
		assert.Equal(t, fmt.Sprintf("answer %d", i), string(receive(t, pf)))
	}

	// Closing on one side ends the flow on the other through the control stream.
	require.NoError(t, pf.Close())
	select {
	case <-srv.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("receiver did not see the flow end")
	}
	require.ErrorIs(t, pf.Send([]byte("late")), ErrClosed)
	assert.Eventually(t, func() bool { return b.ep.Stats().ActiveFlows == 0 }, 2*time.Second, 10*time.Millisecond)
}

// TestUnadmittedDatagramsDropped: datagrams naming a flow id that no record admitted, or one that
// was refused, or that has ended, are dropped and counted.
func TestUnadmittedDatagramsDropped(t *testing.T) {
	_, b, tun := pair(t, "payments")
	// Before any admission.
	rawDatagram(t, tun, 0, "smuggled")
	rawDatagram(t, tun, 42, "smuggled")
	require.Eventually(t, func() bool { return b.ep.Stats().DatagramsDropped == 2 }, 2*time.Second, 10*time.Millisecond)

	// A refused packet flow opens nothing.
	id := tun.NewFlowID()
	_, err := tun.OpenPacketFlow(ctxT(t), id, rec(t, testRecord{Agent: "m", Kind: uint8(KindPacket), Flow: id, Deny: true}), nil, nil)
	require.ErrorIs(t, err, dtl.ErrPolicy)
	rawDatagram(t, tun, id, "smuggled")
	require.Eventually(t, func() bool { return b.ep.Stats().DatagramsDropped == 3 }, 2*time.Second, 10*time.Millisecond)

	// An admitted flow delivers, then stops delivering once closed.
	id = tun.NewFlowID()
	pf, err := tun.OpenPacketFlow(ctxT(t), id, rec(t, testRecord{Agent: "d", Kind: uint8(KindPacket), Flow: id}), nil, nil)
	require.NoError(t, err)
	srv := recvPacketFlow(t, b)
	rawDatagram(t, tun, id, "fine")
	assert.Equal(t, "fine", string(receive(t, srv)))
	require.NoError(t, pf.Close())
	<-srv.Done()
	rawDatagram(t, tun, id, "after close")
	require.Eventually(t, func() bool { return b.ep.Stats().DatagramsDropped == 4 }, 2*time.Second, 10*time.Millisecond)

	// A malformed header (non-minimal varint) is dropped too.
	require.NoError(t, tun.conn.SendDatagram([]byte{0x40, 0x01, 'x'}))
	require.Eventually(t, func() bool { return b.ep.Stats().DatagramsDropped == 5 }, 2*time.Second, 10*time.Millisecond)
}

func TestPacketFlowIDRules(t *testing.T) {
	_, b, tun := pair(t, "payments")
	// This side may only open even ids.
	_, err := tun.OpenPacketFlow(ctxT(t), 1, rec(t, testRecord{Agent: "d", Kind: uint8(KindPacket), Flow: 1}), nil, nil)
	require.Error(t, err)
	// A record whose flow id has the wrong parity for its opener is refused by the receiver
	// (the attacker writes the frame by hand to get past the sender's check).
	str, err := tun.conn.OpenStreamSync(ctxT(t))
	require.NoError(t, err)
	require.NoError(t, dtl.WriteFrame(str, dtl.FrameRecord, rec(t, testRecord{Agent: "d", Kind: uint8(KindPacket), Flow: 3})))
	err = readVerdict(str)
	require.ErrorIs(t, err, dtl.ErrMalformed)
	// A second flow with an id already open is refused.
	id := tun.NewFlowID()
	r := rec(t, testRecord{Agent: "d", Kind: uint8(KindPacket), Flow: id})
	pf, err := tun.OpenPacketFlow(ctxT(t), id, r, nil, nil)
	require.NoError(t, err)
	defer pf.Close()
	recvPacketFlow(t, b)
	str, err = tun.conn.OpenStreamSync(ctxT(t))
	require.NoError(t, err)
	require.NoError(t, dtl.WriteFrame(str, dtl.FrameRecord, r))
	require.ErrorIs(t, readVerdict(str), dtl.ErrMalformed)
}

func TestPacketFlowQueueOverflowCounts(t *testing.T) {
	pki := newPKI(t, testTD)
	lim := fastLimits()
	lim.DatagramQueue = 2
	a := startNode(t, pki, "a", pki.node(t, "a", "payments"), []string{"payments"}, "")
	b := startNode(t, pki, "b", pki.node(t, "b", "payments"), []string{"payments"}, "", withLimits(lim))
	tun, err := a.ep.Dial(ctxT(t), b.addr, b.id, "payments")
	require.NoError(t, err)
	id := tun.NewFlowID()
	pf, err := tun.OpenPacketFlow(ctxT(t), id, rec(t, testRecord{Agent: "d", Kind: uint8(KindPacket), Flow: id}), nil, nil)
	require.NoError(t, err)
	defer pf.Close()
	srv := recvPacketFlow(t, b)
	for range 5 {
		require.NoError(t, pf.Send([]byte("x")))
	}
	// Nobody reads srv: two fit, the rest are dropped (loss on the wire may drop more).
	require.Eventually(t, func() bool { return len(srv.in) == 2 }, 2*time.Second, 10*time.Millisecond)
	require.Eventually(t, func() bool { return b.ep.Stats().DatagramsDropped >= 1 }, 2*time.Second, 10*time.Millisecond)
}
