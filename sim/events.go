package sim

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/ute-project/ute/identity/authority"
	"github.com/ute-project/ute/node"
	"github.com/ute-project/ute/node/config"
	"github.com/ute-project/ute/node/daemon"
	"github.com/ute-project/ute/node/membership"
	"github.com/ute-project/ute/node/state"
	"github.com/ute-project/ute/overlay/dtl"
	"github.com/ute-project/ute/overlay/tunnel"
	"github.com/ute-project/ute/sim/attack"
	"github.com/ute-project/ute/sim/scenario"
)

// leakWait is how long the runner waits after a refused attempt before counting the bytes that
// reached the target, so that anything wrongly admitted has arrived.
const leakWait = 20 * time.Millisecond

func (r *runner) topology() Topology {
	var t Topology
	for _, z := range r.sc.Zones {
		zi := ZoneInfo{Name: z.Name, CIDR: z.CIDR, Regions: z.Regions}
		for _, name := range r.order {
			if slices.Contains(r.nodes[name].zones(), z.Name) {
				zi.Nodes = append(zi.Nodes, name)
			}
		}
		t.Zones = append(t.Zones, zi)
	}
	for _, name := range r.order {
		n := r.nodes[name]
		ni := NodeInfo{Name: name, Group: n.group.Name, Addr: n.addr.String(), Region: n.group.Region, Zones: n.zones()}
		for _, a := range n.agents {
			ni.Agents = append(ni.Agents, a.String())
		}
		t.Nodes = append(t.Nodes, ni)
	}
	return t
}

func (r *runner) runTimeline(ctx context.Context, res *Result) {
	r.t0 = time.Now()
	r.startTraffic(ctx)
	starts := make([]time.Duration, len(r.sc.Timeline))
	for i, e := range r.sc.Timeline {
		// The simulator's own garbage collection is kept out of the event: with every node in one
		// process the heap is thousands of times a node's, and a collection's mark phase (up to
		// 8.5 s of wall time at 1,000 nodes, its assists taking more CPU than its workers) stalls
		// every node's goroutines at once, which no deployed node would see. A run whose spread
		// overlapped one waited 0.5-0.7 s of simulated time with the record's packets in its last
		// members' socket queues (docs/benchmarks.md, "The simulator's garbage collection").
		// Collecting here, while the timeline waits anyway, moves the next collection past most
		// events; the event starts later if the collection outlasts the wait.
		runtime.GC()
		if wait := r.wall(e.At.D()) - time.Since(r.t0); wait > 0 {
			select {
			case <-ctx.Done():
			case <-time.After(wait):
			}
		}
		if ctx.Err() != nil {
			res.Events = append(res.Events, EventResult{Index: i, Line: e.Line(), Kind: e.Kind, Name: e.Label(), Outcome: "not run", Failure: "the run was cancelled"})
			continue
		}
		starts[i] = r.since(r.t0)
		er := r.event(ctx, e)
		er.Index, er.Line, er.At, er.Kind, er.Name = i, e.Line(), starts[i], e.Kind, e.Label()
		res.Events = append(res.Events, er)
		mark := "ok  "
		if !er.Pass {
			mark = "FAIL"
		}
		r.say("  %s %-9s %s: %s", mark, fmtDur(starts[i]), er.Name, er.Observed)
	}
	if s := r.sc.Settle.D(); s > 0 {
		select {
		case <-ctx.Done():
		case <-time.After(r.wall(s)):
		}
	}
	r.traffic.stop()
	end := r.since(r.t0)
	// False denials are charged to the event during which they happened.
	for i := range res.Events {
		e := &res.Events[i]
		to := end
		if i+1 < len(res.Events) {
			to = res.Events[i+1].At
		}
		e.FalseDenials = r.traffic.denialsBetween(e.At, to)
		if want := r.sc.Timeline[i].Expect.FalseDenials; want != nil && e.FalseDenials > *want && e.Pass {
			e.Pass = false
			e.Failure = fmt.Sprintf("%d legitimate flow(s) failed during the event, at most %d expected", e.FalseDenials, *want)
		}
	}
}

func (r *runner) event(ctx context.Context, e scenario.Event) EventResult {
	switch e.Kind {
	case scenario.KindFlow, scenario.KindLateral:
		return r.flowEvent(ctx, e)
	case scenario.KindReplay:
		return r.replayEvent(ctx, e)
	case scenario.KindTokenReuse:
		return r.tokenReuseEvent(ctx, e)
	case scenario.KindForged:
		return r.forgedEvent(ctx, e)
	case scenario.KindRevoke:
		return r.revokeEvent(ctx, e)
	case scenario.KindPartition:
		return r.partitionEvent(e)
	case scenario.KindHeal:
		return r.healEvent(ctx, e)
	case scenario.KindCrash:
		return r.crashEvent(e)
	case scenario.KindRejoin:
		return r.rejoinEvent(ctx, e)
	case scenario.KindRegionDrift:
		return r.regionDriftEvent(ctx, e)
	case scenario.KindExeSwap:
		return r.exeSwapEvent(ctx, e)
	case scenario.KindDirCopy:
		return r.dirCopyEvent(ctx, e)
	case scenario.KindChurn:
		return r.churnEvent(ctx, e)
	case scenario.KindPolicy:
		return r.policyEvent(ctx, e)
	}
	return EventResult{Outcome: "not run", Failure: "event " + e.Kind + " is not supported in this version"}
}

