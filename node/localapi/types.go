package localapi

import (
	"context"
	"net/netip"
	"time"
)

// FileSocket is the socket's name inside the node directory.
const FileSocket = "ute.sock"

// Routes. Version 1 of the API; a breaking change gets /v2 beside it.
const (
	PathStatus      = "/v1/status"
	PathWhoIs       = "/v1/whois"       // ?addr=IP:PORT
	PathAgents      = "/v1/agents"      // POST AgentSpec; DELETE /v1/agents/{zone}/{name}
	PathRevocations = "/v1/revocations" // POST RevokeRequest
	PathAudit       = "/v1/audit"       // ?recent=N
	PathTrust       = "/v1/trust"       // ?subject=SPIFFE-ID or NAME.ZONE
)

// Backend is what the daemon implements. Errors should wrap one of this package's sentinels
// (ErrBadRequest, ErrNotFound, ErrConflict, ErrForbidden, ErrUnavailable) so the caller gets
// the right code; anything else is reported as "internal". ctx carries the caller (CallerFrom)
// and is cancelled when the request times out.
type Backend interface {
	Status(ctx context.Context) (Status, error)
	// WhoIs returns the verified DTL record of the flow whose remote end, as the local agent
	// sees it, is addr (the caller's overlay IP and port). ErrNotFound when no such flow is live.
	WhoIs(ctx context.Context, addr netip.AddrPort) (WhoIs, error)
	// AddAgent registers an agent and makes it live without a restart.
	AddAgent(ctx context.Context, spec AgentSpec) (Agent, error)
	RemoveAgent(ctx context.Context, zone, name string) error
	// Revoke signs and persists a revocation (this node's own agents, or itself) and returns
	// once it is durable.
	Revoke(ctx context.Context, req RevokeRequest) (Revocation, error)
	Audit(ctx context.Context, q AuditQuery) (Audit, error)
	// TrustExplain returns TrustFlow's view of subject (a SPIFFE ID, or NAME.ZONE of a local
	// agent): its score, the signals behind it and the arithmetic.
	TrustExplain(ctx context.Context, subject string) (TrustExplanation, error)
}

// Status is the node's state as `ute status --json` prints it.
type Status struct {
	Node          string       `json:"node"` // SPIFFE ID
	Name          string       `json:"name"`
	Version       string       `json:"version,omitempty"` // the daemon's `ute --version` line
	TrustDomain   string       `json:"trust_domain"`
	Region        string       `json:"region,omitempty"`
	Serial        string       `json:"serial"` // "serial:<decimal>" of the node certificate
	NotAfter      time.Time    `json:"not_after"`
	StartedAt     time.Time    `json:"started_at"`
	Interface     string       `json:"interface"` // netstack | tun
	Transport     string       `json:"transport"` // quic | wireguard
	Listen        string       `json:"listen"`    // bound UDP address
	Advertise     string       `json:"advertise,omitempty"`
	Metrics       string       `json:"metrics,omitempty"` // bound metrics address; empty: off
	Authority     string       `json:"authority,omitempty"`
	PolicyVersion uint64       `json:"policy_version,omitempty"`
	Zones         []ZoneStatus `json:"zones"`
	Agents        []Agent      `json:"agents"`
	Revocations   []Revocation `json:"revocations"`
	Renewal       Renewal      `json:"renewal"`
	// Trust holds TrustFlow's scores; empty until TrustFlow runs.
	Trust []TrustScore `json:"trust"`
}

// ZoneStatus is one zone the node holds.
type ZoneStatus struct {
	Name    string   `json:"name"`
	CIDRs   []string `json:"cidrs"`
	Members int      `json:"members"` // live gossip members, this node included
	Peers   []Peer   `json:"peers"`
}

// Tunnel states of a peer.
const (
	TunnelUp         = "up"
	TunnelConnecting = "connecting"
	TunnelDown       = "down" // known member, no tunnel open
)

// Peer is another node of a zone and this node's tunnel to it.
type Peer struct {
	Node   string    `json:"node"` // SPIFFE ID
	Addr   string    `json:"addr"`
	Tunnel string    `json:"tunnel"` // TunnelUp, TunnelConnecting or TunnelDown
	Since  time.Time `json:"since,omitzero"`
	Flows  int       `json:"flows"` // live flows on the tunnel
}

// Agent is an agent hosted by this node.
type Agent struct {
	Name        string    `json:"name"`
	Zone        string    `json:"zone"`
	ID          string    `json:"id"` // SPIFFE ID
	OverlayIP   string    `json:"overlay_ip"`
	Serial      string    `json:"serial,omitempty"`
	NotAfter    time.Time `json:"not_after,omitzero"`
	Fingerprint string    `json:"fingerprint,omitempty"` // hex SHA-256 workload fingerprint
	Exe         string    `json:"exe,omitempty"`
	UID         *uint32   `json:"uid,omitempty"`
	Revoked     bool      `json:"revoked,omitempty"`
}

