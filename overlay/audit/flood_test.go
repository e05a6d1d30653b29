package audit

import (
	"bufio"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// fakeClock is a settable clock for the Flood's windows and periods.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newFakeClock() *fakeClock {
	return &fakeClock{t: time.Date(2026, 12, 6, 4, 0, 0, 0, time.UTC)}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

func readRecords(t *testing.T, dir string) []Record {
	t.Helper()
	f, err := os.Open(filepath.Join(dir, LogFile))
	require.NoError(t, err)
	defer func() { _ = f.Close() }()
	var out []Record
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, maxLine)
	for sc.Scan() {
		var r Record
		require.NoError(t, json.Unmarshal(sc.Bytes(), &r))
		out = append(out, r)
	}
	require.NoError(t, sc.Err())
	return out
}

func deny(peer, reason, dst string, flow int) Entry {
	return Entry{Event: EventDeny, Fields: map[string]string{
		"peer": peer, "reason": reason, "dst": dst, "zone": "payments", "flow": strconv.Itoa(flow),
		"error": "dtl: the zone's rules do not allow this flow",
	}}
}

var denyKey = []string{"zone", "peer", "reason", "dst"}

// tally is what the log says about one kind of refusal.
type tally struct {
	single, summaries int
	collapsed         uint64
}

func tallies(t *testing.T, recs []Record) map[string]*tally {
	t.Helper()
	out := map[string]*tally{}
	get := func(k string) *tally {
		if out[k] == nil {
			out[k] = &tally{}
		}
		return out[k]
	}
	for _, r := range recs {
		switch r.Event {
		case EventDeny:
			get(r.Fields["peer"]+" "+r.Fields["reason"]+" "+r.Fields["dst"]).single++
		case EventCollapsed:
			require.Equal(t, EventDeny, r.Fields["of"])
			n, err := strconv.ParseUint(r.Fields["count"], 10, 64)
			require.NoError(t, err)
			require.Positive(t, n, "a summary stands for at least one refusal")
			first, err := time.Parse(time.RFC3339Nano, r.Fields["first"])
			require.NoError(t, err)
			last, err := time.Parse(time.RFC3339Nano, r.Fields["last"])
			require.NoError(t, err)
			require.False(t, last.Before(first))
			k := get(r.Fields["peer"] + " " + r.Fields["reason"] + " " + r.Fields["dst"])
			k.summaries++
			k.collapsed += n
		}
	}
	return out
}

// The reported flood: refused flows from one peer at full speed. Scaled: a 200 ms window and a 2 s
// flood (ten windows); UTE_AUDIT_FLOOD=10s runs the true figure, a 10 s flood with the default
// 10 s window (docs/benchmarks.md). Every refusal is accounted for exactly, admits written
// meanwhile are all there, and the log stays small.
func TestFloodCollapsesRefusalsWithExactCounts(t *testing.T) {
	dir := t.TempDir()
	_, key, err := ed25519.GenerateKey(rand.Reader)
	require.NoError(t, err)
	l, err := Open(dir, Options{Key: key})
	require.NoError(t, err)
	window, flood := 200*time.Millisecond, 2*time.Second
	if v := os.Getenv("UTE_AUDIT_FLOOD"); v != "" {
		flood, err = time.ParseDuration(v)
		require.NoError(t, err)
		window = DefaultFloodWindow
	}
	f := NewFlood(l, FloodOptions{Window: window})

	kinds := []struct{ peer, reason, dst string }{
		{"spiffe://acme.internal/node/mallory", "policy", "ledger:8080/tcp"},
		{"spiffe://acme.internal/node/mallory", "policy", "ledger:9090/tcp"},
		{"spiffe://acme.internal/node/mallory", "replay", "ledger:8080/tcp"},
		{"spiffe://acme.internal/node/eve", "policy", "ledger:8080/tcp"},
	}
	sent := make([]atomic.Uint64, len(kinds))
	var admits atomic.Uint64
	ctx := context.Background()
	deadline := time.Now().Add(flood)
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Go(func() {
			for i := 0; time.Now().Before(deadline); i++ {
				k := (w + i) % len(kinds)
				if !assert.NoError(t, f.Refuse(ctx, deny(kinds[k].peer, kinds[k].reason, kinds[k].dst, i), denyKey...)) {
					return
				}
				sent[k].Add(1)
				if i%10000 == 0 { // legitimate traffic continues; admits are never collapsed
					assert.NoError(t, l.Append(ctx, Entry{Event: EventAdmit, Fields: map[string]string{"flow": fmt.Sprint(w, "-", i)}}))
					admits.Add(1)
				}
			}
		})
	}
	wg.Wait()
	require.NoError(t, f.Close())
	require.NoError(t, l.Close())

	recs := readRecords(t, dir)
	got := tallies(t, recs)
	var total uint64
	for i, k := range kinds {
		n := sent[i].Load()
		total += n
		g := got[k.peer+" "+k.reason+" "+k.dst]
		require.NotNil(t, g, "kind %v", k)
		assert.Equal(t, 1, g.single, "the first refusal of each kind is written as itself, once")
		assert.Equal(t, n, uint64(g.single)+g.collapsed, "exact count for %v", k)
		assert.LessOrEqual(t, g.summaries, int(flood/window)+2, "one summary per window at most")
	}
	st := f.Stats()
	assert.Equal(t, total, st.Refusals)
	assert.Equal(t, total, st.Written+st.Collapsed)
	assert.Zero(t, st.Dropped)
	var nAdmits uint64
	for _, r := range recs {
		if r.Event == EventAdmit {
			nAdmits++
		}
	}
	assert.Equal(t, admits.Load(), nAdmits)

	info, err := os.Stat(filepath.Join(dir, LogFile))
	require.NoError(t, err)
	t.Logf("%d refusals in %s (%.0f/s): %d entries, %d bytes", total, flood, float64(total)/flood.Seconds(), len(recs), info.Size())
	assert.Greater(t, total, uint64(10000), "the flood must be a flood")
	// Each kind: one entry, then at most one summary per window (about 400 bytes each).
	assert.Less(t, info.Size(), int64(len(kinds)*(int(flood/window)+3)*450)+int64(nAdmits)*300)
	_, err = VerifyWithKey(dir, key.Public().(ed25519.PublicKey))
	require.NoError(t, err)
}

