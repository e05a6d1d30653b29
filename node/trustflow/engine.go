package trustflow

import (
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"
)

// Kind names a signal.
type Kind string

// Signal kinds. docs/trustflow.md says what each defends and why its default weight is what it is.
const (
	// KindRegionDrift: the node's region left its zone's placement. Full weight: the subject now
	// runs where the zone says it must never run.
	KindRegionDrift Kind = "region_drift"
	// KindFingerprintMismatch: a flow's workload is not the agent's enrolled executable.
	KindFingerprintMismatch Kind = "fingerprint_mismatch"
	// KindDuplicateIdentity: the same identity is live at two endpoints at once.
	KindDuplicateIdentity Kind = "duplicate_identity"
	// KindSignerMismatch: a record that fails its signature, chain or session binding, or is
	// replayed, on a tunnel the subject holds.
	KindSignerMismatch Kind = "signer_mismatch"
	// KindPolicyDenial: a verified record the zone policy refuses.
	KindPolicyDenial Kind = "policy_denial"
	// KindDestinationBurst: many more distinct destinations than the subject's own baseline.
	KindDestinationBurst Kind = "destination_burst"
	// KindRenewalFailure: a certificate renewal or reissue failed.
	KindRenewalFailure Kind = "renewal_failure"
	// KindExpiringCertificate: a certificate is close to its end without having been renewed.
	KindExpiringCertificate Kind = "expiring_certificate"
)

// Kinds lists every signal kind in a fixed order.
func Kinds() []Kind {
	return []Kind{KindRegionDrift, KindFingerprintMismatch, KindDuplicateIdentity, KindSignerMismatch,
		KindPolicyDenial, KindDestinationBurst, KindRenewalFailure, KindExpiringCertificate}
}

// DefaultWeights are the points one signal of each kind takes off a score of 100. A fresh map
// each call, so a caller may change its copy.
func DefaultWeights() map[Kind]int {
	return map[Kind]int{
		KindRegionDrift:         100,
		KindFingerprintMismatch: 100,
		KindDuplicateIdentity:   100,
		KindSignerMismatch:      40,
		KindPolicyDenial:        10,
		KindDestinationBurst:    25,
		KindRenewalFailure:      5,
		KindExpiringCertificate: 20,
	}
}

// Defaults of Config.
const (
	DefaultDecayPerHour = 10
	DefaultMaxEvents    = 32
	DefaultMaxSubjects  = 10000
	MaxSubjectLen       = 2048
	MaxReasonLen        = 200
	// maxElapsed bounds the decay arithmetic; far more than any penalty needs to decay.
	maxElapsed = 1000 * time.Hour
)

// Errors of the engine.
var (
	ErrConfig = errors.New("trustflow: invalid configuration")
	ErrSignal = errors.New("trustflow: invalid signal")
	// ErrDuplicate: a signal with this ID is already held; it is not counted again.
	ErrDuplicate = errors.New("trustflow: signal already held")
)

// Tuning is the per-zone part of the scoring rules (the policy file's trustflow blocks). The
// engine asks it on every signal and every score, so a new policy applies at once; nil answers
// fall back to the engine's own weights and decay.
type Tuning interface {
	// Weight is zone's weight for kind, ok=false when the zone does not set one.
	Weight(zone string, k Kind) (int, bool)
	// DecayPerHour is the decay of subject's penalty; 0 keeps the engine's.
	DecayPerHour(subject string) int
}

// Config configures an Engine.
type Config struct {
	// Clock is the engine's time source; required (the engine never reads the wall clock).
	Clock func() time.Time
	// Weights override DefaultWeights per kind (0..100).
	Weights map[Kind]int
	// DecayPerHour is how many points a penalty loses per hour, linearly; 0 means
	// DefaultDecayPerHour.
	DecayPerHour int
	// MaxEvents is how many events per subject Explain keeps (older ones are folded into the
	// penalty, which stays exact); 0 means DefaultMaxEvents.
	MaxEvents int
	// MaxSubjects bounds the subjects held; when full, the subject with the smallest penalty is
	// forgotten first, so a flood of signals about many subjects cannot restore a low score.
	MaxSubjects int
	// Tuning, when set, supplies per-zone weights and per-subject decay (see SetTuning).
	Tuning Tuning
}

