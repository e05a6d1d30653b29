package tunnel

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/ute-project/ute/overlay/dtl"
)

// maxFlowID is the largest QUIC varint, the datagram header's flow id encoding.
const maxFlowID = 1<<62 - 1

// readyByte is sent by the server on a unidirectional stream once it has verified the client: in
// TLS 1.3 the client finishes its handshake before the server has checked the client certificate,
// so without it Dial could report success for a tunnel the server is about to refuse.
const readyByte = 0x55

// Tunnel is one QUIC connection with one peer node for one zone.
type Tunnel struct {
	ep       *Endpoint
	conn     *quic.Conn
	peer     Peer
	zone     string
	exporter []byte
	outbound bool
	local    *tls.Certificate // the certificate this side presented in the handshake
	opened   time.Time        // when the endpoint registered the tunnel

	nextFlow       atomic.Uint64
	controlStreams atomic.Int64 // inbound control streams open (Limits.MaxControlStreams)
	counted        bool         // an inbound tunnel counted under the peer's connection cap
	abusive        atomic.Bool  // closed by closeAbusive
	pending        int          // streams accepted, not yet admitted; guarded by ep.budget.mu
	silent         int          // of those, streams still waiting for their first frame; ditto

	mu      sync.Mutex
	packets map[uint64]*PacketFlow // live packet flows by flow id, both directions

	// Idle close of gossip-only tunnels (idle.go).
	lastUse     atomic.Int64 // Endpoint.mono() at the last control traffic or claim
	openFlows   atomic.Int64 // stream flows open or being opened, both directions (packet flows: packets)
	idleClosing atomic.Bool  // the idle check decided to close the tunnel
	openControl atomic.Int64 // control streams open on the tunnel, both directions
	idleTimer   atomic.Pointer[time.Timer]
}

// Zone is the tunnel's zone.
func (t *Tunnel) Zone() string { return t.zone }

// Peer is the verified peer node.
func (t *Tunnel) Peer() Peer { return t.peer }

// Exporter is the tunnel's session binding value (the DTL record's external AAD).
func (t *Tunnel) Exporter() []byte { return append([]byte(nil), t.exporter...) }

// Opened is when the endpoint registered the tunnel (its handshake and the peer's proof done).
func (t *Tunnel) Opened() time.Time { return t.opened }

// Outbound reports whether this node dialed the tunnel.
func (t *Tunnel) Outbound() bool { return t.outbound }

// Stale reports whether this node has replaced the certificate it presented in the tunnel's
// handshake (Endpoint.SetCertificate). A stale tunnel keeps carrying its flows, and the peer may
// still open flows on it; this side's Dial no longer picks it.
func (t *Tunnel) Stale() bool { return t.local != t.ep.cert.Load() }

// LocalCertificate is the leaf certificate this node presented in the tunnel's handshake.
func (t *Tunnel) LocalCertificate() *x509.Certificate { return t.local.Leaf }

// Alive reports whether the connection is still open.
func (t *Tunnel) Alive() bool { return t.conn.Context().Err() == nil }

// Done is closed when the tunnel's connection closes.
func (t *Tunnel) Done() <-chan struct{} { return t.conn.Context().Done() }

// LocalAddr and RemoteAddr are the underlay addresses of the connection.
func (t *Tunnel) LocalAddr() net.Addr  { return t.conn.LocalAddr() }
func (t *Tunnel) RemoteAddr() net.Addr { return t.conn.RemoteAddr() }

// Close closes the tunnel and all its flows.
func (t *Tunnel) Close() error {
	t.closeWith(codeNormal, "closed")
	return nil
}

func (t *Tunnel) closeWith(code quic.ApplicationErrorCode, msg string) {
	_ = t.conn.CloseWithError(code, msg)
}

func (t *Tunnel) closeFlows() {
	t.mu.Lock()
	all := make([]*PacketFlow, 0, len(t.packets))
	for _, pf := range t.packets {
		all = append(all, pf)
	}
	t.mu.Unlock()
	for _, pf := range all {
		_ = pf.Close()
	}
}

// NewFlowID returns a flow id for a flow this node opens on the tunnel. The dialing side uses even
// ids and the accepting side odd ones (as QUIC does for stream ids), so both directions share one
// datagram id space without collisions. Sign it into the flow's record. It never returns
// ControlFlowID: after 2^61 flows on one tunnel it returns an id above the varint range, which
// OpenPacketFlow and the peer refuse.
func (t *Tunnel) NewFlowID() uint64 {
	n := t.nextFlow.Add(1) - 1
	if n >= ControlFlowID>>1 {
		return 1<<62 | t.openerParity()
	}
	return n<<1 | t.openerParity()
}

// openerParity is the low bit of the flow ids this side opens.
func (t *Tunnel) openerParity() uint64 {
	if t.outbound {
		return 0
	}
	return 1
}

