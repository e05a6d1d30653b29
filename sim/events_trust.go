package sim

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/ute-project/ute/node/config"
	"github.com/ute-project/ute/node/daemon"
	"github.com/ute-project/ute/sim/scenario"
	"github.com/ute-project/ute/zones"
)

// duplicateConfirm is how long the simulated nodes wait before they count a node ID live at
// two underlay addresses as a duplicate (daemon.Options.DuplicateConfirm; 45 s by default, so
// that a peer restarted on another port is not its own duplicate). Simulated nodes restart on
// the same address, so the run can confirm in seconds.
const duplicateConfirm = 2 * time.Second

// retryEvery is how often a drift or copy event retries its flow until it is refused.
const retryEvery = 50 * time.Millisecond

// clone is a second host running a copied node directory.
type clone struct {
	d    *daemon.Daemon
	conn net.PacketConn
}

func notRun(format string, args ...any) EventResult {
	er := EventResult{Outcome: "not run", Failure: fmt.Sprintf(format, args...)}
	er.Observed = er.Failure
	return er
}

// untilRefused runs attempt every retryEvery until it fails or the expectation's time (plus a
// second) has passed, and reports the first refusal, the time since t0 and the bytes that
// reached the target meanwhile.
func (r *runner) untilRefused(ctx context.Context, t0 time.Time, x scenario.Expect, target scenario.Dest, attempt func() error) (el time.Duration, leaked int64, tries int, err error) {
	before := r.received(target)
	limit := x.Within.D() + time.Second
	for {
		tries++
		if err = attempt(); err != nil || r.since(t0) > limit || ctx.Err() != nil {
			break
		}
		time.Sleep(r.wall(retryEvery))
	}
	el = r.since(t0)
	time.Sleep(r.wall(leakWait))
	return el, r.received(target) - before, tries, err
}

// regionDriftEvent writes the node's region file (what a provisioning hook writes when the
// node now runs elsewhere): TrustFlow's region signal lowers the node's and its agents' trust,
// and the node isolates itself. The observation is a flow from one of its agents, retried
// until it is refused.
func (r *runner) regionDriftEvent(ctx context.Context, e scenario.Event) EventResult {
	n := r.node(e.Node)
	to, _ := scenario.ParseDest(e.To)
	from, ok := r.agentOf(n, e.From, to.Zone)
	if !ok {
		return notRun("node %s runs no agent", n.name)
	}
	if err := os.WriteFile(filepath.Join(n.dir, daemon.FileRegion), []byte(e.Region+"\n"), 0o600); err != nil {
		return notRun("region file: %v", err)
	}
	t0 := time.Now()
	// From now on the node's flows are expected to fail: not false denials.
	r.mu.Lock()
	r.revoked[r.nodeID(n.name)] = true
	r.gen++
	r.mu.Unlock()
	el, leaked, tries, err := r.untilRefused(ctx, t0, e.Expect, to, func() error {
		return r.exchange(ctx, from, to, attackMarker+"drift\n")
	})
	er := EventResult{TimeToBlock: el, LeakedBytes: leaked}
	if err != nil {
		er.Outcome, er.Reason = "blocked", refusal(err)
		er.Observed = fmt.Sprintf("node %s now in %s; %s → %s refused %s after the drift (%s), %d flow(s) passed before", n.name, e.Region, from, to, fmtDur(el), er.Reason, tries-1)
	} else {
		er.Outcome = "allowed"
		er.Observed = fmt.Sprintf("node %s now in %s; %s → %s still admitted after %s (%d flows)", n.name, e.Region, from, to, fmtDur(el), tries)
		r.mu.Lock()
		delete(r.revoked, r.nodeID(n.name)) // nothing changed: its traffic is legitimate again
		r.gen++
		r.mu.Unlock()
	}
	judge(&er, e.Expect)
	return er
}

// agentOf is the named agent, or the node's first agent in zone (or its first agent).
func (r *runner) agentOf(n *simNode, named, zone string) (scenario.AgentRef, bool) {
	if named != "" {
		ref, err := scenario.ParseAgentRef(named)
		return ref, err == nil
	}
	for _, a := range n.agents {
		if a.Zone == zone {
			return a, true
		}
	}
	if len(n.agents) > 0 {
		return n.agents[0], true
	}
	return scenario.AgentRef{}, false
}

