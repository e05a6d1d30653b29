package sim

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/goccy/go-yaml"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/identity/authority"
	"github.com/ute-project/ute/node"
	"github.com/ute-project/ute/node/config"
	"github.com/ute-project/ute/node/daemon"
	"github.com/ute-project/ute/node/membership"
	"github.com/ute-project/ute/node/state"
	"github.com/ute-project/ute/sim/memnet"
	"github.com/ute-project/ute/sim/scenario"
)

// Options tune a run; the zero value runs the scenario as written.
type Options struct {
	// Seed overrides the scenario's seed when non-zero.
	Seed uint64
	// MaxNodes, when positive, scales the node groups down so the topology has at most this
	// many nodes (tests use it to keep large scenarios inside their budget).
	MaxNodes int
	// Dir holds the authority's and nodes' directories; empty uses a temporary directory that
	// the run removes.
	Dir string
	// Logger receives the simulator's progress; nil discards it. The nodes' own logs go to
	// NodeLogger (nil discards them).
	Logger, NodeLogger *slog.Logger
	// Progress, when set, receives one line per phase and event as the run goes.
	Progress io.Writer
	// Parallel is how many nodes join and start at once (a staggered start starts four times as
	// many); 0 means 4.
	Parallel int
	// Real runs the nodes on real UDP sockets on 127.0.0.1 instead of the in-memory network:
	// the scenario's latency, jitter and loss do not apply (the kernel's loopback carries the
	// packets); partitions are applied by filtering at each socket. At most MaxRealNodes nodes.
	Real bool
	// Dilation, when positive, replaces the scenario's time-dilation factor (1: none).
	Dilation int
}

// MaxRealNodes bounds a run with Options.Real: every node is a socket and a QUIC endpoint on
// the machine's loopback, where the kernel, not a model, decides what is lost when it is busy.
const MaxRealNodes = 64

// nodePort is the underlay port every simulated node listens on (each has its own address).
const nodePort = 7946

// runner holds one run's state; its methods are called from Run's goroutine except where noted.
type runner struct {
	sc   *scenario.Scenario
	opts Options
	seed uint64
	dir  string
	log  *slog.Logger
	exe  string

	auth     *authority.Authority
	authAddr string
	stopAuth func()
	net      underlay
	timing   *membership.Timing // as the daemons get it: dilated
	// simTiming is the gossip timing in simulated time (what the model and the report use).
	simTiming membership.Timing
	// k is the time-dilation factor (1: none): every timer the runner reaches runs k times
	// slower, and every time it measures is divided by k.
	k    time.Duration
	gate *dialGate           // shared by every node's endpoint: paces first contacts
	hubs map[string]*simNode // zone -> its first node, in a staggered start (else nil)

	mu      sync.RWMutex // guards the fields below (traffic goroutines read them)
	nodes   map[string]*simNode
	order   []string
	groupOf map[string]string          // node -> group
	agentAt map[string]string          // agent.zone -> node
	revoked map[string]bool            // subjects (SPIFFE IDs) revoked so far
	side    map[string]int             // node -> partition set (0: none)
	records []issued                   // every revocation record the authority issued, in order
	rules   map[string][]scenario.Rule // zone -> rules, once a policy_change replaced them
	proxied map[string]bool            // nodes that run the proxy interface (exe_swap targets)
	clones  []clone                    // second hosts of copied directories (directory_copy)
	cloneNo int
	gen     uint64 // see epoch

	servers  map[string]*server // agent.zone:port
	srvWG    sync.WaitGroup
	traffic  *trafficStats
	t0       time.Time
	progress io.Writer
}

type issued struct {
	subject string
	zones   []string // the zones whose members must hold it
	raw     []byte
	node    string // the revoked node, if a node was revoked
	side    int    // the partition side it was handed to (0: none)
}

type simNode struct {
	name   string
	group  *scenario.Group
	index  int
	dir    string
	addr   netip.AddrPort
	token  string
	agents []scenario.AgentRef
	conn   net.PacketConn
	d      *daemon.Daemon // nil while crashed
	cfg    config.Config  // the config d runs with (Reload changes its peers)
}

func (n *simNode) zones() []string { return n.group.Zones }

// daemonOf is n's daemon, nil while it is down (crashed, or not yet started); a restart replaces it.
func (r *runner) daemonOf(n *simNode) *daemon.Daemon {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return n.d
}

