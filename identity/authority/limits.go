package authority

import (
	"container/list"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"
)

// Limits bound what an unauthenticated peer can make the authority do. A join needs no client
// certificate, so anyone who completes a QUIC handshake can send requests; these numbers keep such
// a peer from filling the audit trail (one fsync per record) or tying up the join path. Zero
// fields take the defaults below; docs/identity.md ("Audit and abuse limits") explains them.
type Limits struct {
	// Interval is the accounting window: per-source and global audit budgets refill over it, and
	// a source's suppressed refusals are folded into one summary record per Interval.
	Interval time.Duration
	// PerSourceBurst is how many unauthenticated refusals of one source (IPv4 /32, IPv6 /64) are
	// audited individually per Interval; the rest are counted in that source's summary.
	PerSourceBurst int
	// GlobalBurst caps the audit records (individual or a new summary) that unauthenticated
	// refusals of all sources together may write per Interval; beyond it they are folded into one
	// summary for all sources ("*").
	GlobalBurst int
	// MaxSources bounds the sources the limiter remembers; the least recently seen is evicted
	// (its pending summary written) to make room for a new one.
	MaxSources int
	// MaxConnsPerSource is how many connections of one source are served at once; more are
	// closed at once with closeBusy (the client sees ErrBusy) and never reach the store.
	MaxConnsPerSource int
	// MaxConns is how many connections of all sources are served at once.
	MaxConns int
	// MaxInFlight is how many read requests (joins and renewals) are processed at once: parsed,
	// checked against the store, signed. More are answered CodeBusy without touching the store.
	MaxInFlight int
	// MaxWatchers is how many watch connections are served at once in total; more are refused
	// with CodeBusy. An accepted watcher stops counting against MaxConns and MaxConnsPerSource.
	MaxWatchers int
	// MaxWatchersPerNode is how many watch connections one node ID holds at once; a new one
	// beyond it replaces the node's oldest (a node that reconnects is not locked out by its own
	// half-dead connection).
	MaxWatchersPerNode int
}

// Default limits. The audit budgets are per minute: a flood from one source costs 5 individual
// records and one summary a minute; all sources together at most 100 records (individual or a new
// summary) plus one global summary a minute.
const (
	DefaultLimitInterval      = time.Minute
	DefaultPerSourceBurst     = 5
	DefaultGlobalBurst        = 100
	DefaultMaxSources         = 4096
	DefaultMaxConnsPerSource  = 8
	DefaultMaxConns           = 256
	DefaultMaxInFlight        = 16
	DefaultMaxWatchers        = 4096
	DefaultMaxWatchersPerNode = 2
)

func (l Limits) withDefaults() Limits {
	if l.Interval <= 0 {
		l.Interval = DefaultLimitInterval
	}
	if l.PerSourceBurst <= 0 {
		l.PerSourceBurst = DefaultPerSourceBurst
	}
	if l.GlobalBurst <= 0 {
		l.GlobalBurst = DefaultGlobalBurst
	}
	if l.MaxSources <= 0 {
		l.MaxSources = DefaultMaxSources
	}
	if l.MaxConnsPerSource <= 0 {
		l.MaxConnsPerSource = DefaultMaxConnsPerSource
	}
	if l.MaxConns <= 0 {
		l.MaxConns = DefaultMaxConns
	}
	if l.MaxInFlight <= 0 {
		l.MaxInFlight = DefaultMaxInFlight
	}
	if l.MaxWatchers <= 0 {
		l.MaxWatchers = DefaultMaxWatchers
	}
	if l.MaxWatchersPerNode <= 0 {
		l.MaxWatchersPerNode = DefaultMaxWatchersPerNode
	}
	return l
}

// sourceOf is the accounting key of a remote address: the IPv4 address, or the IPv6 /64 (one
// host routinely owns a whole /64, so counting single IPv6 addresses would let it multiply its
// budget by 2^64). Anything else shares the zero prefix, which only makes such peers stricter.
func sourceOf(addr net.Addr) netip.Prefix {
	ua, ok := addr.(*net.UDPAddr)
	if !ok {
		return netip.Prefix{}
	}
	ip, ok := netip.AddrFromSlice(ua.IP)
	if !ok {
		return netip.Prefix{}
	}
	return sourcePrefix(ip)
}