// judge sets Pass and Failure of an attack-or-flow result against e's expectation.
func judge(er *EventResult, x scenario.Expect) {
	er.Expectation = x.Outcome
	if x.Outcome == "blocked" {
		er.Expectation = fmt.Sprintf("blocked within %s, ≤ %d B leaked", fmtDur(x.Within.D()), x.LeakedBytes)
	} else if x.Outcome == "allowed" {
		er.Expectation = fmt.Sprintf("allowed within %s", fmtDur(x.Within.D()))
	}
	er.Pass = true
	switch {
	case er.Outcome != x.Outcome:
		er.Pass, er.Failure = false, fmt.Sprintf("expected %s, was %s", x.Outcome, er.Outcome)
	case er.TimeToBlock > x.Within.D():
		er.Pass, er.Failure = false, fmt.Sprintf("took %s, expected within %s", fmtDur(er.TimeToBlock), fmtDur(x.Within.D()))
	case x.Outcome == "blocked" && er.LeakedBytes > x.LeakedBytes:
		er.Pass, er.Failure = false, fmt.Sprintf("%d bytes reached the target, at most %d expected", er.LeakedBytes, x.LeakedBytes)
	}
}

// refusal names why an attempt was refused, as the node or the authority said it.
func refusal(err error) string {
	var re *node.RefusedError
	var rj *tunnel.RejectedError
	var vr *authority.RefusalError
	switch {
	case errors.As(err, &rj):
		return "peer rejected: " + rj.Reason
	case errors.As(err, &re):
		return "refused locally: " + re.Reason
	case errors.Is(err, authority.ErrTokenUsed):
		return "authority: token already used"
	case errors.As(err, &vr):
		return "authority: " + vr.Message
	case errors.Is(err, errNodeDown):
		return "node down"
	}
	msg := err.Error()
	if len(msg) > 80 {
		msg = msg[:80] + "…"
	}
	return msg
}

func (r *runner) flowEvent(ctx context.Context, e scenario.Event) EventResult {
	from, _ := scenario.ParseAgentRef(e.From)
	to, _ := scenario.ParseDest(e.To)
	before := r.received(to)
	t0 := time.Now()
	err := r.attempt(ctx, from, to)
	el := r.since(t0)
	er := EventResult{TimeToBlock: el}
	if err != nil {
		time.Sleep(r.wall(leakWait))
		er.Outcome, er.Reason = "blocked", refusal(err)
		er.Observed = fmt.Sprintf("%s → %s blocked in %s (%s)", from, to, fmtDur(el), er.Reason)
	} else {
		er.Outcome = "allowed"
		er.Observed = fmt.Sprintf("%s → %s allowed; answered in %s", from, to, fmtDur(el))
	}
	if err != nil || e.Expect.Outcome == "blocked" {
		// Bytes that reached the target count as leaked where a block was expected.
		er.LeakedBytes = r.received(to) - before
	}
	judge(&er, e.Expect)
	return er
}

// attempt opens a flow from → to and exchanges a line. When from's node also serves to's zone
// (a node shared by two zones), the agent's record is pushed over that zone's tunnel directly,
// as a compromised shared node could: the SDK would refuse it locally.
func (r *runner) attempt(ctx context.Context, from scenario.AgentRef, to scenario.Dest) error {
	if from.Zone != to.Zone {
		a, fn, err := r.agent(from)
		if err != nil {
			return err
		}
		if slices.Contains(fn.zones(), to.Zone) {
			ctx, cancel := context.WithTimeout(ctx, r.wall(5*time.Second))
			defer cancel()
			t, err := a.Node().Tunnel(ctx, r.agentAt[to.AgentRef.String()], to.Zone)
			if err != nil {
				return err
			}
			rec, err := a.Record(t, dtl.Destination{Agent: to.Agent, Port: to.Port, Proto: dtl.ProtoTCP})
			if err != nil {
				return err
			}
			return r.openAndSend(ctx, t, rec)
		}
	}
	return r.exchange(ctx, from, to, attackMarker+"flow\n")
}

// openAndSend opens a flow with rec and, were it admitted, sends a line on it.
func (r *runner) openAndSend(ctx context.Context, t *tunnel.Tunnel, rec []byte) error {
	fc, err := t.OpenFlow(ctx, rec, nil, nil)
	if err != nil {
		return err
	}
	_, _ = fc.Write([]byte(attackMarker + "flow\n"))
	buf := make([]byte, 5)
	_ = fc.SetReadDeadline(time.Now().Add(r.wall(time.Second)))
	_, _ = io.ReadFull(fc, buf)
	_ = fc.Close()
	return nil
}

// step runs one refused-or-not attempt of a composite event against target.
func (r *runner) step(what string, target scenario.Dest, want error, attempt func() error) Step {
	before := r.received(target)
	t0 := time.Now()
	err := attempt()
	el := r.since(t0)
	time.Sleep(r.wall(leakWait))
	s := Step{What: what, Time: el, Leaked: r.received(target) - before, Outcome: "allowed", Expected: refusalName(want)}
	if err != nil {
		s.Outcome, s.Reason = "blocked", refusal(err)
		if !errors.Is(err, want) {
			s.Reason += " (expected " + refusalName(want) + ")"
		}
	}
	return s
}

