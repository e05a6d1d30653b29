package trustflow

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/zones"
)

const agent = "spiffe://acme.internal/zone/payments/agent/billing-api"

// fakeClock is a clock tests move by hand.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock() *fakeClock { return &fakeClock{t: time.Date(2026, 12, 6, 0, 0, 0, 0, time.UTC)} }

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

func newEngine(t *testing.T, cfg Config) (*Engine, *fakeClock) {
	t.Helper()
	c := newClock()
	cfg.Clock = c.Now
	e, err := New(cfg)
	require.NoError(t, err)
	return e, c
}

func TestDefaultWeightsCoverEveryKind(t *testing.T) {
	w := DefaultWeights()
	require.Len(t, w, len(Kinds()))
	for _, k := range Kinds() {
		assert.Positive(t, w[k], "kind %s has no weight", k)
	}
	// A fresh map each call: changing one copy changes no engine.
	w[KindPolicyDenial] = 99
	assert.Equal(t, 10, DefaultWeights()[KindPolicyDenial])
}

func TestScoresAndActions(t *testing.T) {
	th := ThresholdsOf(&zones.Zone{MinTrust: 50, IsolateBelow: 20})
	cases := []struct {
		name    string
		signals []Kind
		gap     time.Duration // between signals
		after   time.Duration // after the last signal
		want    int
		action  zones.Action
	}{
		{"nothing", nil, 0, 0, 100, zones.ActionAllow},
		{"one policy denial", []Kind{KindPolicyDenial}, 0, 0, 90, zones.ActionAllow},
		{"five denials reach the minimum exactly", rep(KindPolicyDenial, 5), 0, 0, 50, zones.ActionAllow},
		{"six denials fall below min_trust", rep(KindPolicyDenial, 6), 0, 0, 40, zones.ActionDenyFlows},
		{"six denials, an hour later", rep(KindPolicyDenial, 6), 0, time.Hour, 50, zones.ActionAllow},
		{"six denials an hour apart each decay away", rep(KindPolicyDenial, 6), time.Hour, 0, 90, zones.ActionAllow},
		{"region drift isolates at once", []Kind{KindRegionDrift}, 0, 0, 0, zones.ActionIsolateAndRevoke},
		{"duplicate identity isolates at once", []Kind{KindDuplicateIdentity}, 0, 0, 0, zones.ActionIsolateAndRevoke},
		{"fingerprint mismatch isolates at once", []Kind{KindFingerprintMismatch}, 0, 0, 0, zones.ActionIsolateAndRevoke},
		{"one signer mismatch denies nothing yet", []Kind{KindSignerMismatch}, 0, 0, 60, zones.ActionAllow},
		{"two signer mismatches isolate", rep(KindSignerMismatch, 2), 0, 0, 20, zones.ActionDenyFlows},
		{"three signer mismatches isolate", rep(KindSignerMismatch, 3), 0, 0, 0, zones.ActionIsolateAndRevoke},
		{"a burst", []Kind{KindDestinationBurst}, 0, 0, 75, zones.ActionAllow},
		{"renewal failures are mild", rep(KindRenewalFailure, 3), 0, 0, 85, zones.ActionAllow},
		{"expiring certificate", []Kind{KindExpiringCertificate}, 0, 0, 80, zones.ActionAllow},
		{"penalty never exceeds 100", rep(KindRegionDrift, 3), 0, 0, 0, zones.ActionIsolateAndRevoke},
		{"full decay after 10 h", []Kind{KindRegionDrift}, 0, 10 * time.Hour, 100, zones.ActionAllow},
		{"a fraction of a point still counts", []Kind{KindPolicyDenial}, 0, time.Hour - time.Second, 99, zones.ActionAllow},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e, c := newEngine(t, Config{})
			for i, k := range tc.signals {
				if i > 0 {
					c.Add(tc.gap)
				}
				_, err := e.Observe(Signal{Subject: agent, Kind: k, Reason: "test"})
				require.NoError(t, err)
			}
			c.Add(tc.after)
			got := e.Score(agent)
			assert.Equal(t, tc.want, got)
			assert.Equal(t, tc.action, th.Action(got))
		})
	}
}

func rep(k Kind, n int) []Kind {
	out := make([]Kind, n)
	for i := range out {
		out[i] = k
	}
	return out
}