// exeSwapEvent: a process that is not the agent's enrolled workload — this simulator, whose
// executable is not the stand-in file the agents were enrolled with — connects to the agent's
// HTTP proxy (the node runs the proxy interface) and asks for a flow to the target. Workload
// attestation must refuse it before anything is dialed.
func (r *runner) exeSwapEvent(ctx context.Context, e scenario.Event) EventResult {
	ref, _ := scenario.ParseAgentRef(e.Agent)
	to, _ := scenario.ParseDest(e.To)
	_, n, err := r.agent(ref)
	if err != nil {
		return notRun("%v", err)
	}
	d := r.daemonOf(n)
	var proxyAddr netip.AddrPort
	for _, p := range d.Proxies() {
		if p.Agent == ref.Agent && p.Zone == ref.Zone {
			proxyAddr = p.HTTP
		}
	}
	if !proxyAddr.IsValid() {
		return notRun("node %s serves no proxy for %s", n.name, ref)
	}
	before := r.received(to)
	t0 := time.Now()
	status, err := proxyConnect(ctx, proxyAddr, to.String())
	el := r.since(t0)
	time.Sleep(r.wall(leakWait))
	er := EventResult{TimeToBlock: el, LeakedBytes: r.received(to) - before}
	switch {
	case err != nil:
		er.Outcome, er.Reason = "blocked", err.Error()
	case status != "":
		er.Outcome, er.Reason = "blocked", status
	default:
		er.Outcome = "allowed"
	}
	exe, _ := os.Executable()
	if er.Outcome == "blocked" {
		er.Observed = fmt.Sprintf("%s used %s's proxy on node %s: %s in %s", filepath.Base(exe), ref, n.name, er.Reason, fmtDur(el))
	} else {
		er.Observed = fmt.Sprintf("%s used %s's proxy on node %s and reached %s", filepath.Base(exe), ref, n.name, to)
	}
	judge(&er, e.Expect)
	return er
}

// proxyConnect sends an HTTP CONNECT for target through the proxy at addr and, when it is
// answered 200, a marked line. It returns the refusal's status line ("" when connected).
func proxyConnect(ctx context.Context, addr netip.AddrPort, target string) (string, error) {
	var dialer net.Dialer
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	c, err := dialer.DialContext(ctx, "tcp", addr.String())
	if err != nil {
		return "", fmt.Errorf("proxy: %w", err)
	}
	defer func() { _ = c.Close() }()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", target, target); err != nil {
		return "", fmt.Errorf("proxy: %w", err)
	}
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
	if err != nil {
		return "", fmt.Errorf("proxy: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 200))
		_ = resp.Body.Close()
		return fmt.Sprintf("proxy answered %s: %s", resp.Status, strings.TrimSpace(string(body))), nil
	}
	if _, err := c.Write([]byte(attackMarker + "exe\n")); err != nil {
		return "", nil
	}
	buf := make([]byte, 5)
	_, _ = io.ReadFull(br, buf)
	return "", nil
}

