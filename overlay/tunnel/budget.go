package tunnel

import (
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/quic-go/quic-go"
)

// Cost before admission. Everything a peer makes this node hold before one of its
// flows is admitted is bounded per peer: inbound tunnels per peer node and per source address,
// streams waiting for their first frame or their verdict per tunnel and per peer, and the time a
// stream may wait for its first frame, which shrinks as the peer's budget fills. A stream over a
// budget is reset at once (0x208), never queued; a stream that misses its deadline is reset
// (0x202) and counted as stalled. Neither is reported one by one: the counts go to Stats and, in
// one StallReport per peer and interval, to Config.OnStalled.

const (
	// codeBusy closes an inbound connection over Limits.MaxConnsPerPeer or MaxConnsPerSource.
	codeBusy quic.ApplicationErrorCode = 0x105
	// streamCodeBusy resets a stream over Limits.MaxPendingPerConn or MaxPendingPerPeer.
	streamCodeBusy quic.StreamErrorCode = 0x208
)

// StallReport is one peer's pre-admission refusals over one interval: what the node audits as
// `stalled` in aggregate instead of one entry per stream.
type StallReport struct {
	Peer string // the peer node's SPIFFE ID
	// Stalled counts streams reset because their first frame did not arrive before the deadline.
	Stalled uint64
	// Busy counts streams reset at once because the peer's or the tunnel's pending budget was full.
	Busy uint64
	// ConnsRefused counts inbound tunnels of the peer closed over MaxConnsPerPeer or
	// MaxConnsPerSource, or because their pending budget filled with silent streams.
	ConnsRefused uint64
	First, Last  time.Time // when the first and the last of them happened
}

// peerBudget is one peer's accounting: inbound tunnels, pending streams, and the counts not yet
// reported.
type peerBudget struct {
	conns   int
	pending int
	silent  int // of pending, streams still waiting for their first frame
	report  StallReport
}

// budgets is the endpoint's pre-admission accounting, under its own lock (taken on every inbound
// stream, so kept apart from the endpoint's).
type budgets struct {
	lim     Limits
	mu      sync.Mutex
	peers   map[string]*peerBudget
	sources map[netip.Addr]int
}

func newBudgets(lim Limits) *budgets {
	return &budgets{lim: lim, peers: make(map[string]*peerBudget), sources: make(map[netip.Addr]int)}
}

func (b *budgets) peer(id string) *peerBudget {
	p := b.peers[id]
	if p == nil {
		p = &peerBudget{report: StallReport{Peer: id}}
		b.peers[id] = p
	}
	return p
}

// gc drops a peer's entry once it holds nothing and has nothing to report. Called with b.mu held.
func (b *budgets) gc(id string, p *peerBudget) {
	if p.conns == 0 && p.pending == 0 && p.silent == 0 && p.report.Stalled == 0 && p.report.Busy == 0 && p.report.ConnsRefused == 0 {
		delete(b.peers, id)
	}
}

func sourceOf(a net.Addr) (netip.Addr, bool) {
	if u, ok := a.(*net.UDPAddr); ok {
		ip, ok := netip.AddrFromSlice(u.IP)
		return ip.Unmap(), ok
	}
	return netip.Addr{}, false
}

