package audit

import (
	"container/list"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

// EventCollapsed is the entry that stands for identical refusals collapsed within a window. Its
// fields are the refusals' key fields (what made them identical), plus: of (the event of the
// refusals), count (how many refusals it stands for, none of them written on their own), first and
// last (the times of the first and last of them), window.
const EventCollapsed = "refusals-collapsed"

// EventBudget records the hourly budget of refusal entries. state=exhausted is written at once
// when an entry first does not fit (fields budget, period, period_start, until); state=dropped
// when the period ends with drops, or at Close (fields entries, bytes, refusals, first, last,
// period_start, period_end, by: "event:reason=refusals" counts, largest first).
const EventBudget = "audit-budget"

// Defaults of FloodOptions.
const (
	DefaultFloodWindow  = 10 * time.Second
	DefaultFloodBudget  = 8 << 20 // bytes of refusal entries per period
	DefaultFloodPeriod  = time.Hour
	DefaultFloodMaxKeys = 4096
)

// maxByReasons bounds the by field of a dropped entry; the rest is summed under "other".
const maxByReasons = 16

// Appender is where a Flood writes: a *Log, or a wrapper that survives reopening it.
type Appender interface {
	Append(ctx context.Context, e Entry) error
}

// FloodOptions tune a Flood. Zero fields take the defaults.
type FloodOptions struct {
	// Window: identical refusals within this time of the first are collapsed into one
	// EventCollapsed entry per window for as long as they continue.
	Window time.Duration
	// Budget is how many bytes of refusal entries (single refusals and EventCollapsed) one
	// Period may write; what does not fit is counted and reported by EventBudget entries.
	Budget int64
	Period time.Duration
	// MaxKeys bounds the kinds of refusal tracked at once; the oldest is summarised early to make
	// room, so memory stays bounded whatever a peer varies.
	MaxKeys int
	Now     func() time.Time
	Logger  *slog.Logger
}

// FloodStats counts what a Flood did since it was made.
type FloodStats struct {
	Refusals  uint64 // refusals passed to Refuse
	Written   uint64 // refusals written as their own entry
	Collapsed uint64 // refusals written as part of an EventCollapsed count
	Dropped   uint64 // refusals in entries the budget dropped (reported by EventBudget)
	Summaries uint64 // EventCollapsed entries written
}

// Flood writes refusals to an audit log without letting a flood of them fill the disk: the first
// refusal of each kind is written at once as an ordinary entry; identical ones that follow within
// the window are counted and written as one EventCollapsed entry with the exact count and the first
// and last time; and a byte budget per period caps refusal entries, with EventBudget entries saying
// what was dropped. Summaries are ordinary entries of the chain: the hash chain and signed heads
// cover them like any other, so an edited count fails verification like any edited entry.
// Entries that are not refusals must go to the log directly: Flood never collapses or drops them.
type Flood struct {
	dst  Appender
	opts FloodOptions
	log  *slog.Logger

	mu      sync.Mutex
	aggs    map[string]*aggregate
	order   *list.List // of *aggregate, by window start (oldest first)
	stats   FloodStats
	budget  budgetState
	closing bool // Close has begun (it runs once)
	closed  bool // refusals are refused

	// wake rouses the ticker when it sleeps with nothing pending (see ticker); it holds at most
	// one notice.
	wake chan struct{}
	stop chan struct{}
	done chan struct{}
}

type aggregate struct {
	key         string
	event       string
	fields      map[string]string // the key fields
	start       time.Time         // of the current window
	count       uint64            // refusals since the window opened, not written
	first, last time.Time
	elem        *list.Element
}

type budgetState struct {
	start       time.Time // of the period; zero before the first refusal entry
	used        int64
	exhausted   bool
	entries     uint64
	bytes       int64
	refusals    uint64
	first, last time.Time
	by          map[string]uint64
}

// NewFlood returns a Flood writing to dst and starts its ticker, which writes summaries once
// their window has passed even when no refusal follows; it sleeps while nothing is pending.
// Close stops it.
func NewFlood(dst Appender, opts FloodOptions) *Flood {
	if opts.Window <= 0 {
		opts.Window = DefaultFloodWindow
	}
	if opts.Budget <= 0 {
		opts.Budget = DefaultFloodBudget
	}
	if opts.Period <= 0 {
		opts.Period = DefaultFloodPeriod
	}
	if opts.MaxKeys <= 0 {
		opts.MaxKeys = DefaultFloodMaxKeys
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	f := &Flood{dst: dst, opts: opts, log: opts.Logger, aggs: map[string]*aggregate{}, order: list.New(),
		wake: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{})}
	go f.ticker()
	return f
}

// ticker writes due summaries every quarter window while there is something to summarise: a
// kind of refusal still tracked (it is forgotten after a whole quiet window) or refusals the
// budget dropped (their entry is due when the period ends). Otherwise it sleeps until Refuse
// starts tracking a kind: on a node at rest a ticker that fires with nothing to do costs a
// wake-up a second for nothing (docs/benchmarks.md, "A node at rest").
func (f *Flood) ticker() {
	defer close(f.done)
	// A quarter window: a summary is written at most a quarter window after its window ends.
	every := min(max(f.opts.Window/4, 10*time.Millisecond), time.Second)
	t := time.NewTimer(every)
	defer t.Stop()
	for {
		f.mu.Lock()
		idle := f.idleLocked()
		f.mu.Unlock()
		if idle {
			t.Stop()
			select {
			case <-f.stop:
				return
			case <-f.wake:
			}
			t.Reset(every)
		}
		select {
		case <-f.stop:
			return
		case <-t.C:
			t.Reset(every)
			f.mu.Lock()
			err := f.flushLocked(context.Background(), f.opts.Now(), false)
			f.mu.Unlock()
			if err != nil {
				f.log.Error("audit: writing refusal summaries failed", "err", err)
			}
		}
	}
}

// idleLocked reports whether the ticker has nothing to do until the next refusal: no kind is
// tracked and no dropped refusal awaits its entry.
func (f *Flood) idleLocked() bool { return f.order.Len() == 0 && f.budget.entries == 0 }

// rouse wakes the ticker if it sleeps; a notice already pending is enough.
func (f *Flood) rouse() {
	select {
	case f.wake <- struct{}{}:
	default:
	}
}

// Refuse records one refusal. key names the fields of e that, with e.Event, make two refusals
// identical (e.g. peer, reason, dst); a field absent from e counts as empty. The first refusal of a
// kind is written at once as e itself, unless the period's budget is spent (then it is counted in
// the EventBudget entry).
func (f *Flood) Refuse(ctx context.Context, e Entry, key ...string) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("audit: refuse: %w", err)
	}
	if err := validate(&e); err != nil {
		return err
	}
	k := refusalKey(e, key)
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return ErrClosed
	}
	now := f.opts.Now() // under the lock, so that refusals are stamped in the order they count
	if e.Time.IsZero() {
		e.Time = now
	}
	f.stats.Refusals++
	if err := f.rollLocked(ctx, now); err != nil {
		return err
	}
	if a := f.aggs[k]; a != nil {
		if a.count == 0 || e.Time.Before(a.first) {
			a.first = e.Time
		}
		if a.count == 0 || e.Time.After(a.last) {
			a.last = e.Time
		}
		a.count++
		return nil
	}
	var errs []error
	if len(f.aggs) >= f.opts.MaxKeys {
		errs = append(errs, f.closeAggLocked(ctx, f.order.Front().Value.(*aggregate), now))
	}
	a := &aggregate{key: k, event: e.Event, start: now, fields: make(map[string]string, len(key))}
	for _, name := range key {
		a.fields[name] = e.Fields[name]
	}
	a.elem = f.order.PushBack(a)
	f.aggs[k] = a
	if f.order.Len() == 1 {
		f.rouse() // the first kind tracked: the ticker may be asleep
	}
	ok, err := f.writeLocked(ctx, e, 1)
	if ok {
		f.stats.Written++
	}
	return errors.Join(append(errs, err)...)
}