// Revocation is a revocation record the node holds.
type Revocation struct {
	Subject    string    `json:"subject"` // SPIFFE ID or serial:<decimal>
	Reason     string    `json:"reason"`
	Issuer     string    `json:"issuer,omitempty"` // SPIFFE ID of the signer
	IssuedAt   time.Time `json:"issued_at,omitzero"`
	ReceivedAt time.Time `json:"received_at,omitzero"`
}

// Renewal states.
const (
	RenewalOK       = "ok"       // certificate valid, next renewal scheduled
	RenewalRetrying = "retrying" // the last attempt failed; backing off
	RenewalDisabled = "disabled" // no authority address: renewal is manual
)

// Renewal is the state of the node certificate's automatic renewal.
type Renewal struct {
	State       string    `json:"state"`
	NextAt      time.Time `json:"next_at,omitzero"`
	LastSuccess time.Time `json:"last_success,omitzero"`
	LastFailure time.Time `json:"last_failure,omitzero"`
	LastError   string    `json:"last_error,omitempty"`
}

// TrustScore is a subject's TrustFlow score with the reasons behind it.
type TrustScore struct {
	Subject string   `json:"subject"`
	Score   int      `json:"score"`
	Reasons []string `json:"reasons"`
	// Action is what the score calls for under the subject's zone thresholds: allow,
	// deny_flows or isolate_and_revoke; empty when no zone's thresholds apply.
	Action string `json:"action,omitempty"`
}

// TrustExplanation is a subject's score with the signals and the arithmetic behind it.
type TrustExplanation struct {
	Subject      string       `json:"subject"`
	Score        int          `json:"score"`
	Action       string       `json:"action,omitempty"`
	MinTrust     int          `json:"min_trust"`
	IsolateBelow int          `json:"isolate_below"`
	Penalty      float64      `json:"penalty"`
	DecayPerHour int          `json:"decay_per_hour"`
	Now          time.Time    `json:"now"`
	Full         time.Time    `json:"full,omitzero"` // when the score is back to 100 without new signals
	Folded       int          `json:"folded"`        // older events folded into the first listed
	Events       []TrustEvent `json:"events"`
	Steps        []string     `json:"steps"`
}

// TrustEvent is one signal that changed a score.
type TrustEvent struct {
	Kind         string    `json:"kind"`
	Weight       int       `json:"weight"`
	Reason       string    `json:"reason"`
	At           time.Time `json:"at"`
	Recovered    float64   `json:"recovered"` // points decay removed since the previous event
	PenaltyAfter float64   `json:"penalty_after"`
	ScoreBefore  int       `json:"score_before"`
	ScoreAfter   int       `json:"score_after"`
}

// WhoIs is the verified DTL record of a flow, as the receiving node admitted it.
type WhoIs struct {
	Agent       string    `json:"agent"` // source agent SPIFFE ID
	AgentName   string    `json:"agent_name"`
	Zone        string    `json:"zone"`
	Node        string    `json:"node"` // SPIFFE ID of the node that attested the agent
	Region      string    `json:"region,omitempty"`
	Trust       int       `json:"trust"`
	Drift       []string  `json:"drift"`
	Fingerprint string    `json:"fingerprint"` // hex SHA-256 workload fingerprint
	SourceIP    string    `json:"source_ip"`   // the source agent's overlay IP
	Source      string    `json:"source"`      // the address asked about
	Destination string    `json:"destination"`
	FlowID      uint64    `json:"flow_id"`
	IssuedAt    time.Time `json:"issued_at"`
	AgentSerial string    `json:"agent_serial"`
	NodeSerial  string    `json:"node_serial"`
	Local       bool      `json:"local"` // from an agent of this same node
}

// AgentSpec asks for a new agent.
type AgentSpec struct {
	Name   string            `json:"name"`
	Zone   string            `json:"zone"`
	Exe    string            `json:"exe"` // absolute path of the workload's executable
	UID    *uint32           `json:"uid,omitempty"`
	GID    *uint32           `json:"gid,omitempty"`
	Labels map[string]string `json:"labels,omitempty"` // policy selector labels
	// Lifetime is the certificate lifetime in seconds; 0 takes the node's default.
	Lifetime int64 `json:"lifetime_s,omitempty"`
}

// RevokeRequest asks the node to revoke a subject.
type RevokeRequest struct {
	Subject string `json:"subject"`
	Reason  string `json:"reason"`
}

// AuditQuery selects what Audit returns.
type AuditQuery struct {
	Recent int `json:"recent"` // how many of the newest entries to include (0..MaxRecent)
}

// Audit is a verification summary of the node's audit log and its newest entries.
type Audit struct {
	Entries    int          `json:"entries"`
	Anchored   int          `json:"anchored"`
	Unanchored int          `json:"unanchored"`
	LastHash   string       `json:"last_hash"`
	Signed     bool         `json:"signed"`
	OK         bool         `json:"ok"`
	FirstBad   int          `json:"first_bad"` // -1 when OK
	Problem    string       `json:"problem,omitempty"`
	Recent     []AuditEntry `json:"recent"`
}

// AuditEntry is one committed audit record.
type AuditEntry struct {
	Seq    uint64            `json:"seq"`
	Time   time.Time         `json:"time"`
	Event  string            `json:"event"`
	Fields map[string]string `json:"fields,omitempty"`
}