// OpenFlow opens a stream flow: it sends record, waits for the peer's verdict and returns the
// stream as a net.Conn whose addresses are local and remote (the overlay addresses; nil means the
// tunnel's underlay addresses). A refusal is a *RejectedError.
func (t *Tunnel) OpenFlow(ctx context.Context, record []byte, local, remote net.Addr) (*FlowConn, error) {
	str, err := t.openFlowStream(ctx, record)
	if err != nil {
		return nil, err
	}
	return t.newFlowConn(str, nil, local, remote, nil), nil
}

// OpenPacketFlow opens a UDP/ICMP flow named flowID (from NewFlowID, signed into record): the
// record is admitted on a control stream, then payload travels as datagrams. Closing the flow
// closes the control stream, which ends the flow on both sides.
func (t *Tunnel) OpenPacketFlow(ctx context.Context, flowID uint64, record []byte, local, remote net.Addr) (*PacketFlow, error) {
	if flowID > maxFlowID || flowID == ControlFlowID || flowID&1 != t.openerParity() {
		return nil, fmt.Errorf("tunnel: flow id %d is not one this side may open; use Tunnel.NewFlowID", flowID)
	}
	pf := t.newPacketFlow(flowID, local, remote, nil)
	t.mu.Lock()
	if _, dup := t.packets[flowID]; dup {
		t.mu.Unlock()
		return nil, fmt.Errorf("tunnel: flow id %d already open on this tunnel", flowID)
	}
	// Registered before the record is sent so that datagrams the peer sends right after its
	// accept are not lost; nothing is delivered to the caller before the accept arrives.
	t.packets[flowID] = pf
	t.mu.Unlock()
	str, err := t.openFlowStream(ctx, record)
	if err != nil {
		t.removePacketFlow(pf)
		return nil, err
	}
	pf.setCtrl(str)
	if !t.ep.spawn(pf.controlLoop) {
		_ = pf.Close()
		return nil, ErrClosed
	}
	return pf, nil
}