// refusalKey is e.Event and the key fields, each length-prefixed so no two keys collide.
func refusalKey(e Entry, key []string) string {
	var b strings.Builder
	b.WriteString(strconv.Itoa(len(e.Event)))
	b.WriteByte(':')
	b.WriteString(e.Event)
	for _, name := range key {
		v := e.Fields[name]
		b.WriteString(strconv.Itoa(len(name)))
		b.WriteByte(':')
		b.WriteString(name)
		b.WriteString(strconv.Itoa(len(v)))
		b.WriteByte(':')
		b.WriteString(v)
	}
	return b.String()
}

// Flush writes every pending summary now, whatever its window, and the budget's dropped entry
// if anything was dropped. The kinds of refusal stay tracked (the next one is still collapsed).
func (f *Flood) Flush(ctx context.Context) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return ErrClosed
	}
	return f.flushLocked(ctx, f.opts.Now(), true)
}

// Stats returns the counters.
func (f *Flood) Stats() FloodStats {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.stats
}

// Close stops the ticker and writes what is pending (Flush). It does not close dst.
func (f *Flood) Close() error {
	f.mu.Lock()
	if f.closing {
		f.mu.Unlock()
		return nil
	}
	f.closing = true
	f.mu.Unlock()
	close(f.stop)
	<-f.done
	f.mu.Lock()
	defer f.mu.Unlock()
	err := f.flushLocked(context.Background(), f.opts.Now(), true)
	f.closed = true
	return err
}