// Run runs a scenario and returns its result. An error means the run itself could not proceed
// (setup failed); failed expectations are in the result (Result.Failed).
func Run(ctx context.Context, sc *scenario.Scenario, opts Options) (*Result, error) {
	sc = scale(sc, opts.MaxNodes)
	r := &runner{sc: sc, opts: opts, seed: sc.Seed, log: opts.Logger, progress: opts.Progress,
		nodes: map[string]*simNode{}, groupOf: map[string]string{}, agentAt: map[string]string{},
		revoked: map[string]bool{}, side: map[string]int{}, servers: map[string]*server{},
		rules: map[string][]scenario.Rule{}, proxied: map[string]bool{}}
	if opts.Seed != 0 {
		r.seed = opts.Seed
	}
	k := max(sc.Dilation, 1)
	if opts.Dilation > 0 {
		k = opts.Dilation
	}
	if k > 1 {
		if opts.Real {
			return nil, errors.New("sim: --real runs on the kernel's loopback, whose delays cannot be dilated: run it without dilation")
		}
		for _, e := range sc.Timeline {
			if why := scenario.Undilated(e.Kind); why != "" {
				return nil, fmt.Errorf("sim: %s: event %s cannot run with dilation %d: it waits on %s", sc.Name, e.Kind, k, why)
			}
		}
	}
	r.k = time.Duration(k)
	if r.log == nil {
		r.log = slog.New(slog.DiscardHandler)
	}
	if r.opts.Parallel <= 0 {
		r.opts.Parallel = 4
	}
	if r.opts.NodeLogger == nil {
		r.opts.NodeLogger = slog.New(slog.DiscardHandler)
	}
	r.dir = opts.Dir
	if r.dir == "" {
		d, err := os.MkdirTemp(scratchParent(), "ute-sim-")
		if err != nil {
			return nil, fmt.Errorf("sim: temporary directory: %w", err)
		}
		r.dir = d
		defer func() { _ = os.RemoveAll(d) }()
	}
	// Agents run in this process; their enrolled executable is a small stand-in file, since
	// enrolling hashes it once per agent (hashing a 25 MB test binary per agent was 7% of a
	// 100-node run's CPU).
	r.exe = filepath.Join(r.dir, "workload")
	if err := os.WriteFile(r.exe, []byte("#!/bin/false\n# ute sim: the agents' enrolled workload\n"), 0o700); err != nil {
		return nil, fmt.Errorf("sim: %w", err)
	}
	res := &Result{Scenario: sc.Name, Description: sc.Description, File: sc.File(), Seed: r.seed, Nodes: sc.NodeCount(), Zones: len(sc.Zones),
		Network: NetworkInfo{Latency: sc.Network.Latency.D(), Jitter: sc.Network.Jitter.D(), Loss: sc.Network.Loss}, Gossip: sc.Gossip,
		Nondeterminism: nondeterminism, Underlay: "memnet", Dilation: k}
	if k > 1 {
		res.Undilated = undilated
	}
	if opts.Real {
		res.Underlay, res.Network = "udp-loopback", NetworkInfo{}
	}
	start := time.Now()
	defer r.stop()
	if err := r.setup(ctx, res); err != nil {
		return nil, err
	}
	res.Topology = r.topology()
	r.runTimeline(ctx, res)
	res.Traffic = r.traffic.summary()
	res.NetworkStats = r.net.stats()
	res.Duration = time.Since(start)
	for _, e := range res.Events {
		if !e.Pass {
			res.Failed++
		}
	}
	return res, nil
}

const nondeterminism = "The network's loss and jitter are drawn per link from the seed, so the n-th packet on a link " +
	"meets the same fate in every run. Not deterministic: the order in which goroutines send (Go's scheduler), " +
	"the real-time timers of quic-go and memberlist (gossip targets are chosen by memberlist's own random source), " +
	"and key generation, so measured times vary from run to run."

func (r *runner) say(format string, args ...any) {
	if r.progress != nil {
		fmt.Fprintf(r.progress, format+"\n", args...)
	}
	r.log.Info(fmt.Sprintf(format, args...))
}

// scale reduces group counts so the topology has at most max nodes, keeping every node that an
// event names.
func scale(sc *scenario.Scenario, maxNodes int) *scenario.Scenario {
	total := sc.NodeCount()
	if maxNodes <= 0 || total <= maxNodes {
		return sc
	}
	out := *sc
	out.Nodes = slices.Clone(sc.Nodes)
	named := map[string]bool{}
	for _, e := range sc.Timeline {
		for _, n := range append([]string{e.Node, e.Via}, slices.Concat(e.Sets...)...) {
			named[n] = true
		}
	}
	for i := range out.Nodes {
		g := &out.Nodes[i]
		if g.Count <= 1 {
			continue
		}
		keep := 1
		for j, n := range g.NodeNames() {
			if named[n] {
				keep = max(keep, j+1)
			}
		}
		g.Count = max(keep, g.Count*maxNodes/total)
	}
	return &out
}

