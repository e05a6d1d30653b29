package tunnel

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/overlay/dtl"
)

type controlStream struct {
	t       *Tunnel
	channel byte
	c       net.Conn
}

type controlDatagram struct {
	t       *Tunnel
	payload []byte
}

// controlNodes starts a (dialer) and b; b takes control streams and datagrams when withControl.
func controlNodes(t *testing.T, withControl bool, opts ...nodeOpt) (a, b *testNode, tun *Tunnel, streams chan controlStream, dgrams chan controlDatagram) {
	t.Helper()
	pki := newPKI(t, testTD)
	streams = make(chan controlStream, 64)
	dgrams = make(chan controlDatagram, 64)
	if withControl {
		opts = append(opts, func(c *Config) {
			c.ControlHandler = func(t *Tunnel, ch byte, conn net.Conn) { streams <- controlStream{t, ch, conn} }
			c.ControlDatagram = func(t *Tunnel, p []byte) {
				select {
				case dgrams <- controlDatagram{t, p}:
				default:
				}
			}
		})
	}
	a = startNode(t, pki, "a", pki.node(t, "a", "payments"), []string{"payments"}, "")
	b = startNode(t, pki, "b", pki.node(t, "b", "payments"), []string{"payments"}, "", opts...)
	var err error
	tun, err = a.ep.Dial(ctxT(t), b.addr, b.id, "payments")
	require.NoError(t, err)
	return a, b, tun, streams, dgrams
}

func recvControl(t *testing.T, ch chan controlStream) controlStream {
	t.Helper()
	select {
	case s := <-ch:
		t.Cleanup(func() { _ = s.c.Close() })
		return s
	case <-time.After(5 * time.Second):
		t.Fatal("no control stream delivered")
		return controlStream{}
	}
}

func streamErrCode(err error) (quic.StreamErrorCode, bool) {
	var se *quic.StreamError
	if errors.As(err, &se) {
		return se.ErrorCode, true
	}
	return 0, false
}

// TestControlStreamRoundTrip: a control stream reaches the ControlHandler with its channel and the
// verified peer, carries bytes both ways, and touches neither the Admitter nor the flow table.
func TestControlStreamRoundTrip(t *testing.T) {
	a, b, tun, streams, _ := controlNodes(t, true)
	c, err := tun.OpenControl(ctxT(t), 7)
	require.NoError(t, err)
	defer func() { _ = c.Close() }()
	_, err = c.Write([]byte("ping"))
	require.NoError(t, err)

	s := recvControl(t, streams)
	assert.Equal(t, byte(7), s.channel)
	assert.Equal(t, a.id, s.t.Peer().NodeID)
	assert.Equal(t, "payments", s.t.Zone())
	assert.Equal(t, a.addr.String(), s.c.RemoteAddr().String())
	buf := make([]byte, 4)
	_, err = io.ReadFull(s.c, buf)
	require.NoError(t, err)
	assert.Equal(t, "ping", string(buf))
	_, err = s.c.Write([]byte("pong"))
	require.NoError(t, err)
	_, err = io.ReadFull(c, buf)
	require.NoError(t, err)
	assert.Equal(t, "pong", string(buf))

	st := b.ep.Stats()
	assert.Equal(t, uint64(1), st.ControlStreams)
	assert.Zero(t, st.FlowsAdmitted)
	assert.Zero(t, st.ActiveFlows)
	assert.Zero(t, b.admitter.calls.Load())
}

