package daemon

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/identity/record"
	"github.com/ute-project/ute/node/metrics"
	"github.com/ute-project/ute/node/trustflow"
	"github.com/ute-project/ute/zones"
)

// Trust events in gossip. Every signal this node observes about a subject of one of its zones is
// signed as a trust event (identity/record) and spread in that zone's pool; every member verifies
// the events it receives and folds them into the same engine, ordered by observation time, so
// that all members compute the same score. Events are soft state: held in memory for as long as
// their weight takes to decay at the subject's rate (a restarted node relearns the recent ones
// through push/pull), never written to disk.

// Refusals of a trust event beyond identity/record's (which wrap record's sentinels).
var (
	// ErrTrustEventReplay: an event with this observer and nonce is already held; it is not
	// counted again.
	ErrTrustEventReplay = errors.New("daemon: trust event already held (replay)")
	// ErrTrustEventZone: the event names a zone this node does not serve, arrived on another
	// zone's pool, or names a node not known to serve the zone.
	ErrTrustEventZone = errors.New("daemon: trust event outside the observer's zones")
	// ErrTrustEventObserver: the observer is revoked; its word no longer counts.
	ErrTrustEventObserver = errors.New("daemon: trust event from a revoked observer")
	// ErrTrustEventLimit: the observer already has maxEventsPerObserver events held.
	ErrTrustEventLimit = errors.New("daemon: too many trust events held from one observer")
)

// Bounds of the trust-event store and of what this node emits.
const (
	maxEventsPerObserver = 1024
	maxEventsHeld        = 1 << 16
	maxRetention         = 7 * 24 * time.Hour
	// emitPerMinute bounds the events this node signs per subject and kind each minute: beyond
	// it the subject is denied or isolated already, and a flood of probes must not become a
	// flood of gossip.
	emitPerMinute = 10
)

// heldEvent is one verified trust event in the store.
type heldEvent struct {
	zone, observer, subject string
	expires                 time.Time
	raw                     []byte
}

// eventStore holds the verified trust events, keyed by observer and nonce.
type eventStore struct {
	mu     sync.Mutex
	byKey  map[string]*heldEvent
	perObs map[string]int
}

func newEventStore() *eventStore {
	return &eventStore{byKey: map[string]*heldEvent{}, perObs: map[string]int{}}
}

// add holds e under key unless it is held already or its observer is at its bound.
func (s *eventStore) add(key string, e *heldEvent) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.byKey[key]; ok {
		return ErrTrustEventReplay
	}
	if s.perObs[e.observer] >= maxEventsPerObserver || len(s.byKey) >= maxEventsHeld {
		return fmt.Errorf("%w: %d held from %s", ErrTrustEventLimit, s.perObs[e.observer], e.observer)
	}
	s.byKey[key] = e
	s.perObs[e.observer]++
	return nil
}

func (s *eventStore) removeLocked(key string, e *heldEvent) {
	delete(s.byKey, key)
	if s.perObs[e.observer]--; s.perObs[e.observer] <= 0 {
		delete(s.perObs, e.observer)
	}
}

// prune drops expired events.
func (s *eventStore) prune(now time.Time) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for k, e := range s.byKey {
		if now.After(e.expires) {
			s.removeLocked(k, e)
			n++
		}
	}
	return n
}

// observers lists the observers with events held, sorted.
func (s *eventStore) observers() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]string, 0, len(s.perObs))
	for o := range s.perObs {
		out = append(out, o)
	}
	sort.Strings(out)
	return out
}

// dropObserver forgets every event of observer.
func (s *eventStore) dropObserver(observer string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for k, e := range s.byKey {
		if e.observer == observer {
			s.removeLocked(k, e)
			n++
		}
	}
	return n
}

// snapshot is every held event of zone, for push/pull.
func (s *eventStore) snapshot(zone string) [][]byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out [][]byte
	for _, e := range s.byKey {
		if e.zone == zone {
			out = append(out, e.raw)
		}
	}
	return out
}

func (s *eventStore) len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.byKey)
}

// eventCounters counts trust events by outcome: a Prometheus counter on the node's registry and
// a copy tests and status can read.
type eventCounters struct {
	vec *prometheus.CounterVec
	mu  sync.Mutex
	n   map[string]uint64
}

func newEventCounters(m *metrics.Metrics) *eventCounters {
	c := &eventCounters{n: map[string]uint64{}, vec: prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: metrics.Namespace, Name: "trust_events_total",
		Help: "Trust events by outcome: accepted, published, or the reason one was dropped (signature, signer, not_allowed, zone, replay, expired, observer_revoked, limit, malformed, rate).",
	}, []string{"outcome"})}
	if m != nil {
		// A second daemon on one registry (never in practice) would keep counting here only.
		_ = m.Registry().Register(c.vec)
	}
	return c
}