func (r *runner) setup(ctx context.Context, res *Result) error {
	t := time.Now()
	if r.opts.Real {
		if n := r.sc.NodeCount(); n > MaxRealNodes {
			return fmt.Errorf("sim: --real runs at most %d nodes on loopback; %s has %d (scale it down with --max-nodes)", MaxRealNodes, r.sc.Name, n)
		}
		r.net = newUDPUnderlay()
	} else {
		mn, err := memnet.New(r.seed, memnet.Link{Latency: r.wall(r.sc.Network.Latency.D()), Jitter: r.wall(r.sc.Network.Jitter.D()), Loss: r.sc.Network.Loss})
		if err != nil {
			return err
		}
		r.net = memUnderlay{mn}
	}
	switch r.sc.Gossip {
	case "fast":
		r.simTiming = membership.FastTiming()
	case "scale":
		r.simTiming = ScaleTiming()
	default:
		// The node's own defaults: its config's intervals over memberlist's LAN profile.
		r.simTiming = membership.LANTiming()
		g := config.Default().Gossip
		r.simTiming.GossipInterval, r.simTiming.ProbeInterval, r.simTiming.PushPullInterval = g.Interval, g.ProbeInterval, g.PushPullInterval
	}
	if r.sc.Gossip == "fast" || r.sc.Gossip == "scale" || r.k > 1 {
		t := dilate(r.simTiming, r.k)
		r.timing = &t
	}
	res.GossipInterval, res.Fanout = r.simTiming.GossipInterval, r.simTiming.GossipNodes
	slots := dialSlots()
	r.gate = newDialGate(slots, time.Second).withDeferrable(deferSlots(slots))
	if err := r.startAuthority(); err != nil {
		return err
	}
	r.traffic = newTrafficStats()
	// Plan the nodes.
	i := 0
	for gi := range r.sc.Nodes {
		g := &r.sc.Nodes[gi]
		for k, name := range g.NodeNames() {
			addr, err := r.net.plan(i)
			if err != nil {
				return err
			}
			n := &simNode{name: name, group: g, index: k, dir: filepath.Join(r.dir, "nodes", name), addr: addr}
			for _, a := range g.Agents {
				ref := scenario.AgentRef{Agent: g.AgentName(a, k), Zone: a.Zone}
				n.agents = append(n.agents, ref)
				r.agentAt[ref.String()] = name
			}
			r.nodes[name] = n
			r.order = append(r.order, name)
			r.groupOf[name] = g.Name
			i++
		}
	}
	for _, e := range r.sc.Timeline {
		if e.Kind == scenario.KindExeSwap {
			r.proxied[r.agentAt[e.Agent]] = true
		}
	}
	r.say("%s: %d node(s) in %d zone(s), seed %d, gossip %s%s%s", r.sc.Name, len(r.order), len(r.sc.Zones), r.seed, r.sc.Gossip, r.dilationNote(), procsNote())
	// Joins are sequential within a zone's first node so that later nodes receive bootstrap
	// members; the rest run a few at once. A staggered start joins each node just before it
	// starts it, so that the authority's bootstrap members are nodes already running.
	if r.sc.Start != "staggered" {
		if err := r.each(ctx, r.order, r.join); err != nil {
			return err
		}
		res.JoinTime = time.Since(t)
		r.say("  joined %d node(s) with one-time tokens in %s", len(r.order), res.JoinTime.Round(time.Millisecond))
	}
	t = time.Now()
	start := r.startAll
	if r.sc.Start == "staggered" {
		r.gate.setup.Store(true)
		start = r.startStaggered
	}
	if err := start(ctx); err != nil {
		return err
	}
	if err := r.awaitGossip(ctx, r.sc.Limits.Gossip.D()); err != nil {
		return err
	}
	res.GossipTime = time.Since(t)
	r.say("  every node found its zone peers by gossip in %s", res.GossipTime.Round(time.Millisecond))
	if w := r.sc.Warmup.D(); w > 0 {
		// The last quarter with gossip packets flowing again: a member declared failed while
		// they were dropped hears it and refutes before the timeline starts.
		t = time.Now()
		r.say("  warmup: %s (simulated) for the gossip queues to drain", w)
		var base spreadSnap
		for i, part := range []time.Duration{w - w/4, w / 4} {
			if i == 1 && r.progress != nil {
				base = r.spreadSnapshot()
			}
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(r.wall(part)):
			}
			r.gate.setup.Store(false)
		}
		if r.progress != nil {
			// The zone at rest: what the last quarter of the warmup sent and dropped.
			r.say("%s", strings.Replace(r.spreadSnapshot().line(base, w/4, 0), "spread at", "at rest, the warmup's last", 1))
		}
		res.WarmupTime = time.Since(t)
	}
	r.gate.setup.Store(false)
	if err := r.startServers(); err != nil {
		return err
	}
	return nil
}

// each runs f for every name, Parallel at a time; the first error wins.
func (r *runner) each(ctx context.Context, names []string, f func(context.Context, *simNode) error) error {
	return r.eachN(ctx, r.opts.Parallel, names, f)
}