// A legitimate agent with steady traffic for a simulated day: a call every second to the same
// few destinations, renewals that succeed, one node that reconnects from its own address after
// restarts. No detector fires and the score stays 100 all day.
func TestNoFalsePositivesForADay(t *testing.T) {
	e, c := newEngine(t, Config{})
	burst := NewBurstDetector(BurstConfig{})
	dup := &DuplicateDetector{}
	dests := []string{"ledger:8080", "ledger:8443", "fx:8080", "audit:9000"}
	const peer = "spiffe://acme.internal/node/b"
	for sec := range 24 * 3600 {
		now := c.Now()
		if b, ok := burst.Observe(agent, dests[sec%len(dests)], now); ok {
			_, err := e.Observe(Signal{Subject: agent, Kind: KindDestinationBurst, Reason: b.String()})
			require.NoError(t, err)
		}
		// The peer restarts every 2 h: its tunnel is gone for a moment and comes back from the
		// same address.
		live := []Sighting{{Subject: peer, Addr: "10.0.0.2:4500"}}
		if sec%7200 == 0 {
			live = nil
		}
		for _, d := range dup.Check(now, live) {
			_, err := e.Observe(Signal{Subject: d.Subject, Kind: KindDuplicateIdentity})
			require.NoError(t, err)
		}
		if sec%600 == 0 {
			require.Equal(t, 100, e.Score(agent), "at %s", now)
			require.Equal(t, 100, e.Score(peer), "at %s", now)
		}
		c.Add(time.Second)
	}
	assert.Empty(t, e.Scores(), "no subject collected any signal")
}

// A fan-out that grows slowly moves the baseline with it; a sudden jump well above the agent's
// own baseline is a burst, reported once per window.
func TestBurstRelativeToOwnBaseline(t *testing.T) {
	c := newClock()
	d := NewBurstDetector(BurstConfig{})
	// 30 minutes at 6 destinations a minute: baseline 6, threshold 3×6+10 = 28.
	for m := range 30 {
		for i := range 6 {
			_, ok := d.Observe(agent, fmt.Sprintf("svc-%d:8080", i), c.Now().Add(time.Duration(m)*time.Minute+time.Duration(i)*time.Second))
			require.False(t, ok)
		}
	}
	at := c.Now().Add(30 * time.Minute)
	var bursts []Burst
	for i := range 60 {
		if b, ok := d.Observe(agent, fmt.Sprintf("host-%d:22", i), at.Add(time.Duration(i)*100*time.Millisecond)); ok {
			bursts = append(bursts, b)
		}
	}
	require.Len(t, bursts, 1, "reported once per window")
	b := bursts[0]
	assert.InDelta(t, 6.0, b.Baseline, 0.001)
	assert.Equal(t, 28, b.Threshold)
	assert.Equal(t, 29, b.Count)
	// Another agent whose normal fan-out is 40 a minute is not bursting at 40.
	busy := "spiffe://acme.internal/zone/payments/agent/gateway"
	for m := range 30 {
		for i := range 40 {
			_, ok := d.Observe(busy, fmt.Sprintf("svc-%d:8080", i), c.Now().Add(time.Duration(m)*time.Minute))
			if m >= 1 { // the first window has no baseline yet: 40 > 10 there is a burst by design
				require.False(t, ok, "minute %d", m)
			}
		}
	}
}

// A node restarted on another port leaves a dead tunnel behind until the idle timeout; it is not
// a duplicate. A second live copy that stays is, after the confirmation time, reported once.
func TestDuplicateIdentity(t *testing.T) {
	c := newClock()
	d := &DuplicateDetector{Confirm: 45 * time.Second}
	const n = "spiffe://acme.internal/node/a"
	old, restarted, thief := Sighting{n, "10.0.0.1:4500"}, Sighting{n, "10.0.0.1:4501"}, Sighting{n, "203.0.113.9:4500"}
	// Restart: both addresses live for 30 s (idle timeout), then only the new one.
	for s := range 30 {
		require.Empty(t, d.Check(c.Now().Add(time.Duration(s)*time.Second), []Sighting{old, restarted}))
	}
	require.Empty(t, d.Check(c.Now().Add(31*time.Second), []Sighting{restarted}))
	require.Empty(t, d.Check(c.Now().Add(90*time.Second), []Sighting{restarted, restarted}), "one address twice is one place")
	// A thief keeps a second copy live.
	base := c.Now().Add(100 * time.Second)
	require.Empty(t, d.Check(base, []Sighting{restarted, thief}))
	require.Empty(t, d.Check(base.Add(44*time.Second), []Sighting{restarted, thief}))
	got := d.Check(base.Add(45*time.Second), []Sighting{thief, restarted})
	require.Len(t, got, 1)
	assert.Equal(t, Duplicate{Subject: n, Addrs: []string{"10.0.0.1:4501", "203.0.113.9:4500"}, Since: base}, got[0])
	require.Empty(t, d.Check(base.Add(60*time.Second), []Sighting{restarted, thief}), "reported once")
}