func sourcePrefix(ip netip.Addr) netip.Prefix {
	ip = ip.Unmap().WithZone("")
	bits := 32
	if ip.Is6() {
		bits = 64
	}
	p, err := ip.Prefix(bits)
	if err != nil {
		return netip.Prefix{}
	}
	return p
}

// sourceLabel is how a source appears in the audit trail.
func sourceLabel(p netip.Prefix) string {
	switch {
	case !p.IsValid():
		return "unknown"
	case p.Addr().Is4():
		return p.Addr().String()
	default:
		return p.String()
	}
}

// globalSource labels the summary of refusals folded once the global budget is spent.
const globalSource = "*"

// bucket is a token bucket refilled continuously at capacity per interval.
type bucket struct {
	tokens float64
	at     time.Time
}

func (b *bucket) refill(now time.Time, capacity int, interval time.Duration) {
	if el := now.Sub(b.at); el > 0 {
		b.tokens = min(float64(capacity), b.tokens+float64(capacity)*float64(el)/float64(interval))
		b.at = now
	}
}

func (b *bucket) take() bool {
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}

// summary counts the suppressed refusals of one source (or of all, for the global one) during one
// interval. It is written once, when the interval ends, its source is evicted, or at shutdown.
type summary struct {
	label       string
	opened      time.Time
	first, last time.Time
	count       uint64
	reasons     map[string]uint64
	owner       *sourceState // nil for the global summary
	elem        *list.Element
}

func (s *summary) record(now time.Time) AuditRecord {
	keys := slices.Sorted(maps.Keys(s.reasons))
	parts := make([]string, 0, len(keys))
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%s=%d", k, s.reasons[k]))
	}
	return AuditRecord{
		Time: now, Event: EventSuppressed, Remote: s.label, Outcome: OutcomeSuppressed,
		Count: s.count, First: s.first.UTC(), Last: s.last.UTC(), Reasons: maps.Clone(s.reasons),
		Reason: fmt.Sprintf("%d unauthenticated refusals not audited one by one (%s) between %s and %s",
			s.count, strings.Join(parts, ", "), s.first.UTC().Format(time.RFC3339), s.last.UTC().Format(time.RFC3339)),
	}
}

type sourceState struct {
	key  netip.Prefix
	b    bucket
	sum  *summary
	elem *list.Element // in noiseLimiter.lru
}

// noiseLimiter decides which unauthenticated refusals are audited one by one and folds the others
// into summaries. It does no I/O: callers write the records it returns, outside its lock. Its
// memory is bounded by MaxSources entries plus one pending summary each and one global summary.
type noiseLimiter struct {
	mu        sync.Mutex
	lim       Limits
	sources   map[netip.Prefix]*sourceState
	lru       *list.List // of *sourceState, most recently seen first
	pending   *list.List // of *summary, oldest opened first: all intervals have one length, so they also end in this order
	global    bucket
	globalSum *summary
}

func newNoiseLimiter(lim Limits, now time.Time) *noiseLimiter {
	lim = lim.withDefaults()
	return &noiseLimiter{
		lim: lim, sources: make(map[netip.Prefix]*sourceState), lru: list.New(), pending: list.New(),
		global: bucket{tokens: float64(lim.GlobalBurst), at: now},
	}
}