// dirCopyEvent copies a node's directory to a second host and starts a daemon on it: the same
// node identity is then live at two underlay addresses. Both hosts open a tunnel to the
// target's node, whose TrustFlow duplicate check (after duplicateConfirm) isolates the
// identity. The observation is a flow from the copy's agent, retried until refused.
func (r *runner) dirCopyEvent(ctx context.Context, e scenario.Event) EventResult {
	n := r.node(e.Node)
	to, _ := scenario.ParseDest(e.To)
	from, _ := r.agentOf(n, e.From, to.Zone)
	r.mu.Lock()
	r.cloneNo++
	no := r.cloneNo
	orig := n.d
	r.mu.Unlock()
	if orig == nil {
		return notRun("node %s is down", n.name)
	}
	dir := filepath.Join(r.dir, "copies", fmt.Sprintf("%s-%d", n.name, no))
	if err := copyTree(n.dir, dir); err != nil {
		return notRun("copy %s: %v", n.dir, err)
	}
	addr, err := r.net.plan(len(r.order) + 1000 + no)
	if err != nil {
		return notRun("%v", err)
	}
	conn, err := r.net.listen(addr)
	if err != nil {
		return notRun("%v", err)
	}
	cfg := config.Default()
	cfg.Interface = config.InterfaceNetstack // the sim's agents live in its process
	for _, m := range r.live(to.Zone) {
		if m != n && len(cfg.Peers) < 3 {
			cfg.Peers = append(cfg.Peers, config.Peer{Node: r.nodeID(m.name), Addr: m.addr})
		}
	}
	t0 := time.Now()
	cd, err := daemon.Start(ctx, daemon.Options{Dir: dir, Config: cfg, PacketConn: conn, NoAuthority: true, Timing: r.timing,
		DuplicateConfirm: duplicateConfirm, Logger: r.opts.NodeLogger.With("node", n.name+"-copy")})
	if err != nil {
		_ = conn.Close()
		return notRun("the copy did not start: %v", err)
	}
	cd.Node().Endpoint().SetDialGate(nodeGate{r.gate, addr, r.net.reachable})
	r.mu.Lock()
	r.clones = append(r.clones, clone{cd, conn})
	r.revoked[r.nodeID(n.name)] = true // its flows are expected to be cut from now on
	r.gen++
	r.mu.Unlock()
	target := r.agentAt[to.AgentRef.String()]
	// Both hosts hold a tunnel to the target's node, dialed by them, as two running copies
	// would: the target counts only inbound tunnels as evidence of where a node is (an
	// outbound one only says where it dialed). Tunnels the target already has with the node
	// are closed first, so that the original's comes from its own dial.
	if tn := r.node(target); tn != nil && tn.d != nil {
		tn.d.Node().Endpoint().ClosePeer(r.nodeID(n.name))
	}
	tctx, cancel := context.WithTimeout(ctx, r.wall(10*time.Second))
	_, err1 := orig.Node().Tunnel(tctx, target, to.Zone)
	_, err2 := cd.Node().Tunnel(tctx, target, to.Zone)
	cancel()
	if err1 != nil || err2 != nil {
		return notRun("tunnels to %s: original: %v; copy: %v", target, err1, err2)
	}
	send := func() error {
		a, err := cd.Node().Agent(from.Zone, from.Agent)
		if err != nil {
			return err
		}
		ctx, cancel := context.WithTimeout(ctx, r.wall(3*time.Second))
		defer cancel()
		c, err := a.Relay().Dial(ctx, "tcp", to.String()) // a stand-in workload, as in exchange
		if err != nil {
			return err
		}
		defer func() { _ = c.Close() }()
		_ = c.SetDeadline(time.Now().Add(r.wall(3 * time.Second)))
		if _, err := c.Write([]byte(attackMarker + "copy\n")); err != nil {
			return err
		}
		buf := make([]byte, 5)
		if _, err := io.ReadFull(c, buf); err != nil {
			return fmt.Errorf("no answer: %w", err)
		}
		return nil
	}
	// Until the copy has learned the target's name from its peers (directory exchange), its
	// SDK refuses the name locally: that is the copy not being ready, not a defence.
	for ctx.Err() == nil && r.since(t0) < 10*time.Second {
		if err := send(); err == nil || !strings.Contains(refusal(err), "unknown-name") {
			break
		}
		time.Sleep(r.wall(retryEvery))
	}
	el, leaked, tries, err := r.untilRefused(ctx, t0, e.Expect, to, send)
	er := EventResult{TimeToBlock: el, LeakedBytes: leaked}
	if err != nil {
		er.Outcome, er.Reason = "blocked", refusal(err)
		er.Observed = fmt.Sprintf("node %s's directory running at %s too; the copy's %s → %s refused %s after it started (%s), %d flow(s) passed before",
			n.name, addr, from, to, fmtDur(el), er.Reason, tries-1)
	} else {
		er.Outcome = "allowed"
		er.Observed = fmt.Sprintf("node %s's directory running at %s too; the copy's flows to %s still admitted after %s", n.name, addr, to, fmtDur(el))
	}
	judge(&er, e.Expect)
	return er
}