func TestExplainShowsTheArithmetic(t *testing.T) {
	e, c := newEngine(t, Config{})
	for range 3 {
		_, err := e.Observe(Signal{Subject: agent, Kind: KindPolicyDenial, Reason: "no rule lets billing-api reach ledger on tcp/22"})
		require.NoError(t, err)
		c.Add(30 * time.Minute)
	}
	x := e.Explain(agent)
	// 10 → decays 5 → 15 → decays 5 → 20, now decays 5 more: 15.
	require.Len(t, x.Events, 3)
	assert.Equal(t, []float64{10, 15, 20}, []float64{x.Events[0].PenaltyAfter, x.Events[1].PenaltyAfter, x.Events[2].PenaltyAfter})
	assert.Equal(t, []float64{0, 5, 5}, []float64{x.Events[0].Recovered, x.Events[1].Recovered, x.Events[2].Recovered})
	assert.InDelta(t, 15.0, x.Penalty, 0.0001)
	assert.Equal(t, 85, x.Score)
	assert.Equal(t, 85, e.Score(agent))
	require.Len(t, x.Steps, 4)
	assert.Contains(t, x.Steps[3], "penalty 20 − decay 5 (10/h over 30m0s) = 15, score = 100 − ceil(15) = 85")
	assert.Equal(t, c.Now().Add(90*time.Minute), x.Full)

	unknown := e.Explain("spiffe://acme.internal/node/nobody")
	assert.Equal(t, 100, unknown.Score)
	assert.Empty(t, unknown.Events)
}

// Folding old events away keeps the penalty exact; the event list is bounded.
func TestEventsBoundedPenaltyExact(t *testing.T) {
	e, _ := newEngine(t, Config{MaxEvents: 4})
	for range 9 {
		_, err := e.Observe(Signal{Subject: agent, Kind: KindRenewalFailure, Reason: "authority unreachable"})
		require.NoError(t, err)
	}
	x := e.Explain(agent)
	assert.Len(t, x.Events, 4)
	assert.Equal(t, 5, x.Folded)
	assert.Equal(t, 55, x.Score)
}

// A flood of signals about many subjects cannot evict a subject with a low score.
func TestFullEngineKeepsLowScores(t *testing.T) {
	e, _ := newEngine(t, Config{MaxSubjects: 8})
	_, err := e.Observe(Signal{Subject: agent, Kind: KindRegionDrift})
	require.NoError(t, err)
	for i := range 100 {
		_, err := e.Observe(Signal{Subject: fmt.Sprintf("spiffe://acme.internal/node/n%d", i), Kind: KindRenewalFailure})
		require.NoError(t, err)
	}
	assert.Equal(t, 0, e.Score(agent))
	assert.Len(t, e.Scores(), 8)
}

// Members receive gossiped signals in different orders; each orders them by time, so all
// compute the same score. An earlier signal arriving late is placed where it belongs.
func TestSignalsInAnyOrderGiveTheSameScore(t *testing.T) {
	base := newClock().Now()
	sigs := []Signal{
		{Subject: agent, Kind: KindPolicyDenial, At: base, ID: "b#1"},
		{Subject: agent, Kind: KindPolicyDenial, At: base.Add(30 * time.Minute), ID: "c#1"},
		{Subject: agent, Kind: KindSignerMismatch, At: base.Add(40 * time.Minute), ID: "b#2"},
		{Subject: agent, Kind: KindPolicyDenial, At: base.Add(40 * time.Minute), ID: "a#9"},
	}
	var scores []int
	for _, order := range [][]int{{0, 1, 2, 3}, {3, 2, 1, 0}, {2, 0, 3, 1}} {
		e, c := newEngine(t, Config{})
		c.Add(time.Hour)
		for _, i := range order {
			_, err := e.Observe(sigs[i])
			require.NoError(t, err)
		}
		scores = append(scores, e.Score(agent))
		x := e.Explain(agent)
		require.Len(t, x.Events, 4)
		assert.Equal(t, "a#9", x.Events[2].ID, "ties ordered by ID")
	}
	// 10 at 0:00; decays 5, +10 = 15 at 0:30; decays 1.666 (in thousandths, rounded down),
	// +40 +10 = 63.334 at 0:40; decays 3.333 by 1:00: 60.001, score 100 − ceil(60.001) = 39.
	assert.Equal(t, []int{39, 39, 39}, scores)
}

