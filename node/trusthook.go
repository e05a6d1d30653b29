package node

import (
	"context"

	"github.com/ute-project/ute/overlay/audit"
)

// TrustFlow's hooks into the node: the node reports the events it sees (flow verdicts,
// credential failures) and asks for its own view of a subject's trust when it attests and when
// it admits. Scoring and acting live in node/trustflow and node/daemon; nothing here decides.

// EventTrust is the audit event of a TrustFlow action (a subject denied or isolated, with the
// signals behind it).
const EventTrust = "trust"

// FlowVerdict is one audited flow verdict with what TrustFlow needs to attribute it.
type FlowVerdict struct {
	Zone string
	// Peer is the tunnel's peer node, authenticated by the TLS handshake; this node's own ID for
	// same-node flows.
	Peer string
	// Agent and Node are the record's source claims ("" when the record did not decode). They
	// are verified only when the refusal comes after the signature check (dtl's order).
	Agent, Node string
	Destination string // "agent:port/proto" of the record
	Reason      string // dtl reason code name; "" for an admission
	Local       bool
}

// trustView is this node's own view of the lowest score among subjects (100 without TrustFlow).
func (n *Node) trustView(subjects ...string) int {
	v := 100
	if n.cfg.TrustView == nil {
		return v
	}
	for _, s := range subjects {
		if s == "" {
			continue
		}
		v = min(v, max(0, n.cfg.TrustView(s)))
	}
	return v
}

// attestedTrust is the score this node attests for agent: the configured score, lowered to the
// node's own TrustFlow view of the agent and of the node itself.
func (n *Node) attestedTrust(agent, node string) uint8 {
	return uint8(min(int(n.trust), n.trustView(agent, node)))
}

func (n *Node) credentialFailed(subject string, err error) {
	if n.cfg.OnCredentialFailure != nil {
		n.cfg.OnCredentialFailure(subject, err)
	}
}

// AppendAudit appends one entry to the node's audit log (TrustFlow's actions use EventTrust).
func (n *Node) AppendAudit(ctx context.Context, event string, fields map[string]string) error {
	for k, v := range fields {
		fields[k] = truncate(v)
	}
	return n.audit.Append(ctx, audit.Entry{Event: event, Fields: fields})
}