// admit accounts one unauthenticated refusal of src for reason at now. individual says whether the
// caller audits it as its own record; due holds summaries that must be written now (intervals
// that ended, or the summary of an evicted source). suppress forces folding (busy refusals, which
// must never cost an fsync of their own).
func (l *noiseLimiter) admit(src netip.Prefix, reason string, now time.Time, suppress bool) (individual bool, due []AuditRecord) {
	l.mu.Lock()
	defer l.mu.Unlock()
	due = l.dueLocked(now, false)
	st, ok := l.sources[src]
	if !ok {
		if len(l.sources) >= l.lim.MaxSources {
			if old := l.lru.Back(); old != nil {
				due = append(due, l.evictLocked(old.Value.(*sourceState), now)...)
			}
		}
		st = &sourceState{key: src, b: bucket{tokens: float64(l.lim.PerSourceBurst), at: now}}
		st.elem = l.lru.PushFront(st)
		l.sources[src] = st
	} else {
		l.lru.MoveToFront(st.elem)
	}
	st.b.refill(now, l.lim.PerSourceBurst, l.lim.Interval)
	l.global.refill(now, l.lim.GlobalBurst, l.lim.Interval)
	if !suppress && st.b.tokens >= 1 && l.global.tokens >= 1 {
		st.b.take()
		l.global.take()
		return true, due
	}
	sum := st.sum
	if sum == nil {
		// A new per-source summary is one more record later, so it spends the global budget too;
		// without budget the refusal joins the one global summary.
		if (suppress || st.b.tokens < 1) && l.global.take() {
			sum = l.openLocked(sourceLabel(src), st, now)
			st.sum = sum
		} else {
			if l.globalSum == nil {
				l.globalSum = l.openLocked(globalSource, nil, now)
			}
			sum = l.globalSum
		}
	}
	sum.count++
	sum.last = now
	sum.reasons[reason]++
	return false, due
}

func (l *noiseLimiter) openLocked(label string, owner *sourceState, now time.Time) *summary {
	s := &summary{label: label, opened: now, first: now, reasons: make(map[string]uint64), owner: owner}
	s.elem = l.pending.PushBack(s)
	return s
}

func (l *noiseLimiter) closeLocked(s *summary, now time.Time) AuditRecord {
	l.pending.Remove(s.elem)
	if s.owner != nil {
		s.owner.sum = nil
	} else {
		l.globalSum = nil
	}
	return s.record(now)
}

func (l *noiseLimiter) evictLocked(st *sourceState, now time.Time) []AuditRecord {
	l.lru.Remove(st.elem)
	delete(l.sources, st.key)
	if st.sum == nil {
		return nil
	}
	return []AuditRecord{l.closeLocked(st.sum, now)}
}

// dueLocked closes the summaries whose interval has ended at now, or all of them.
func (l *noiseLimiter) dueLocked(now time.Time, all bool) []AuditRecord {
	var out []AuditRecord
	for e := l.pending.Front(); e != nil; e = l.pending.Front() {
		s := e.Value.(*summary)
		if !all && now.Before(s.opened.Add(l.lim.Interval)) {
			break
		}
		out = append(out, l.closeLocked(s, now))
	}
	return out
}

// flush returns the summaries due at now (all of them when all is set, as at shutdown).
func (l *noiseLimiter) flush(now time.Time, all bool) []AuditRecord {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.dueLocked(now, all)
}

// size is the number of sources remembered and of summaries pending.
func (l *noiseLimiter) size() (sources, pending int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.sources), l.pending.Len()
}

// connLimiter counts the connections being served, per source and in total. Entries are deleted
// when their count returns to zero, so its size is bounded by MaxConns.
type connLimiter struct {
	mu        sync.Mutex
	perSource int
	total     int
	n         int
	bySource  map[netip.Prefix]int
}

func newConnLimiter(lim Limits) *connLimiter {
	lim = lim.withDefaults()
	return &connLimiter{perSource: lim.MaxConnsPerSource, total: lim.MaxConns, bySource: make(map[netip.Prefix]int)}
}

// acquire takes a slot for a connection of src; ok is false when src or the whole endpoint is at
// its limit, and why names which.
func (c *connLimiter) acquire(src netip.Prefix) (release func(), why string, ok bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case c.bySource[src] >= c.perSource:
		return nil, fmt.Sprintf("%d connections from %s already being served", c.perSource, sourceLabel(src)), false
	case c.n >= c.total:
		return nil, fmt.Sprintf("%d connections already being served", c.total), false
	}
	c.bySource[src]++
	c.n++
	var once sync.Once
	return func() {
		once.Do(func() {
			c.mu.Lock()
			defer c.mu.Unlock()
			c.n--
			if c.bySource[src]--; c.bySource[src] <= 0 {
				delete(c.bySource, src)
			}
		})
	}, "", true
}

// reasonKey names a refusal in a summary's histogram: the event and the wire code's name.
func reasonKey(event string, c Code) string { return event + "/" + c.String() }