// A signal older than every listed event (the older ones were folded) counts at the oldest
// listed time: a penalty never decays backwards.
func TestSignalsOlderThanTheFoldNeverDecayBackwards(t *testing.T) {
	e, c := newEngine(t, Config{MaxEvents: 1})
	_, err := e.Observe(Signal{Subject: agent, Kind: KindPolicyDenial})
	require.NoError(t, err)
	_, err = e.Observe(Signal{Subject: agent, Kind: KindPolicyDenial, At: c.Now().Add(time.Second)})
	require.NoError(t, err)
	_, err = e.Observe(Signal{Subject: agent, Kind: KindPolicyDenial, At: c.Now().Add(-time.Hour)})
	require.NoError(t, err)
	assert.Equal(t, 70, e.Score(agent))
}

func TestDuplicateSignalCountsOnce(t *testing.T) {
	e, _ := newEngine(t, Config{})
	s := Signal{Subject: agent, Kind: KindPolicyDenial, ID: "spiffe://acme.internal/node/b#00"}
	_, err := e.Observe(s)
	require.NoError(t, err)
	sc, err := e.Observe(s)
	require.ErrorIs(t, err, ErrDuplicate)
	assert.Equal(t, 90, sc)
	assert.Equal(t, 90, e.Score(agent))
}

type zoneTuning map[string]testProfile

type testProfile struct {
	Weights map[Kind]int
	Decay   int
}

func (z zoneTuning) Weight(zone string, k Kind) (int, bool) {
	w, ok := z[zone].Weights[k]
	return w, ok
}

func (z zoneTuning) DecayPerHour(subject string) int {
	if strings.Contains(subject, "/zone/payments/") {
		return z["payments"].Decay
	}
	return 0
}

// A zone's weights apply to signals observed in it, an observer's explicit weight is capped at
// the zone's, a zero weight ignores the kind, and the subject's zone sets its decay.
func TestZoneTuning(t *testing.T) {
	e, c := newEngine(t, Config{Tuning: zoneTuning{"payments": {Weights: map[Kind]int{KindPolicyDenial: 30, KindDestinationBurst: 0}, Decay: 60}}})
	assert.Equal(t, 30, e.WeightIn("payments", KindPolicyDenial))
	assert.Equal(t, 10, e.WeightIn("support", KindPolicyDenial))
	sc, err := e.Observe(Signal{Subject: agent, Kind: KindPolicyDenial, Zone: "payments"})
	require.NoError(t, err)
	assert.Equal(t, 70, sc)
	sc, err = e.Observe(Signal{Subject: agent, Kind: KindPolicyDenial, Zone: "payments", Weight: 100})
	require.NoError(t, err)
	assert.Equal(t, 40, sc, "an observer cannot charge more than the zone's weight")
	sc, err = e.Observe(Signal{Subject: agent, Kind: KindDestinationBurst, Zone: "payments"})
	require.NoError(t, err)
	assert.Equal(t, 40, sc, "weight 0: ignored in this zone")
	c.Add(30 * time.Minute)
	assert.Equal(t, 70, e.Score(agent), "decay 60/h")
	assert.Equal(t, 60, e.Explain(agent).DecayPerHour)
	e.SetTuning(nil)
	assert.Equal(t, 10, e.WeightIn("payments", KindPolicyDenial))
}

// A revoked observer's word stops counting.
func TestForgetObserver(t *testing.T) {
	e, _ := newEngine(t, Config{})
	const liar, honest = "spiffe://acme.internal/node/liar", "spiffe://acme.internal/node/b"
	for i := range 3 {
		_, err := e.Observe(Signal{Subject: agent, Kind: KindSignerMismatch, Observer: liar, ID: fmt.Sprintf("l%d", i)})
		require.NoError(t, err)
	}
	_, err := e.Observe(Signal{Subject: agent, Kind: KindPolicyDenial, Observer: honest, ID: "h"})
	require.NoError(t, err)
	assert.Equal(t, 0, e.Score(agent))
	assert.Equal(t, 90, e.ScoreFrom(agent, func(ev Event) bool { return ev.Observer == honest }))
	assert.Equal(t, 100, e.ScoreFrom("spiffe://acme.internal/node/nobody", func(Event) bool { return true }))
	assert.Equal(t, []string{agent}, e.ForgetObserver(liar))
	assert.Equal(t, 90, e.Score(agent))
	assert.Empty(t, e.ForgetObserver(liar))
}

