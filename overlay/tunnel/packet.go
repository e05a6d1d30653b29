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

	"github.com/ute-project/ute/overlay/dtl"
)

// ErrSendQueueFull means a datagram too large for one QUIC datagram was dropped because the
// flow's stream queue stayed full for streamSendWait (the peer is not taking the control
// stream's bytes as fast as they come).
var ErrSendQueueFull = errors.New("tunnel: packet flow send queue full")

// streamSendWait bounds how long Send waits for room in a full stream queue. Waiting paces a
// sender that outruns the stream, as a full socket buffer blocks a UDP sender; the bound keeps a
// peer that withholds stream credit from blocking Send forever.
const streamSendWait = time.Second

// PacketFlow is an admitted UDP flow: datagrams tagged with its flow id, alive while its control
// stream is open. A datagram too large for one QUIC datagram travels on the control stream as a
// packet frame (packetframe.go), so any datagram up to MaxPacketPayload arrives whole.
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
	queued    atomic.Int64 // payload bytes waiting in in, bounded by budget
	budget    int64
	done      chan struct{}
	closeOnce sync.Once

	sq streamQueue
}

// streamQueue holds the packet frames Send queued for the control stream and the state of the
// goroutine writing them, started with the first one.
type streamQueue struct {
	mu      sync.Mutex
	frames  [][]byte
	bytes   int64         // frame bytes queued or being written, bounded by PacketFlow.budget
	running bool          // the writer goroutine was started
	wake    chan struct{} // cap 1: a frame was queued
	room    chan struct{} // closed (and replaced) each time a frame left the queue
}

