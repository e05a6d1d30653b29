package trustflow

import (
	"errors"
	"fmt"
	"slices"
	"strconv"
	"sync"
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
)

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
}

// Signal is one observation about a subject.
type Signal struct {
	Subject string // agent or node SPIFFE ID
	Kind    Kind
	// Weight is the points this signal takes off; 0 takes the engine's weight for Kind.
	Weight int
	Reason string
	// At is when it was observed; zero means the engine's clock now. A time before the subject's
	// last change counts as that time: a penalty never decays backwards.
	At time.Time
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
	weights  map[Kind]int
	decay    int64 // millipoints per hour
	maxEv    int
	maxSubj  int
	mu       sync.Mutex
	subjects map[string]*subject
}

type subject struct {
	penalty int64 // millipoints at since
	since   time.Time
	events  []Event
	folded  int
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

// DecayPerHour is the engine's decay rate.
func (e *Engine) DecayPerHour() int { return int(e.decay / 1000) }

// decayed is the penalty of s at t (millipoints), and what decay removed since s.since.
func (e *Engine) decayed(s *subject, t time.Time) (now, recovered int64) {
	el := t.Sub(s.since)
	if el <= 0 {
		return s.penalty, 0
	}
	el = min(el, maxElapsed)
	rec := el.Milliseconds() * e.decay / int64(time.Hour/time.Millisecond)
	rec = min(rec, s.penalty)
	return s.penalty - rec, rec
}

// scoreOf turns a penalty in millipoints into a score: any remaining fraction of a point still
// counts, so a score is 100 only once the penalty is entirely gone.
func scoreOf(milli int64) int {
	pts := (milli + 999) / 1000
	return int(max(0, 100-min(pts, 100)))
}

// Observe records a signal and returns the subject's score after it.
func (e *Engine) Observe(sig Signal) (int, error) {
	if err := checkSubject(sig.Subject); err != nil {
		return 0, err
	}
	def, ok := e.weights[sig.Kind]
	if !ok {
		return 0, fmt.Errorf("%w: unknown kind %q", ErrSignal, truncate(string(sig.Kind), 40))
	}
	w := sig.Weight
	if w == 0 {
		w = def
	}
	if w < 0 || w > 100 {
		return 0, fmt.Errorf("%w: weight %d outside 0..100", ErrSignal, sig.Weight)
	}
	at := sig.At
	if at.IsZero() {
		at = e.now()
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	s := e.subjects[sig.Subject]
	if s == nil {
		e.makeRoom(at)
		s = &subject{since: at}
		e.subjects[sig.Subject] = s
	}
	if at.Before(s.since) {
		at = s.since
	}
	cur, rec := e.decayed(s, at)
	next := min(cur+int64(w)*1000, 100*1000)
	ev := Event{Kind: sig.Kind, Weight: w, Reason: truncate(sig.Reason, MaxReasonLen), At: at.UTC(),
		Recovered: pts(rec), PenaltyAfter: pts(next), ScoreBefore: scoreOf(cur), ScoreAfter: scoreOf(next)}
	s.penalty, s.since = next, at
	s.events = append(s.events, ev)
	if over := len(s.events) - e.maxEv; over > 0 {
		s.events = slices.Delete(s.events, 0, over)
		s.folded += over
	}
	return ev.ScoreAfter, nil
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
	x := Explanation{Subject: subject, Score: 100, DecayPerHour: int(e.decay / 1000), Now: now.UTC(), Events: []Event{}, Steps: []string{}}
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
		x.Steps = append(x.Steps, fmt.Sprintf("%s  %s: penalty recovered %s by decay, then +%d (%s) = %s, score %d → %d",
			ev.At.Format(time.RFC3339), ev.Kind, fmtPts(ev.Recovered), ev.Weight, ev.Reason, fmtPts(ev.PenaltyAfter),
			ev.ScoreBefore, ev.ScoreAfter))
	}
	p, rec := e.decayed(s, now)
	x.Penalty, x.Score = pts(p), scoreOf(p)
	x.Steps = append(x.Steps, fmt.Sprintf("%s  now: penalty %s − decay %s (%d/h over %s) = %s, score = 100 − ceil(%s) = %d",
		x.Now.Format(time.RFC3339), fmtPts(pts(s.penalty)), fmtPts(pts(rec)), x.DecayPerHour,
		now.Sub(s.since).Round(time.Second), fmtPts(x.Penalty), fmtPts(x.Penalty), x.Score))
	if p > 0 && e.decay > 0 {
		ms := (p*int64(time.Hour/time.Millisecond) + e.decay - 1) / e.decay
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
