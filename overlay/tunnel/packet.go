package tunnel

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"

	"github.com/quic-go/quic-go"

	"github.com/ute-project/ute/overlay/dtl"
)

// PacketFlow is an admitted UDP flow: datagrams tagged with its flow id, alive while its control
// stream is open.
type PacketFlow struct {
	t      *Tunnel
	id     uint64
	ctrlMu sync.Mutex
	ctrl   *quic.Stream // set once the verdict arrived; guarded by ctrlMu
	adm    *Admission
	entry  *flowEntry
	local  net.Addr
	remote net.Addr

	in        chan []byte
	done      chan struct{}
	closeOnce sync.Once
}

func (t *Tunnel) newPacketFlow(id uint64, local, remote net.Addr, adm *Admission) *PacketFlow {
	if local == nil {
		local = t.conn.LocalAddr()
	}
	if remote == nil {
		remote = t.conn.RemoteAddr()
	}
	return &PacketFlow{
		t: t, id: id, adm: adm, local: local, remote: remote,
		in:   make(chan []byte, t.ep.lim.DatagramQueue),
		done: make(chan struct{}),
	}
}

// ID is the flow id.
func (p *PacketFlow) ID() uint64 { return p.id }

// LocalAddr and RemoteAddr are the overlay addresses of the flow.
func (p *PacketFlow) LocalAddr() net.Addr  { return p.local }
func (p *PacketFlow) RemoteAddr() net.Addr { return p.remote }

// Admission is the receiving node's admission (ok false on the opening side).
func (p *PacketFlow) Admission() (Admission, bool) {
	if p.adm == nil {
		return Admission{}, false
	}
	return *p.adm, true
}

// Tunnel is the tunnel the flow rides on.
func (p *PacketFlow) Tunnel() *Tunnel { return p.t }

// Done is closed when the flow ends.
func (p *PacketFlow) Done() <-chan struct{} { return p.done }

// Send sends one datagram on the flow.
func (p *PacketFlow) Send(payload []byte) error {
	select {
	case <-p.done:
		return ErrClosed
	default:
	}
	b := make([]byte, 0, 8+len(payload))
	b, err := dtl.AppendDatagramHeader(b, p.id)
	if err != nil {
		return err
	}
	hdr := len(b)
	b = append(b, payload...)
	if err := p.t.conn.SendDatagram(b); err != nil {
		var tl *quic.DatagramTooLargeError
		if errors.As(err, &tl) {
			return fmt.Errorf("%w: %d payload bytes, at most %d fit now", ErrDatagramTooLarge, len(payload), tl.MaxDatagramPayloadSize-int64(hdr))
		}
		return p.t.connErr("send datagram", err)
	}
	if p.entry != nil {
		p.entry.touch(p.t.ep.clock())
	}
	return nil
}

// Receive returns the next datagram of the flow.
func (p *PacketFlow) Receive(ctx context.Context) ([]byte, error) {
	select {
	case b := <-p.in:
		return b, nil
	case <-p.done:
		// Drain what already arrived before reporting the end.
		select {
		case b := <-p.in:
			return b, nil
		default:
			return nil, ErrClosed
		}
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (p *PacketFlow) push(b []byte) bool {
	select {
	case <-p.done:
		return false
	default:
	}
	select {
	case p.in <- b:
		if p.entry != nil {
			p.entry.touch(p.t.ep.clock())
		}
		return true
	default:
		return false
	}
}

// setCtrl attaches the control stream; a flow closed meanwhile cancels it at once.
func (p *PacketFlow) setCtrl(s *quic.Stream) {
	p.ctrlMu.Lock()
	p.ctrl = s
	p.ctrlMu.Unlock()
	select {
	case <-p.done:
		s.CancelRead(streamCodeClosed)
		s.CancelWrite(streamCodeClosed)
	default:
	}
}

// Close ends the flow on both sides.
func (p *PacketFlow) Close() error {
	p.closeCode(streamCodeClosed)
	return nil
}

func (p *PacketFlow) closeCode(code quic.StreamErrorCode) {
	p.closeOnce.Do(func() {
		close(p.done)
		p.t.removePacketFlow(p)
		p.ctrlMu.Lock()
		ctrl := p.ctrl
		p.ctrlMu.Unlock()
		if ctrl != nil {
			ctrl.CancelRead(code)
			ctrl.CancelWrite(code)
		}
		if p.entry != nil {
			p.t.ep.table.release(p.entry)
		}
	})
}

// controlLoop ends the flow when the control stream ends. The control stream carries no data
// after the verdict; any byte on it is a protocol violation and ends the flow too.
func (p *PacketFlow) controlLoop() {
	p.ctrlMu.Lock()
	ctrl := p.ctrl
	p.ctrlMu.Unlock()
	// Read returns when the peer closes or resets the stream, when Close cancels it, or when the
	// connection dies.
	var b [1]byte
	_, _ = ctrl.Read(b[:])
	p.closeCode(streamCodeControl)
}