// sourceFull reports whether remote already holds MaxConnsPerSource inbound tunnels: checked
// before the handshake, so a full source costs no signature verification.
func (b *budgets) sourceFull(remote net.Addr) bool {
	src, ok := sourceOf(remote)
	if !ok {
		return false
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.sources[src] >= b.lim.MaxConnsPerSource
}

// addConn counts an inbound tunnel of peer from remote, or refuses it (false) over either cap.
func (b *budgets) addConn(peer string, remote net.Addr, now time.Time) bool {
	src, hasSrc := sourceOf(remote)
	b.mu.Lock()
	defer b.mu.Unlock()
	p := b.peer(peer)
	if p.conns >= b.lim.MaxConnsPerPeer || (hasSrc && b.sources[src] >= b.lim.MaxConnsPerSource) {
		p.report.ConnsRefused++
		p.report.stamp(now)
		return false
	}
	p.conns++
	if hasSrc {
		b.sources[src]++
	}
	return true
}

func (b *budgets) removeConn(peer string, remote net.Addr) {
	src, hasSrc := sourceOf(remote)
	b.mu.Lock()
	defer b.mu.Unlock()
	if p := b.peers[peer]; p != nil {
		p.conns--
		b.gc(peer, p)
	}
	if hasSrc {
		if b.sources[src]--; b.sources[src] <= 0 {
			delete(b.sources, src)
		}
	}
}

// takePending reserves one pending stream of t for its peer and returns the first-frame timeout
// for it, or false when the tunnel's or the peer's budget is full (the stream is counted busy).
// The timeout shrinks linearly with the fuller of the two budgets, down to MinFirstFrameTimeout:
// under pressure a slow opener gets less time, a prompt one needs none.
//
// abusive is true when a budget is full of silent streams (not delivered their first frame): the
// tunnel's, with at least MaxSilentPerConn of them, or the peer's, with half of it silent and
// some of those on this tunnel. An honest peer's streams carry their record in their first
// packet, so such a tunnel is stalling this node on purpose, and resetting its streams one by one
// would only hand it the credit for the next.
func (b *budgets) takePending(t *Tunnel, now time.Time) (timeout time.Duration, ok, abusive bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	p := b.peer(t.peer.NodeID)
	if t.pending >= b.lim.MaxPendingPerConn || p.pending >= b.lim.MaxPendingPerPeer {
		p.report.Busy++
		p.report.stamp(now)
		abusive := t.silent >= b.lim.MaxSilentPerConn ||
			(p.pending >= b.lim.MaxPendingPerPeer && 2*p.silent >= b.lim.MaxPendingPerPeer && t.silent > 0)
		return 0, false, abusive
	}
	t.pending++
	t.silent++
	p.pending++
	p.silent++
	fill := max(float64(t.pending)/float64(b.lim.MaxPendingPerConn), float64(p.pending)/float64(b.lim.MaxPendingPerPeer))
	d := time.Duration(float64(b.lim.FirstFrameTimeout) * (1 - fill))
	return max(d, min(b.lim.MinFirstFrameTimeout, b.lim.FirstFrameTimeout)), true, false
}

// firstFrameDone marks one of t's pending streams as past its first frame (read or failed).
func (b *budgets) firstFrameDone(t *Tunnel) {
	b.mu.Lock()
	defer b.mu.Unlock()
	t.silent--
	if p := b.peers[t.peer.NodeID]; p != nil {
		p.silent--
	}
}

// closeAbusive closes t, whose pending budget is full of silent streams (see takePending): its
// streams pending now are counted as stalled when they fail, never reported one by one.
func (t *Tunnel) closeAbusive() {
	if !t.abusive.CompareAndSwap(false, true) {
		return
	}
	e := t.ep
	e.stats.busyTunnels.Add(1)
	e.budget.mu.Lock()
	p := e.budget.peer(t.peer.NodeID)
	p.report.ConnsRefused++
	p.report.stamp(e.clock())
	e.budget.mu.Unlock()
	e.log.Warn("tunnel closed: its streams stall before admission", "peer", t.peer.NodeID, "zone", t.zone, "remote", addrString(t.conn.RemoteAddr()))
	_ = t.conn.CloseWithError(codeBusy, "too many streams stalled before admission")
}

func (b *budgets) releasePending(t *Tunnel) {
	b.mu.Lock()
	defer b.mu.Unlock()
	t.pending--
	if p := b.peers[t.peer.NodeID]; p != nil {
		p.pending--
		b.gc(t.peer.NodeID, p)
	}
}

func (b *budgets) stalled(peer string, now time.Time) {
	b.mu.Lock()
	defer b.mu.Unlock()
	p := b.peer(peer)
	p.report.Stalled++
	p.report.stamp(now)
}

// pendingTotal is the number of streams waiting for admission now, all peers together.
func (b *budgets) pendingTotal() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	n := 0
	for _, p := range b.peers {
		n += p.pending
	}
	return n
}

// take returns the pending reports and starts new ones.
func (b *budgets) take() []StallReport {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []StallReport
	for id, p := range b.peers {
		r := p.report
		if r.Stalled == 0 && r.Busy == 0 && r.ConnsRefused == 0 {
			continue
		}
		out = append(out, r)
		p.report = StallReport{Peer: id}
		b.gc(id, p)
	}
	return out
}

func (r *StallReport) stamp(now time.Time) {
	if r.First.IsZero() {
		r.First = now
	}
	r.Last = now
}

// flushStalls hands every pending StallReport to Config.OnStalled.
func (e *Endpoint) flushStalls() {
	reports := e.budget.take()
	if e.cfg.OnStalled == nil {
		return
	}
	for _, r := range reports {
		e.cfg.OnStalled(r)
	}
}