// Signal is one observation about a subject.
type Signal struct {
	Subject string // agent or node SPIFFE ID
	Kind    Kind
	// Weight is the points this signal takes off; 0 takes the engine's weight for Kind.
	Weight int
	Reason string
	// At is when it was observed; zero means the engine's clock now. Signals are ordered by At
	// (then ID), whatever order they arrive in, so that members folding the same signals compute
	// the same score; only a signal older than every event still listed (see MaxEvents) counts
	// at the oldest listed time instead.
	At time.Time
	// Zone is the zone the signal was observed in: its trustflow weights apply, and an explicit
	// Weight is capped at the zone's weight for Kind. Empty: the engine's weights.
	Zone string
	// Observer is the node that observed it (for explanations and ForgetObserver); optional.
	Observer string
	// ID identifies the observation (a gossiped trust event's key); a second signal with the same
	// ID is refused with ErrDuplicate. Empty: never deduplicated.
	ID string
}

// Event is one recorded change of a subject's score.
type Event struct {
	Kind   Kind      `json:"kind"`
	Weight int       `json:"weight"`
	Reason string    `json:"reason"`
	At     time.Time `json:"at"`
	// Recovered is the penalty (in points, to 0.001) that decay removed since the previous event.
	Recovered float64 `json:"recovered"`
	// PenaltyAfter is the penalty right after this event.
	PenaltyAfter float64 `json:"penalty_after"`
	ScoreBefore  int     `json:"score_before"`
	ScoreAfter   int     `json:"score_after"`
	Zone         string  `json:"zone,omitempty"`
	Observer     string  `json:"observer,omitempty"`
	ID           string  `json:"id,omitempty"`

	milli int64 // PenaltyAfter in millipoints
}

// Explanation is a subject's score with the signals and the arithmetic behind it.
type Explanation struct {
	Subject      string    `json:"subject"`
	Score        int       `json:"score"`
	Penalty      float64   `json:"penalty"`
	DecayPerHour int       `json:"decay_per_hour"`
	Now          time.Time `json:"now"`
	Events       []Event   `json:"events"`
	// Folded counts older events no longer listed; their effect is in the first listed event's
	// penalty.
	Folded int `json:"folded"`
	// Steps is the arithmetic, one line per event and one for now.
	Steps []string `json:"steps"`
	// Full is when the score returns to 100 if no new signal arrives.
	Full time.Time `json:"full,omitzero"`
}

// Score is a subject's score with its most recent reasons.
type Score struct {
	Subject string
	Score   int
	Reasons []string
}

// Engine holds the scores. It is safe for concurrent use.
type Engine struct {
	now      func() time.Time
	tuning   atomic.Pointer[tuningBox]
	weights  map[Kind]int
	decay    int64 // millipoints per hour
	maxEv    int
	maxSubj  int
	mu       sync.Mutex
	subjects map[string]*subject
}

type subject struct {
	id      string
	penalty int64 // millipoints at since (after the newest event)
	since   time.Time
	// base is the penalty folded events left at baseAt (0 before anything was folded).
	base   int64
	baseAt time.Time
	events []Event // sorted by (At, ID)
	folded int
}

type tuningBox struct{ t Tuning }

// SetTuning replaces the per-zone tuning (after a policy change); nil removes it.
func (e *Engine) SetTuning(t Tuning) { e.tuning.Store(&tuningBox{t}) }

func (e *Engine) tune() Tuning {
	if b := e.tuning.Load(); b != nil {
		return b.t
	}
	return nil
}

// New returns an engine; cfg.Clock is required.
func New(cfg Config) (*Engine, error) {
	if cfg.Clock == nil {
		return nil, fmt.Errorf("%w: Clock is required", ErrConfig)
	}
	w := DefaultWeights()
	for k, v := range cfg.Weights {
		if _, ok := w[k]; !ok {
			return nil, fmt.Errorf("%w: unknown signal kind %q", ErrConfig, k)
		}
		if v < 0 || v > 100 {
			return nil, fmt.Errorf("%w: weight of %s is %d, outside 0..100", ErrConfig, k, v)
		}
		w[k] = v
	}
	e := &Engine{now: cfg.Clock, weights: w, decay: DefaultDecayPerHour * 1000, maxEv: cfg.MaxEvents,
		maxSubj: cfg.MaxSubjects, subjects: map[string]*subject{}}
	e.SetTuning(cfg.Tuning)
	if cfg.DecayPerHour < 0 || cfg.DecayPerHour > 100*60 {
		return nil, fmt.Errorf("%w: decay of %d points per hour is outside 0..6000", ErrConfig, cfg.DecayPerHour)
	}
	if cfg.DecayPerHour > 0 {
		e.decay = int64(cfg.DecayPerHour) * 1000
	}
	if e.maxEv <= 0 {
		e.maxEv = DefaultMaxEvents
	}
	if e.maxSubj <= 0 {
		e.maxSubj = DefaultMaxSubjects
	}
	return e, nil
}