// queueBudget bounds the bytes a packet flow holds in each direction: what DatagramQueue
// datagrams of the largest QUIC datagram hold, so frames on the stream never make a flow hold
// more than datagrams already could, but at least one datagram of the largest size.
func queueBudget(datagramQueue int) int64 {
	return max(int64(datagramQueue)*maxQUICDatagram, MaxPacketPayload)
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
		in:     make(chan []byte, t.ep.lim.DatagramQueue),
		budget: queueBudget(t.ep.lim.DatagramQueue),
		done:   make(chan struct{}),
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

// Send sends one datagram of at most MaxPacketPayload bytes on the flow, best effort as UDP is.
// A datagram that fits in a QUIC datagram goes as one; a larger one is queued for the control
// stream, which carries it whole but may deliver it after smaller datagrams sent later (UDP
// allows reordering). Send blocks while quic-go's datagram queue or the flow's stream queue is
// full, the latter for at most streamSendWait, then fails with ErrSendQueueFull.
func (p *PacketFlow) Send(payload []byte) error {
	select {
	case <-p.done:
		return ErrClosed
	default:
	}
	if len(payload) > MaxPacketPayload {
		return fmt.Errorf("%w: %d payload bytes, a packet flow carries at most %d", ErrDatagramTooLarge, len(payload), MaxPacketPayload)
	}
	if len(payload) <= maxQUICDatagram {
		b := make([]byte, 0, 8+len(payload))
		b, err := dtl.AppendDatagramHeader(b, p.id)
		if err != nil {
			return err
		}
		err = p.t.conn.SendDatagram(append(b, payload...))
		var tl *quic.DatagramTooLargeError
		switch {
		case err == nil:
			p.touch()
			return nil
		case !errors.As(err, &tl):
			return p.t.connErr("send datagram", err)
		}
		// Too large for the path now (before path-MTU discovery raised the limit): the stream.
	}
	if err := p.sendOnStream(payload); err != nil {
		return err
	}
	p.touch()
	return nil
}

func (p *PacketFlow) touch() {
	if p.entry != nil {
		p.entry.touch(p.t.ep.clock())
	}
}

// sendOnStream queues payload's packet frame for the control stream's writer goroutine. Writes
// go through one goroutine, never from Send itself: a frame must reach the stream whole, and a
// write cut by a deadline would leave half a frame on it and end the flow.
func (p *PacketFlow) sendOnStream(payload []byte) error {
	p.ctrlMu.Lock()
	ctrl := p.ctrl
	p.ctrlMu.Unlock()
	if ctrl == nil {
		return ErrClosed
	}
	frame := appendPacketFrame(make([]byte, 0, 4+len(payload)), payload)
	var timeout <-chan time.Time
	for {
		room, err := p.enqueue(ctrl, frame)
		if err != nil || room == nil {
			return err
		}
		if timeout == nil {
			tm := time.NewTimer(streamSendWait)
			defer tm.Stop()
			timeout = tm.C
		}
		select {
		case <-room:
		case <-p.done:
			return ErrClosed
		case <-timeout:
			return fmt.Errorf("%w: %d payload bytes dropped after %s", ErrSendQueueFull, len(payload), streamSendWait)
		}
	}
}

// enqueue queues frame, starting the writer with the first one. When the queue is full it
// queues nothing and returns a channel closed once room may have freed.
func (p *PacketFlow) enqueue(ctrl *quic.Stream, frame []byte) (<-chan struct{}, error) {
	q := &p.sq
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.room == nil {
		q.wake = make(chan struct{}, 1)
		q.room = make(chan struct{})
	}
	if q.bytes+int64(len(frame)) > p.budget {
		return q.room, nil
	}
	if !q.running {
		if !p.t.ep.spawn(func() { p.streamWriter(ctrl) }) {
			return nil, ErrClosed
		}
		q.running = true
	}
	q.frames = append(q.frames, frame)
	q.bytes += int64(len(frame))
	select {
	case q.wake <- struct{}{}:
	default:
	}
	return nil, nil
}

// streamWriter writes queued frames to the control stream until the flow ends. A write blocks
// only while the peer withholds stream credit; Close cancels the stream, which ends the write.
// A failed write ends the flow: the stream may hold part of a frame.
func (p *PacketFlow) streamWriter(ctrl *quic.Stream) {
	q := &p.sq
	for {
		q.mu.Lock()
		for len(q.frames) == 0 {
			wake := q.wake
			q.mu.Unlock()
			select {
			case <-wake:
			case <-p.done:
				return
			}
			q.mu.Lock()
		}
		f := q.frames[0]
		q.frames[0] = nil
		q.frames = q.frames[1:]
		q.mu.Unlock()
		_, err := ctrl.Write(f)
		q.mu.Lock()
		q.bytes -= int64(len(f))
		close(q.room)
		q.room = make(chan struct{})
		q.mu.Unlock()
		if err != nil {
			p.closeCode(streamCodeControl)
			return
		}
	}
}

// Receive returns the next datagram of the flow.
func (p *PacketFlow) Receive(ctx context.Context) ([]byte, error) {
	select {
	case b := <-p.in:
		return p.took(b), nil
	case <-p.done:
		// Drain what already arrived before reporting the end.
		select {
		case b := <-p.in:
			return p.took(b), nil
		default:
			return nil, ErrClosed
		}
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (p *PacketFlow) took(b []byte) []byte {
	p.queued.Add(-int64(len(b)))
	return b
}

// push queues a received datagram for Receive; false when it was dropped: the flow ended, or
// its queue is full (DatagramQueue datagrams or budget bytes).
func (p *PacketFlow) push(b []byte) bool {
	select {
	case <-p.done:
		return false
	default:
	}
	n := int64(len(b))
	if p.queued.Add(n) > p.budget {
		p.queued.Add(-n)
		return false
	}
	select {
	case p.in <- b:
		p.touch()
		return true
	default:
		p.queued.Add(-n)
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

// controlLoop reads the peer's packet frames from the control stream and delivers them like
// datagrams (same queue, same drops, counted in DatagramsDropped) until the stream ends. Its end,
// a frame over MaxPacketPayload or a frame cut short ends the flow on both sides: no partial
// datagram is ever delivered.
func (p *PacketFlow) controlLoop() {
	p.ctrlMu.Lock()
	ctrl := p.ctrl
	p.ctrlMu.Unlock()
	// Reads return when the peer closes or resets the stream, when Close cancels it, or when the
	// connection dies.
	for {
		b, err := readPacketFrame(ctrl, MaxPacketPayload)
		if err != nil {
			if !errors.Is(err, io.EOF) && !isDone(p.done) {
				p.t.ep.log.Debug("packet flow control stream ended", "peer", p.t.peer.NodeID, "flow", p.id, "err", err)
			}
			break
		}
		if !p.push(b) {
			p.t.ep.stats.datagramsDrops.Add(1)
		}
	}
	p.closeCode(streamCodeControl)
}

func isDone(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}