// eachN is each with parallel at a time.
func (r *runner) eachN(ctx context.Context, parallel int, names []string, f func(context.Context, *simNode) error) error {
	sem := make(chan struct{}, parallel)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var first error
	for _, name := range names {
		n := r.node(name)
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			if err := f(ctx, n); err != nil {
				mu.Lock()
				if first == nil {
					first = err
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return first
}

func (r *runner) node(name string) *simNode {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return r.nodes[name]
}

type policyFile struct {
	Zones []policyZone `yaml:"zones"`
}

type policyZone struct {
	Name         string          `yaml:"name"`
	CIDR         string          `yaml:"cidr"`
	Regions      []string        `yaml:"regions"`
	MinTrust     int             `yaml:"min_trust"`
	IsolateBelow int             `yaml:"isolate_below"`
	NodePrefix   int             `yaml:"node_prefix,omitempty"`
	Rules        []scenario.Rule `yaml:"rules,omitempty"`
}

// nodePrefix is the node slice length for a zone of cidr served by nodes nodes: the policy's
// default (the CIDR's length + 8: 256 slices) unless that is too few, then the longest prefix
// with a slice for each (at most /28). 0 keeps the default.
func nodePrefix(cidr string, nodes int) int {
	p, err := netip.ParsePrefix(cidr)
	if err != nil || !p.Addr().Is4() || nodes <= 256 {
		return 0
	}
	bits := 8
	for 1<<bits < nodes {
		bits++
	}
	return min(p.Bits()+bits, 28)
}

// policyYAML is the policy of the scenario's zones with the rules in force now (policy_change
// replaces a zone's rules).
func (r *runner) policyYAML() ([]byte, error) {
	var pf policyFile
	for _, z := range r.sc.Zones {
		rules := z.Rules
		if rs, ok := r.rules[z.Name]; ok {
			rules = rs
		}
		members := 0
		for _, g := range r.sc.Nodes {
			if slices.Contains(g.Zones, z.Name) {
				members += max(g.Count, 1)
			}
		}
		pf.Zones = append(pf.Zones, policyZone{Name: z.Name, CIDR: z.CIDR, Regions: z.Regions, MinTrust: 50, IsolateBelow: 20,
			NodePrefix: nodePrefix(z.CIDR, members), Rules: rules})
	}
	raw, err := yaml.Marshal(pf)
	if err != nil {
		return nil, fmt.Errorf("sim: policy: %w", err)
	}
	return raw, nil
}

func (r *runner) startAuthority() error {
	raw, err := r.policyYAML()
	if err != nil {
		return err
	}
	pol := filepath.Join(r.dir, "policy.yaml")
	if err := os.WriteFile(pol, raw, 0o600); err != nil {
		return fmt.Errorf("sim: %w", err)
	}
	adir := filepath.Join(r.dir, "authority")
	aopts := authority.Options{Limits: authority.Limits{MaxConnsPerSource: 64, MaxInFlight: 64}}
	if err := authority.Init(adir, r.sc.TrustDomain, pol, aopts); err != nil {
		return fmt.Errorf("sim: the scenario's zones are not a valid policy: %w", err)
	}
	a, err := authority.Open(adir, aopts)
	if err != nil {
		return fmt.Errorf("sim: authority: %w", err)
	}
	// The authority link is not simulated: joins go over real QUIC on loopback. The nodes run
	// without the authority watch; the runner hands a revocation record to one node, as the
	// watch would, and gossip does the rest.
	srv, err := a.Listen("127.0.0.1:0")
	if err != nil {
		_ = a.Close()
		return fmt.Errorf("sim: authority listen: %w", err)
	}
	r.auth, r.authAddr = a, srv.Addr().String()
	sctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(sctx) }()
	r.stopAuth = func() { cancel(); <-done; _ = a.Close() }
	return nil
}

func hostFingerprint(name string) []byte {
	fp := sha256.Sum256([]byte("ute sim host " + name))
	return fp[:]
}

func (r *runner) join(ctx context.Context, n *simNode) error {
	if n.token == "" { // a retry keeps the token of the first attempt
		tok, err := r.auth.CreateToken(ctx, authority.TokenSpec{Zones: n.zones(), Regions: []string{n.group.Region}, TTL: 10 * time.Minute})
		if err != nil {
			return fmt.Errorf("sim: token for %s: %w", n.name, err)
		}
		n.token = tok.Token
	}
	jctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	sd, err := node.Join(jctx, node.JoinParams{Dir: n.dir, Authority: r.authAddr, Token: n.token, Name: n.name, Region: n.group.Region,
		HostFingerprint: hostFingerprint(n.name), Advertise: n.addr.String()})
	if err != nil {
		return fmt.Errorf("sim: node %s join: %w", n.name, err)
	}
	for _, a := range n.agents {
		if _, err := sd.AddAgent(state.AgentSpec{Name: a.Agent, Zone: a.Zone, Exe: r.exe, UID: uint32(os.Getuid()), GID: uint32(os.Getgid())}); err != nil {
			return fmt.Errorf("sim: node %s agent %s: %w", n.name, a, err)
		}
	}
	return nil
}

// start runs the node's daemon on a fresh memnet conn at its address; peers, when given, are
// static bootstrap peers (a rejoining node uses live members, as an operator's config would).
func (r *runner) start(ctx context.Context, n *simNode) error {
	return r.startWith(ctx, n, nil)
}

func (r *runner) startWith(ctx context.Context, n *simNode, peers []config.Peer) error {
	conn, err := r.net.listen(n.addr)
	if err != nil {
		return fmt.Errorf("sim: node %s: %w", n.name, err)
	}
	cfg := config.Default()
	cfg.Peers = peers
	if idle := r.sc.TunnelIdle.D(); idle > 0 {
		cfg.Gossip.TunnelIdle = idle
	}
	cfg.Gossip.TunnelIdle = r.wall(cfg.Gossip.TunnelIdle)
	var reconnect time.Duration // the daemon's default, 30 s
	switch {
	case r.sc.Start == "staggered":
		// The staggered start's last step relies on it (startStaggered); at rest it costs a
		// read of the bootstrap list, and a join only when a bootstrap member is missing.
		reconnect = staggerReconnect
	case r.k > 1:
		reconnect = r.wall(30 * time.Second)
	}
	cfg.Interface = config.InterfaceNetstack // the sim's agents live in its process
	if r.proxied[n.name] {
		cfg.Interface = config.InterfaceProxy
	}
	d, err := daemon.Start(ctx, daemon.Options{Dir: n.dir, Config: cfg, PacketConn: conn, NoAuthority: true, Timing: r.timing,
		DuplicateConfirm: r.wall(duplicateConfirm), ReconnectInterval: reconnect, TrustTick: r.trustTick(), Logger: r.opts.NodeLogger.With("node", n.name)})
	if err != nil {
		_ = conn.Close()
		return fmt.Errorf("sim: node %s start: %w", n.name, err)
	}
	d.Node().Endpoint().SetDialGate(nodeGate{r.gate, n.addr, r.net.reachable})
	r.mu.Lock()
	n.conn, n.d, n.cfg = conn, d, cfg
	r.mu.Unlock()
	return nil
}

// crash stops a node's daemon and its socket.
func (r *runner) crash(n *simNode) {
	r.mu.Lock()
	d, conn := n.d, n.conn
	n.d, n.conn = nil, nil
	r.mu.Unlock()
	r.stopServers(n.name)
	if d != nil {
		_ = d.Close()
	}
	if conn != nil {
		_ = conn.Close()
	}
}

// live is the names of the running nodes, optionally only those serving zone.
func (r *runner) live(zone string) []*simNode {
	r.mu.RLock()
	defer r.mu.RUnlock()
	var out []*simNode
	for _, name := range r.order {
		n := r.nodes[name]
		if n.d != nil && (zone == "" || slices.Contains(n.zones(), zone)) {
			out = append(out, n)
		}
	}
	return out
}

// members is the live nodes, optionally only those serving zone, that are not revoked: a
// revoked node (by the authority, or by itself after a region drift, or cut by its peers as a
// duplicate) has left gossip and is not expected to receive anything.
func (r *runner) members(zone string) []*simNode {
	live := r.live(zone)
	r.mu.RLock()
	defer r.mu.RUnlock()
	return slices.DeleteFunc(live, func(n *simNode) bool { return r.revoked[r.nodeID(n.name)] })
}

// awaitGossip waits until every live node's pools hold every live node of their zone.
func (r *runner) awaitGossip(ctx context.Context, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	nextReport := time.Now().Add(5 * time.Second)
	// Reading a pool's members costs O(members), so a large run polls less often, and only the
	// pools not yet complete until every one has been seen complete; then one full pass
	// confirms (a member may have been declared failed meanwhile).
	poll := max(50*time.Millisecond, time.Duration(len(r.order))*time.Millisecond)
	done := map[string]bool{}
	confirm := false
	for {
		var missing []string
		point := map[*simNode]map[string]*simNode{} // staggered start: node -> zone -> a member it lacks
		for _, z := range r.sc.Zones {
			live := r.live(z.Name)
			want := len(live)
			for _, n := range live {
				k := n.name + "/" + z.Name
				if done[k] && !confirm {
					continue
				}
				ms := n.d.Members(z.Name)
				if got := len(ms); float64(got) < r.sc.Limits.Members*float64(want) {
					missing = append(missing, fmt.Sprintf("%s/%s:%d/%d", n.name, z.Name, got, want))
					delete(done, k)
					if r.hubs != nil {
						if point[n] == nil {
							point[n] = map[string]*simNode{}
						}
						point[n][z.Name] = r.latestLacking(ms, live)
					}
				} else {
					done[k] = true
				}
			}
		}
		for n, lacks := range point {
			r.pointAt(n, lacks)
		}
		if len(missing) == 0 {
			if confirm {
				return nil
			}
			confirm = true // every pool was complete once: confirm with a full pass at once
			continue
		}
		confirm = false
		if time.Now().After(nextReport) {
			nextReport = time.Now().Add(5 * time.Second)
			var ms runtime.MemStats
			runtime.ReadMemStats(&ms)
			r.say("  gossip discovery: %d node/zone pool(s) still missing members (e.g. %s%s); %d tunnels, heap %d MiB",
				len(missing), missing[0], r.lacking(missing[0]), r.tunnels(), ms.HeapInuse>>20)
		}
		if time.Now().After(deadline) {
			if len(missing) > 8 {
				missing = append(missing[:8], fmt.Sprintf("and %d more", len(missing)-8))
			}
			st := r.net.stats()
			return fmt.Errorf("sim: gossip did not find every zone member within %s: %s (network: %d packets sent, %d delivered, %d unreachable)",
				limit, strings.Join(missing, " "), st.Sent, st.Delivered, st.Unreachable)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(poll):
		}
	}
}

func (r *runner) stop() {
	if r.traffic != nil {
		r.traffic.stop()
	}
	for _, name := range r.order {
		r.stopServers(name)
	}
	var wg sync.WaitGroup
	for _, name := range r.order {
		n := r.nodes[name]
		wg.Go(func() { r.crash(n) })
	}
	for _, c := range r.clones {
		wg.Go(func() { _ = c.d.Close(); _ = c.conn.Close() })
	}
	wg.Wait()
	r.srvWG.Wait()
	if r.net != nil {
		_ = r.net.close()
	}
	if r.stopAuth != nil {
		r.stopAuth()
	}
}

// agentID is the SPIFFE ID of agent ref.
func (r *runner) agentID(ref scenario.AgentRef) string {
	return identity.AgentID(r.sc.TrustDomain, ref.Zone, ref.Agent).String()
}

func (r *runner) nodeID(name string) string { return identity.NodeID(r.sc.TrustDomain, name).String() }

// agent returns the SDK handle of ref on its node, or an error when the node is down.
func (r *runner) agent(ref scenario.AgentRef) (*node.Agent, *simNode, error) {
	r.mu.RLock()
	n := r.nodes[r.agentAt[ref.String()]]
	var d *daemon.Daemon
	if n != nil {
		d = n.d
	}
	r.mu.RUnlock()
	if n == nil {
		return nil, nil, fmt.Errorf("no node runs %s", ref)
	}
	if d == nil {
		return nil, n, fmt.Errorf("%w: node %s is down", errNodeDown, n.name)
	}
	a, err := d.Node().Agent(ref.Zone, ref.Agent)
	return a, n, err
}

var errNodeDown = errors.New("node down")

// server is an agent's listener that answers each flow and counts the bytes of attack flows
// that reached it: attempts send attackMarker first, legitimate traffic does not, so that
// traffic running beside an attack is not counted as leaked.
type server struct {
	l        net.Listener
	node     string
	received counter
}

// attackMarker starts every payload an attack (or a flow event) sends.
const attackMarker = "atk:"

type counter struct {
	mu sync.Mutex
	n  int64
}

func (c *counter) add(k int) {
	c.mu.Lock()
	c.n += int64(k)
	c.mu.Unlock()
}

func (c *counter) load() int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n
}

// destinations is every agent.zone:port that traffic or an event targets.
func (r *runner) destinations() map[string]scenario.Dest {
	out := map[string]scenario.Dest{}
	add := func(s string) {
		if d, err := scenario.ParseDest(s); err == nil {
			out[d.String()] = d
		}
	}
	for _, t := range r.sc.Traffic {
		add(t.To)
	}
	for _, e := range r.sc.Timeline {
		add(e.To)
	}
	return out
}

func (r *runner) startServers() error {
	for _, d := range r.destinations() {
		if err := r.startServer(d); err != nil {
			return err
		}
	}
	return nil
}

// startServersOf restarts the listeners of a node's agents (after a rejoin).
func (r *runner) startServersOf(name string) error {
	for _, d := range r.destinations() {
		if r.agentAt[d.AgentRef.String()] == name {
			if err := r.startServer(d); err != nil {
				return err
			}
		}
	}
	return nil
}

func (r *runner) startServer(dst scenario.Dest) error {
	a, n, err := r.agent(dst.AgentRef)
	if err != nil {
		return fmt.Errorf("sim: server %s: %w", dst, err)
	}
	l, err := a.Listen("tcp", fmt.Sprintf(":%d", dst.Port))
	if err != nil {
		return fmt.Errorf("sim: listen %s: %w", dst, err)
	}
	r.mu.Lock()
	s := r.servers[dst.String()]
	if s == nil {
		s = &server{}
		r.servers[dst.String()] = s
	}
	s.l, s.node = l, n.name
	r.mu.Unlock()
	r.srvWG.Go(func() {
		var conns sync.WaitGroup
		defer conns.Wait()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			conns.Go(func() {
				defer func() { _ = c.Close() }()
				_ = c.SetDeadline(time.Now().Add(10 * time.Second))
				buf := make([]byte, 512)
				var head []byte
				decided, attack, pending := false, false, 0
				for {
					k, err := c.Read(buf)
					switch {
					case !decided:
						head = append(head, buf[:min(k, len(attackMarker)-len(head))]...)
						pending += k
						if len(head) == len(attackMarker) || err != nil {
							decided, attack = true, string(head) == attackMarker
							if attack {
								s.received.add(pending)
							}
						}
					case attack:
						s.received.add(k)
					}
					if k > 0 {
						if _, werr := c.Write([]byte("pong\n")); werr != nil {
							return
						}
					}
					if err != nil {
						return
					}
				}
			})
		}
	})
	return nil
}

