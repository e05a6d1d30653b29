package sim

import (
	"time"

	"github.com/ute-project/ute/sim/memnet"
)

// Result is what a run observed.
type Result struct {
	Scenario       string        `json:"scenario"`
	Description    string        `json:"description,omitempty"`
	File           string        `json:"file,omitempty"`
	Seed           uint64        `json:"seed"`
	Nodes          int           `json:"nodes"`
	Zones          int           `json:"zones"`
	Gossip         string        `json:"gossip"`
	GossipInterval time.Duration `json:"gossip_interval_ns"`
	Fanout         int           `json:"fanout"`
	Network        NetworkInfo   `json:"network"`
	// Underlay is "memnet" (the in-memory network) or "udp-loopback" (--real).
	Underlay string `json:"underlay"`
	// Dilation is the time-dilation factor k (1: none). With k > 1 every timer the simulator
	// reaches ran k times slower and every time in Events, Traffic and the curves is the
	// measured wall time divided by k (simulated time); JoinTime, GossipTime and Duration stay
	// wall-clock. Undilated lists what was not slowed down.
	Dilation       int            `json:"dilation"`
	Undilated      []string       `json:"undilated,omitempty"`
	JoinTime       time.Duration  `json:"join_ns"`
	GossipTime     time.Duration  `json:"gossip_discovery_ns"`
	WarmupTime     time.Duration  `json:"warmup_ns,omitempty"`
	Duration       time.Duration  `json:"duration_ns"`
	Events         []EventResult  `json:"events"`
	Traffic        TrafficSummary `json:"traffic"`
	NetworkStats   memnet.Stats   `json:"network_stats"`
	Topology       Topology       `json:"topology"`
	Failed         int            `json:"failed"`
	Nondeterminism string         `json:"nondeterminism"`
}

// NetworkInfo is the underlay's default link.
type NetworkInfo struct {
	Latency time.Duration `json:"latency_ns"`
	Jitter  time.Duration `json:"jitter_ns"`
	Loss    float64       `json:"loss"`
}

// Topology is the zones and nodes of the run, for the report.
type Topology struct {
	Zones []ZoneInfo `json:"zones"`
	Nodes []NodeInfo `json:"nodes"`
}

// ZoneInfo is a zone and its members.
type ZoneInfo struct {
	Name    string   `json:"name"`
	CIDR    string   `json:"cidr"`
	Regions []string `json:"regions"`
	Nodes   []string `json:"nodes"`
}

// NodeInfo is a node of the run.
type NodeInfo struct {
	Name   string   `json:"name"`
	Group  string   `json:"group"`
	Addr   string   `json:"addr"`
	Region string   `json:"region"`
	Zones  []string `json:"zones"`
	Agents []string `json:"agents,omitempty"`
}

// EventResult is one timeline event: what was expected, what happened.
type EventResult struct {
	Index       int           `json:"index"`
	Line        int           `json:"line,omitempty"`
	At          time.Duration `json:"at_ns"` // when it ran, since the timeline started
	Kind        string        `json:"event"`
	Name        string        `json:"name"`
	Expectation string        `json:"expectation"`
	Observed    string        `json:"observed"`
	Outcome     string        `json:"outcome"` // blocked, allowed, converged, partial, done
	Reason      string        `json:"reason,omitempty"`
	// TimeToBlock is the time from the attempt to its refusal, or from the revocation to the
	// last member holding it.
	TimeToBlock  time.Duration `json:"time_to_block_ns,omitempty"`
	LeakedBytes  int64         `json:"leaked_bytes"`
	FalseDenials int           `json:"false_denials"`
	Pass         bool          `json:"pass"`
	Failure      string        `json:"failure,omitempty"`
	// Members and Curve describe a convergence: the fraction of Members holding the records
	// over time, beside the gossip model's prediction for the same size and fan-out.
	Members int          `json:"members,omitempty"`
	Curve   []CurvePoint `json:"curve,omitempty"`
	Model   []CurvePoint `json:"model,omitempty"`
	// Steps are the sub-attempts of a composite event (replay: same session, new session, other
	// node).
	Steps []Step `json:"steps,omitempty"`
}

// Step is one attempt within an event.
type Step struct {
	What     string        `json:"what"`
	Outcome  string        `json:"outcome"`
	Reason   string        `json:"reason"`
	Time     time.Duration `json:"time_ns"`
	Leaked   int64         `json:"leaked_bytes"`
	Expected string        `json:"expected"`
}

// CurvePoint is the fraction of members holding a record T after it was issued.
type CurvePoint struct {
	T        time.Duration `json:"t_ns"`
	Fraction float64       `json:"fraction"`
}
