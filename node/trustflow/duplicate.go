package trustflow

import (
	"slices"
	"time"
)

// Sighting is one place an identity is live now: a node ID and the underlay address of one of
// its live tunnels.
type Sighting struct {
	Subject string
	Addr    string
}

// Duplicate is an identity live at two or more addresses for at least the confirmation time.
type Duplicate struct {
	Subject string
	Addrs   []string
	Since   time.Time
}

// DuplicateDetector confirms that an identity is live at two places at once. A node that
// restarts on another port leaves a dead connection behind until its peers' idle timeout ends
// it, so a second address alone is not evidence: both must stay live for Confirm (default 45 s,
// longer than QUIC's 30 s idle timeout). A node that reconnects from the same address is one
// sighting. Not safe for concurrent use.
type DuplicateDetector struct {
	Confirm time.Duration
	first   map[string]time.Time
	done    map[string]bool
}

// Check takes every sighting live at time at and returns the identities newly confirmed as
// duplicates. Each is reported once until it is seen at a single address again.
func (d *DuplicateDetector) Check(at time.Time, live []Sighting) []Duplicate {
	if d.first == nil {
		d.first, d.done = map[string]time.Time{}, map[string]bool{}
	}
	confirm := d.Confirm
	if confirm <= 0 {
		confirm = 45 * time.Second
	}
	addrs := map[string][]string{}
	for _, s := range live {
		if s.Subject == "" || s.Addr == "" || slices.Contains(addrs[s.Subject], s.Addr) {
			continue
		}
		addrs[s.Subject] = append(addrs[s.Subject], s.Addr)
	}
	for id := range d.first {
		if len(addrs[id]) < 2 {
			delete(d.first, id)
			delete(d.done, id)
		}
	}
	var out []Duplicate
	ids := make([]string, 0, len(addrs))
	for id := range addrs {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	for _, id := range ids {
		as := addrs[id]
		if len(as) < 2 {
			continue
		}
		first, ok := d.first[id]
		if !ok {
			d.first[id] = at
			first = at
		}
		if !d.done[id] && at.Sub(first) >= confirm {
			d.done[id] = true
			slices.Sort(as)
			out = append(out, Duplicate{Subject: id, Addrs: as, Since: first})
		}
	}
	return out
}

// DefaultAgentWindow is how close in time two nodes' presentations of one agent identity must be
// to count as live at once (AgentDuplicateDetector.Window).
const DefaultAgentWindow = time.Minute

// maxAgentsTracked bounds the agents an AgentDuplicateDetector remembers; when full, agents
// whose presentations are all older than the window are forgotten first, then the oldest.
const maxAgentsTracked = 10000

// AgentDuplicateDetector confirms that one agent identity is presented by two nodes at once: the
// verified flows of agent A (its certificate chain names the node that issued it) arrive issued
// by node X, then by node Y, then by X again, all within Window. An agent name is minted by the
// node that hosts it, so two live issuers of one name are two agents claiming one identity (a
// node minting another node's agent name, or one enrolled twice). An agent moved from X to Y is
// one switch of issuer, never flagged; only issuers alternating is. Not safe for concurrent use.
type AgentDuplicateDetector struct {
	Window time.Duration
	seen   map[string]*agentIssuers
}

type agentIssuers struct {
	last map[string]time.Time // issuing node → its newest presentation of the agent
	done bool                 // reported; reset once a single issuer remains in the window
	at   time.Time            // newest presentation, for eviction
}

// Observe records that node presented agent at time at, and returns the duplicate when this
// presentation confirms one (reported once until a single issuer remains within the window).
func (d *AgentDuplicateDetector) Observe(agent, node string, at time.Time) (Duplicate, bool) {
	if agent == "" || node == "" {
		return Duplicate{}, false
	}
	window := d.Window
	if window <= 0 {
		window = DefaultAgentWindow
	}
	if d.seen == nil {
		d.seen = map[string]*agentIssuers{}
	}
	s := d.seen[agent]
	if s == nil {
		d.evict(at, window)
		s = &agentIssuers{last: map[string]time.Time{}}
		d.seen[agent] = s
	}
	for n, t := range s.last {
		if at.Sub(t) > window {
			delete(s.last, n)
		}
	}
	// Interleaved: this node presented the agent before, and another one did since.
	mine, before := s.last[node]
	var others []string
	for n, t := range s.last {
		if n != node && before && t.After(mine) {
			others = append(others, n)
		}
	}
	s.last[node] = at
	s.at = at
	if len(s.last) < 2 {
		s.done = false
	}
	if len(others) == 0 || s.done {
		return Duplicate{}, false
	}
	s.done = true
	addrs := append(others, node)
	slices.Sort(addrs)
	return Duplicate{Subject: agent, Addrs: addrs, Since: mine}, true
}

// evict makes room for one more agent: first every agent not presented within the window, then,
// if still full, the one presented longest ago.
func (d *AgentDuplicateDetector) evict(now time.Time, window time.Duration) {
	if len(d.seen) < maxAgentsTracked {
		return
	}
	oldest, oldestAt := "", now
	for a, s := range d.seen {
		if now.Sub(s.at) > window {
			delete(d.seen, a)
			continue
		}
		if oldest == "" || s.at.Before(oldestAt) {
			oldest, oldestAt = a, s.at
		}
	}
	if len(d.seen) >= maxAgentsTracked {
		delete(d.seen, oldest)
	}
}