// The first refusal of a kind is written at once; identical ones within the window are written
// as one summary when the window ends; a kind quiet for a whole window is forgotten, so its next
// refusal is again written at once.
func TestFloodFirstOfKindAtOnceThenSummary(t *testing.T) {
	dir := t.TempDir()
	l := openLog(t, dir, Options{})
	clk := newFakeClock()
	f := NewFlood(l, FloodOptions{Window: 40 * time.Millisecond, Now: clk.Now})
	t.Cleanup(func() { _ = f.Close() })
	ctx := context.Background()
	r := deny("spiffe://acme.internal/node/mallory", "policy", "ledger:8080/tcp", 0)

	require.NoError(t, f.Refuse(ctx, r, denyKey...))
	require.Equal(t, uint64(1), l.Len(), "written at once")
	start := clk.Now()
	for i := range 5 {
		clk.Add(time.Millisecond)
		require.NoError(t, f.Refuse(ctx, deny("spiffe://acme.internal/node/mallory", "policy", "ledger:8080/tcp", i+1), denyKey...))
	}
	require.Equal(t, uint64(1), l.Len(), "identical refusals within the window are held")

	clk.Add(40 * time.Millisecond)
	require.Eventually(t, func() bool { return l.Len() == 2 }, 5*time.Second, time.Millisecond, "the ticker writes the summary")
	require.NoError(t, l.Sync())
	recs := readRecords(t, dir)
	s := recs[1]
	assert.Equal(t, EventCollapsed, s.Event)
	assert.Equal(t, map[string]string{
		"of": EventDeny, "count": "5", "peer": "spiffe://acme.internal/node/mallory", "reason": "policy",
		"dst": "ledger:8080/tcp", "zone": "payments", "window": "40ms",
		"first": start.Add(time.Millisecond).Format(time.RFC3339Nano), "last": start.Add(5 * time.Millisecond).Format(time.RFC3339Nano),
	}, s.Fields)

	// A quiet window: the kind is forgotten.
	clk.Add(41 * time.Millisecond)
	require.Eventually(t, func() bool {
		return f.Stats() == FloodStats{Refusals: 6, Written: 1, Collapsed: 5, Summaries: 1} && f.kinds() == 0
	},
		5*time.Second, time.Millisecond)
	require.NoError(t, f.Refuse(ctx, r, denyKey...))
	assert.Equal(t, uint64(3), l.Len(), "after a quiet window the next refusal is the first of its kind again")

	// Another destination is another kind, written at once too.
	require.NoError(t, f.Refuse(ctx, deny("spiffe://acme.internal/node/mallory", "policy", "ledger:9090/tcp", 9), denyKey...))
	assert.Equal(t, uint64(4), l.Len())
}

