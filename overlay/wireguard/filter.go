package wireguard

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.zx2c4.com/wireguard/tun"
)

// ErrNotAdded is returned for an admission whose hook reported success without adding the
// tuple (or whose tuple was removed again, by a racing revocation, before its packets left).
var ErrNotAdded = errors.New("wireguard: admission did not add the flow")

// FilterConfig configures a Filter.
type FilterConfig struct {
	// Inner is the kernel-side device (the TUN the agents' packets enter and leave by).
	Inner tun.Device
	// Admit decides a new outbound 5-tuple. It runs on a filter-owned goroutine (at most
	// MaxAdmissions at once), its ctx ends when the filter closes. To admit, it calls
	// AddOutbound(t, info) and returns nil; any error refuses the tuple for RefuseFor.
	Admit func(ctx context.Context, t Tuple) error
	// OnRemove, if set, is told every tuple the filter forgets by itself (idle). It must not block.
	OnRemove func(t Tuple, info any)
	// MaxHeldPerFlow bounds the packets held for one tuple while it is being admitted (default
	// 16); MaxHeld bounds them across tuples (default 4096). A packet over either is dropped
	// and counted.
	MaxHeldPerFlow, MaxHeld int
	// MaxAdmissions bounds the tuples under admission at once (default 256); a new tuple over
	// it is dropped (counted) and tried again on its next packet.
	MaxAdmissions int
	// RefuseFor is how long a refused tuple's packets are dropped without asking again
	// (default 2 s), so a retransmitting SYN does not sign a record per packet.
	RefuseFor time.Duration
	// IdleTimeout forgets an admitted tuple no packet used for this long (default 5 min).
	IdleTimeout time.Duration
	// Clock is the time source; nil means time.Now.
	Clock  func() time.Time
	Logger *slog.Logger
}

// FilterStats count what the filter did.
type FilterStats struct {
	Held       uint64 // packets held while their tuple was admitted
	Released   uint64 // held packets released after admission
	Overflow   uint64 // packets dropped: hold queue full, or too many admissions at once
	Refused    uint64 // packets dropped because their tuple was refused
	Unadmitted uint64 // packets from the device (inbound) of no admitted tuple, dropped
	NotFlow    uint64 // packets that are not TCP or UDP with ports, dropped (both directions)
	Fragments  uint64 // later fragments of UDP datagrams (IPv4, IPv6) that followed their first (frag.go)
	Admissions uint64 // tuples admitted
	Refusals   uint64 // tuples refused
	Resets     uint64 // TCP resets written toward local programs: cut flows, and their later packets
	Flows      int    // tuples admitted now
}

type entry struct {
	t    Tuple
	info any
	last atomic.Int64 // coarse unix nanos of the last packet
	tcp  *tcpTrack    // TCP tuples only: sequence numbers, to reset the flow when it is cut
}

type pendingFlow struct {
	pkts [][]byte
}

type batch struct {
	bufs  [][]byte
	sizes []int
	n     int
	err   error
}

// Filter is a tun.Device wrapper in front of a wireguard-go device. Packets the kernel sends
// (Read, toward the peers) pass when their tuple is admitted outbound or is the reply of an
// admitted inbound tuple; a packet of a new tuple is held until Admit decides. Packets the device
// delivers (Write, toward the kernel) pass only when their tuple was admitted inbound or is the
// reply of an admitted outbound tuple. The fast path is two map lookups under a read lock.
type Filter struct {
	cfg   FilterConfig
	inner tun.Device
	log   *slog.Logger
	now   func() time.Time

	// mu guards the admitted maps. Write holds it for reading across the inner write, so a
	// removal returns only after every packet that saw the tuple has been handed to the kernel.
	mu  sync.RWMutex
	out map[key]*entry // admitted outbound: this node's agent opened it; key as the packets leave
	in  map[key]*entry // admitted inbound: a peer's agent opened it; key as the packets arrive

	pmu     sync.Mutex
	pending map[Tuple]*pendingFlow
	held    int
	refused map[Tuple]time.Time
	resets  map[key]time.Time // TCP tuples cut lately, as the local side sends: answered by a RST

	// fragOut and fragIn follow fragmented UDP datagrams leaving and arriving (frag.go).
	fragOut, fragIn fragTable
	released        [][]byte

	// direct is the inner device's file when it can interrupt a blocked read (a kernel TUN: a
	// nonblocking file in Go's poller). Read then reads the kernel straight into the device's
	// buffers and decides in place, and an admission that releases packets wakes it by setting a
	// read deadline in the past. Otherwise (nil: channel TUNs, test devices) a reader goroutine
	// reads ahead and Read waits on it and on released packets alike.
	direct   *os.File
	nRelease atomic.Int32 // len(released), readable without pmu on Read's fast path

	notify chan struct{}
	ready  chan *batch
	free   chan *batch
	cur    *batch // the batch Read is handing out; Read's goroutine only
	curPos int
	start  sync.Once

	coarse atomic.Int64
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	closed atomic.Bool

	heldPkts, releasedPkts, overflow, refusedPkts, unadmitted, notFlow, admissions, refusals, resetsSent, fragments atomic.Uint64
}