func (r *runner) stopServers(name string) {
	r.mu.Lock()
	var ls []net.Listener
	for _, s := range r.servers {
		if s.node == name && s.l != nil {
			ls = append(ls, s.l)
			s.l = nil
		}
	}
	r.mu.Unlock()
	for _, l := range ls {
		_ = l.Close()
	}
}

// received is the bytes that have reached dst so far.
func (r *runner) received(dst scenario.Dest) int64 {
	r.mu.RLock()
	s := r.servers[dst.String()]
	r.mu.RUnlock()
	if s == nil {
		return 0
	}
	return s.received.load()
}

// scratchParent is where a run without Options.Dir keeps its directories: /dev/shm when it is
// there, since every node's stores and audit log fsync, and on a disk a thousand nodes' fsyncs
// are a large share of the run.
func scratchParent() string {
	if st, err := os.Stat("/dev/shm"); err == nil && st.IsDir() {
		if f, err := os.CreateTemp("/dev/shm", "ute-sim-probe-"); err == nil {
			_ = f.Close()
			_ = os.Remove(f.Name())
			return "/dev/shm"
		}
	}
	return ""
}

// ScaleTiming is the "scale" gossip profile: memberlist's LAN dissemination (200 ms gossip
// interval, fan-out 3, retransmit multiplier 4), the numbers the convergence model and Serf's
// figures use, with relaxed failure detection. On a real network each node has its own CPU; in
// a run of hundreds of nodes on two cores a probe to a member this node has no tunnel with yet
// waits for a paced handshake, and with the LAN profile's 500 ms probe timeout live members are
// declared failed faster than gossip refutes it (measured: 200 nodes fell back from 166 to
// about 110 members each). Failure detection is not what the large scenarios measure.
func ScaleTiming() membership.Timing {
	t := membership.LANTiming()
	t.ProbeInterval = 5 * time.Second
	t.ProbeTimeout = 3 * time.Second
	t.SuspicionMult = 8
	// Push/pull hands a joining node the whole member list in one exchange, the cheapest
	// discovery there is when most first contacts wait for a handshake slot; memberlist
	// stretches the interval with the pool's size (×6 at 1,000 members: one exchange per node
	// a minute), so its share of a record's spread in the first seconds stays negligible.
	t.PushPullInterval = 10 * time.Second
	t.TCPTimeout = 10 * time.Second
	return t
}