// At rest the ticker sleeps: with no kind of refusal tracked and nothing dropped it does not wake
// at all (it reads the clock on each tick, so the clock counts its ticks); a refusal rouses it,
// it writes the summary when the window ends, and once the kind is forgotten after a quiet window
// it sleeps again, until the next refusal rouses it once more.
func TestFloodTickerSleepsWhenNothingIsPending(t *testing.T) {
	dir := t.TempDir()
	l := openLog(t, dir, Options{})
	clk := newFakeClock()
	var reads atomic.Int64
	now := func() time.Time {
		reads.Add(1)
		return clk.Now()
	}
	f := NewFlood(l, FloodOptions{Window: 40 * time.Millisecond, Now: now}) // awake, it ticks every 10 ms
	t.Cleanup(func() { _ = f.Close() })
	ctx := context.Background()
	r := deny("spiffe://acme.internal/node/mallory", "policy", "ledger:8080/tcp", 0)

	time.Sleep(100 * time.Millisecond)
	assert.Zero(t, reads.Load(), "no tick while nothing was ever refused")

	for round := range 2 {
		require.NoError(t, f.Refuse(ctx, r, denyKey...))
		require.NoError(t, f.Refuse(ctx, r, denyKey...))
		require.Eventually(t, func() bool { return reads.Load() > int64(round)*100+5 }, 5*time.Second, time.Millisecond,
			"round %d: the ticker runs while a kind is tracked", round)
		clk.Add(40 * time.Millisecond)
		require.Eventually(t, func() bool { return f.Stats().Summaries == uint64(round+1) }, 5*time.Second, time.Millisecond,
			"round %d: the summary is written when the window ends", round)
		clk.Add(41 * time.Millisecond) // a whole quiet window: the next tick forgets the kind
		require.Eventually(t, func() bool { return f.kinds() == 0 }, 5*time.Second, time.Millisecond)
		settled := reads.Load()
		time.Sleep(100 * time.Millisecond)
		assert.Equal(t, settled, reads.Load(), "round %d: asleep again once nothing is pending", round)
		reads.Store(int64(round+1) * 100)
	}
	require.NoError(t, f.Close())
	assert.Equal(t, FloodStats{Refusals: 4, Written: 2, Collapsed: 2, Summaries: 2}, f.Stats())
}

func (f *Flood) kinds() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.aggs)
}

// A peer that varies what it is refused for (every destination port) cannot grow memory: the
// oldest kind is summarised early to make room, and the counts stay exact.
func TestFloodMaxKeysSummarisesOldest(t *testing.T) {
	dir := t.TempDir()
	l := openLog(t, dir, Options{})
	f := NewFlood(l, FloodOptions{MaxKeys: 2, Now: newFakeClock().Now})
	ctx := context.Background()
	sent := map[string]uint64{}
	for i := range 300 {
		dst := fmt.Sprintf("ledger:%d/tcp", 8000+i%3)
		require.NoError(t, f.Refuse(ctx, deny("spiffe://acme.internal/node/mallory", "policy", dst, i), denyKey...))
		sent["spiffe://acme.internal/node/mallory policy "+dst]++
		require.LessOrEqual(t, f.kinds(), 2)
	}
	require.NoError(t, f.Close())
	require.NoError(t, l.Sync())
	got := tallies(t, readRecords(t, dir))
	for k, n := range sent {
		require.NotNil(t, got[k])
		assert.Equal(t, n, uint64(got[k].single)+got[k].collapsed, k)
	}
}

// The budget: once a period's bytes of refusal entries are spent, one entry says so at once,
// refusals are only counted, and the period's dropped entry gives the exact totals. The next
// period writes again.
func TestFloodBudgetBoundsTheLog(t *testing.T) {
	dir := t.TempDir()
	l := openLog(t, dir, Options{})
	clk := newFakeClock()
	const budget = 8 << 10
	f := NewFlood(l, FloodOptions{Budget: budget, Now: clk.Now, Logger: slog.New(slog.DiscardHandler)})
	ctx := context.Background()
	// Every refusal a new kind (a new source each time): no collapsing helps, the budget must.
	refuse := func(i int) {
		require.NoError(t, f.Refuse(ctx, Entry{Event: "tunnel-refused", Fields: map[string]string{
			"source": fmt.Sprintf("198.51.%d.%d", i/256%256, i%256), "zone": "payments", "reason": "chain",
		}}, "source", "zone", "reason"))
	}
	const n = 2000
	for i := range n {
		refuse(i)
	}
	require.NoError(t, l.Sync())
	info, err := os.Stat(filepath.Join(dir, LogFile))
	require.NoError(t, err)
	assert.LessOrEqual(t, info.Size(), int64(budget+1024), "the budget plus one exhausted entry")
	recs := readRecords(t, dir)
	last := recs[len(recs)-1]
	require.Equal(t, EventBudget, last.Event, "the exhausted entry follows the last written refusal")
	assert.Equal(t, "exhausted", last.Fields["state"])
	assert.Equal(t, strconv.Itoa(budget), last.Fields["budget"])
	written := len(recs) - 1

	// The period ends: its dropped entry, then refusals are written again.
	clk.Add(time.Hour)
	refuse(n)
	require.NoError(t, f.Close())
	require.NoError(t, l.Sync())
	recs = readRecords(t, dir)
	d := recs[written+1]
	require.Equal(t, EventBudget, d.Event)
	assert.Equal(t, "dropped", d.Fields["state"])
	assert.Equal(t, strconv.Itoa(n-written), d.Fields["refusals"], "exact count of what was not written")
	assert.Equal(t, strconv.Itoa(n-written), d.Fields["entries"])
	assert.Equal(t, fmt.Sprintf("tunnel-refused:chain=%d", n-written), d.Fields["by"])
	assert.Equal(t, "tunnel-refused", recs[written+2].Event, "a new period writes again")
	assert.Len(t, recs, written+3)
	st := f.Stats()
	assert.Equal(t, uint64(n+1), st.Refusals)
	assert.Equal(t, uint64(n-written), st.Dropped)
	assert.Equal(t, st.Refusals, st.Written+st.Collapsed+st.Dropped)
}

