package node

import (
	"context"
	"strconv"
	"time"

	"github.com/ute-project/ute/overlay/audit"
	"github.com/ute-project/ute/overlay/tunnel"
)

// reasonStalled is the audit reason of streams a peer opened and never completed before
// admission: stalled at their first-frame deadline, reset over the peer's pending budget, or
// cut with a tunnel closed for filling its budget with silent streams.
const reasonStalled = "stalled"

// onStalled audits one peer's pre-admission refusals of one interval (tunnel.Config.OnStalled) as
// one deny entry with reason `stalled` and exact counts. A peer can open such streams by the
// thousand, so they are never audited one by one, and never as `internal`.
func (n *Node) onStalled(r tunnel.StallReport) {
	f := map[string]string{
		"peer":    truncate(r.Peer),
		"reason":  reasonStalled,
		"stalled": strconv.FormatUint(r.Stalled, 10),
		"busy":    strconv.FormatUint(r.Busy, 10),
		"tunnels": strconv.FormatUint(r.ConnsRefused, 10),
		"first":   r.First.UTC().Format(time.RFC3339Nano),
		"last":    r.Last.UTC().Format(time.RFC3339Nano),
	}
	if err := n.audit.Append(context.Background(), audit.Entry{Event: audit.EventDeny, Fields: f}); err != nil {
		n.log.Error("audit append failed", "event", audit.EventDeny, "reason", reasonStalled, "err", err)
	}
	n.log.Warn("peer stalled streams before admission", "peer", r.Peer, "stalled", r.Stalled, "busy", r.Busy, "tunnels_closed", r.ConnsRefused)
}