// tunnels is the number of tunnels the live nodes hold (each counts at both ends).
func (r *runner) tunnels() int {
	n := 0
	for _, m := range r.live("") {
		n += m.d.Node().Endpoint().Stats().Tunnels
	}
	return n
}

// lacking names a few members that a pool (node/zone:…, as awaitGossip reports it) does not
// see.
func (r *runner) lacking(pool string) string {
	name, rest, _ := strings.Cut(pool, "/")
	zone, _, _ := strings.Cut(rest, ":")
	n := r.node(name)
	if n == nil || n.d == nil {
		return ""
	}
	seen := map[string]bool{}
	for _, m := range n.d.Members(zone) {
		seen[m.NodeID] = true
	}
	var out []string
	for _, m := range r.live(zone) {
		if !seen[r.nodeID(m.name)] {
			out = append(out, m.name)
		}
	}
	if len(out) == 0 {
		return ""
	}
	// How many members the first missing one sees tells a slow discovery (it sees most of the
	// zone) from a split pool (it sees about as many as are missing: an island that declared
	// the rest failed, and that the rest declared failed).
	sees := ""
	if m := r.node(out[0]); m != nil && m.d != nil {
		sees = fmt.Sprintf("; %s sees %d", out[0], len(m.d.Members(zone)))
	}
	return ", lacks " + abbreviate(out) + sees
}