var _ tun.Device = (*Filter)(nil)

// NewFilter wraps cfg.Inner.
func NewFilter(cfg FilterConfig) *Filter {
	if cfg.MaxHeldPerFlow <= 0 {
		cfg.MaxHeldPerFlow = 16
	}
	if cfg.MaxHeld <= 0 {
		cfg.MaxHeld = 4096
	}
	if cfg.MaxAdmissions <= 0 {
		cfg.MaxAdmissions = 256
	}
	if cfg.RefuseFor <= 0 {
		cfg.RefuseFor = 2 * time.Second
	}
	if cfg.IdleTimeout <= 0 {
		cfg.IdleTimeout = 5 * time.Minute
	}
	f := &Filter{cfg: cfg, inner: cfg.Inner, log: cfg.Logger, now: cfg.Clock,
		out: map[key]*entry{}, in: map[key]*entry{},
		pending: map[Tuple]*pendingFlow{}, refused: map[Tuple]time.Time{}, resets: map[key]time.Time{},
		notify: make(chan struct{}, 1), ready: make(chan *batch, 2), free: make(chan *batch, 2)}
	if f.log == nil {
		f.log = slog.New(slog.DiscardHandler)
	}
	if f.now == nil {
		f.now = time.Now
	}
	f.coarse.Store(f.now().UnixNano())
	if fl := cfg.Inner.File(); fl != nil && fl.SetReadDeadline(time.Time{}) == nil {
		f.direct = fl
	}
	f.ctx, f.cancel = context.WithCancel(context.Background())
	f.wg.Go(f.sweepLoop)
	return f
}

// AddOutbound admits t, a tuple one of this node's agents opens, with info the caller wants
// back (Flows, RemoveMatching). Its replies pass inbound.
func (f *Filter) AddOutbound(t Tuple, info any) { f.add(f.out, t, info) }

// AddInbound admits t, a tuple a peer's agent opens toward one of this node's agents. Its
// replies pass outbound.
func (f *Filter) AddInbound(t Tuple, info any) { f.add(f.in, t, info) }

func (f *Filter) add(m map[key]*entry, t Tuple, info any) {
	e := &entry{t: t, info: info}
	if t.Proto == ProtoTCP {
		e.tcp = &tcpTrack{}
	}
	e.last.Store(f.coarse.Load())
	f.mu.Lock()
	m[keyOf(t)] = e
	f.mu.Unlock()
}

// Admitted reports whether t passes outbound (admitted outbound, or the reply of an admitted
// inbound tuple).
func (f *Filter) Admitted(t Tuple) bool {
	k := keyOf(t)
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.out[k] != nil || f.in[k.reverse()] != nil
}

// Remove forgets t in both directions (a cut: revocation, isolation, policy) and returns the
// info it was admitted with. When it returns, no packet of t passes anymore, and a TCP tuple's
// local end has been sent a RST.
func (f *Filter) Remove(t Tuple) (info any, ok bool) {
	k := keyOf(t)
	var cut []cutEntry
	f.mu.Lock()
	if e := f.out[k]; e != nil {
		cut = append(cut, cutEntry{e, true})
		info, ok = e.info, true
	}
	if e := f.in[k]; e != nil {
		cut = append(cut, cutEntry{e, false})
		info, ok = e.info, true
	}
	delete(f.out, k)
	delete(f.in, k)
	f.mu.Unlock()
	f.reset(cut)
	return info, ok
}