// TestControlFrameCannotSmuggleToAgent (I2): an attacker that opens a stream with a control frame
// and follows it with a record the Admitter would accept and a payload gets nothing to an agent:
// with a ControlHandler the bytes are control data for the node, never admitted; without one the
// stream is reset after exactly the control frame was read.
func TestControlFrameCannotSmuggleToAgent(t *testing.T) {
	record := rec(t, testRecord{Agent: "mallory"})
	frame := []byte{byte(dtl.FrameRecord), 0, 0}
	binary.BigEndian.PutUint16(frame[1:], uint16(len(record)))
	frame = append(frame, record...)
	payload := []byte("GET /ledger HTTP/1.1\r\n\r\nsmuggled")
	smuggle := append(append([]byte{byte(dtl.FrameControl), 0, 1, 9}, frame...), payload...)

	t.Run("with handler", func(t *testing.T) {
		_, b, tun, streams, _ := controlNodes(t, true)
		str, err := tun.conn.OpenStreamSync(ctxT(t))
		require.NoError(t, err)
		_, err = str.Write(smuggle)
		require.NoError(t, err)
		require.NoError(t, str.Close())

		s := recvControl(t, streams)
		_ = s.c.SetReadDeadline(time.Now().Add(5 * time.Second))
		got, err := io.ReadAll(s.c)
		require.NoError(t, err)
		assert.Equal(t, append(append([]byte(nil), frame...), payload...), got, "the handler sees raw bytes, not a flow")
		assert.Zero(t, b.admitter.calls.Load(), "the record after a control frame is never admitted")
		assert.Zero(t, b.ep.Stats().FlowsAdmitted)
		select {
		case <-b.streams:
			t.Fatal("an agent handler received a control stream")
		default:
		}
	})
	t.Run("without handler", func(t *testing.T) {
		_, b, tun, _, _ := controlNodes(t, false)
		str, err := tun.conn.OpenStreamSync(ctxT(t))
		require.NoError(t, err)
		_, err = str.Write(smuggle)
		require.NoError(t, err)
		_ = str.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err = io.ReadAll(str)
		code, ok := streamErrCode(err)
		require.True(t, ok, "want a stream reset, got %v", err)
		assert.Equal(t, streamCodeControlRefused, code)

		st := b.ep.Stats()
		assert.Equal(t, uint64(1), st.ControlStreamsRefused)
		assert.Zero(t, st.FlowsAdmitted)
		assert.Zero(t, b.admitter.calls.Load())
		assert.Equal(t, int64(dtl.FrameHeaderLen+1), b.ep.preAdmitRead.Load(), "exactly the control frame was read")
		select {
		case <-b.streams:
			t.Fatal("an agent handler received a control stream")
		default:
		}
	})
}

// TestControlStreamCap: control streams over Limits.MaxControlStreams on one tunnel are reset at
// once; closing one frees its place.
func TestControlStreamCap(t *testing.T) {
	lim := fastLimits()
	lim.MaxControlStreams = 2
	_, b, tun, streams, _ := controlNodes(t, true, withLimits(lim))
	var held []controlStream
	for range 2 {
		c, err := tun.OpenControl(ctxT(t), 1)
		require.NoError(t, err)
		t.Cleanup(func() { _ = c.Close() })
		_, err = c.Write([]byte{1})
		require.NoError(t, err)
		held = append(held, recvControl(t, streams))
	}
	extra, err := tun.OpenControl(ctxT(t), 1)
	require.NoError(t, err)
	_, err = extra.Write([]byte{1})
	require.NoError(t, err)
	_ = extra.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err = extra.Read(make([]byte, 1))
	code, ok := streamErrCode(err)
	require.True(t, ok, "want a stream reset, got %v", err)
	assert.Equal(t, streamCodeControlRefused, code)
	assert.Equal(t, uint64(1), b.ep.Stats().ControlStreamsRefused)

	require.NoError(t, held[0].c.Close())
	again, err := tun.OpenControl(ctxT(t), 1)
	require.NoError(t, err)
	t.Cleanup(func() { _ = again.Close() })
	_, err = again.Write([]byte{1})
	require.NoError(t, err)
	recvControl(t, streams)
	assert.Equal(t, uint64(3), b.ep.Stats().ControlStreams)
}

// TestControlFirstFrameDeadline: a stream that never finishes its control frame is reset after
// FirstFrameTimeout and never reaches the handler.
func TestControlFirstFrameDeadline(t *testing.T) {
	_, b, tun, streams, _ := controlNodes(t, true)
	str, err := tun.conn.OpenStreamSync(ctxT(t))
	require.NoError(t, err)
	_, err = str.Write([]byte{byte(dtl.FrameControl), 0})
	require.NoError(t, err)
	_ = str.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err = io.ReadAll(str)
	code, ok := streamErrCode(err)
	require.True(t, ok, "want a stream reset, got %v", err)
	assert.Equal(t, streamCodeBad, code)
	assert.Equal(t, uint64(1), b.ep.Stats().FlowsDropped)
	select {
	case <-streams:
		t.Fatal("a half control frame reached the handler")
	default:
	}
}

