package tunnel

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/quicvarint"
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
	b, pf, srv := queuedPacketFlow(t, 2)
	for range 5 {
		require.NoError(t, pf.Send([]byte("x")))
	}
	// Nobody reads srv: two fit, the rest are dropped (loss on the wire may drop more).
	require.Eventually(t, func() bool { return len(srv.in) == 2 }, 2*time.Second, 10*time.Millisecond)
	require.Eventually(t, func() bool { return b.ep.Stats().DatagramsDropped >= 1 }, 2*time.Second, 10*time.Millisecond)
}

// queuedPacketFlow opens a packet flow from a to b, whose flows queue at most queue datagrams:
// b, the opening end and b's end.
func queuedPacketFlow(t *testing.T, queue int) (b *testNode, pf, srv *PacketFlow) {
	t.Helper()
	pki := newPKI(t, testTD)
	lim := fastLimits()
	lim.DatagramQueue = queue
	a := startNode(t, pki, "a", pki.node(t, "a", "payments"), []string{"payments"}, "")
	b = startNode(t, pki, "b", pki.node(t, "b", "payments"), []string{"payments"}, "", withLimits(lim))
	tun, err := a.ep.Dial(ctxT(t), b.addr, b.id, "payments")
	require.NoError(t, err)
	id := tun.NewFlowID()
	pf, err = tun.OpenPacketFlow(ctxT(t), id, rec(t, testRecord{Agent: "d", Kind: uint8(KindPacket), Flow: id}), nil, nil)
	require.NoError(t, err)
	t.Cleanup(func() { _ = pf.Close() })
	return b, pf, recvPacketFlow(t, b)
}

// pattern is a datagram of n bytes that differs from every other (size, tag) pair.
func pattern(n int, tag byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7) ^ tag
	}
	return b
}

// exchangeLarge sends large datagrams interleaved with small ones from one end and checks that
// every large one arrives whole, in the order sent (frames share one stream).
func exchangeLarge(t *testing.T, from, to *PacketFlow, sizes []int, tag byte) {
	t.Helper()
	for i, n := range sizes {
		require.NoError(t, from.Send(fmt.Appendf(nil, "small %d before", i)))
		require.NoError(t, from.Send(pattern(n, tag)))
		require.NoError(t, from.Send(fmt.Appendf(nil, "small %d after", i)))
	}
	var got [][]byte
	for len(got) < len(sizes) {
		b := receive(t, to)
		if len(b) > 64 {
			got = append(got, b)
		}
	}
	for i, n := range sizes {
		require.Len(t, got[i], n, "datagram %d", i)
		assert.True(t, bytes.Equal(pattern(n, tag), got[i]), "datagram %d of %d bytes arrived altered", i, n)
	}
}

// TestPacketFlowLargeDatagramsBothWays: datagrams larger than a QUIC datagram, up to nearly the
// UDP maximum, arrive whole in both directions, mixed with small ones, on the opening and the
// accepting side.
func TestPacketFlowLargeDatagramsBothWays(t *testing.T) {
	_, b, tun := pair(t, "payments")
	id := tun.NewFlowID()
	pf, err := tun.OpenPacketFlow(ctxT(t), id, rec(t, testRecord{Agent: "dns", Kind: uint8(KindPacket), Flow: id}), nil, nil)
	require.NoError(t, err)
	defer pf.Close()
	srv := recvPacketFlow(t, b)
	sizes := []int{1400, 8 << 10, 65000, MaxPacketPayload}
	exchangeLarge(t, pf, srv, sizes, 0x5a)
	exchangeLarge(t, srv, pf, sizes, 0xa5)

	err = pf.Send(make([]byte, MaxPacketPayload+1))
	require.ErrorIs(t, err, ErrDatagramTooLarge, "no UDP datagram is larger; the sender refuses it")
	select {
	case <-srv.Done():
		t.Fatal("the flow ended")
	default:
	}
	assert.Zero(t, b.ep.Stats().DatagramsDropped)
}