func refusalName(err error) string {
	switch {
	case errors.Is(err, dtl.ErrReplay):
		return "replay"
	case errors.Is(err, dtl.ErrSignature):
		return "signature"
	case errors.Is(err, dtl.ErrChain):
		return "chain"
	}
	return err.Error()
}

// composite folds steps into an event result: blocked only if every step was.
func composite(steps []Step, x scenario.Expect) EventResult {
	er := EventResult{Steps: steps, Outcome: "blocked"}
	var parts []string
	for _, s := range steps {
		if s.Outcome != "blocked" {
			er.Outcome = "allowed"
		}
		er.TimeToBlock = max(er.TimeToBlock, s.Time)
		er.LeakedBytes += s.Leaked
		parts = append(parts, fmt.Sprintf("%s: %s", s.What, orStr(s.Reason, s.Outcome)))
	}
	er.Observed = strings.Join(parts, "; ")
	if len(steps) > 0 {
		er.Reason = steps[len(steps)-1].Reason
	}
	judge(&er, x)
	return er
}

func orStr(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

// replayEvent captures a DTL record of an admitted flow and replays it on its own session, on a
// new session between the same nodes, and (with via) from another node of the zone: the stolen
// session of the seed's first scenario.
func (r *runner) replayEvent(ctx context.Context, e scenario.Event) EventResult {
	from, _ := scenario.ParseAgentRef(e.From)
	to, _ := scenario.ParseDest(e.To)
	fail := func(format string, args ...any) EventResult {
		er := EventResult{Outcome: "not run", Failure: fmt.Sprintf(format, args...)}
		er.Observed = er.Failure
		return er
	}
	a, _, err := r.agent(from)
	if err != nil {
		return fail("%v", err)
	}
	ctx, cancel := context.WithTimeout(ctx, r.wall(15*time.Second))
	defer cancel()
	dstNode := r.agentAt[to.AgentRef.String()]
	t1, err := a.Node().Tunnel(ctx, dstNode, to.Zone)
	if err != nil {
		return fail("tunnel for the original flow: %v", err)
	}
	dst := dtl.Destination{Agent: to.Agent, Port: to.Port, Proto: dtl.ProtoTCP}
	rec, err := a.Record(t1, dst)
	if err != nil {
		return fail("record: %v", err)
	}
	fc, err := t1.OpenFlow(ctx, rec, nil, nil)
	if err != nil {
		return fail("the original flow was refused, so there is nothing to replay: %v", err)
	}
	_ = fc.Close()
	steps := []Step{r.step("same session", to, dtl.ErrReplay, func() error { return r.openAndSend(ctx, t1, rec) })}
	// Closing the session ends the legitimate flows on it too: the runner did that, not a
	// defence, so flows spanning it are excused (epoch), not counted as false denials.
	r.bump()
	_ = t1.Close()
	<-t1.Done()
	r.bump()
	steps = append(steps, r.step("new session", to, dtl.ErrSignature, func() error {
		t2, err := a.Node().Tunnel(ctx, dstNode, to.Zone)
		if err != nil {
			return err
		}
		return r.openAndSend(ctx, t2, rec)
	}))
	r.bump()
	if e.Via != "" {
		steps = append(steps, r.step("from node "+e.Via, to, dtl.ErrSignature, func() error {
			r.mu.RLock()
			d := r.nodes[e.Via].d
			r.mu.RUnlock()
			if d == nil {
				return fmt.Errorf("%w: %s", errNodeDown, e.Via)
			}
			tv, err := d.Node().Tunnel(ctx, dstNode, to.Zone)
			if err != nil {
				return err
			}
			return r.openAndSend(ctx, tv, rec)
		}))
	}
	return composite(steps, e.Expect)
}

func (r *runner) tokenReuseEvent(ctx context.Context, e scenario.Event) EventResult {
	n := r.node(e.Node)
	ctx, cancel := context.WithTimeout(ctx, r.wall(15*time.Second))
	defer cancel()
	t0 := time.Now()
	mallory := fmt.Sprintf("mallory-%d", time.Now().UnixNano()%1e6)
	_, err := node.Join(ctx, node.JoinParams{Dir: filepath.Join(r.dir, "attacker", mallory), Authority: r.authAddr, Token: n.token,
		Name: mallory, Region: n.group.Region, HostFingerprint: hostFingerprint(mallory)})
	er := EventResult{TimeToBlock: r.since(t0)}
	if err != nil {
		er.Outcome, er.Reason = "blocked", refusal(err)
		er.Observed = fmt.Sprintf("node %s's join token presented by another host: %s in %s", e.Node, er.Reason, fmtDur(er.TimeToBlock))
	} else {
		er.Outcome = "allowed"
		er.Observed = fmt.Sprintf("node %s's join token was accepted a second time", e.Node)
	}
	judge(&er, e.Expect)
	return er
}

// forgedEvent: node via signs an agent certificate for a zone it does not hold and sends a
// flow with it over a tunnel it does hold to the target's node.
func (r *runner) forgedEvent(ctx context.Context, e scenario.Event) EventResult {
	to, _ := scenario.ParseDest(e.To)
	fv := r.node(e.Via)
	r.mu.RLock()
	d := fv.d
	r.mu.RUnlock()
	if d == nil {
		return EventResult{Outcome: "not run", Failure: "node " + e.Via + " is down", Observed: "node " + e.Via + " is down"}
	}
	n := d.Node()
	dstNode := r.node(r.agentAt[to.AgentRef.String()])
	var zone string
	for _, z := range fv.zones() {
		if slices.Contains(dstNode.zones(), z) {
			zone = z
			break
		}
	}
	step := r.step(fmt.Sprintf("agent certificate for zone %s signed by node %s, sent on its %s tunnel", e.Zone, e.Via, zone), to, dtl.ErrChain, func() error {
		sd, err := state.Open(fv.dir)
		if err != nil {
			return err
		}
		// The node's own issuing key, the one that may sign agents: only its zones and slices are
		// its to grant.
		issuer, key, err := sd.NodeIssuer()
		if err != nil {
			return err
		}
		forged, agentKey, err := attack.ForgeAgentCert(issuer, key, e.Zone, "mallory", forgedIP(r.sc, e.Zone))
		if err != nil {
			return err
		}
		ctx, cancel := context.WithTimeout(ctx, r.wall(10*time.Second))
		defer cancel()
		t, err := n.Tunnel(ctx, dstNode.name, zone)
		if err != nil {
			return err
		}
		rec, err := dtl.Sign(&dtl.Claims{
			Zone: e.Zone, Agent: forged.ID.String(), Chain: &dtl.CertChain{Node: issuer.Raw(), Agent: forged.Raw()},
			Node: n.ID().String(), Fingerprint: forged.Claims.Fingerprint, Region: n.Region(), Trust: 100,
			Destination: dtl.Destination{Agent: to.Agent, Port: to.Port, Proto: dtl.ProtoTCP}, FlowID: t.NewFlowID(), Seq: 1 << 40, IssuedAt: time.Now(),
		}, agentKey, t.Exporter())
		if err != nil {
			return err
		}
		return r.openAndSend(ctx, t, rec)
	})
	return composite([]Step{step}, e.Expect)
}

// forgedIP is an address inside zone's CIDR for the forged certificate.
func forgedIP(sc *scenario.Scenario, zone string) netip.Addr {
	for _, z := range sc.Zones {
		if z.Name == zone {
			p := netip.MustParsePrefix(z.CIDR)
			a := p.Addr()
			for range 77 {
				if n := a.Next(); p.Contains(n) {
					a = n
				}
			}
			return a
		}
	}
	return netip.Addr{}
}

// revokeEvent revokes a subject at the authority, hands the signed record to one live member
// (as the authority's watch would) and measures gossip carrying it to every other live member
// that can be reached.
func (r *runner) revokeEvent(ctx context.Context, e scenario.Event) EventResult {
	var is issued
	var label string
	if e.Agent != "" {
		ref, _ := scenario.ParseAgentRef(e.Agent)
		is = issued{subject: r.agentID(ref), zones: []string{ref.Zone}}
		label = "agent " + ref.String()
	} else {
		n := r.node(e.Node)
		is = issued{subject: r.nodeID(n.name), zones: n.zones(), node: n.name}
		label = "node " + n.name
	}
	rev, err := r.auth.RevokeSubject(ctx, is.subject, "ute sim: "+e.Label())
	if err != nil || rev.Record == nil {
		er := EventResult{Outcome: "not run", Failure: fmt.Sprintf("the authority did not revoke %s: %v", is.subject, err)}
		er.Observed = er.Failure
		return er
	}
	is.raw = rev.Record
	r.mu.Lock()
	r.revoked[is.subject] = true
	r.records = append(r.records, is)
	r.gen++
	r.mu.Unlock()
	members := r.holders(is)
	var seed *simNode
	for _, m := range members {
		if m.name != is.node && (seed == nil || r.isHub(seed) && !r.isHub(m)) {
			seed = m
		}
		if seed != nil && !r.isHub(seed) {
			break
		}
	}
	if seed == nil {
		er := EventResult{Outcome: "not run", Failure: "no live member of " + strings.Join(is.zones, ",") + " to receive the record"}
		er.Observed = er.Failure
		return er
	}
	// Only the members the seed can reach are expected to converge now; the others catch up at
	// the heal.
	r.mu.Lock()
	side := r.side[seed.name]
	r.records[len(r.records)-1].side = side
	r.mu.Unlock()
	r.mu.RLock()
	var reach []*simNode
	for _, m := range members {
		if r.side[m.name] == side {
			reach = append(reach, m)
		}
	}
	r.mu.RUnlock()
	// The progress lines' counters and the socket trace start before the record is handed over:
	// at 1,000 nodes a snapshot taken after it was once finished only after most of the spread.
	w := r.watchSpread()
	defer w.stop()
	t0 := time.Now()
	if _, err := seed.d.Accept(ctx, is.raw, daemon.FromAuthority); err != nil {
		er := EventResult{Outcome: "not run", Failure: fmt.Sprintf("node %s refused the authority's record: %v", seed.name, err)}
		er.Observed = er.Failure
		return er
	}
	er := r.converge(ctx, t0, w, []issued{is}, reach, e.Expect)
	er.Observed = fmt.Sprintf("%s revoked (record seq %d); ", label, rev.Seq) + er.Observed
	if len(reach) < len(members) {
		er.Observed += fmt.Sprintf(" (%d member(s) across the partition wait for the heal)", len(members)-len(reach))
	}
	return er
}

// isHub reports whether n is a zone's hub in a staggered start: every node joined through it,
// so its re-broadcast queue is the last to drain, and a record handed to it first waits behind
// that queue (measured at 1,000 nodes: the record never left it). The authority's watch would
// hand a record to every node; the runner hands it to one, so it picks one that is not a hub.
func (r *runner) isHub(n *simNode) bool {
	for _, h := range r.hubs {
		if h == n {
			return true
		}
	}
	return false
}

// holders is the live members that must hold record is: live nodes of its zones, without the
// revoked node itself.
func (r *runner) holders(is issued) []*simNode {
	var out []*simNode
	for _, n := range r.members("") {
		if n.name == is.node {
			continue
		}
		for _, z := range is.zones {
			if slices.Contains(n.zones(), z) {
				out = append(out, n)
				break
			}
		}
	}
	return out
}

// converge polls members until each holds every record in recs.
func (r *runner) converge(ctx context.Context, t0 time.Time, w *spreadWatch, recs []issued, members []*simNode, x scenario.Expect) EventResult {
	subjects := make([]string, len(recs))
	for i, is := range recs {
		subjects[i] = is.subject
	}
	return r.convergeWith(ctx, t0, w, func(_ *simNode, d *daemon.Daemon) (bool, time.Time) {
		return heldAt(d, subjects)
	}, members, x)
}

// heldAt reports whether d holds a record for every subject, and when the last of them took
// effect there (revstore's Entry.Held, the node's own clock): the time a member got a record is
// read from the member, not from the runner's poll, whose first pass over 1,000 members took
// 0.52 s of simulated time on a saturated 2-core machine (docs/benchmarks.md).
func heldAt(d *daemon.Daemon, subjects []string) (bool, time.Time) {
	var last time.Time
	st := d.Store()
	for _, sub := range subjects {
		e, ok := st.Lookup(sub) // a record's key is its subject's canonical key
		if !ok {
			return false, time.Time{}
		}
		if e.Held.After(last) {
			last = e.Held
		}
	}
	return true, last
}

// convergeWith polls members until holds is true of each, recording the fraction of members
// for which it is over time. A member's time is the one holds reports (its own record of when
// it took what the event spread), or, when holds reports none, the end of the poll pass that
// first saw it; times before t0 count as 0.
func (r *runner) convergeWith(ctx context.Context, t0 time.Time, w *spreadWatch, holds func(*simNode, *daemon.Daemon) (bool, time.Time), members []*simNode, x scenario.Expect) EventResult {
	er := EventResult{Members: len(members), Expectation: fmt.Sprintf("%.0f%% of live members within %s", x.Converged*100, fmtDur(x.Within.D()))}
	limit := x.Within.D() + x.Within.D()/2 + time.Second
	have := make([]bool, len(members))
	at := make([]time.Duration, len(members)) // per member that holds it, simulated time since t0
	whens := make([]time.Time, len(members))  // what holds reported, for the pass that found it
	count := 0
	var el time.Duration
	// With progress on, a line a simulated second: the gossip counters of every live node since
	// the convergence began (what was sent, dropped, re-queued), so that a stalled spread says why.
	if w == nil {
		w = r.watchSpread()
		defer w.stop()
	}
	nextLine := time.Second
	for {
		var found []int // the members this pass found
		for i, m := range members {
			if have[i] {
				continue
			}
			d := r.daemonOf(m)
			if d == nil {
				continue
			}
			if ok, when := holds(m, d); ok {
				have[i], whens[i] = true, when
				found = append(found, i)
				count++
			}
		}
		el = r.since(t0)
		for _, i := range found {
			at[i] = el
			if !whens[i].IsZero() {
				at[i] = max(0, whens[i].Sub(t0)/r.k)
			}
		}
		frac := 1.0
		if len(members) > 0 {
			frac = float64(count) / float64(len(members))
		}
		done := frac >= 1 || el > limit || ctx.Err() != nil
		if r.progress != nil && (el >= nextLine || done) {
			nextLine = el.Truncate(time.Second) + time.Second
			line := r.spreadSnapshot().line(w.base, el, frac)
			if frac < 1 && len(members)-count <= 5 {
				line += "; " + r.stragglerTunnels(members, have)
			}
			r.say("%s", line)
			if done && frac >= 1 {
				r.say("  %s", r.lastMembers(t0, members, at, 3))
			}
		}
		if done {
			break
		}
		time.Sleep(2 * time.Millisecond)
	}
	var times []time.Duration
	for i, h := range have {
		if h {
			times = append(times, at[i])
		}
	}
	er.Curve = curveOf(times, len(members), el)
	reached, ok := reachedAt(er.Curve, x.Converged)
	final := er.Curve[len(er.Curve)-1]
	er.TimeToBlock = reached
	switch {
	case final.Fraction >= 1:
		er.Outcome = "converged"
		er.Observed = fmt.Sprintf("100%% of %d member(s) held the record(s) after %s", len(members), fmtDur(final.T))
	case ok:
		er.Outcome = "converged"
		er.Observed = fmt.Sprintf("%.1f%% of %d member(s) after %s (%.0f%% reached at %s)", final.Fraction*100, len(members), fmtDur(final.T), x.Converged*100, fmtDur(reached))
	default:
		er.Outcome = "partial"
		er.Observed = fmt.Sprintf("only %.1f%% of %d member(s) held the record(s) after %s", final.Fraction*100, len(members), fmtDur(final.T))
	}
	if final.Fraction < 1 {
		er.Observed += "; " + r.stragglers(members, have)
	}
	er.Model = predict(len(members), r.fanout(), r.interval(), final.T)
	er.Pass = true
	switch {
	case er.Outcome != "converged":
		er.Pass, er.Failure = false, fmt.Sprintf("%.0f%% expected within %s", x.Converged*100, fmtDur(x.Within.D()))
	case reached > x.Within.D():
		er.Pass, er.Failure = false, fmt.Sprintf("%.0f%% took %s, expected within %s", x.Converged*100, fmtDur(reached), fmtDur(x.Within.D()))
	}
	return er
}

// spreadWatch is what one convergence's progress lines compare with: every live node's gossip
// counters when it began, and the socket trace, on from then until stop (the last members' line
// says where their packets waited: socketTrace). Without progress it does nothing.
type spreadWatch struct {
	r    *runner
	base spreadSnap
	on   bool
}

func (r *runner) watchSpread() *spreadWatch {
	w := &spreadWatch{r: r}
	if r.progress != nil {
		w.base = r.spreadSnapshot()
		r.net.trace(true)
		w.on = true
	}
	return w
}

func (w *spreadWatch) stop() {
	if w.on {
		w.r.net.trace(false)
		w.on = false
	}
}

// curveOf is the fraction of n members over time, one step per member time (members at the same
// time make one step); with no member holding it, one point at 0 % at end, the time waited.
func curveOf(times []time.Duration, n int, end time.Duration) []CurvePoint {
	if n == 0 {
		return []CurvePoint{{T: 0, Fraction: 1}}
	}
	if len(times) == 0 {
		return []CurvePoint{{T: end, Fraction: 0}}
	}
	sorted := slices.Clone(times)
	slices.Sort(sorted)
	var curve []CurvePoint
	for i, t := range sorted {
		p := CurvePoint{T: t, Fraction: float64(i+1) / float64(n)}
		if k := len(curve); k > 0 && curve[k-1].T == t {
			curve[k-1] = p
			continue
		}
		curve = append(curve, p)
	}
	return curve
}

// reachedAt is when curve first reached frac of its members, and whether it did.
func reachedAt(curve []CurvePoint, frac float64) (time.Duration, bool) {
	for _, p := range curve {
		if p.Fraction >= frac {
			return p.T, true
		}
	}
	return 0, false
}

// stragglers names a few members that never held what the event waited for, and how many of
// the others had them in their member lists (a member that most others hold as failed gets no
// gossip until it refutes).
func (r *runner) stragglers(members []*simNode, have []bool) string {
	var names []string
	for i, m := range members {
		if !have[i] {
			names = append(names, m.name)
		}
	}
	out := "missing: " + abbreviate(names)
	if len(names) > 3 {
		return out
	}
	for _, name := range names {
		id, known := r.nodeID(name), 0
		for _, m := range members {
			d := r.daemonOf(m)
			if d == nil || m.name == name {
				continue
			}
			for _, z := range m.zones() {
				if slices.ContainsFunc(d.Members(z), func(x membership.Member) bool { return x.NodeID == id }) {
					known++
					break
				}
			}
		}
		out += fmt.Sprintf("; %s listed by %d of %d", name, known, len(members)-1)
	}
	return out
}

// stragglerTunnels names the members still without the record, each with the tunnels it holds
// open and how many of those lead to a member that has the record: a straggler with no tunnel to
// a holder waits for a gossip round's handshake, one with such a tunnel waits for a packet.
func (r *runner) stragglerTunnels(members []*simNode, have []bool) string {
	holds := make(map[string]bool, len(members))
	for i, m := range members {
		if have[i] {
			holds[r.nodeID(m.name)] = true
		}
	}
	var parts []string
	for i, m := range members {
		if have[i] {
			continue
		}
		d := r.daemonOf(m)
		if d == nil || d.Node() == nil {
			parts = append(parts, m.name+" (down)")
			continue
		}
		open, toHolder := 0, 0
		for _, t := range d.Node().Endpoint().Tunnels() {
			open++
			if holds[t.Peer().NodeID] {
				toHolder++
			}
		}
		parts = append(parts, fmt.Sprintf("%s (%d tunnels, %d to holders)", m.name, open, toHolder))
	}
	return "waiting: " + strings.Join(parts, ", ")
}

// arrival is "; the packet that brought it arrived at T, left the worker's queue at U" for a member whose last new record came
// in a gossip packet after t0 (membership.Stats.LastGossipArrival; in the benchmark the one
// record of the spread), else "": a packet that arrived long before the member held the record
// waited in this member for its worker, one that arrived late waited on its way.
func (r *runner) arrival(d *daemon.Daemon, t0 time.Time) string {
	m := d.Gossip()
	if m == nil {
		return ""
	}
	st := m.Stats()
	a := st.LastGossipArrival
	if a.IsZero() || a.Before(t0) {
		return ""
	}
	return "; the packet that brought it arrived at " + fmtDur(a.Sub(t0)/r.k) + ", left the worker's queue at " + fmtDur(st.LastGossipDequeued.Sub(t0)/r.k)
}

// lastMembers names the n members that took the longest, for the progress output of a
// completed spread: when each got it; of the members its tunnels lead to now, how many held it
// and the earliest and median time they did; and from when one of those tunnels was open while
// its peer held it (a tunnel's open time is its registration at this end). A last member that
// had such a tunnel long before it took the record waited for packets on their way (a sender's
// flood, the network, its own CPU); one whose first such tunnel came just before waited for a
// tunnel; one with none waited for a gossip round's dial or a push/pull. Tunnels that closed
// before the end are not seen.
func (r *runner) lastMembers(t0 time.Time, members []*simNode, at []time.Duration, n int) string {
	byID := make(map[string]time.Duration, len(members))
	order := make([]int, len(members))
	for i, m := range members {
		byID[r.nodeID(m.name)] = at[i]
		order[i] = i
	}
	slices.SortFunc(order, func(a, b int) int { return cmp.Compare(at[b], at[a]) })
	var parts []string
	for _, i := range order[:min(n, len(order))] {
		m := members[i]
		d := r.daemonOf(m)
		if d == nil || d.Node() == nil {
			parts = append(parts, fmt.Sprintf("%s at %s (down)", m.name, fmtDur(at[i])))
			continue
		}
		var peers []time.Duration
		open := 0
		first := time.Duration(-1) // earliest moment a tunnel to a holder was open
		holders := map[netip.AddrPort]time.Duration{}
		for _, t := range d.Node().Endpoint().Tunnels() {
			open++
			p, ok := byID[t.Peer().NodeID]
			if !ok {
				continue
			}
			if u, ok := t.RemoteAddr().(*net.UDPAddr); ok {
				ap := u.AddrPort()
				holders[netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())] = p
			}
			peers = append(peers, p)
			since := max(p, t.Opened().Sub(t0)/r.k)
			if first < 0 || since < first {
				first = since
			}
		}
		if len(peers) == 0 {
			parts = append(parts, fmt.Sprintf("%s at %s (%d tunnels, none to a member)", m.name, fmtDur(at[i]), open))
			continue
		}
		slices.Sort(peers)
		parts = append(parts, fmt.Sprintf("%s at %s (%d tunnels; %d to members, who held it from %s, median %s; a tunnel to a holder from %s%s%s)",
			m.name, fmtDur(at[i]), open, len(peers), fmtDur(peers[0]), fmtDur(peers[len(peers)/2]), fmtDur(first), r.arrival(d, t0),
			r.socketTrace(m.addr, holders, t0, at[i])))
	}
	return "last: " + strings.Join(parts, "; ")
}