// flushLocked writes the summaries whose window has passed (all pending ones with force),
// forgets the kinds that were quiet for a whole window, and rolls the budget period.
func (f *Flood) flushLocked(ctx context.Context, now time.Time, force bool) error {
	var due []*list.Element
	for e := f.order.Front(); e != nil; e = e.Next() {
		if !force && now.Sub(e.Value.(*aggregate).start) < f.opts.Window {
			break // ordered by window start: the rest are younger
		}
		due = append(due, e)
	}
	var errs []error
	for _, e := range due {
		a := e.Value.(*aggregate)
		switch {
		case a.count > 0:
			errs = append(errs, f.summaryLocked(ctx, a, now))
			a.start = now
			f.order.MoveToBack(e)
		case !force:
			f.order.Remove(e)
			delete(f.aggs, a.key)
		}
	}
	errs = append(errs, f.rollLocked(ctx, now))
	if force && f.budget.entries > 0 {
		errs = append(errs, f.droppedLocked(ctx, now))
	}
	return errors.Join(errs...)
}

// closeAggLocked writes a's pending summary, if any, and forgets a.
func (f *Flood) closeAggLocked(ctx context.Context, a *aggregate, now time.Time) error {
	var err error
	if a.count > 0 {
		err = f.summaryLocked(ctx, a, now)
	}
	f.order.Remove(a.elem)
	delete(f.aggs, a.key)
	return err
}

func (f *Flood) summaryLocked(ctx context.Context, a *aggregate, now time.Time) error {
	fields := make(map[string]string, len(a.fields)+5)
	for k, v := range a.fields {
		if v != "" {
			fields[k] = v
		}
	}
	fields["of"] = a.event
	fields["count"] = strconv.FormatUint(a.count, 10)
	fields["first"] = a.first.UTC().Format(time.RFC3339Nano)
	fields["last"] = a.last.UTC().Format(time.RFC3339Nano)
	fields["window"] = f.opts.Window.String()
	n := a.count
	a.count = 0
	ok, err := f.writeLocked(ctx, Entry{Event: EventCollapsed, Fields: fields, Time: now}, n)
	if ok {
		f.stats.Summaries++
		f.stats.Collapsed += n
	}
	return err
}