// A summary is an ordinary entry of the chain: raising or lowering its count is caught by Verify
// like any edited entry, and so is a recomputed hash (the chain breaks at the next entry).
func TestForgedSummaryIsDetected(t *testing.T) {
	dir := t.TempDir()
	l, err := Open(dir, Options{})
	require.NoError(t, err)
	clk := newFakeClock()
	f := NewFlood(l, FloodOptions{Now: clk.Now})
	ctx := context.Background()
	for i := range 100 {
		require.NoError(t, f.Refuse(ctx, deny("spiffe://acme.internal/node/mallory", "policy", "ledger:8080/tcp", i), denyKey...))
	}
	require.NoError(t, f.Close())
	require.NoError(t, l.Append(ctx, Entry{Event: EventAdmit}))
	require.NoError(t, l.Close())
	lines := logLines(t, dir)
	require.Len(t, lines, 3)
	require.Contains(t, string(lines[1]), `"count":"99"`)
	_, err = Verify(dir)
	require.NoError(t, err)

	forged := append([][]byte(nil), lines...)
	forged[1] = []byte(strings.Replace(string(lines[1]), `"count":"99"`, `"count":"9"`, 1))
	putLines(t, dir, forged)
	_, err = Verify(dir)
	require.ErrorIs(t, err, ErrEdited)
	var ve *VerifyError
	require.ErrorAs(t, err, &ve)
	assert.Equal(t, 1, ve.Index, "the summary is the entry named")

	// Rehash the edited summary: its own hash now matches, the next entry's prev does not.
	rec, _, derr := decodeLine(lines[1][:len(lines[1])-1])
	require.NoError(t, derr)
	rec.Fields["count"] = "9"
	line, _, err := rec.encode()
	require.NoError(t, err)
	forged[1] = line
	putLines(t, dir, forged)
	_, err = Verify(dir)
	require.ErrorIs(t, err, ErrBrokenChain)
}

func TestFloodRefusesBadEntriesAndUseAfterClose(t *testing.T) {
	l := openLog(t, t.TempDir(), Options{})
	f := NewFlood(l, FloodOptions{})
	require.ErrorIs(t, f.Refuse(context.Background(), Entry{Event: "Bad Event"}), ErrBadEntry)
	require.NoError(t, f.Close())
	require.NoError(t, f.Close(), "Close is idempotent")
	require.ErrorIs(t, f.Refuse(context.Background(), deny("p", "policy", "d", 0), denyKey...), ErrClosed)
	require.ErrorIs(t, f.Flush(context.Background()), ErrClosed)
}

// Close may race with itself and with refusals (a node closing while flows are refused): it runs
// once, and every refusal it let in is accounted for.
func TestFloodConcurrentClose(t *testing.T) {
	dir := t.TempDir()
	l := openLog(t, dir, Options{})
	f := NewFlood(l, FloodOptions{})
	var wg sync.WaitGroup
	var ok atomic.Uint64
	for i := range 4 {
		wg.Go(func() {
			for j := range 200 {
				err := f.Refuse(context.Background(), deny("spiffe://acme.internal/node/mallory", "policy", "ledger:8080/tcp", i*1000+j), denyKey...)
				if err == nil {
					ok.Add(1)
				} else {
					assert.ErrorIs(t, err, ErrClosed)
				}
			}
		})
	}
	for range 3 {
		wg.Go(func() { assert.NoError(t, f.Close()) })
	}
	wg.Wait()
	require.NoError(t, l.Sync())
	got := tallies(t, readRecords(t, dir))["spiffe://acme.internal/node/mallory policy ledger:8080/tcp"]
	if ok.Load() == 0 {
		assert.Nil(t, got)
		return
	}
	require.NotNil(t, got)
	assert.Equal(t, ok.Load(), uint64(got.single)+got.collapsed)
}