func (c *eventCounters) inc(outcome string) {
	c.vec.WithLabelValues(outcome).Inc()
	c.mu.Lock()
	c.n[outcome]++
	c.mu.Unlock()
}

func (c *eventCounters) get(outcome string) uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n[outcome]
}

// TrustEvents is how many trust events ended with outcome (accepted, published, or a drop
// reason: signature, signer, not_allowed, zone, replay, expired, observer_revoked, limit,
// malformed, rate).
func (d *Daemon) TrustEvents(outcome string) uint64 { return d.trust.counts.get(outcome) }

// dropReason names a refused trust event for the counters.
func dropReason(err error) string {
	switch {
	case errors.Is(err, ErrTrustEventReplay):
		return "replay"
	case errors.Is(err, ErrTrustEventZone):
		return "zone"
	case errors.Is(err, ErrTrustEventObserver):
		return "observer_revoked"
	case errors.Is(err, ErrTrustEventLimit):
		return "limit"
	case errors.Is(err, record.ErrSignature):
		return "signature"
	case errors.Is(err, record.ErrSigner), errors.Is(err, record.ErrTrustDomain):
		return "signer"
	case errors.Is(err, record.ErrNotAllowed):
		return "not_allowed"
	case errors.Is(err, record.ErrExpired), errors.Is(err, record.ErrFuture):
		return "expired"
	}
	return "malformed"
}

// retention is how long an event about subject weighing weight points is held: until its
// weight has fully decayed at the subject's rate (at least an hour, at most maxRetention).
func (t *trust) retention(subject string, weight uint64) time.Duration {
	rate := t.tuning().DecayPerHour(subject)
	if rate <= 0 {
		rate = t.eng.DecayPerHour()
	}
	d := time.Duration(weight) * time.Hour / time.Duration(rate)
	return min(max(d, time.Hour), maxRetention)
}

// AcceptTrustEvent verifies a trust event and, when it is new, holds it, folds it into the
// engine and spreads it (events this node signs) in its zone's pool. arrivedOn is the pool a
// gossiped event came from. Every refusal is counted (TrustEvents) and wraps a sentinel:
// identity/record's for the signature, signer, zone grant and age; ErrTrustEventReplay,
// ErrTrustEventZone, ErrTrustEventObserver and ErrTrustEventLimit for the rest.
func (d *Daemon) AcceptTrustEvent(ctx context.Context, raw []byte, from Origin, arrivedOn ...string) (bool, error) {
	ev, err := d.trust.acceptEvent(raw, from, arrivedOn...)
	if err != nil {
		d.trust.counts.inc(dropReason(err))
		if !errors.Is(err, ErrTrustEventReplay) {
			d.log.Warn("trust event refused", "from", string(from), "err", err)
		}
		return false, err
	}
	d.trust.counts.inc("accepted")
	if from == FromLocal {
		d.spread(raw, ev.Claims.Zone, from)
		d.trust.counts.inc("published")
	}
	// The loop acts on the new score (it owns the action state).
	d.trust.push(trustInput{act: ev.Claims.Subject})
	return true, nil
}

// acceptTrustEvent is the record path's entry for trust events: a replay is not an error there
// (gossip brings every event several times; it is counted and not applied).
func (d *Daemon) acceptTrustEvent(ctx context.Context, raw []byte, from Origin, arrivedOn ...string) (bool, error) {
	isNew, err := d.AcceptTrustEvent(ctx, raw, from, arrivedOn...)
	if errors.Is(err, ErrTrustEventReplay) {
		return false, nil
	}
	return isNew, err
}