// socketTrace is "; its socket read N packets by T, the longest after W in its queue; from
// members holding it: S B sent at A, in the queue at B, read at C, …" for a member at addr that
// took the record at `until`, from the network's trace of the spread (memnet.Trace; "" on real
// UDP). holders maps the underlay address of each tunnel's peer to when that peer held the
// record; the packets listed are the first few from those peers sent after they held it and
// larger than an ACK: the sender's flood has left it when it is sent, the link's delay is sent to
// queued, and this member's QUIC read loop took it at read. A record packet read long before the
// member held the record waited in this member's QUIC, tunnel or worker goroutines; one sent
// late waited at its sender.
func (r *runner) socketTrace(addr netip.AddrPort, holders map[netip.AddrPort]time.Duration, t0 time.Time, until time.Duration) string {
	tr := r.net.traced(addr)
	if len(tr) == 0 {
		return ""
	}
	rel := func(t time.Time) time.Duration { return t.Sub(t0) / r.k }
	const minSize = 200 // an ACK-only QUIC packet is well below this, a record's datagram above
	read, longest := 0, time.Duration(0)
	var listed []string
	for _, p := range tr {
		if rel(p.Read) > until {
			break
		}
		read++
		longest = max(longest, p.Read.Sub(p.Queued)/r.k)
		held, ok := holders[p.From]
		if !ok || p.Size < minSize || rel(p.Sent) < held || len(listed) == 3 {
			continue
		}
		listed = append(listed, fmt.Sprintf("%d B sent at %s, in the queue at %s, read at %s", p.Size, fmtDur(rel(p.Sent)), fmtDur(rel(p.Queued)), fmtDur(rel(p.Read))))
	}
	out := fmt.Sprintf("; its socket read %d packets by then, the longest after %s in its queue", read, fmtDur(longest))
	if len(listed) > 0 {
		out += "; from members holding it: " + strings.Join(listed, "; ")
	}
	return out
}