func (t *Tunnel) openFlowStream(ctx context.Context, record []byte) (*quic.Stream, error) {
	lim := t.ep.lim
	t.flowBegin()
	defer t.flowEnd()
	if len(record) == 0 {
		return nil, fmt.Errorf("%w: empty record", ErrFrame)
	}
	if len(record) > lim.MaxRecordSize {
		return nil, fmt.Errorf("%w: record is %d bytes, limit %d", ErrFrameTooLarge, len(record), lim.MaxRecordSize)
	}
	str, err := t.conn.OpenStreamSync(ctx)
	if err != nil {
		return nil, t.connErr("open stream", err)
	}
	deadline := time.Now().Add(lim.VerdictTimeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	_ = str.SetDeadline(deadline)
	// A cancelled ctx interrupts the blocking read/write by moving the deadline to the past. A
	// ctx that can never be cancelled (Done is nil) needs no watcher: registering one allocates
	// on every flow for nothing.
	stop := func() bool { return true }
	if ctx.Done() != nil {
		stop = context.AfterFunc(ctx, func() { _ = str.SetDeadline(time.Unix(1, 0)) })
	}
	defer stop()

	if err = dtl.WriteFrame(str, dtl.FrameRecord, record); err == nil {
		err = readVerdict(str)
	}
	if err != nil {
		str.CancelRead(streamCodeClosed)
		str.CancelWrite(streamCodeClosed)
		var rej *RejectedError
		if errors.As(err, &rej) {
			return nil, err
		}
		if ctx.Err() != nil {
			return nil, fmt.Errorf("tunnel: waiting for flow verdict: %w", ctx.Err())
		}
		return nil, t.connErr("flow verdict", err)
	}
	if !stop() && ctx.Err() != nil {
		str.CancelRead(streamCodeClosed)
		str.CancelWrite(streamCodeClosed)
		return nil, fmt.Errorf("tunnel: waiting for flow verdict: %w", ctx.Err())
	}
	_ = str.SetDeadline(time.Time{})
	return str, nil
}

func (t *Tunnel) connErr(op string, err error) error {
	if !t.Alive() {
		return fmt.Errorf("tunnel: %s: %w: %w", op, ErrClosed, err)
	}
	return fmt.Errorf("tunnel: %s: %w", op, err)
}

// sendReady tells the dialer that its certificate was accepted (see readyByte).
func (t *Tunnel) sendReady() error {
	s, err := t.conn.OpenUniStream()
	if err != nil {
		return err
	}
	if _, err := s.Write([]byte{readyByte}); err != nil {
		return err
	}
	return s.Close()
}

// streamLoop accepts the peer's flow streams for as long as the connection lives.
func (t *Tunnel) streamLoop() {
	ctx := t.conn.Context()
	for {
		str, err := t.conn.AcceptStream(ctx)
		if err != nil {
			return
		}
		// Over budget: reset here, before a goroutine or a buffer is spent on it.
		timeout, ok, abusive := t.ep.budget.takePending(t, t.ep.clock())
		if !ok {
			t.ep.stats.busyStreams.Add(1)
			str.CancelRead(streamCodeBusy)
			str.CancelWrite(streamCodeBusy)
			if abusive {
				t.closeAbusive()
				return
			}
			continue
		}
		if !t.ep.dispatch(streamJob{t: t, str: str, firstFrame: timeout}) {
			t.ep.budget.firstFrameDone(t)
			t.ep.budget.releasePending(t)
			str.CancelRead(streamCodeClosed)
			str.CancelWrite(streamCodeClosed)
			return
		}
	}
}

// handleStream runs admission for one inbound stream (invariant I2): it reads exactly the flow-open
// header and record, asks the Admitter, and only after an accept hands the stream to a handler.
// Every flow's verdict goes to Config.OnVerdict exactly once, before the peer can learn it.
func (t *Tunnel) handleStream(str *quic.Stream, firstFrame time.Duration) {
	e := t.ep
	// The stream holds a place in its peer's pending budget until its verdict is final.
	// (A plain flag: sync.OnceFunc would allocate on every flow, and only this goroutine calls it.)
	released := false
	release := func() {
		if !released {
			released = true
			e.budget.releasePending(t)
		}
	}
	defer release()
	v := Verdict{Zone: t.zone, Peer: t.peer}
	_ = str.SetReadDeadline(time.Now().Add(firstFrame))
	open, err := readStreamOpen(countingReader{str, &e.preAdmitRead}, e.lim.MaxRecordSize)
	e.budget.firstFrameDone(t)
	if err == nil && open.control {
		release()
		// Not a flow: no record, no Admitter, no verdict, never an agent handler.
		t.handleControl(str, open.channel)
		return
	}
	record := open.record
	// An agent flow is offered: the tunnel is not idle while it is admitted and open (idle.go).
	t.flowBegin()
	defer t.flowEnd()
	if errors.Is(err, os.ErrDeadlineExceeded) || (err != nil && t.abusive.Load()) {
		// Stalled: counted and reported in aggregate (StallReport), never one verdict each.
		e.stats.dropped.Add(1)
		e.stats.stalled.Add(1)
		e.budget.stalled(t.peer.NodeID, e.clock())
		e.log.Debug("flow stalled before its first frame", "peer", t.peer.NodeID, "zone", t.zone, "deadline", firstFrame)
		str.CancelRead(streamCodeBad)
		str.CancelWrite(streamCodeBad)
		return
	}
	if err != nil {
		// Reported before the peer can see the reset, so the audit entry exists by then.
		v.Err = err
		t.report(v)
		e.stats.dropped.Add(1)
		e.log.Warn("flow dropped before admission", "peer", t.peer.NodeID, "zone", t.zone, "err", err)
		str.CancelRead(streamCodeBad)
		str.CancelWrite(streamCodeBad)
		return
	}
	_ = str.SetReadDeadline(time.Time{})
	v.Record = record

	ctx, cancel := context.WithTimeout(t.conn.Context(), e.lim.AdmitTimeout)
	adm, err := e.cfg.Admitter.Admit(ctx, FlowRequest{
		Zone:     t.zone,
		Peer:     t.peer,
		Exporter: t.exporter,
		Record:   record,
	})
	cancel()
	v.Admission = adm
	if err == nil {
		err = t.checkAdmission(adm)
	}
	var entry *flowEntry
	if err == nil {
		entry, err = e.table.reserve(t.peer.NodeID, adm, e.clock())
	}
	var pf *PacketFlow
	if err == nil && adm.Kind == KindPacket {
		// The id is claimed before the accept is sent, so that two concurrent admissions of one id
		// cannot both be accepted; nothing reaches the handler before the accept.
		pf = t.newPacketFlow(adm.FlowID, adm.Local, adm.Remote, &adm)
		pf.entry = entry
		if err = t.claimPacketFlow(pf); err != nil {
			e.table.release(entry)
		}
	}
	if err != nil {
		v.Err = err
		t.report(v)
		t.reject(str, err)
		return
	}
	// The verdict is final here; a failure to send the accept is the peer going away, not a
	// second verdict.
	t.report(v)
	release()
	_ = str.SetWriteDeadline(time.Now().Add(e.lim.FirstFrameTimeout))
	if err := dtl.WriteFrame(str, dtl.FrameAccept, nil); err != nil {
		e.table.release(entry)
		if pf != nil {
			t.removePacketFlow(pf)
		}
		e.stats.dropped.Add(1)
		str.CancelRead(streamCodeBad)
		str.CancelWrite(streamCodeBad)
		return
	}
	_ = str.SetWriteDeadline(time.Time{})
	e.stats.admitted.Add(1)

	switch adm.Kind {
	case KindStream:
		fc := t.newFlowConn(str, &adm, adm.Local, adm.Remote, entry)
		e.cfg.StreamHandler(fc)
	case KindPacket:
		pf.setCtrl(str)
		e.table.activate(entry, pf.closeCode)
		if !e.spawn(pf.controlLoop) {
			_ = pf.Close()
			return
		}
		e.cfg.PacketHandler(pf)
	}
}

// report passes a flow's verdict to the OnVerdict hook.
func (t *Tunnel) report(v Verdict) {
	if t.ep.cfg.OnVerdict != nil {
		t.ep.cfg.OnVerdict(v)
	}
}

// claimPacketFlow registers an inbound packet flow under its id unless the id is live.
func (t *Tunnel) claimPacketFlow(pf *PacketFlow) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if _, dup := t.packets[pf.id]; dup {
		return dtl.Deny(fmt.Errorf("%w: flow id %d is already open", dtl.ErrMalformed, pf.id))
	}
	t.packets[pf.id] = pf
	return nil
}

