package scenario

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"time"
)

// Scenario is one parsed and validated scenario file.
type Scenario struct {
	Name        string    `yaml:"name"`
	Description string    `yaml:"description"`
	Seed        uint64    `yaml:"seed"`
	Network     Network   `yaml:"network"`
	Gossip      string    `yaml:"gossip"` // "fast" (default), "lan" or "scale" (see GossipTiming in package sim)
	TrustDomain string    `yaml:"trust_domain"`
	Zones       []Zone    `yaml:"zones"`
	Nodes       []Group   `yaml:"nodes"`
	Traffic     []Traffic `yaml:"traffic"`
	Timeline    []Event   `yaml:"timeline"`
	Settle      Duration  `yaml:"settle"` // wait after the timeline before the final tally
	// TunnelIdle is how long a tunnel that has carried only gossip stays up when silent before
	// the node closes it (tunnel.Limits.GossipIdleTimeout); 0 keeps the node default (60 s).
	TunnelIdle Duration `yaml:"tunnel_idle"`
	// Dilation is the time-dilation factor k: the run makes every timer it can reach (gossip
	// timings, link latency and jitter, tunnel idle, the daemon's reconnect and duplicate
	// confirmation, the timeline) k times slower and reports the times it measures divided by
	// k, so that the nodes get k times the CPU per simulated second. 0 or 1: none.
	Dilation int `yaml:"dilation"`
	// Start is how the nodes start: "all" (the default) starts them all at once, each joining
	// through the bootstrap members the authority gave it; "staggered" starts them a few at a
	// time through their zones' first node (the hub), each after the previous ones have
	// joined, then points every node at the last one started (see docs/simulator.md, "Scale").
	Start string `yaml:"start"`
	// Warmup is how long (simulated time) the zone runs after discovery before the timeline
	// starts. Every member a node learns it re-broadcasts, and those broadcasts go before
	// the records in each gossip packet: at 1,000 members a node that has just learned the zone
	// needs about 90 s of gossip rounds to drain them. With start: staggered, gossip packets to
	// members without a tunnel stay dropped during the warmup, as during discovery.
	Warmup Duration  `yaml:"warmup"`
	Limits RunLimits `yaml:"limits"`
	file   string
}

// RunLimits bound the run.
type RunLimits struct {
	// Gossip is how long the nodes may take to find their zone peers before the run fails.
	Gossip Duration `yaml:"gossip"`
	// Members is the fraction of its zone's live members every node must see before the
	// timeline starts (default 1: all of them). Large runs may accept slightly less: memberlist
	// can hold a member it declared failed, while the member itself never heard so, until a
	// push/pull reaches the member (minutes at hundreds of nodes); gossip still reaches both.
	Members float64 `yaml:"members"`
}

// Network is the in-memory underlay's default link.
type Network struct {
	Latency Duration `yaml:"latency"`
	Jitter  Duration `yaml:"jitter"`
	Loss    float64  `yaml:"loss"`
}

// Zone is a zone of the generated policy.
type Zone struct {
	Name    string   `yaml:"name"`
	CIDR    string   `yaml:"cidr"`
	Regions []string `yaml:"regions"`
	Rules   []Rule   `yaml:"rules"`
}

// Rule is an allow rule of the generated policy, in the policy's own syntax.
type Rule struct {
	From  string   `yaml:"from"`
	To    string   `yaml:"to"`
	Ports []string `yaml:"ports"`
}

// Group is Count nodes with the same zones, region and agents. With Count 1 the node is named
// Name; otherwise Name-0 … Name-(Count-1), and each agent name gets the same suffix.
type Group struct {
	Name   string   `yaml:"name"`
	Count  int      `yaml:"count"`
	Zones  []string `yaml:"zones"`
	Region string   `yaml:"region"`
	Agents []Agent  `yaml:"agents"`
}

// Agent is an agent every node of a group runs.
type Agent struct {
	Name string `yaml:"name"`
	Zone string `yaml:"zone"`
}

// Traffic is a legitimate flow that runs for the whole timeline: every Interval, From opens a
// flow to To and exchanges a few bytes. A refused or failed flow while neither end is revoked
// or crashed is a false denial.
type Traffic struct {
	From     string   `yaml:"from"` // agent.zone
	To       string   `yaml:"to"`   // agent.zone:port
	Interval Duration `yaml:"interval"`
}

// Event kinds.
const (
	KindFlow        = "flow"               // From dials To; expect says whether it must be blocked
	KindLateral     = "lateral_movement"   // a flow whose ends are in different zones
	KindReplay      = "replay"             // a captured DTL record replayed: same session, new session, other node
	KindTokenReuse  = "token_reuse"        // a used join token presented by another host
	KindForged      = "forged_provenance"  // a node signs an agent certificate for a zone it lacks
	KindRevoke      = "revoke"             // the authority revokes an agent or a node
	KindPartition   = "partition"          // the underlay splits into sets of groups
	KindHeal        = "heal"               // the partition ends; records catch up
	KindCrash       = "crash"              // a node stops
	KindRejoin      = "rejoin"             // a crashed node starts again on its directory
	KindRegionDrift = "region_drift"       // the node's region file names another region (TrustFlow)
	KindDuplicate   = "duplicate_identity" // refused: write directory_copy
	KindExeSwap     = "exe_swap"           // another executable uses an agent's proxy (workload attestation)
	KindDirCopy     = "directory_copy"     // a node's directory runs on a second host (TrustFlow duplicates)
	KindChurn       = "churn"              // rounds of nodes of a group crashing and restarting
	KindPolicy      = "policy_change"      // the authority releases a policy with a zone's rules replaced
)

