package trustflow

import (
	"fmt"
	"time"
)

// BurstConfig tunes a BurstDetector; zero fields take the defaults.
type BurstConfig struct {
	// Window is the length of one counting window (default 1 min).
	Window time.Duration
	// Factor and Slack set the threshold: a window is a burst when its count of distinct
	// destinations exceeds Factor × baseline + Slack (defaults 3 and 10).
	Factor, Slack int
	// MaxSubjects bounds the subjects tracked (default 10,000); MaxDestinations bounds the
	// distinct destinations counted per window (default 1,024; a count saturates there).
	MaxSubjects, MaxDestinations int
}

// Burst is a window in which a subject reached more distinct destinations than its baseline
// allows.
type Burst struct {
	Subject   string
	Count     int     // distinct destinations in the window so far
	Baseline  float64 // the subject's moving average of distinct destinations per window
	Threshold int
	Window    time.Time // start of the window
}

func (b Burst) String() string {
	return fmt.Sprintf("%d distinct destinations in the window from %s, baseline %.1f, threshold %d",
		b.Count, b.Window.UTC().Format(time.RFC3339), b.Baseline, b.Threshold)
}

// BurstDetector learns each subject's usual number of distinct destinations per window (an
// exponential moving average, weight 1/8, over consecutive windows, empty ones included, seeded
// with its first complete window) and
// reports the first time in a window that the count exceeds Factor × baseline + Slack. It is not
// safe for concurrent use; the caller serialises.
type BurstDetector struct {
	cfg  BurstConfig
	subj map[string]*burstState
}

type burstState struct {
	start    time.Time
	dests    map[string]struct{}
	base     int64 // millis of destinations per window
	learned  bool  // a window has closed: base is a measurement, not a guess
	reported bool
}

// NewBurstDetector returns a detector with cfg's defaults filled in.
func NewBurstDetector(cfg BurstConfig) *BurstDetector {
	if cfg.Window <= 0 {
		cfg.Window = time.Minute
	}
	if cfg.Factor <= 0 {
		cfg.Factor = 3
	}
	if cfg.Slack <= 0 {
		cfg.Slack = 10
	}
	if cfg.MaxSubjects <= 0 {
		cfg.MaxSubjects = 10000
	}
	if cfg.MaxDestinations <= 0 {
		cfg.MaxDestinations = 1024
	}
	return &BurstDetector{cfg: cfg, subj: map[string]*burstState{}}
}

// Observe counts one flow of subject to dest at time at and reports a burst the first time the
// window crosses its threshold.
func (d *BurstDetector) Observe(subject, dest string, at time.Time) (Burst, bool) {
	s := d.subj[subject]
	start := at.Truncate(d.cfg.Window)
	if s == nil {
		if len(d.subj) >= d.cfg.MaxSubjects {
			d.evict(start)
		}
		s = &burstState{start: start, dests: map[string]struct{}{}}
		d.subj[subject] = s
	}
	d.roll(s, start)
	if _, ok := s.dests[dest]; !ok && len(s.dests) < d.cfg.MaxDestinations {
		s.dests[dest] = struct{}{}
	}
	thr := int(s.base*int64(d.cfg.Factor)/1000) + d.cfg.Slack
	if len(s.dests) > thr && !s.reported {
		s.reported = true
		return Burst{Subject: subject, Count: len(s.dests), Baseline: float64(s.base) / 1000, Threshold: thr, Window: s.start}, true
	}
	return Burst{}, false
}

// roll closes the windows between s.start and start, folding their counts into the baseline.
func (d *BurstDetector) roll(s *burstState, start time.Time) {
	if !start.After(s.start) {
		return
	}
	count := int64(len(s.dests)) * 1000
	if s.learned {
		s.base += (count - s.base) / 8
	} else {
		// The first complete window is the baseline itself: averaging it in from zero would
		// flag a busy but steady subject for its first half hour.
		s.base, s.learned = count, true
	}
	// Empty windows in between pull the baseline down; after 64 of them it is as good as zero.
	gaps := int64(start.Sub(s.start)/d.cfg.Window) - 1
	for i := int64(0); i < min(gaps, 64); i++ {
		s.base -= s.base / 8
	}
	s.start, s.reported = start, false
	clear(s.dests)
}

// evict forgets the subject whose window is oldest.
func (d *BurstDetector) evict(now time.Time) {
	var victim string
	oldest := now
	for id, s := range d.subj {
		if victim == "" || s.start.Before(oldest) || (s.start.Equal(oldest) && id < victim) {
			victim, oldest = id, s.start
		}
	}
	delete(d.subj, victim)
}