func TestPruneForgetsRecoveredSubjects(t *testing.T) {
	e, c := newEngine(t, Config{})
	_, err := e.Observe(Signal{Subject: agent, Kind: KindPolicyDenial})
	require.NoError(t, err)
	assert.Zero(t, e.Prune())
	c.Add(time.Hour)
	assert.Equal(t, 1, e.Prune())
	assert.Empty(t, e.Scores())
}

func TestBadSignalsAndConfig(t *testing.T) {
	e, _ := newEngine(t, Config{})
	for name, s := range map[string]Signal{
		"empty subject": {Kind: KindPolicyDenial},
		"unknown kind":  {Subject: agent, Kind: "vibes"},
		"negative":      {Subject: agent, Kind: KindPolicyDenial, Weight: -1},
		"too heavy":     {Subject: agent, Kind: KindPolicyDenial, Weight: 101},
		"huge subject":  {Subject: strings.Repeat("x", MaxSubjectLen+1), Kind: KindPolicyDenial},
		"invalid UTF-8": {Subject: "\xff", Kind: KindPolicyDenial},
	} {
		_, err := e.Observe(s)
		require.ErrorIs(t, err, ErrSignal, name)
	}
	assert.Equal(t, 100, e.Score(agent))
	_, err := New(Config{})
	require.ErrorIs(t, err, ErrConfig)
	_, err = New(Config{Clock: time.Now, Weights: map[Kind]int{"vibes": 1}})
	require.ErrorIs(t, err, ErrConfig)
	_, err = New(Config{Clock: time.Now, Weights: map[Kind]int{KindPolicyDenial: 101}})
	require.ErrorIs(t, err, ErrConfig)
	_, err = New(Config{Clock: time.Now, DecayPerHour: -1})
	require.ErrorIs(t, err, ErrConfig)
	custom, err := New(Config{Clock: time.Now, Weights: map[Kind]int{KindPolicyDenial: 30}, DecayPerHour: 60})
	require.NoError(t, err)
	assert.Equal(t, 30, custom.Weight(KindPolicyDenial))
	assert.Equal(t, 60, custom.DecayPerHour())
}

func TestThresholds(t *testing.T) {
	strict := ThresholdsOf(&zones.Zone{MinTrust: 50, IsolateBelow: 20}, &zones.Zone{MinTrust: 80, IsolateBelow: 10})
	assert.Equal(t, Thresholds{MinTrust: 80, IsolateBelow: 20}, strict)
	assert.Equal(t, Thresholds{MinTrust: 100, IsolateBelow: 100}, ThresholdsOf(), "no zone: fail closed")
	assert.Equal(t, zones.ActionIsolateAndRevoke, ThresholdsOf().Action(99))
}

// Observe takes arbitrary strings from its callers; nothing may panic and a score stays in range.
func FuzzObserve(f *testing.F) {
	f.Add(agent, "policy_denial", 0, "reason", int64(0))
	f.Add("", "vibes", -5, "\xff", int64(-1))
	f.Add(agent, "region_drift", 100, strings.Repeat("é", 300), int64(1<<62))
	f.Fuzz(func(t *testing.T, subject, kind string, weight int, reason string, offset int64) {
		c := newClock()
		e, err := New(Config{Clock: c.Now, MaxSubjects: 4, MaxEvents: 2,
			Tuning: zoneTuning{"payments": {Weights: map[Kind]int{KindPolicyDenial: 0}, Decay: 1}}})
		require.NoError(t, err)
		for i := range 3 {
			// Arrival order differs from observation order: later ones first.
			sc, err := e.Observe(Signal{Subject: subject, Kind: Kind(kind), Weight: weight, Reason: reason,
				At: c.Now().Add(time.Duration(offset) - time.Duration(i)*time.Minute), Zone: "payments", ID: reason + strconv.Itoa(i%2)})
			if err != nil {
				if !errors.Is(err, ErrDuplicate) {
					require.ErrorIs(t, err, ErrSignal)
				}
				continue
			}
			require.True(t, sc >= 0 && sc <= 100)
			x := e.Explain(subject)
			require.True(t, x.Score >= 0 && x.Score <= 100)
			for _, ev := range x.Events {
				require.LessOrEqual(t, len(ev.Reason), MaxReasonLen)
			}
		}
	})
}

// The policy file's trustflow blocks name the engine's kinds, no more and no fewer.
func TestPolicyNamesEveryKind(t *testing.T) {
	var names []string
	for _, k := range Kinds() {
		names = append(names, string(k))
	}
	assert.Equal(t, zones.TrustSignals(), names)
}