// RemoveIf is Remove for a tuple whose admission info match accepts (a cut a peer node asks for:
// only the node at the tuple's other end may ask). It reports whether t was admitted at all and
// whether it was removed; a tuple match refuses stays admitted, untouched.
func (f *Filter) RemoveIf(t Tuple, match func(info any) bool) (found, removed bool) {
	k := keyOf(t)
	var cut []cutEntry
	f.mu.Lock()
	eo, ei := f.out[k], f.in[k]
	found = eo != nil || ei != nil
	if eo != nil && match(eo.info) {
		cut = append(cut, cutEntry{eo, true})
		delete(f.out, k)
	}
	if ei != nil && match(ei.info) {
		cut = append(cut, cutEntry{ei, false})
		delete(f.in, k)
	}
	f.mu.Unlock()
	f.reset(cut)
	return found, len(cut) > 0
}

// RemoveMatching forgets every admitted tuple match selects (a cut) and returns how many. When it
// returns, no packet of those tuples passes anymore, and the local ends of the TCP ones have
// been sent a RST.
func (f *Filter) RemoveMatching(match func(t Tuple, info any) bool) int {
	var cut []cutEntry
	f.mu.Lock()
	for i, m := range []map[key]*entry{f.out, f.in} {
		for k, e := range m {
			if match(e.t, e.info) {
				delete(m, k)
				cut = append(cut, cutEntry{e, i == 0})
			}
		}
	}
	f.mu.Unlock()
	f.reset(cut)
	return len(cut)
}

type cutEntry struct {
	e        *entry
	outbound bool
}

// reset writes a RST toward the local end of each cut TCP tuple and remembers the tuples for
// RefuseFor, so that what the local side still sends on them is answered by a RST too. It runs
// after the tuples left the maps: the Write that delivered their last packet has returned, so
// the tracked sequence numbers are final.
func (f *Filter) reset(cut []cutEntry) {
	if len(cut) == 0 {
		return
	}
	until := f.now().Add(f.cfg.RefuseFor)
	var pkts [][]byte
	f.pmu.Lock()
	for _, c := range cut {
		if c.e.tcp == nil {
			continue
		}
		local, remote := c.e.t.Source(), c.e.t.Destination()
		if !c.outbound {
			local, remote = remote, local
		}
		f.resets[keyOf(Tuple{Src: local.Addr(), Dst: remote.Addr(), SrcPort: local.Port(), DstPort: remote.Port(), Proto: ProtoTCP})] = until
		if p := c.e.tcp.rstToLocal(local, remote); p != nil {
			pkts = append(pkts, p)
		}
	}
	f.pmu.Unlock()
	f.inject(pkts)
}

// inject writes packets the filter made (resets) into the kernel device.
func (f *Filter) inject(pkts [][]byte) {
	if len(pkts) == 0 || f.closed.Load() {
		return
	}
	if _, err := f.inner.Write(pkts, rstHeadroom); err != nil {
		f.log.Debug("reset not written", "err", err)
		return
	}
	f.resetsSent.Add(uint64(len(pkts)))
}

// Flows visits every admitted tuple; outbound says which map it is in.
func (f *Filter) Flows(visit func(t Tuple, outbound bool, info any)) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	for _, e := range f.out {
		visit(e.t, true, e.info)
	}
	for _, e := range f.in {
		visit(e.t, false, e.info)
	}
}

// Stats returns the counters.
func (f *Filter) Stats() FilterStats {
	f.mu.RLock()
	n := len(f.out) + len(f.in)
	f.mu.RUnlock()
	return FilterStats{Held: f.heldPkts.Load(), Released: f.releasedPkts.Load(), Overflow: f.overflow.Load(),
		Refused: f.refusedPkts.Load(), Unadmitted: f.unadmitted.Load(), NotFlow: f.notFlow.Load(),
		Admissions: f.admissions.Load(), Refusals: f.refusals.Load(), Resets: f.resetsSent.Load(),
		Fragments: f.fragments.Load(), Flows: n}
}