func (r *runner) startAll(ctx context.Context) error { return r.each(ctx, r.order, r.start) }

// staggerReconnect is the daemon's reconnect interval in a staggered start (wall-clock: it
// paces setup, not the network being measured).
const staggerReconnect = 5 * time.Second

// startStaggered starts each zone's first node (its hub), then the others in order, Parallel at
// a time, each with its zones' hubs as static peers and only once the nodes before it have
// joined: a joiner's push/pull with the hub hands it every member started before it, in one
// exchange, where gossip would carry each member to each node separately (at 1,000 nodes a
// million gossip packets, nearly each a QUIC handshake on two cores). Then every node gets the
// last node started in each of its zones as a peer too (Reload); the daemon's reconnect joins
// through it when it is missing from the pool, so the earlier nodes learn the later ones in one
// exchange as well. Nothing here changes how a node behaves once started: static peers and
// Reload are what an operator has.
func (r *runner) startStaggered(ctx context.Context) error {
	hubs, lasts := map[string]*simNode{}, map[string]*simNode{}
	r.hubs = hubs
	var hubNames, rest []string
	for _, name := range r.order {
		n := r.nodes[name]
		hub := false
		for _, z := range n.zones() {
			if hubs[z] == nil {
				hubs[z], hub = n, true
			}
			lasts[z] = n
		}
		if hub {
			hubNames = append(hubNames, name)
		} else {
			rest = append(rest, name)
		}
	}
	// Each node joins (one-time token) right before it starts: the authority names a few of the
	// members that joined before as its bootstrap members, and those must be running, or every
	// join and reconnect would wait out handshakes to nodes not started yet (measured: 1,000
	// nodes stalled at 440, the dial gate's slots held by them).
	// The authority link is real QUIC on loopback with node.Join's fixed 5 s: while hundreds of
	// nodes run on the same cores a join can miss it (one did, at 16 joins at once), so joins
	// keep start: all's pace (Parallel at once) and a join that got no answer is retried as an
	// operator would: the same token into the same directory, where node.Join staged the key;
	// if the authority had already answered, it sends the same certificates again. (A fresh
	// token and an empty directory, as before, failed whenever the lost answer had been
	// committed: the name was held by the certificate the node never received.)
	joins := make(chan struct{}, r.opts.Parallel)
	joinStart := func(peers func(*simNode) []config.Peer) func(context.Context, *simNode) error {
		return func(ctx context.Context, n *simNode) error {
			var err error
			for range 3 {
				joins <- struct{}{}
				err = r.join(ctx, n)
				<-joins
				if err == nil || ctx.Err() != nil || authority.JoinRefused(err) {
					break
				}
				r.log.Warn("sim: join again", "node", n.name, "err", err)
			}
			if err != nil {
				return err
			}
			return r.startWith(ctx, n, peers(n))
		}
	}
	if err := r.each(ctx, hubNames, joinStart(func(*simNode) []config.Peer { return nil })); err != nil {
		return err
	}
	var mu sync.Mutex // guards the two below
	next, started := time.Now().Add(5*time.Second), 0
	// A join waits on round trips (dilated) and memberlist's join grace more than on the CPU:
	// 1,000 nodes four at a time took 8 minutes, with the process at a quarter of one core.
	err := r.eachN(ctx, 4*r.opts.Parallel, rest, func(ctx context.Context, n *simNode) error {
		if err := joinStart(func(n *simNode) []config.Peer { return r.peersOf(n, hubs) })(ctx, n); err != nil {
			return err
		}
		r.awaitJoined(ctx, n, 30*time.Second)
		mu.Lock()
		defer mu.Unlock()
		if started++; time.Now().After(next) {
			next = time.Now().Add(5 * time.Second)
			r.say("  staggered start: %d of %d node(s) started and joined", started, len(rest))
		}
		return nil
	})
	if err != nil {
		return err
	}
	for _, name := range r.order {
		r.pointAt(r.node(name), lasts)
	}
	return nil
}