// Weight is the engine's weight for kind (0 for an unknown kind).
func (e *Engine) Weight(k Kind) int { return e.weights[k] }

// WeightIn is the weight of kind in zone: the zone's trustflow weight when it sets one, else the
// engine's.
func (e *Engine) WeightIn(zone string, k Kind) int {
	if t := e.tune(); t != nil && zone != "" {
		if w, ok := t.Weight(zone, k); ok && w >= 0 && w <= 100 {
			return w
		}
	}
	return e.weights[k]
}

// DecayPerHour is the engine's decay rate.
func (e *Engine) DecayPerHour() int { return int(e.decay / 1000) }

// decayOf is subject's decay in millipoints per hour.
func (e *Engine) decayOf(subject string) int64 {
	if t := e.tune(); t != nil {
		if d := t.DecayPerHour(subject); d > 0 && d <= 100*60 {
			return int64(d) * 1000
		}
	}
	return e.decay
}

// decayed is the penalty of s at t (millipoints), and what decay removed since s.since.
func (e *Engine) decayed(s *subject, t time.Time) (now, recovered int64) {
	return decayFrom(s.penalty, s.since, t, e.decayOf(s.id))
}

// decayFrom is a penalty p at since, decayed at rate (millipoints per hour) until t.
func decayFrom(p int64, since, t time.Time, rate int64) (now, recovered int64) {
	el := t.Sub(since)
	if el <= 0 || since.IsZero() {
		return p, 0
	}
	el = min(el, maxElapsed)
	rec := el.Milliseconds() * rate / int64(time.Hour/time.Millisecond)
	rec = min(rec, p)
	return p - rec, rec
}

// scoreOf turns a penalty in millipoints into a score: any remaining fraction of a point still
// counts, so a score is 100 only once the penalty is entirely gone.
func scoreOf(milli int64) int {
	pts := (milli + 999) / 1000
	return int(max(0, 100-min(pts, 100)))
}

// Observe records a signal and returns the subject's score after it. A signal whose weight in
// its zone is 0 is not recorded.
func (e *Engine) Observe(sig Signal) (int, error) {
	if err := checkSubject(sig.Subject); err != nil {
		return 0, err
	}
	def, ok := e.weights[sig.Kind]
	if !ok {
		return 0, fmt.Errorf("%w: unknown kind %q", ErrSignal, truncate(string(sig.Kind), 40))
	}
	if sig.Zone != "" {
		def = e.WeightIn(sig.Zone, sig.Kind)
	}
	w := sig.Weight
	if w < 0 || w > 100 {
		return 0, fmt.Errorf("%w: weight %d outside 0..100", ErrSignal, sig.Weight)
	}
	if w == 0 || w > def {
		// An observer may charge less than the zone's weight (a share), never more.
		w = def
	}
	at := sig.At
	if at.IsZero() {
		at = e.now()
	}
	at = at.UTC()
	e.mu.Lock()
	defer e.mu.Unlock()
	s := e.subjects[sig.Subject]
	if w == 0 {
		if s == nil {
			return 100, nil
		}
		p, _ := e.decayed(s, e.now())
		return scoreOf(p), nil
	}
	if s != nil && sig.ID != "" && slices.ContainsFunc(s.events, func(ev Event) bool { return ev.ID == sig.ID }) {
		p, _ := e.decayed(s, e.now())
		return scoreOf(p), fmt.Errorf("%w: %s", ErrDuplicate, truncate(sig.ID, 80))
	}
	if s == nil {
		e.makeRoom(at)
		s = &subject{id: sig.Subject}
		e.subjects[sig.Subject] = s
	}
	if s.folded > 0 && at.Before(s.baseAt) {
		at = s.baseAt
	}
	ev := Event{Kind: sig.Kind, Weight: w, Reason: truncate(sig.Reason, MaxReasonLen), At: at,
		Zone: truncate(sig.Zone, 63), Observer: truncate(sig.Observer, MaxSubjectLen), ID: truncate(sig.ID, MaxSubjectLen)}
	i, _ := slices.BinarySearchFunc(s.events, ev, cmpEvent)
	s.events = slices.Insert(s.events, i, ev)
	e.recompute(s, i)
	if over := len(s.events) - e.maxEv; over > 0 {
		last := s.events[over-1]
		s.base, s.baseAt = last.milli, last.At
		s.events = slices.Delete(s.events, 0, over)
		s.folded += over
	}
	p, _ := e.decayed(s, e.now())
	return scoreOf(p), nil
}