func (r *runner) fanout() int { return r.simTiming.GossipNodes }

// interval is the gossip interval in simulated time.
func (r *runner) interval() time.Duration { return r.simTiming.GossipInterval }

func (r *runner) partitionEvent(e scenario.Event) EventResult {
	var sets [][]netip.AddrPort
	side := map[string]int{}
	var parts []string
	for i, set := range e.Sets {
		var addrs []netip.AddrPort
		var names []string
		for _, name := range set {
			for _, n := range r.order {
				if n == name || r.groupOf[n] == name {
					addrs = append(addrs, r.nodes[n].addr)
					side[n] = i + 1
					names = append(names, n)
				}
			}
		}
		sets = append(sets, addrs)
		parts = append(parts, fmt.Sprintf("{%s}", abbreviate(names)))
	}
	r.net.partition(sets...)
	r.mu.Lock()
	r.side = side
	r.gen++
	r.mu.Unlock()
	return EventResult{Outcome: "done", Pass: true, Expectation: "—", Observed: "underlay split: " + strings.Join(parts, " | ") + " | rest"}
}

func abbreviate(names []string) string {
	if len(names) <= 4 {
		return strings.Join(names, ",")
	}
	return fmt.Sprintf("%s,%s … %s (%d)", names[0], names[1], names[len(names)-1], len(names))
}