// Read hands wireguard-go the kernel's packets that may leave. Like every tun.Device, it is
// called from one goroutine at a time.
func (f *Filter) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	if f.direct != nil {
		return f.readDirect(bufs, sizes, offset)
	}
	f.start.Do(func() { f.startReader(len(bufs[0]), offset) })
	if f.cur == nil && f.closed.Load() {
		return 0, os.ErrClosed
	}
	for {
		if n := f.takeReleased(bufs, sizes, offset); n > 0 {
			return n, nil
		}
		if b := f.cur; b != nil {
			n := 0
			for n < len(bufs) && f.curPos < b.n {
				sizes[n] = copy(bufs[n][offset:], b.bufs[f.curPos][offset:offset+b.sizes[f.curPos]])
				n++
				f.curPos++
			}
			err := b.err
			if f.curPos >= b.n {
				f.cur, f.curPos = nil, 0
				b.err = nil
				f.free <- b
			} else {
				err = nil // reported with the batch's last packets
			}
			if n > 0 || err != nil {
				return n, err
			}
			continue
		}
		select {
		case b, ok := <-f.ready:
			if !ok {
				return 0, os.ErrClosed
			}
			f.cur, f.curPos = b, 0
		case <-f.notify:
		}
	}
}

// readDirect is Read on a kernel TUN: the kernel's packets are read into bufs, the device's own
// buffers, and decided there, with no reader goroutine, hand-over or copy on the way. Passing
// packets are moved down over dropped ones by copying: bufs' elements belong to the device's
// per-packet buffers and must stay where they are.
func (f *Filter) readDirect(bufs [][]byte, sizes []int, offset int) (int, error) {
	for {
		if f.nRelease.Load() > 0 {
			if n := f.takeReleased(bufs, sizes, offset); n > 0 {
				return n, nil
			}
		}
		if f.closed.Load() {
			return 0, os.ErrClosed
		}
		n, err := f.inner.Read(bufs, sizes, offset)
		if err != nil && errors.Is(err, os.ErrDeadlineExceeded) {
			// wake: packets were released. Clear the deadline before taking them, so that a wake
			// landing after the clear leaves the deadline set and the next read returns at once.
			_ = f.direct.SetReadDeadline(time.Time{})
			continue
		}
		now := f.coarse.Load()
		k := 0
		for i := range n {
			pkt := bufs[i][offset : offset+sizes[i]]
			if f.outbound(pkt, now) {
				if k != i {
					sizes[k] = copy(bufs[k][offset:], pkt)
				} else {
					sizes[k] = sizes[i]
				}
				k++
			}
		}
		if k > 0 || err != nil {
			return k, err
		}
	}
}

// DirectRead reports whether Read reads the inner device directly (it can interrupt a blocked
// read: a kernel TUN) rather than through a reader goroutine.
func (f *Filter) DirectRead() bool { return f.direct != nil }

// wake makes Read hand out released packets now, even while it waits for the kernel.
func (f *Filter) wake() {
	if f.direct != nil {
		_ = f.direct.SetReadDeadline(time.Unix(1, 0))
		return
	}
	select {
	case f.notify <- struct{}{}:
	default:
	}
}

// takeReleased copies released packets into bufs.
func (f *Filter) takeReleased(bufs [][]byte, sizes []int, offset int) int {
	f.pmu.Lock()
	defer f.pmu.Unlock()
	n := 0
	for n < len(bufs) && len(f.released) > 0 {
		sizes[n] = copy(bufs[n][offset:], f.released[0])
		f.released[0] = nil
		f.released = f.released[1:]
		n++
	}
	f.nRelease.Store(int32(len(f.released)))
	if len(f.released) > 0 && f.direct == nil {
		select {
		case f.notify <- struct{}{}:
		default:
		}
	}
	return n
}

func (f *Filter) startReader(bufSize, offset int) {
	bs := max(1, f.inner.BatchSize())
	for range cap(f.free) {
		b := &batch{bufs: make([][]byte, bs), sizes: make([]int, bs)}
		for i := range b.bufs {
			b.bufs[i] = make([]byte, bufSize)
		}
		f.free <- b
	}
	// Under pmu, like every other goroutine start, so that none starts once Close waits.
	f.pmu.Lock()
	defer f.pmu.Unlock()
	if f.closed.Load() {
		close(f.ready)
		return
	}
	f.wg.Go(func() { f.readLoop(offset) })
}