func cmpEvent(a, b Event) int {
	if c := a.At.Compare(b.At); c != 0 {
		return c
	}
	return strings.Compare(a.ID, b.ID)
}

// recompute replays s's events from index from on: each event's penalty is the previous one's,
// decayed to the event's time, plus its weight (capped at 100 points).
func (e *Engine) recompute(s *subject, from int) {
	rate := e.decayOf(s.id)
	p, t := s.base, s.baseAt
	if from > 0 {
		p, t = s.events[from-1].milli, s.events[from-1].At
	}
	for i := from; i < len(s.events); i++ {
		ev := &s.events[i]
		cur, rec := decayFrom(p, t, ev.At, rate)
		next := min(cur+int64(ev.Weight)*1000, 100*1000)
		ev.Recovered, ev.PenaltyAfter, ev.milli = pts(rec), pts(next), next
		ev.ScoreBefore, ev.ScoreAfter = scoreOf(cur), scoreOf(next)
		p, t = next, ev.At
	}
	s.penalty, s.since = p, t
}

// ScoreFrom is subject's score now counting only the listed events keep accepts (not the
// penalty of events already folded away): e.g. what this node observed itself.
func (e *Engine) ScoreFrom(subject string, keep func(Event) bool) int {
	now := e.now()
	e.mu.Lock()
	defer e.mu.Unlock()
	s := e.subjects[subject]
	if s == nil {
		return 100
	}
	rate := e.decayOf(subject)
	var p int64
	var t time.Time
	for _, ev := range s.events {
		if !keep(ev) {
			continue
		}
		cur, _ := decayFrom(p, t, ev.At, rate)
		p, t = min(cur+int64(ev.Weight)*1000, 100*1000), ev.At
	}
	p, _ = decayFrom(p, t, now, rate)
	return scoreOf(p)
}