// healEvent ends the partition and measures every live member catching up on every record
// issued so far (push/pull and re-broadcast).
func (r *runner) healEvent(ctx context.Context, e scenario.Event) EventResult {
	r.net.heal()
	r.mu.Lock()
	r.side = map[string]int{}
	r.gen++
	recs := slices.Clone(r.records)
	r.mu.Unlock()
	return r.catchUp(ctx, recs, nil, e.Expect, "partition healed; ")
}

// catchUp measures the live members (or only), each holding the records of its zones.
func (r *runner) catchUp(ctx context.Context, recs []issued, only *simNode, x scenario.Expect, prefix string) EventResult {
	t0 := time.Now()
	// Each member must hold the records of its own zones: converge per record set.
	seen := map[string]bool{}
	var members []*simNode
	for _, is := range recs {
		for _, m := range r.holders(is) {
			if (only == nil || m == only) && !seen[m.name] {
				seen[m.name] = true
				members = append(members, m)
			}
		}
	}
	if len(recs) == 0 {
		return EventResult{Outcome: "converged", Pass: true, Expectation: "—", Observed: prefix + "no revocation issued yet, nothing to catch up"}
	}
	er := r.convergeEach(ctx, t0, recs, members, x)
	er.Observed = prefix + er.Observed
	return er
}