// readLoop reads the kernel device ahead of Read, so that Read can also return released packets
// while no kernel packet arrives.
func (f *Filter) readLoop(offset int) {
	defer close(f.ready)
	for {
		var b *batch
		select {
		case b = <-f.free:
		case <-f.ctx.Done():
			return
		}
		n, err := f.inner.Read(b.bufs, b.sizes, offset)
		k := 0
		now := f.coarse.Load()
		for i := range n {
			if f.outbound(b.bufs[i][offset:offset+b.sizes[i]], now) {
				b.bufs[k], b.bufs[i] = b.bufs[i], b.bufs[k]
				b.sizes[k] = b.sizes[i]
				k++
			}
		}
		b.n, b.err = k, err
		if k == 0 && err == nil {
			f.free <- b
			continue
		}
		select {
		case f.ready <- b:
		case <-f.ctx.Done():
			return
		}
		if err != nil && !errors.Is(err, tun.ErrTooManySegments) {
			return
		}
	}
}

// outbound decides one packet from the kernel: pass, or hold it for admission.
func (f *Filter) outbound(pkt []byte, now int64) bool {
	var k key
	var ok bool
	if isFragment(pkt) {
		var fk fragKey
		var first, followed bool
		k, ok, fk, first, followed = f.fragOut.classify(pkt, now)
		if first {
			f.fragOut.remember(fk, k, now)
		}
		if followed {
			f.fragments.Add(1)
		}
	} else {
		k, ok = parseKey(pkt)
	}
	if !ok {
		f.notFlow.Add(1)
		return false
	}
	f.mu.RLock()
	e := f.out[k]
	if e == nil {
		e = f.in[k.reverse()]
	}
	f.mu.RUnlock()
	if e != nil {
		if e.last.Load() != now {
			e.last.Store(now)
		}
		if e.tcp != nil {
			if seq, ack, flags, span, ok := tcpSegment(pkt); ok {
				e.tcp.localNext.advance(seq + span)
				if flags&tcpACK != 0 {
					e.tcp.localAck.advance(ack)
				}
			}
		}
		return true
	}
	t, ok := ParseTuple(pkt)
	if !ok {
		t = tupleOf(k) // a fragment: its datagram's tuple
	}
	f.hold(t, k, pkt)
	return false
}

// hold queues a packet of a tuple that is not admitted and starts its admission.
func (f *Filter) hold(t Tuple, k key, pkt []byte) {
	now := f.now()
	f.pmu.Lock()
	if until, ok := f.resets[k]; ok {
		if now.Before(until) {
			if rst := rstReply(pkt, t); rst != nil {
				f.pmu.Unlock()
				f.refusedPkts.Add(1)
				f.inject([][]byte{rst})
				return
			}
		} else {
			delete(f.resets, k)
		}
	}
	if until, ok := f.refused[t]; ok {
		if now.Before(until) {
			f.pmu.Unlock()
			f.refusedPkts.Add(1)
			return
		}
		delete(f.refused, t)
	}
	p := f.pending[t]
	start := false
	if p == nil {
		if len(f.pending) >= f.cfg.MaxAdmissions || f.closed.Load() {
			f.pmu.Unlock()
			f.overflow.Add(1)
			return
		}
		p = &pendingFlow{}
		f.pending[t] = p
		start = true
	}
	if len(p.pkts) >= f.cfg.MaxHeldPerFlow || f.held >= f.cfg.MaxHeld {
		f.overflow.Add(1)
	} else {
		p.pkts = append(p.pkts, append([]byte(nil), pkt...))
		f.held++
		f.heldPkts.Add(1)
	}
	if start {
		f.wg.Add(1)
	}
	f.pmu.Unlock()
	if start {
		go f.admit(t)
	}
}

// admit runs the Admit hook for t and releases or drops its held packets.
func (f *Filter) admit(t Tuple) {
	defer f.wg.Done()
	var err error
	if !f.Admitted(t) {
		if f.cfg.Admit == nil {
			err = errors.New("wireguard: no admission hook")
		} else {
			err = f.cfg.Admit(f.ctx, t)
		}
		if err == nil && !f.Admitted(t) {
			err = ErrNotAdded
		}
	}
	f.pmu.Lock()
	p := f.pending[t]
	delete(f.pending, t)
	var pkts [][]byte
	if p != nil {
		pkts = p.pkts
		f.held -= len(pkts)
	}
	if err != nil {
		f.refused[t] = f.now().Add(f.cfg.RefuseFor)
		f.refusedPkts.Add(uint64(len(pkts)))
		f.refusals.Add(1)
	} else {
		f.released = append(f.released, pkts...)
		f.nRelease.Store(int32(len(f.released)))
		f.releasedPkts.Add(uint64(len(pkts)))
		f.admissions.Add(1)
	}
	f.pmu.Unlock()
	if err != nil {
		f.log.Debug("flow refused", "flow", t.String(), "err", err)
		return
	}
	if len(pkts) > 0 {
		f.wake()
	}
}