func (t *trust) acceptEvent(raw []byte, from Origin, arrivedOn ...string) (*record.TrustEvent, error) {
	d := t.d
	now := d.now()
	ev, err := d.verif.VerifyTrustEvent(raw, now, func(c record.TrustEventClaims) time.Duration { return t.retention(c.Subject, c.Weight) })
	if err != nil {
		return nil, err
	}
	c := ev.Claims
	if d.node.Revoked(c.Observer, record.SerialKey(ev.ObserverCert.Serial())) {
		return nil, fmt.Errorf("%w: %s", ErrTrustEventObserver, c.Observer)
	}
	if !slices.Contains(d.node.Zones(), c.Zone) {
		return nil, fmt.Errorf("%w: zone %s is not served here", ErrTrustEventZone, c.Zone)
	}
	if len(arrivedOn) > 0 && !slices.Contains(arrivedOn, c.Zone) {
		return nil, fmt.Errorf("%w: an event of zone %s arrived on the pool of %v", ErrTrustEventZone, c.Zone, arrivedOn)
	}
	if ev.SubjectID.Kind == identity.KindNode && !t.servesZone(c.Subject, c.Zone) {
		return nil, fmt.Errorf("%w: node %s is not known in zone %s", ErrTrustEventZone, c.Subject, c.Zone)
	}
	if err := t.events.add(ev.Key(), &heldEvent{zone: c.Zone, observer: c.Observer, subject: c.Subject,
		expires: c.ObservedAt.Add(t.retention(c.Subject, c.Weight)), raw: ev.Raw()}); err != nil {
		return nil, err
	}
	if _, err := t.eng.Observe(trustflow.Signal{Subject: c.Subject, Kind: trustflow.Kind(c.Kind), Weight: int(c.Weight),
		Reason: c.Reason, At: c.ObservedAt, Zone: c.Zone, Observer: c.Observer, ID: ev.Key()}); err != nil && !errors.Is(err, trustflow.ErrDuplicate) {
		// An unknown kind (a newer member's) is held and spread, but not scored here.
		d.log.Debug("trust event not scored", "kind", c.Kind, "err", err)
	}
	return ev, nil
}

// servesZone reports whether node is known to serve zone: this node, a tunnel peer in zone, or a
// member of zone's pool.
func (t *trust) servesZone(node, zone string) bool {
	d := t.d
	if node == d.node.ID().String() {
		return slices.Contains(d.node.Zones(), zone)
	}
	for _, tn := range d.node.Snapshot().Tunnels {
		if tn.Peer == node && tn.Zone == zone {
			return true
		}
	}
	return d.isMember(zone, node)
}

// emit signs a signal this node observed as a trust event and accepts it like any other (held,
// scored, spread). It reports false when the signal cannot be an event (no zone of this node
// names the subject, the node is retired, or the rate bound is reached); the caller then
// scores it locally only.
func (t *trust) emit(ctx context.Context, s trustflow.Signal) bool {
	d := t.d
	id, err := identity.ParseID(s.Subject)
	if err != nil || (id.Kind != identity.KindNode && id.Kind != identity.KindAgent) {
		return false
	}
	zone := t.zoneOf(id, s.Zone)
	if zone == "" {
		return false
	}
	now := d.now()
	at := s.At
	if at.IsZero() {
		at = now
	}
	at = at.Truncate(time.Millisecond)
	rk := s.Subject + "|" + string(s.Kind)
	win := t.emitted[rk]
	if now.Sub(win.start) >= time.Minute {
		win = emitWindow{start: now}
	}
	if win.n >= emitPerMinute {
		t.counts.inc("rate")
		return true // dropped: the subject already carries this minute's evidence
	}
	win.n++
	t.emitted[rk] = win
	w := s.Weight
	if w == 0 {
		w = t.eng.WeightIn(zone, s.Kind)
	}
	if w <= 0 {
		return true // weight 0 in this zone: the kind is ignored there
	}
	cert, key, err := d.node.Credentials()
	if err != nil {
		return false
	}
	nonce := make([]byte, record.TrustNonceLen)
	_, _ = rand.Read(nonce)
	raw, err := record.SignTrustEvent(record.TrustEventClaims{
		TrustDomain: cert.ID.TrustDomain, Subject: s.Subject, Kind: string(s.Kind), Weight: uint64(min(w, 100)),
		ObservedAt: at, Zone: zone, Observer: cert.ID.String(), ObserverCert: cert.Raw(), Nonce: nonce,
		Reason: record.FitTrustReason(s.Reason),
	}, key)
	if err != nil {
		d.log.Warn("trust event not signed", "subject", s.Subject, "err", err)
		return false
	}
	if _, err := d.AcceptTrustEvent(ctx, raw, FromLocal); err != nil {
		return false
	}
	return true
}

type emitWindow struct {
	start time.Time
	n     int
}