// convergeEach is converge where each member needs only the records of its zones.
func (r *runner) convergeEach(ctx context.Context, t0 time.Time, recs []issued, members []*simNode, x scenario.Expect) EventResult {
	subjects := map[*simNode][]string{}
	for _, is := range recs {
		for _, m := range r.holders(is) {
			subjects[m] = append(subjects[m], is.subject)
		}
	}
	var wrapped []*simNode
	for _, m := range members {
		if len(subjects[m]) > 0 {
			wrapped = append(wrapped, m)
		}
	}
	return r.convergeWith(ctx, t0, nil, func(m *simNode, d *daemon.Daemon) (bool, time.Time) {
		return heldAt(d, subjects[m])
	}, wrapped, x)
}

func (r *runner) crashEvent(e scenario.Event) EventResult {
	n := r.node(e.Node)
	r.crash(n)
	r.bump()
	return EventResult{Outcome: "done", Pass: true, Expectation: "—", Observed: "node " + n.name + " stopped (daemon closed, socket gone)"}
}

// rejoinEvent starts a crashed node again on its directory with a few live members of its zones
// as static peers, and measures it catching up on the records issued while it was down.
func (r *runner) rejoinEvent(ctx context.Context, e scenario.Event) EventResult {
	n := r.node(e.Node)
	var peers []config.Peer
	for _, z := range n.zones() {
		for _, m := range r.live(z) {
			if len(peers) >= 3*len(n.zones()) {
				break
			}
			peers = append(peers, config.Peer{Node: r.nodeID(m.name), Addr: m.addr})
		}
	}
	t0 := time.Now()
	if err := r.startWith(ctx, n, peers); err != nil {
		return EventResult{Outcome: "not run", Failure: err.Error(), Observed: err.Error()}
	}
	if err := r.startServersOf(n.name); err != nil {
		return EventResult{Outcome: "not run", Failure: err.Error(), Observed: err.Error()}
	}
	r.bump()
	r.mu.RLock()
	recs := slices.Clone(r.records)
	r.mu.RUnlock()
	started := r.since(t0)
	er := r.catchUp(ctx, recs, n, e.Expect, fmt.Sprintf("node %s restarted in %s; ", n.name, fmtDur(started)))
	return er
}

func fmtDur(d time.Duration) string {
	switch {
	case d >= 10*time.Second:
		return d.Round(100 * time.Millisecond).String()
	case d >= time.Second:
		return d.Round(10 * time.Millisecond).String()
	case d >= time.Millisecond:
		return d.Round(100 * time.Microsecond).String()
	}
	return d.Round(time.Microsecond).String()
}
