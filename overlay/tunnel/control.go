package tunnel

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/ute-project/ute/overlay/dtl"
)

// Control traffic is node-level traffic on a zone tunnel beside the agents' flows: gossip today.
// It is authenticated by the tunnel's mutual TLS alone (both node certificates were verified for
// the zone inside the handshake), carries no DTL record and never reaches an agent.

// ControlFlowID is the datagram flow id reserved for control datagrams. NewFlowID never returns
// it and no flow may be admitted under it, so it names no flow on either side. It is the largest
// QUIC varint, so its header costs ControlDatagramOverhead bytes of each datagram.
const ControlFlowID uint64 = maxFlowID

// ControlDatagramOverhead is the length of ControlFlowID's datagram header.
const ControlDatagramOverhead = 8

// streamCodeControlRefused resets a control stream this node will not take: no ControlHandler,
// or too many control streams open on the tunnel.
const streamCodeControlRefused quic.StreamErrorCode = 0x207

// streamOpen is what the first frame of an inbound stream asks for: a flow (its record) or a
// control stream (its channel).
type streamOpen struct {
	record  []byte
	control bool
	channel byte
}

// readStreamOpen reads the opener's first frame, a record or a control frame, and nothing past it.
func readStreamOpen(r io.Reader, maxRecord int) (streamOpen, error) {
	typ, body, err := dtl.ReadFrame(r, maxRecord)
	if err != nil {
		if errors.Is(err, dtl.ErrTooLarge) {
			return streamOpen{}, fmt.Errorf("%w: %w", ErrFrameTooLarge, err)
		}
		return streamOpen{}, fmt.Errorf("%w: %w", ErrFrame, err)
	}
	switch typ {
	case dtl.FrameRecord:
		if len(body) == 0 {
			return streamOpen{}, fmt.Errorf("%w: empty record", ErrFrame)
		}
		return streamOpen{record: body}, nil
	case dtl.FrameControl:
		// ReadFrame guarantees the 1-byte body.
		return streamOpen{control: true, channel: body[0]}, nil
	default:
		return streamOpen{}, fmt.Errorf("%w: first frame is %s, want record or control", ErrFrame, typ)
	}
}

// handleControl hands an inbound control stream to the ControlHandler, or resets it. The stream
// never enters the flow table and nothing of it reaches the Admitter or an agent handler.
func (t *Tunnel) handleControl(str *quic.Stream, channel byte) {
	e := t.ep
	refuse := func(why string) {
		e.stats.controlRefused.Add(1)
		e.log.Debug("control stream refused", "peer", t.peer.NodeID, "zone", t.zone, "channel", channel, "why", why)
		str.CancelRead(streamCodeControlRefused)
		str.CancelWrite(streamCodeControlRefused)
	}
	h := e.cfg.ControlHandler
	if h == nil {
		refuse("no control handler")
		return
	}
	if t.controlStreams.Add(1) > int64(e.lim.MaxControlStreams) {
		t.controlStreams.Add(-1)
		refuse("too many control streams")
		return
	}
	_ = str.SetReadDeadline(time.Time{})
	e.stats.controlStreams.Add(1)
	h(t, channel, t.newControlConn(str, channel, true))
}

// OpenControl opens a control stream on channel: the first frame names the channel, and what
// follows is the caller's. The peer resets it (a stream error on Read or Write) when it has no
// ControlHandler or too many control streams open on this tunnel.
func (t *Tunnel) OpenControl(ctx context.Context, channel byte) (*ControlConn, error) {
	str, err := t.conn.OpenStreamSync(ctx)
	if err != nil {
		return nil, t.connErr("open control stream", err)
	}
	if err := dtl.WriteFrame(str, dtl.FrameControl, []byte{channel}); err != nil {
		str.CancelRead(streamCodeClosed)
		str.CancelWrite(streamCodeClosed)
		return nil, t.connErr("open control stream", err)
	}
	return t.newControlConn(str, channel, false), nil
}

