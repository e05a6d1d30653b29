package daemon

import (
	"fmt"
	"sync"
	"time"

	"github.com/ute-project/ute/node"
	"github.com/ute-project/ute/node/trustflow"
)

// directoryDuplicates turns the node's "two directory entries" reports (node.DirectoryDuplicate:
// one agent name announced by two nodes of a zone at once, the holder's entry re-read and still
// current) into TrustFlow's duplicate_identity signal on the agent, the same signal as flows that
// alternate between two issuers (trust.go). Every exchange with the claimant reports the
// conflict again, so one agent is signalled at most once per trustflow.DefaultAgentWindow.
type directoryDuplicates struct {
	t    *trust
	mu   sync.Mutex
	last map[string]time.Time // agent → last signal
}

// maxDirectoryDuplicates bounds the agents remembered for the once-per-window rule.
const maxDirectoryDuplicates = 4096

func newDirectoryDuplicates(t *trust) *directoryDuplicates {
	return &directoryDuplicates{t: t, last: map[string]time.Time{}}
}

// report is node.Config.OnDirectoryDuplicate: it must not block, so it only queues the signal.
func (d *directoryDuplicates) report(dd node.DirectoryDuplicate) {
	now := d.t.d.now()
	d.mu.Lock()
	if at, ok := d.last[dd.Agent]; ok && now.Sub(at) < trustflow.DefaultAgentWindow {
		d.mu.Unlock()
		return
	}
	if len(d.last) >= maxDirectoryDuplicates {
		for a, at := range d.last {
			if now.Sub(at) >= trustflow.DefaultAgentWindow {
				delete(d.last, a)
			}
		}
		if len(d.last) >= maxDirectoryDuplicates {
			clear(d.last)
		}
	}
	d.last[dd.Agent] = now
	d.mu.Unlock()
	reason := fmt.Sprintf("announced by %s and %s at once: two directory entries", dd.Holder, dd.Claimant)
	d.t.observe(trustflow.Signal{Subject: dd.Agent, Kind: trustflow.KindDuplicateIdentity, Zone: dd.Zone, At: now, Reason: reason})
}
