package tunnel

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"
)

// FlowConn is an admitted stream flow as a net.Conn. Its addresses are overlay addresses.
type FlowConn struct {
	t      *Tunnel
	str    *quic.Stream
	adm    *Admission // nil on the opening side
	local  net.Addr
	remote net.Addr
	entry  *flowEntry // inbound flows only

	closeOnce sync.Once
	code      atomic.Uint64 // the stream error code this side reset the flow with; 0 when not reset
}

var _ net.Conn = (*FlowConn)(nil)

func (t *Tunnel) newFlowConn(str *quic.Stream, adm *Admission, local, remote net.Addr, entry *flowEntry) *FlowConn {
	if local == nil {
		local = t.conn.LocalAddr()
	}
	if remote == nil {
		remote = t.conn.RemoteAddr()
	}
	c := &FlowConn{t: t, str: str, adm: adm, local: local, remote: remote, entry: entry}
	t.flowBegin() // until Close or reset: an open flow keeps the tunnel (idle.go)
	if entry != nil {
		t.ep.table.activate(entry, c.reset)
	}
	return c
}

// Read reads flow payload.
func (c *FlowConn) Read(p []byte) (int, error) {
	n, err := c.str.Read(p)
	if n > 0 && c.entry != nil {
		c.entry.touch(c.t.ep.clock())
	}
	if err != nil && err != io.EOF {
		return n, c.wrapErr(err)
	}
	return n, err
}

// Write writes flow payload.
func (c *FlowConn) Write(p []byte) (int, error) {
	n, err := c.str.Write(p)
	if n > 0 && c.entry != nil {
		c.entry.touch(c.t.ep.clock())
	}
	if err != nil {
		return n, c.wrapErr(err)
	}
	return n, nil
}

func (c *FlowConn) wrapErr(err error) error {
	switch quic.StreamErrorCode(c.code.Load()) {
	case streamCodeIdle:
		return &net.OpError{Op: "flow", Net: "ute", Addr: c.remote, Err: ErrFlowIdle}
	case streamCodeAborted:
		return &net.OpError{Op: "flow", Net: "ute", Addr: c.remote, Err: fmt.Errorf("%w: %w", ErrFlowAborted, err)}
	}
	return err
}

// CloseWrite sends end-of-stream and keeps reading (a TCP half-close).
func (c *FlowConn) CloseWrite() error { return c.str.Close() }

// Close closes both directions and releases the flow's place in the flow table.
func (c *FlowConn) Close() error {
	c.closeOnce.Do(func() {
		c.str.CancelRead(streamCodeClosed)
		if peerStopped(c.str) {
			// The peer closed first and asked this side to stop sending (STOP_SENDING): quic-go
			// has already queued the reset that answers it, and Close would only build an
			// error (fmt.Errorf) that is discarded here. CancelWrite on a stream reset that way
			// sends nothing and lets quic-go forget the stream, as Close would.
			c.str.CancelWrite(streamCodeClosed)
		} else {
			_ = c.str.Close()
		}
		if c.entry != nil {
			c.t.ep.table.release(c.entry)
		}
		c.t.flowEnd()
	})
	return nil
}

// peerStopped reports whether the peer's STOP_SENDING has reset str's send side. Only then is
// CancelWrite equivalent to Close: after a local Close (CloseWrite) it would abort the delivery of
// data still in flight, so any other cause of the send side's end keeps Close.
func peerStopped(str *quic.Stream) bool {
	if str.Context().Err() == nil {
		return false
	}
	// AsType rather than As: As's target escapes, an allocation on every closed flow.
	se, ok := errors.AsType[*quic.StreamError](context.Cause(str.Context()))
	return ok && se.Remote
}

// Abort resets the flow in both directions (stream error 0x206): unlike Close, the peer sees an
// error rather than end-of-stream, and bytes in flight are discarded. The node uses it when the
// flow's agent is revoked.
func (c *FlowConn) Abort() { c.reset(streamCodeAborted) }

func (c *FlowConn) reset(code quic.StreamErrorCode) {
	c.closeOnce.Do(func() {
		c.code.Store(uint64(code))
		c.str.CancelRead(code)
		c.str.CancelWrite(code)
		if c.entry != nil {
			c.t.ep.table.release(c.entry)
		}
		c.t.flowEnd()
	})
}

// LocalAddr is this side's overlay address.
func (c *FlowConn) LocalAddr() net.Addr { return c.local }

// RemoteAddr is the other side's overlay address.
func (c *FlowConn) RemoteAddr() net.Addr { return c.remote }

func (c *FlowConn) SetDeadline(t time.Time) error      { return c.str.SetDeadline(t) }
func (c *FlowConn) SetReadDeadline(t time.Time) error  { return c.str.SetReadDeadline(t) }
func (c *FlowConn) SetWriteDeadline(t time.Time) error { return c.str.SetWriteDeadline(t) }

// Admission is the receiving node's admission of this flow (the verified record in Info); ok is
// false on the opening side.
func (c *FlowConn) Admission() (Admission, bool) {
	if c.adm == nil {
		return Admission{}, false
	}
	return *c.adm, true
}

// Tunnel is the tunnel the flow rides on.
func (c *FlowConn) Tunnel() *Tunnel { return c.t }

// countingReader counts bytes read before admission (a test hook for invariant I2).
type countingReader struct {
	r io.Reader
	n *atomic.Int64
}

func (c countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n.Add(int64(n))
	return n, err
}