// ForgetObserver drops every listed event observer reported (its identity was revoked: its word
// no longer counts) and recomputes the subjects it touched. Events already folded away stay in
// their subject's base penalty. It returns the subjects whose score changed.
func (e *Engine) ForgetObserver(observer string) []string {
	if observer == "" {
		return nil
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	var changed []string
	for id, s := range e.subjects {
		n := len(s.events)
		s.events = slices.DeleteFunc(s.events, func(ev Event) bool { return ev.Observer == observer })
		if len(s.events) == n {
			continue
		}
		e.recompute(s, 0)
		changed = append(changed, id)
	}
	slices.Sort(changed)
	return changed
}

// makeRoom forgets the subject with the smallest penalty when the engine is full.
func (e *Engine) makeRoom(at time.Time) {
	if len(e.subjects) < e.maxSubj {
		return
	}
	var victim string
	var least int64 = -1
	for id, s := range e.subjects {
		p, _ := e.decayed(s, at)
		if least < 0 || p < least || (p == least && id < victim) {
			victim, least = id, p
		}
	}
	delete(e.subjects, victim)
}

// Score is subject's score now; 100 for a subject the engine holds nothing about.
func (e *Engine) Score(subject string) int {
	e.mu.Lock()
	defer e.mu.Unlock()
	s := e.subjects[subject]
	if s == nil {
		return 100
	}
	p, _ := e.decayed(s, e.now())
	return scoreOf(p)
}

// Scores lists every subject with a signal still held, sorted by subject, each with the reasons
// of its newest events (newest first, at most 3).
func (e *Engine) Scores() []Score {
	now := e.now()
	e.mu.Lock()
	defer e.mu.Unlock()
	out := make([]Score, 0, len(e.subjects))
	for id, s := range e.subjects {
		p, _ := e.decayed(s, now)
		sc := Score{Subject: id, Score: scoreOf(p), Reasons: []string{}}
		for i := len(s.events) - 1; i >= 0 && len(sc.Reasons) < 3; i-- {
			ev := s.events[i]
			sc.Reasons = append(sc.Reasons, fmt.Sprintf("%s −%d at %s: %s", ev.Kind, ev.Weight, ev.At.Format(time.RFC3339), ev.Reason))
		}
		out = append(out, sc)
	}
	slices.SortFunc(out, func(a, b Score) int {
		switch {
		case a.Subject < b.Subject:
			return -1
		case a.Subject > b.Subject:
			return 1
		}
		return 0
	})
	return out
}

// Forget drops everything held about subject (a revoked subject needs a new identity).
func (e *Engine) Forget(subject string) {
	e.mu.Lock()
	delete(e.subjects, subject)
	e.mu.Unlock()
}

// Prune forgets subjects whose penalty has fully decayed, keeping memory bounded by activity.
func (e *Engine) Prune() int {
	now := e.now()
	e.mu.Lock()
	defer e.mu.Unlock()
	n := 0
	for id, s := range e.subjects {
		if p, _ := e.decayed(s, now); p == 0 {
			delete(e.subjects, id)
			n++
		}
	}
	return n
}

// Explain returns subject's score with every held event and the arithmetic.
func (e *Engine) Explain(subject string) Explanation {
	now := e.now()
	e.mu.Lock()
	defer e.mu.Unlock()
	rate := e.decayOf(subject)
	x := Explanation{Subject: subject, Score: 100, DecayPerHour: int(rate / 1000), Now: now.UTC(), Events: []Event{}, Steps: []string{}}
	s := e.subjects[subject]
	if s == nil {
		x.Steps = append(x.Steps, "no signal held: score 100")
		return x
	}
	x.Events = slices.Clone(s.events)
	x.Folded = s.folded
	if s.folded > 0 {
		x.Steps = append(x.Steps, fmt.Sprintf("%d older event(s) folded into the penalty of the first one listed", s.folded))
	}
	for _, ev := range s.events {
		by := ""
		if ev.Observer != "" {
			by = ", observed by " + ev.Observer
			if ev.Zone != "" {
				by += " in zone " + ev.Zone
			}
		}
		x.Steps = append(x.Steps, fmt.Sprintf("%s  %s: penalty recovered %s by decay, then +%d (%s%s) = %s, score %d → %d",
			ev.At.Format(time.RFC3339), ev.Kind, fmtPts(ev.Recovered), ev.Weight, ev.Reason, by, fmtPts(ev.PenaltyAfter),
			ev.ScoreBefore, ev.ScoreAfter))
	}
	p, rec := e.decayed(s, now)
	x.Penalty, x.Score = pts(p), scoreOf(p)
	x.Steps = append(x.Steps, fmt.Sprintf("%s  now: penalty %s − decay %s (%d/h over %s) = %s, score = 100 − ceil(%s) = %d",
		x.Now.Format(time.RFC3339), fmtPts(pts(s.penalty)), fmtPts(pts(rec)), x.DecayPerHour,
		now.Sub(s.since).Round(time.Second), fmtPts(x.Penalty), fmtPts(x.Penalty), x.Score))
	if p > 0 && rate > 0 {
		ms := (p*int64(time.Hour/time.Millisecond) + rate - 1) / rate
		x.Full = now.Add(time.Duration(ms) * time.Millisecond).UTC()
	}
	return x
}

func pts(milli int64) float64 { return float64(milli) / 1000 }

func fmtPts(p float64) string { return strconv.FormatFloat(p, 'f', -1, 64) }

func checkSubject(s string) error {
	switch {
	case s == "":
		return fmt.Errorf("%w: empty subject", ErrSignal)
	case len(s) > MaxSubjectLen:
		return fmt.Errorf("%w: subject is %d bytes; the limit is %d", ErrSignal, len(s), MaxSubjectLen)
	case !utf8.ValidString(s):
		return fmt.Errorf("%w: subject is not UTF-8", ErrSignal)
	}
	return nil
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	// Cut on a rune boundary so the reason stays valid UTF-8.
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n]
}