// Write hands the kernel the packets wireguard-go decrypted, keeping only those of admitted
// tuples. It reorders bufs in place.
func (f *Filter) Write(bufs [][]byte, offset int) (int, error) {
	now := f.coarse.Load()
	f.mu.RLock()
	defer f.mu.RUnlock()
	kept := 0
	for i := range bufs {
		pkt := bufs[i][offset:]
		var k key
		var ok, first bool
		var fk fragKey
		if isFragment(pkt) {
			var followed bool
			k, ok, fk, first, followed = f.fragIn.classify(pkt, now)
			if followed {
				f.fragments.Add(1)
			}
		} else {
			k, ok = parseKey(pkt)
		}
		if !ok {
			f.notFlow.Add(1)
			continue
		}
		e := f.in[k]
		if e == nil {
			e = f.out[k.reverse()]
		}
		if e == nil {
			f.unadmitted.Add(1)
			continue
		}
		if first {
			f.fragIn.remember(fk, k, now)
		}
		if e.last.Load() != now {
			e.last.Store(now)
		}
		if e.tcp != nil {
			if seq, _, _, span, ok := tcpSegment(bufs[i][offset:]); ok {
				e.tcp.remoteNext.advance(seq + span)
			}
		}
		bufs[kept], bufs[i] = bufs[i], bufs[kept]
		kept++
	}
	if kept == 0 {
		return len(bufs), nil
	}
	if _, err := f.inner.Write(bufs[:kept], offset); err != nil {
		return 0, err
	}
	return len(bufs), nil
}

// sweepLoop advances the coarse clock and forgets idle tuples and expired refusals.
func (f *Filter) sweepLoop() {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	last := f.now()
	for {
		select {
		case <-f.ctx.Done():
			return
		case <-t.C:
			now := f.now()
			f.coarse.Store(now.UnixNano())
			if now.Sub(last) >= min(f.cfg.IdleTimeout/4, 30*time.Second) {
				f.SweepIdle(now)
				last = now
			}
		}
	}
}

// SweepIdle forgets tuples idle since before now-IdleTimeout and refusals past their time, and
// returns how many tuples it forgot.
func (f *Filter) SweepIdle(now time.Time) int {
	f.coarse.Store(now.UnixNano())
	cutoff := now.Add(-f.cfg.IdleTimeout).UnixNano()
	type gone struct {
		t    Tuple
		info any
	}
	var forgot []gone
	f.mu.Lock()
	for _, m := range []map[key]*entry{f.out, f.in} {
		for k, e := range m {
			if e.last.Load() <= cutoff {
				delete(m, k)
				forgot = append(forgot, gone{e.t, e.info})
			}
		}
	}
	f.mu.Unlock()
	f.pmu.Lock()
	for t, until := range f.refused {
		if !now.Before(until) {
			delete(f.refused, t)
		}
	}
	for k, until := range f.resets {
		if !now.Before(until) {
			delete(f.resets, k)
		}
	}
	f.pmu.Unlock()
	f.fragOut.sweep(now.UnixNano())
	f.fragIn.sweep(now.UnixNano())
	if f.cfg.OnRemove != nil {
		for _, g := range forgot {
			f.cfg.OnRemove(g.t, g.info)
		}
	}
	return len(forgot)
}

// File, MTU, Name, Events and BatchSize are the inner device's.
func (f *Filter) File() *os.File           { return f.inner.File() }
func (f *Filter) MTU() (int, error)        { return f.inner.MTU() }
func (f *Filter) Name() (string, error)    { return f.inner.Name() }
func (f *Filter) Events() <-chan tun.Event { return f.inner.Events() }
func (f *Filter) BatchSize() int           { return f.inner.BatchSize() }

// Close stops admissions and the reader and closes the inner device; it waits for every
// goroutine the filter started.
func (f *Filter) Close() error {
	f.pmu.Lock()
	if !f.closed.CompareAndSwap(false, true) {
		f.pmu.Unlock()
		return nil
	}
	f.pmu.Unlock()
	f.cancel()
	err := f.inner.Close()
	f.wg.Wait()
	return err
}
