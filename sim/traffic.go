package sim

import (
	"context"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/ute-project/ute/sim/scenario"
)

// trafficStats counts the legitimate flows and the false denials among them.
type trafficStats struct {
	mu       sync.Mutex
	attempts int
	ok       int
	excused  int // failed while an end was revoked, down or partitioned away: not a denial
	denials  []Denial
	cancel   context.CancelFunc
	wg       sync.WaitGroup
}

// Denial is a legitimate flow that failed.
type Denial struct {
	At    time.Duration `json:"at"` // since the timeline started
	Flow  string        `json:"flow"`
	Error string        `json:"error"`
}

// TrafficSummary is the legitimate traffic of a run.
type TrafficSummary struct {
	Flows        int      `json:"flows"`
	OK           int      `json:"ok"`
	Excused      int      `json:"excused"`
	FalseDenials int      `json:"false_denials"`
	Denials      []Denial `json:"denials,omitempty"`
}

func newTrafficStats() *trafficStats { return &trafficStats{cancel: func() {}} }

func (t *trafficStats) stop() {
	t.cancel()
	t.wg.Wait()
}

func (t *trafficStats) summary() TrafficSummary {
	t.mu.Lock()
	defer t.mu.Unlock()
	d := t.denials
	if len(d) > 50 {
		d = d[:50]
	}
	return TrafficSummary{Flows: t.attempts, OK: t.ok, Excused: t.excused, FalseDenials: len(t.denials), Denials: d}
}

// denialsBetween counts the false denials in [from, to) since the timeline started.
func (t *trafficStats) denialsBetween(from, to time.Duration) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	k := 0
	for _, d := range t.denials {
		if d.At >= from && d.At < to {
			k++
		}
	}
	return k
}

// startTraffic runs every traffic entry until the run stops.
func (r *runner) startTraffic(ctx context.Context) {
	ctx, cancel := context.WithCancel(ctx)
	r.traffic.cancel = cancel
	for _, tr := range r.sc.Traffic {
		from, _ := scenario.ParseAgentRef(tr.From)
		to, _ := scenario.ParseDest(tr.To)
		r.traffic.wg.Go(func() {
			tick := time.NewTicker(r.wall(tr.Interval.D()))
			defer tick.Stop()
			for {
				select {
				case <-ctx.Done():
					return
				case <-tick.C:
				}
				r.oneFlow(ctx, from, to)
			}
		})
	}
}

// epoch changes whenever the run changes who may talk to whom (revocation, partition, crash);
// a flow that spans a change is not judged.
func (r *runner) epoch() uint64 {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return r.gen
}

func (r *runner) bump() {
	r.mu.Lock()
	r.gen++
	r.mu.Unlock()
}

// shouldWork reports whether a legitimate flow from → to is expected to succeed now.
func (r *runner) shouldWork(from scenario.AgentRef, to scenario.Dest) bool {
	r.mu.RLock()
	defer r.mu.RUnlock()
	fn, tn := r.nodes[r.agentAt[from.String()]], r.nodes[r.agentAt[to.AgentRef.String()]]
	if fn == nil || tn == nil || fn.d == nil || tn.d == nil {
		return false
	}
	if r.side[fn.name] != r.side[tn.name] {
		return false
	}
	for _, s := range []string{r.agentID(from), r.agentID(to.AgentRef), r.nodeID(fn.name), r.nodeID(tn.name)} {
		if r.revoked[s] {
			return false
		}
	}
	return true
}

func (r *runner) oneFlow(ctx context.Context, from scenario.AgentRef, to scenario.Dest) {
	gen := r.epoch()
	expected := r.shouldWork(from, to)
	err := r.exchange(ctx, from, to, "ping\n")
	if ctx.Err() != nil {
		return
	}
	t := r.traffic
	t.mu.Lock()
	defer t.mu.Unlock()
	t.attempts++
	switch {
	case err == nil:
		t.ok++
	case !expected || gen != r.epoch():
		t.excused++
	default:
		t.denials = append(t.denials, Denial{At: r.since(r.t0), Flow: from.String() + " → " + to.String(), Error: err.Error()})
	}
}

// exchange opens one flow, sends a line and reads the answer.
func (r *runner) exchange(ctx context.Context, from scenario.AgentRef, to scenario.Dest, payload string) error {
	a, _, err := r.agent(from)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, r.wall(3*time.Second))
	defer cancel()
	// Relay: the simulated agents stand for programs elsewhere, enrolled with a stand-in
	// executable; this process is not their workload (node.Agent.Dial would refuse it).
	c, err := a.Relay().Dial(ctx, "tcp", to.String())
	if err != nil {
		return err
	}
	defer func() { _ = c.Close() }()
	_ = c.SetDeadline(time.Now().Add(r.wall(3 * time.Second)))
	if _, err := c.Write([]byte(payload)); err != nil {
		return err
	}
	buf := make([]byte, 5)
	if _, err := io.ReadFull(c, buf); err != nil {
		return fmt.Errorf("no answer: %w", err)
	}
	return nil
}