// rawPacketFlow opens a packet flow the way a hostile opener can: the record by hand, then
// whatever bytes it likes on the control stream. It returns the stream and b's side of the flow.
func rawPacketFlow(t *testing.T, tun *Tunnel, b *testNode) (*quic.Stream, *PacketFlow) {
	t.Helper()
	str, err := tun.conn.OpenStreamSync(ctxT(t))
	require.NoError(t, err)
	id := tun.NewFlowID()
	require.NoError(t, dtl.WriteFrame(str, dtl.FrameRecord, rec(t, testRecord{Agent: "m", Kind: uint8(KindPacket), Flow: id})))
	require.NoError(t, readVerdict(str))
	return str, recvPacketFlow(t, b)
}

func waitDone(t *testing.T, p *PacketFlow) {
	t.Helper()
	select {
	case <-p.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the flow did not end")
	}
}

// requireReset: the receiver reset the attacker's control stream with the control error.
func requireReset(t *testing.T, str *quic.Stream, code quic.StreamErrorCode) {
	t.Helper()
	_ = str.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := io.Copy(io.Discard, str)
	var se *quic.StreamError
	require.ErrorAs(t, err, &se)
	assert.Equal(t, code, se.ErrorCode)
	assert.True(t, se.Remote)
}

// TestPacketFrameOverBoundEndsFlow: a frame claiming more than MaxPacketPayload ends the flow
// with the control error before anything of it is delivered; a frame at the bound is delivered.
func TestPacketFrameOverBoundEndsFlow(t *testing.T) {
	for _, claim := range []uint64{MaxPacketPayload + 1, 1<<62 - 1} {
		t.Run(fmt.Sprint(claim), func(t *testing.T) {
			_, b, tun := pair(t, "payments")
			str, srv := rawPacketFlow(t, tun, b)
			_, err := str.Write(appendPacketFrame(nil, pattern(MaxPacketPayload, 1)))
			require.NoError(t, err)
			assert.Equal(t, pattern(MaxPacketPayload, 1), receive(t, srv), "a frame at the bound is fine")

			// The receiver may reset the stream before this write returns.
			_, _ = str.Write(append(quicvarint.Append(nil, claim), make([]byte, 4096)...))
			waitDone(t, srv)
			requireReset(t, str, streamCodeControl)
			_, err = srv.Receive(ctxT(t))
			require.ErrorIs(t, err, ErrClosed, "nothing of the oversize frame was delivered")
			require.ErrorIs(t, srv.Send([]byte("late")), ErrClosed)
		})
	}
}

// TestPacketFrameMalformedEndsFlow: a frame cut short by the end of the stream, and a length
// that is not minimally encoded, end the flow with the control error; no partial datagram is
// delivered.
func TestPacketFrameMalformedEndsFlow(t *testing.T) {
	cases := map[string][]byte{
		"payload cut":          append(quicvarint.Append(nil, 5000), make([]byte, 100)...),
		"length cut":           {0x80, 0x00},
		"non-minimal length":   {0x40, 0x05, 'h', 'e', 'l', 'l', 'o'},
		"cut after one frame+": append(appendPacketFrame(nil, []byte("whole")), 0x44),
	}
	for name, raw := range cases {
		t.Run(name, func(t *testing.T) {
			_, b, tun := pair(t, "payments")
			str, srv := rawPacketFlow(t, tun, b)
			_, _ = str.Write(raw) // the receiver may reset the stream before this returns
			// The end of the stream cuts the frames; a non-minimal length may have been refused
			// (and the stream reset) before the close, which then fails.
			_ = str.Close()
			waitDone(t, srv)
			requireReset(t, str, streamCodeControl)
			var got []string
			for {
				d, err := srv.Receive(ctxT(t))
				if err != nil {
					require.ErrorIs(t, err, ErrClosed)
					break
				}
				got = append(got, string(d))
			}
			if name == "cut after one frame+" {
				assert.Equal(t, []string{"whole"}, got, "the whole frame before the cut is delivered, nothing after")
			} else {
				assert.Empty(t, got)
			}
		})
	}
}