// copyTree copies a directory as an attacker with read access would (files as they are now,
// while the original runs).
func copyTree(src, dst string) error {
	return filepath.WalkDir(src, func(path string, de fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(src, path)
		if err != nil {
			return err
		}
		out := filepath.Join(dst, rel)
		if de.IsDir() {
			return os.MkdirAll(out, 0o700)
		}
		if !de.Type().IsRegular() {
			return nil // sockets of the local API are not copied
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		return os.WriteFile(out, b, 0o600)
	})
}

// churnEvent crashes Count nodes of a group, keeps them down for Down, restarts them on their
// directories and waits until each has rejoined: it holds every record of its zones issued so
// far and sees every live member of its zones. Rounds times. Nodes that an event or a traffic
// flow names are never chosen, so that churn does not remove what the rest of the timeline
// needs.
func (r *runner) churnEvent(ctx context.Context, e scenario.Event) EventResult {
	rng := rand.New(rand.NewPCG(r.seed, uint64(e.Line())))
	keep := r.namedNodes()
	var worst *EventResult
	var parts []string
	for round := 1; round <= e.Rounds; round++ {
		var cands []*simNode
		for _, n := range r.live("") {
			if n.group.Name == e.Group && !keep[n.name] {
				cands = append(cands, n)
			}
		}
		if len(cands) < e.Count {
			return notRun("round %d: only %d node(s) of group %s can be restarted, %d asked", round, len(cands), e.Group, e.Count)
		}
		rng.Shuffle(len(cands), func(i, j int) { cands[i], cands[j] = cands[j], cands[i] })
		down := cands[:e.Count]
		slices.SortFunc(down, func(a, b *simNode) int { return strings.Compare(a.name, b.name) })
		var wg sync.WaitGroup
		for _, n := range down {
			wg.Go(func() { r.crash(n) })
		}
		wg.Wait()
		r.bump()
		time.Sleep(r.wall(e.Down.D()))
		t0 := time.Now()
		for _, n := range down {
			if err := r.restart(ctx, n); err != nil {
				return notRun("round %d: %v", round, err)
			}
		}
		r.bump()
		er := r.rejoined(ctx, t0, down, e.Expect)
		names := make([]string, len(down))
		for i, n := range down {
			names[i] = n.name
		}
		if er.Pass {
			parts = append(parts, fmt.Sprintf("round %d: %s restarted, rejoined in %s", round, abbreviate(names), fmtDur(er.TimeToBlock)))
		} else {
			parts = append(parts, fmt.Sprintf("round %d: %s restarted: %s", round, abbreviate(names), er.Observed))
		}
		// The result is the first failed round, or else the slowest.
		if worst == nil || (worst.Pass && (!er.Pass || er.TimeToBlock > worst.TimeToBlock)) {
			worst = &er
		}
	}
	worst.Model = nil // the gossip model describes one record spreading, not a node rejoining
	worst.Observed = strings.Join(parts, "; ")
	worst.Expectation = fmt.Sprintf("every restarted node rejoins within %s", fmtDur(e.Expect.Within.D()))
	return *worst
}

// namedNodes is the nodes that an event or a traffic flow names.
func (r *runner) namedNodes() map[string]bool {
	out := map[string]bool{}
	for _, e := range r.sc.Timeline {
		for _, n := range append([]string{e.Node, e.Via}, slices.Concat(e.Sets...)...) {
			out[n] = true
		}
		for _, ref := range []string{e.From, e.Agent} {
			if a, err := scenario.ParseAgentRef(ref); err == nil {
				out[r.agentAt[a.String()]] = true
			}
		}
		if d, err := scenario.ParseDest(e.To); err == nil {
			out[r.agentAt[d.AgentRef.String()]] = true
		}
	}
	for _, t := range r.sc.Traffic {
		if a, err := scenario.ParseAgentRef(t.From); err == nil {
			out[r.agentAt[a.String()]] = true
		}
		if d, err := scenario.ParseDest(t.To); err == nil {
			out[r.agentAt[d.AgentRef.String()]] = true
		}
	}
	return out
}

// restart starts a crashed node again with a few live members of its zones as static peers.
func (r *runner) restart(ctx context.Context, n *simNode) error {
	// Bootstrap peers it can reach: members on its side of any partition.
	r.mu.RLock()
	side := maps.Clone(r.side)
	r.mu.RUnlock()
	var peers []config.Peer
	for _, z := range n.zones() {
		k := 0
		for _, m := range r.members(z) {
			if k == 3 {
				break
			}
			if m != n && side[m.name] == side[n.name] {
				peers = append(peers, config.Peer{Node: r.nodeID(m.name), Addr: m.addr})
				k++
			}
		}
	}
	if err := r.startWith(ctx, n, peers); err != nil {
		return err
	}
	return r.startServersOf(n.name)
}

// rejoined waits until each node holds every record of its zones and sees every live member of
// its zones.
func (r *runner) rejoined(ctx context.Context, t0 time.Time, nodes []*simNode, x scenario.Expect) EventResult {
	r.mu.RLock()
	recs := slices.Clone(r.records)
	r.mu.RUnlock()
	// A record handed to one side of a partition that is still in place cannot reach the other.
	need := map[*simNode][]issued{}
	r.mu.RLock()
	side := maps.Clone(r.side)
	r.mu.RUnlock()
	for _, is := range recs {
		for _, m := range r.holders(is) {
			if len(side) == 0 || side[m.name] == is.side {
				need[m] = append(need[m], is)
			}
		}
	}
	// Holding here includes a full member list, which has no time of its own: the poll's counts.
	return r.convergeWith(ctx, t0, nil, func(m *simNode, d *daemon.Daemon) (bool, time.Time) {
		for _, is := range need[m] {
			if !d.Store().Revoked(is.subject) {
				return false, time.Time{}
			}
		}
		for _, z := range m.zones() {
			if len(d.Members(z)) < r.reachable(m, z) {
				return false, time.Time{}
			}
		}
		return true, time.Time{}
	}, nodes, x)
}

// policyEvent replaces a zone's rules: the authority signs the next policy release, one live
// node receives it (as the watch would deliver it) and gossip carries it; the event converges
// when every live node on that node's side of any partition has put it in force.
func (r *runner) policyEvent(ctx context.Context, e scenario.Event) EventResult {
	r.mu.Lock()
	r.rules[e.Zone] = slices.Clone(e.Rules)
	r.mu.Unlock()
	raw, err := r.policyYAML()
	if err != nil {
		return notRun("%v", err)
	}
	applied, err := r.auth.ApplyPolicy(ctx, "sim:"+e.Label(), raw)
	if err != nil {
		return notRun("the authority refused the policy: %v", err)
	}
	_, release, err := r.auth.PolicyRelease()
	if err != nil || len(release) == 0 {
		return notRun("no policy release: %v", err)
	}
	live := r.members("")
	if len(live) == 0 {
		return notRun("no live node")
	}
	before := map[*simNode]*zones.Policy{}
	for _, m := range live {
		before[m] = m.d.Node().Policy()
	}
	seed := live[0]
	r.mu.RLock()
	var reach []*simNode
	for _, m := range live {
		if r.side[m.name] == r.side[seed.name] {
			reach = append(reach, m)
		}
	}
	r.mu.RUnlock()
	r.bump()
	t0 := time.Now()
	if _, err := seed.d.Accept(ctx, release, daemon.FromAuthority); err != nil {
		return notRun("node %s refused the release: %v", seed.name, err)
	}
	er := r.convergeWith(ctx, t0, nil, func(m *simNode, d *daemon.Daemon) (bool, time.Time) {
		return d.Node().Policy() != before[m], time.Time{}
	}, reach, e.Expect)
	er.Observed = fmt.Sprintf("policy version %d (zone %s: %d rule(s)); ", applied.Version, e.Zone, len(e.Rules)) +
		strings.Replace(er.Observed, "held the record(s)", "had it in force", 1)
	return er
}

// reachable is how many members of zone m can reach now (itself included): those on its side of
// any partition.
func (r *runner) reachable(m *simNode, zone string) int {
	ms := r.members(zone)
	r.mu.RLock()
	defer r.mu.RUnlock()
	k := 0
	for _, o := range ms {
		if r.side[o.name] == r.side[m.name] {
			k++
		}
	}
	return k
}