// zoneOf is the zone an event about id is reported in: an agent's own zone; for a node the zone
// the caller observed it in, else for this node its first zone, else the zone of a tunnel with
// it. "" when this node serves none of them.
func (t *trust) zoneOf(id identity.ID, hint string) string {
	d := t.d
	mine := d.node.Zones()
	switch {
	case id.Kind == identity.KindAgent:
		if slices.Contains(mine, id.Zone) {
			return id.Zone
		}
		return ""
	case hint != "" && slices.Contains(mine, hint):
		return hint
	case id == d.node.ID():
		if len(mine) == 0 {
			return ""
		}
		return slices.Min(mine)
	}
	var zs []string
	for _, tn := range d.node.Snapshot().Tunnels {
		if tn.Peer == id.String() && slices.Contains(mine, tn.Zone) {
			zs = append(zs, tn.Zone)
		}
	}
	if len(zs) == 0 {
		return ""
	}
	return slices.Min(zs)
}

// checkObservers drops the events of observers revoked since they were accepted, and re-acts
// on the subjects whose scores change, so a revoked member's word stops counting.
func (t *trust) checkObservers(ctx context.Context) {
	d := t.d
	for _, o := range t.events.observers() {
		if o == d.node.ID().String() || !d.node.Revoked(o) {
			continue
		}
		n := t.events.dropObserver(o)
		changed := t.eng.ForgetObserver(o)
		d.log.Info("trust events of a revoked observer dropped", "observer", o, "events", n, "subjects", len(changed))
		for _, s := range changed {
			t.act(ctx, s)
		}
	}
}

// mayIsolate reports whether subject, whose score is below isolate_below, may be isolated here.
// A subject of this node (itself or one of its agents) is isolated and revoked on evidence this
// node observed itself, or on reports of two other members or more: one remote member's word
// alone can deny it (below min_trust), never revoke it, so a compromised member cannot get other
// members' agents revoked. Another node's subject is isolated here (its tunnels cut) only when
// this node's own observations alone take it below isolate_below: on others' reports it is
// denied, and its own node, or the authority, revokes it with a record that must still be able to
// reach this node over its tunnels (a node that reports its own drift revokes itself). A
// duplicate whose evidence is being collected is denied, not yet cut.
func (t *trust) mayIsolate(x trustflow.Explanation, own bool, th trustflow.Thresholds) bool {
	self := t.d.node.ID().String()
	mine := func(ev trustflow.Event) bool { return ev.Observer == "" || ev.Observer == self }
	if !own {
		// A confirmed duplicate stays connected (denied: its score is 0) while the presence proofs
		// for the authority are collected over its tunnels; isolation follows (trust_evidence.go).
		return t.eng.ScoreFrom(x.Subject, mine) < th.IsolateBelow && !t.ev.pending(x.Subject)
	}
	seen := map[string]bool{}
	for _, ev := range x.Events {
		if mine(ev) {
			return true
		}
		seen[ev.Observer] = true
	}
	return len(seen) >= 2 || (x.Folded > 0 && len(x.Events) == 0)
}

// zoneTuning is the policy's trustflow blocks as the engine asks for them; policy is the policy
// in force (nil before the node opens).
type zoneTuning struct{ policy func() *zones.Policy }

func (z zoneTuning) Weight(zone string, k trustflow.Kind) (int, bool) {
	pol := z.policy()
	if pol == nil {
		return 0, false
	}
	pz, ok := pol.Zone(zone)
	if !ok || pz.TrustFlow == nil {
		return 0, false
	}
	w, ok := pz.TrustFlow.Weights[string(k)]
	return w, ok
}

// DecayPerHour is an agent's zone's decay; for a node the slowest decay of the policy's zones,
// so that every member, whichever zones it shares with the node, computes the same.
func (z zoneTuning) DecayPerHour(subject string) int {
	pol := z.policy()
	id, err := identity.ParseID(subject)
	if err != nil || pol == nil {
		return 0
	}
	if id.Kind == identity.KindAgent {
		if pz, ok := pol.Zone(id.Zone); ok && pz.TrustFlow != nil {
			return pz.TrustFlow.DecayPerHour
		}
		return 0
	}
	slowest := 0
	for _, pz := range pol.Zones {
		d := trustflow.DefaultDecayPerHour
		if pz.TrustFlow != nil && pz.TrustFlow.DecayPerHour > 0 {
			d = pz.TrustFlow.DecayPerHour
		}
		if slowest == 0 || d < slowest {
			slowest = d
		}
	}
	return slowest
}

// tuning is the engine's view of the policy in force.
func (t *trust) tuning() zoneTuning {
	return zoneTuning{policy: func() *zones.Policy {
		if t.d.node == nil {
			return nil
		}
		return t.d.node.Policy()
	}}
}

// trustEventsSnapshot is the held events of zone for the pools' push/pull.
func (d *Daemon) trustEventsSnapshot(zone string) [][]byte {
	if d.trust == nil {
		return nil
	}
	return d.trust.events.snapshot(zone)
}