// writeLocked writes a refusal entry standing for refusals refusals, within the budget; ok
// reports whether it was written rather than dropped.
func (f *Flood) writeLocked(ctx context.Context, e Entry, refusals uint64) (ok bool, err error) {
	b := &f.budget
	if b.start.IsZero() {
		b.start = e.Time
	}
	size := entrySize(e)
	if b.used+size <= f.opts.Budget {
		b.used += size
		return true, f.dst.Append(ctx, e)
	}
	if !b.exhausted {
		b.exhausted = true
		f.log.Warn("audit: refusal budget spent; further refusals are counted, not written", "budget", f.opts.Budget, "until", b.start.Add(f.opts.Period))
		err = f.dst.Append(ctx, Entry{Event: EventBudget, Time: e.Time, Fields: map[string]string{
			"state": "exhausted", "budget": strconv.FormatInt(f.opts.Budget, 10), "period": f.opts.Period.String(),
			"period_start": b.start.UTC().Format(time.RFC3339Nano), "until": b.start.Add(f.opts.Period).UTC().Format(time.RFC3339Nano),
		}})
	}
	if b.entries == 0 {
		b.first = e.Time
	}
	b.last = e.Time
	b.entries++
	b.bytes += size
	b.refusals += refusals
	if b.by == nil {
		b.by = map[string]uint64{}
	}
	ev, reason := e.Event, e.Fields["reason"]
	if ev == EventCollapsed {
		ev = e.Fields["of"]
	}
	label := ev + ":" + reason
	if _, ok := b.by[label]; !ok && len(b.by) >= maxByReasons {
		label = "other"
	}
	b.by[label] += refusals
	f.stats.Dropped += refusals
	return false, err
}

// rollLocked starts a new budget period once the current one is over, first writing what the
// old one dropped.
func (f *Flood) rollLocked(ctx context.Context, now time.Time) error {
	b := &f.budget
	if b.start.IsZero() || now.Sub(b.start) < f.opts.Period {
		return nil
	}
	var err error
	if b.entries > 0 {
		err = f.droppedLocked(ctx, now)
	}
	f.budget = budgetState{}
	return err
}

// droppedLocked writes the EventBudget dropped entry and resets the drop counters (not the
// period or the bytes used: the entry itself is outside the budget).
func (f *Flood) droppedLocked(ctx context.Context, now time.Time) error {
	b := &f.budget
	labels := make([]string, 0, len(b.by))
	for l := range b.by {
		labels = append(labels, l)
	}
	sort.Slice(labels, func(i, j int) bool {
		if b.by[labels[i]] != b.by[labels[j]] {
			return b.by[labels[i]] > b.by[labels[j]]
		}
		return labels[i] < labels[j]
	})
	var by strings.Builder
	for _, l := range labels {
		part := l + "=" + strconv.FormatUint(b.by[l], 10)
		if by.Len()+len(part)+1 > MaxFieldValue {
			break
		}
		if by.Len() > 0 {
			by.WriteByte(' ')
		}
		by.WriteString(part)
	}
	end := b.start.Add(f.opts.Period)
	if now.Before(end) {
		end = now
	}
	e := Entry{Event: EventBudget, Time: now, Fields: map[string]string{
		"state": "dropped", "entries": strconv.FormatUint(b.entries, 10), "bytes": strconv.FormatInt(b.bytes, 10),
		"refusals": strconv.FormatUint(b.refusals, 10), "by": by.String(),
		"first": b.first.UTC().Format(time.RFC3339Nano), "last": b.last.UTC().Format(time.RFC3339Nano),
		"period_start": b.start.UTC().Format(time.RFC3339Nano), "period_end": end.UTC().Format(time.RFC3339Nano),
	}}
	b.entries, b.bytes, b.refusals, b.by = 0, 0, 0, nil
	return f.dst.Append(ctx, e)
}

// entrySize is an upper bound of the bytes e takes in the log: its line with the widest
// sequence number.
func entrySize(e Entry) int64 {
	var buf [512]byte
	var ts [40]byte
	b := appendRecord(buf[:0], math.MaxUint64, e.Time.UTC().AppendFormat(ts[:0], time.RFC3339Nano), e.Event, e.Fields, genesis)
	return int64(len(b) + hashSuffixLen + 1)
}