// TestControlDatagrams: control datagrams reach the ControlDatagram handler; without one they
// are dropped and counted; a payload too large is refused with the limit named.
func TestControlDatagrams(t *testing.T) {
	a, _, tun, _, dgrams := controlNodes(t, true)
	require.NoError(t, tun.SendControlDatagram([]byte("hello")))
	select {
	case d := <-dgrams:
		assert.Equal(t, "hello", string(d.payload))
		assert.Equal(t, a.id, d.t.Peer().NodeID)
	case <-time.After(5 * time.Second):
		t.Fatal("no control datagram")
	}

	// The largest payload that fits now (reported for docs/protocol.md).
	lo, hi := 0, 1500
	for lo < hi {
		mid := (lo + hi + 1) / 2
		if err := tun.SendControlDatagram(make([]byte, mid)); err == nil {
			lo = mid
		} else {
			require.ErrorIs(t, err, ErrDatagramTooLarge)
			hi = mid - 1
		}
	}
	t.Logf("largest control datagram payload right after the handshake: %d bytes", lo)
	assert.Greater(t, lo, 1100)
	err := tun.SendControlDatagram(make([]byte, lo+1))
	require.ErrorIs(t, err, ErrDatagramTooLarge)

	_, b2, tun2, _, _ := controlNodes(t, false)
	require.NoError(t, tun2.SendControlDatagram([]byte("nobody listens")))
	require.Eventually(t, func() bool { return b2.ep.Stats().ControlDatagramsDropped == 1 }, 5*time.Second, 10*time.Millisecond)
	assert.Equal(t, uint64(1), b2.ep.Stats().DatagramsDropped)
}

// TestControlFlowIDReserved: no flow can be admitted under ControlFlowID (so control datagrams
// never reach a packet flow), and NewFlowID never hands it out.
func TestControlFlowIDReserved(t *testing.T) {
	a, b, _, _, _ := controlNodes(t, true)
	// b accepted the tunnel, so b opens odd ids, the parity of ControlFlowID.
	var back *Tunnel
	require.Eventually(t, func() bool {
		var ok bool
		back, ok = b.ep.LiveTunnel(a.id, "payments")
		return ok
	}, 5*time.Second, 10*time.Millisecond)
	_, err := back.OpenPacketFlow(ctxT(t), ControlFlowID, rec(t, testRecord{Agent: "x", Kind: uint8(KindPacket), Flow: ControlFlowID}), nil, nil)
	require.Error(t, err, "refused locally")
	_, err = back.OpenFlow(ctxT(t), rec(t, testRecord{Agent: "mallory", Kind: uint8(KindPacket), Flow: ControlFlowID}), nil, nil)
	require.ErrorIs(t, err, dtl.ErrMalformed)
	assert.Equal(t, uint64(1), a.ep.Stats().FlowsDenied)

	back.nextFlow.Store(ControlFlowID >> 1)
	id := back.NewFlowID()
	assert.NotEqual(t, ControlFlowID, id)
	assert.Greater(t, id, uint64(maxFlowID), "an exhausted id space yields ids every check refuses")
}

// FuzzReadStreamOpen: the first-frame reader never panics, reads nothing past the frame it
// returns, and a control frame is exactly 4 bytes.
func FuzzReadStreamOpen(f *testing.F) {
	f.Add([]byte{byte(dtl.FrameControl), 0, 1, 1, 'x'})
	f.Add([]byte{byte(dtl.FrameControl), 0, 2, 1, 2})
	f.Add([]byte{byte(dtl.FrameControl), 0xff, 0xff})
	f.Add([]byte{byte(dtl.FrameControl), 0, 0})
	f.Add([]byte{byte(dtl.FrameRecord), 0, 2, 'a', 'b'})
	f.Add([]byte{byte(dtl.FrameControl)})
	f.Fuzz(func(t *testing.T, in []byte) {
		r := bytes.NewReader(in)
		open, err := readStreamOpen(r, dtl.MaxRecordSize)
		consumed := len(in) - r.Len()
		if err != nil {
			if !errors.Is(err, ErrFrame) && !errors.Is(err, ErrFrameTooLarge) {
				t.Fatalf("unexpected error class: %v", err)
			}
			return
		}
		if open.control {
			if consumed != dtl.FrameHeaderLen+1 || in[0] != byte(dtl.FrameControl) || open.channel != in[3] {
				t.Fatalf("control frame: consumed %d bytes, channel %d", consumed, open.channel)
			}
			return
		}
		if consumed != dtl.FrameHeaderLen+len(open.record) || len(open.record) == 0 {
			t.Fatalf("record frame: consumed %d bytes for %d", consumed, len(open.record))
		}
	})
}