func (t *Tunnel) checkAdmission(adm Admission) error {
	if adm.Agent == "" {
		return dtl.Deny(fmt.Errorf("%w: admitter returned no source agent", dtl.ErrConfig))
	}
	// The peer opens ids of the other parity than ours (docs/protocol.md, "Flow ids"), stream and
	// packet flows alike, so that a flow id names one flow of one side.
	if adm.FlowID > maxFlowID || adm.FlowID&1 == t.openerParity() {
		return dtl.Deny(fmt.Errorf("%w: flow id %d is not one the peer may open", dtl.ErrMalformed, adm.FlowID))
	}
	if adm.FlowID == ControlFlowID {
		return dtl.Deny(fmt.Errorf("%w: flow id %d is reserved for control datagrams", dtl.ErrMalformed, adm.FlowID))
	}
	switch adm.Kind {
	case KindStream:
		if t.ep.cfg.StreamHandler == nil {
			return dtl.Deny(fmt.Errorf("%w: this node takes no stream flows", dtl.ErrUnreachable))
		}
	case KindPacket:
		if t.ep.cfg.PacketHandler == nil {
			return dtl.Deny(fmt.Errorf("%w: this node takes no packet flows", dtl.ErrUnreachable))
		}
	default:
		return dtl.Deny(fmt.Errorf("%w: admitter returned flow kind %d", dtl.ErrConfig, adm.Kind))
	}
	return nil
}

// reject answers a refused flow and stops reading it: the bytes the peer sent after its record
// are never read.
func (t *Tunnel) reject(str *quic.Stream, cause error) {
	e := t.ep
	e.stats.denied.Add(1)
	code, body := rejectBody(cause)
	e.log.Info("flow denied", "peer", t.peer.NodeID, "zone", t.zone, "reason", code.String(), "err", cause)
	str.CancelRead(streamCodeReject)
	_ = str.SetWriteDeadline(time.Now().Add(e.lim.FirstFrameTimeout))
	if err := dtl.WriteFrame(str, dtl.FrameReject, body); err != nil {
		str.CancelWrite(streamCodeReject)
		return
	}
	_ = str.Close()
}

// datagramLoop delivers datagrams to admitted packet flows and drops everything else.
func (t *Tunnel) datagramLoop() {
	ctx := t.conn.Context()
	for {
		b, err := t.conn.ReceiveDatagram(ctx)
		if err != nil {
			return
		}
		if !t.deliverDatagram(b) {
			t.ep.stats.datagramsDrops.Add(1)
		}
	}
}

// SendRawDatagram sends one datagram tagged flowID whether or not a flow of that id is open here.
// It exists for attack scenarios (tests, the simulator): a node's key holder can send any datagram
// anyway, and the receiver drops and counts every datagram whose flow id it did not admit.
func (t *Tunnel) SendRawDatagram(flowID uint64, payload []byte) error {
	b, err := dtl.AppendDatagramHeader(make([]byte, 0, 8+len(payload)), flowID)
	if err != nil {
		return err
	}
	if err := t.conn.SendDatagram(append(b, payload...)); err != nil {
		return t.connErr("send datagram", err)
	}
	return nil
}

func (t *Tunnel) deliverDatagram(b []byte) bool {
	id, payload, err := dtl.ParseDatagram(b)
	if err != nil {
		return false
	}
	if id == ControlFlowID {
		return t.deliverControlDatagram(payload)
	}
	t.mu.Lock()
	pf := t.packets[id]
	t.mu.Unlock()
	if pf == nil {
		return false
	}
	return pf.push(payload)
}

func (t *Tunnel) removePacketFlow(pf *PacketFlow) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.packets[pf.id] == pf {
		delete(t.packets, pf.id)
	}
}