// SendControlDatagram sends one control datagram (tagged ControlFlowID). Delivery is best effort.
// A payload larger than the connection can carry now fails with ErrDatagramTooLarge, naming the
// limit: about 1,235 bytes right after the handshake, more after path-MTU discovery. Like every
// QUIC datagram it may block briefly while the connection's send queue is full.
func (t *Tunnel) SendControlDatagram(payload []byte) error {
	b := make([]byte, 0, ControlDatagramOverhead+len(payload))
	b, err := dtl.AppendDatagramHeader(b, ControlFlowID)
	if err != nil {
		return err
	}
	b = append(b, payload...)
	t.touch()
	if err := t.conn.SendDatagram(b); err != nil {
		var tl *quic.DatagramTooLargeError
		if errors.As(err, &tl) {
			return fmt.Errorf("%w: %d control payload bytes, at most %d fit now", ErrDatagramTooLarge, len(payload), tl.MaxDatagramPayloadSize-ControlDatagramOverhead)
		}
		return t.connErr("send control datagram", err)
	}
	return nil
}

// deliverControlDatagram hands a control datagram's payload to the ControlDatagram handler.
func (t *Tunnel) deliverControlDatagram(payload []byte) bool {
	h := t.ep.cfg.ControlDatagram
	if h == nil {
		t.ep.stats.controlDatagramDrops.Add(1)
		return false
	}
	t.touch()
	t.ep.stats.controlDatagrams.Add(1)
	h(t, payload)
	return true
}

// ControlConn is a control stream as a net.Conn. Its addresses are the tunnel's underlay
// addresses; the peer is Tunnel().Peer().
type ControlConn struct {
	t       *Tunnel
	str     *quic.Stream
	channel byte
	inbound bool

	closeOnce sync.Once
}

var _ net.Conn = (*ControlConn)(nil)

func (t *Tunnel) newControlConn(str *quic.Stream, channel byte, inbound bool) *ControlConn {
	// An open control stream keeps the tunnel from the idle close (idle.go) until it is closed.
	t.openControl.Add(1)
	t.touch()
	return &ControlConn{t: t, str: str, channel: channel, inbound: inbound}
}

// Channel is the control channel the stream was opened on.
func (c *ControlConn) Channel() byte { return c.channel }

// Tunnel is the tunnel the stream rides on.
func (c *ControlConn) Tunnel() *Tunnel { return c.t }

// Read reads from the stream.
func (c *ControlConn) Read(p []byte) (int, error) { return c.str.Read(p) }

// Write writes to the stream.
func (c *ControlConn) Write(p []byte) (int, error) { return c.str.Write(p) }

// CloseWrite sends end-of-stream and keeps reading.
func (c *ControlConn) CloseWrite() error { return c.str.Close() }

// Close closes both directions and, inbound, frees the stream's place under
// Limits.MaxControlStreams.
func (c *ControlConn) Close() error {
	c.closeOnce.Do(func() {
		c.str.CancelRead(streamCodeClosed)
		_ = c.str.Close()
		if c.inbound {
			c.t.controlStreams.Add(-1)
		}
		c.t.touch()
		c.t.openControl.Add(-1)
	})
	return nil
}

// LocalAddr is this node's underlay address.
func (c *ControlConn) LocalAddr() net.Addr { return c.t.conn.LocalAddr() }

// RemoteAddr is the peer node's underlay address.
func (c *ControlConn) RemoteAddr() net.Addr { return c.t.conn.RemoteAddr() }

func (c *ControlConn) SetDeadline(t time.Time) error      { return c.str.SetDeadline(t) }
func (c *ControlConn) SetReadDeadline(t time.Time) error  { return c.str.SetReadDeadline(t) }
func (c *ControlConn) SetWriteDeadline(t time.Time) error { return c.str.SetWriteDeadline(t) }