// pointAt gives n its zones' hubs and the nodes of lacks (zone -> node) as static peers
// (Reload); the daemon's reconnect then joins through those missing from its pool: one
// push/pull with a node that was started later hands over every member that node knows.
func (r *runner) pointAt(n *simNode, lacks map[string]*simNode) {
	r.mu.RLock()
	d, cfg := n.d, n.cfg
	r.mu.RUnlock()
	if d == nil {
		return
	}
	old := cfg.Peers
	cfg.Peers = r.peersOf(n, r.hubs, lacks)
	if slices.Equal(cfg.Peers, old) {
		return
	}
	if _, err := d.Reload(cfg); err != nil {
		r.log.Warn("sim: peers", "node", n.name, "err", err)
		return
	}
	r.mu.Lock()
	n.cfg = cfg
	r.mu.Unlock()
}

// latestLacking is the last-started of the live nodes that members lacks: it knows the most.
func (r *runner) latestLacking(members []membership.Member, live []*simNode) *simNode {
	seen := make(map[string]bool, len(members))
	for _, m := range members {
		seen[m.NodeID] = true
	}
	for i := len(live) - 1; i >= 0; i-- {
		if !seen[r.nodeID(live[i].name)] {
			return live[i]
		}
	}
	return nil
}

// peersOf is the static peers for n: the nodes of each of n's zones in the given maps (zone ->
// node), without n itself.
func (r *runner) peersOf(n *simNode, sets ...map[string]*simNode) []config.Peer {
	var peers []config.Peer
	seen := map[string]bool{n.name: true}
	for _, set := range sets {
		for _, z := range n.zones() {
			if m := set[z]; m != nil && !seen[m.name] {
				seen[m.name] = true
				peers = append(peers, config.Peer{Node: r.nodeID(m.name), Addr: m.addr})
			}
		}
	}
	return peers
}

// awaitJoined waits until every pool of n has another member, or limit passes (the run goes
// on: discovery catches up later or fails at its own limit).
func (r *runner) awaitJoined(ctx context.Context, n *simNode, limit time.Duration) {
	deadline := time.Now().Add(limit)
	for ctx.Err() == nil && time.Now().Before(deadline) {
		d := r.daemonOf(n)
		joined := d != nil
		for _, z := range n.zones() {
			if joined && len(d.Members(z)) <= 1 {
				joined = false
			}
		}
		if joined {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}