// TestPacketFlowLargeQueueOverflowCounts: datagrams on the stream obey the flow's queue like
// datagrams do: a count bound (DatagramQueue) and a byte bound; the excess is dropped and
// counted. The stream does not lose frames, so the counts are exact.
func TestPacketFlowLargeQueueOverflowCounts(t *testing.T) {
	for _, tc := range []struct {
		name          string
		queue, size   int
		sent, fitting int
	}{
		{"count bound", 2, 8 << 10, 5, 2},
		{"byte bound", 256, 65000, 8, 5}, // 256 × 1,452 B holds five 65,000 B datagrams
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, pf, srv := queuedPacketFlow(t, tc.queue)
			for i := range tc.sent {
				require.NoError(t, pf.Send(pattern(tc.size, byte(i))))
			}
			want := uint64(tc.sent - tc.fitting)
			require.Eventually(t, func() bool { return b.ep.Stats().DatagramsDropped == want }, 5*time.Second, 10*time.Millisecond)
			assert.Len(t, srv.in, tc.fitting)
			for i := range tc.fitting {
				assert.Equal(t, pattern(tc.size, byte(i)), receive(t, srv), "the first ones are kept")
			}
			// Reading frees the queue: the flow carries on.
			require.NoError(t, pf.Send(pattern(tc.size, 0xff)))
			assert.Equal(t, pattern(tc.size, 0xff), receive(t, srv))
		})
	}
}

// TestPacketFlowSendDoesNotBlockOnStalledStream: a peer that never reads its control stream
// withholds stream credit; Send then fails with ErrSendQueueFull after streamSendWait instead of
// blocking forever, and small datagrams still go.
func TestPacketFlowSendDoesNotBlockOnStalledStream(t *testing.T) {
	_, b, tun := pair(t, "payments")
	_, srv := rawPacketFlow(t, tun, b) // the attacker never reads its stream
	var err error
	start := time.Now()
	for i := 0; i < 200 && err == nil; i++ {
		err = srv.Send(pattern(60000, byte(i)))
	}
	require.ErrorIs(t, err, ErrSendQueueFull)
	assert.Less(t, time.Since(start), 10*time.Second)
	require.NoError(t, srv.Send([]byte("small still goes")))
	select {
	case <-srv.Done():
		t.Fatal("a stalled stream is the peer's loss, not a reason to end the flow")
	default:
	}
}

// BenchmarkPacketFlowLargeDatagrams: 60,000-byte datagrams on a packet flow over loopback QUIC
// (they travel on the control stream, in order); reports the share the receiver's queue took.
func BenchmarkPacketFlowLargeDatagrams(b *testing.B) {
	_, srvNode, tun := pair(b, "payments")
	id := tun.NewFlowID()
	pf, err := tun.OpenPacketFlow(ctxT(b), id, rec(b, testRecord{Agent: "d", Kind: uint8(KindPacket), Flow: id}), nil, nil)
	require.NoError(b, err)
	defer pf.Close()
	var srv *PacketFlow
	select {
	case srv = <-srvNode.packets:
	case <-time.After(5 * time.Second):
		b.Fatal("no packet flow delivered")
	}
	const size = 60000
	got := make(chan int)
	go func() {
		n := 0
		for {
			d, err := srv.Receive(context.Background())
			if err != nil || d[0] == 1 {
				// The marker, or the flow's end.
				got <- n
				return
			}
			n++
		}
	}()
	msg := make([]byte, size)
	b.SetBytes(size)
	b.ResetTimer()
	for range b.N {
		if err := pf.Send(msg); err != nil {
			b.Fatal(err)
		}
	}
	// The end marker is a frame too: frames keep their order, so every earlier one was
	// delivered or dropped by then.
	end := make([]byte, size)
	end[0] = 1
	require.NoError(b, pf.Send(end))
	var n int
	select {
	case n = <-got:
	case <-time.After(5 * time.Second):
		// The marker itself was dropped by a full queue: closing ends the reader.
		_ = pf.Close()
		n = <-got
	}
	b.StopTimer()
	b.ReportMetric(float64(n)/float64(b.N), "delivered/op")
}