// Unsupported maps the declared event kinds this version cannot run to the reason.
var unsupported = map[string]string{
	KindDuplicate: "a duplicated identity is made by copying a node's directory to a second host: write directory_copy",
}

// Event is one step of the timeline.
type Event struct {
	At     Duration   `yaml:"at"` // offset from the timeline's start; events run in order
	Kind   string     `yaml:"event"`
	Name   string     `yaml:"name"`   // label in the report; defaults to the kind
	From   string     `yaml:"from"`   // agent.zone (flow, lateral_movement, replay)
	To     string     `yaml:"to"`     // agent.zone:port
	Via    string     `yaml:"via"`    // replay: the node that replays; forged_provenance: the forger
	Node   string     `yaml:"node"`   // token_reuse, crash, rejoin, revoke (a node)
	Agent  string     `yaml:"agent"`  // revoke (an agent): agent.zone
	Zone   string     `yaml:"zone"`   // forged_provenance: the zone the forged certificate claims
	Sets   [][]string `yaml:"sets"`   // partition: groups or node names per side
	Region string     `yaml:"region"` // region_drift: where the node runs now
	Group  string     `yaml:"group"`  // churn: the group whose nodes restart
	Count  int        `yaml:"count"`  // churn: nodes restarted per round (default 1)
	Rounds int        `yaml:"rounds"` // churn: rounds (default 1)
	Down   Duration   `yaml:"down"`   // churn: how long each restarted node stays down (default 500ms)
	Rules  []Rule     `yaml:"rules"`  // policy_change: the zone's rules from now on (empty: none)
	Expect Expect     `yaml:"expect"`
	line   int
}

// Line is the event's line in its file.
func (e Event) Line() int { return e.line }

// Label is the event's name in the report.
func (e Event) Label() string {
	if e.Name != "" {
		return e.Name
	}
	return e.Kind
}

// Expect is what the run checks for an event.
type Expect struct {
	// Outcome is "blocked" or "allowed" (flow, lateral_movement, replay, token_reuse,
	// forged_provenance, region_drift, exe_swap, directory_copy); revoke, heal, rejoin, churn
	// and policy_change are "converged".
	Outcome string `yaml:"outcome"`
	// Within bounds the time to block (attacks) or to converge (revoke, heal, rejoin, churn,
	// policy_change).
	Within Duration `yaml:"within"`
	// LeakedBytes is the most bytes that may reach the target of a blocked attempt.
	LeakedBytes int64 `yaml:"leaked_bytes"`
	// Converged is the fraction of live members that must hold the records (default 1).
	Converged float64 `yaml:"converged"`
	// FalseDenials is the most legitimate flows that may fail during the event; -1 (default)
	// does not check.
	FalseDenials *int `yaml:"false_denials"`
}

// Duration is a time.Duration written as Go writes it ("250ms", "2s").
type Duration time.Duration

// D is the duration as a time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }

// UnmarshalText parses "250ms"; a bare number is refused (units are required).
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return fmt.Errorf("%q is not a duration (write e.g. 250ms or 2s)", b)
	}
	if v < 0 {
		return fmt.Errorf("%q is negative", b)
	}
	*d = Duration(v)
	return nil
}

// MarshalText writes the duration as Go does.
func (d Duration) MarshalText() ([]byte, error) { return []byte(time.Duration(d).String()), nil }

// AgentRef is agent.zone.
type AgentRef struct{ Agent, Zone string }

func (a AgentRef) String() string { return a.Agent + "." + a.Zone }

// Dest is agent.zone:port.
type Dest struct {
	AgentRef
	Port uint16
}

func (d Dest) String() string { return d.AgentRef.String() + ":" + strconv.Itoa(int(d.Port)) }

// ParseAgentRef parses agent.zone.
func ParseAgentRef(s string) (AgentRef, error) {
	i := strings.LastIndexByte(s, '.')
	if i <= 0 || i == len(s)-1 {
		return AgentRef{}, fmt.Errorf("%q is not agent.zone", s)
	}
	return AgentRef{Agent: s[:i], Zone: s[i+1:]}, nil
}

// ParseDest parses agent.zone:port.
func ParseDest(s string) (Dest, error) {
	i := strings.LastIndexByte(s, ':')
	if i < 0 {
		return Dest{}, fmt.Errorf("%q is not agent.zone:port", s)
	}
	p, err := strconv.ParseUint(s[i+1:], 10, 16)
	if err != nil || p == 0 {
		return Dest{}, fmt.Errorf("%q: the port must be 1-65535", s)
	}
	a, err := ParseAgentRef(s[:i])
	if err != nil {
		return Dest{}, err
	}
	return Dest{AgentRef: a, Port: uint16(p)}, nil
}

// NodeNames expands a group into its node names.
func (g Group) NodeNames() []string {
	if g.Count == 1 {
		return []string{g.Name}
	}
	out := make([]string, g.Count)
	for i := range out {
		out[i] = fmt.Sprintf("%s-%d", g.Name, i)
	}
	return out
}

// AgentName is agent a's name on the i-th node of g.
func (g Group) AgentName(a Agent, i int) string {
	if g.Count == 1 {
		return a.Name
	}
	return fmt.Sprintf("%s-%d", a.Name, i)
}

// NodeCount is the number of nodes of the topology.
func (s *Scenario) NodeCount() int {
	n := 0
	for _, g := range s.Nodes {
		n += g.Count
	}
	return n
}

// File is the file the scenario came from.
func (s *Scenario) File() string { return s.file }

func validCIDR(s string) bool {
	p, err := netip.ParsePrefix(s)
	return err == nil && p == p.Masked()
}
