package sim

import (
	"fmt"
	"time"
)

// spreadSnap is the gossip counters of every live node, summed: what a record's spread costs
// and loses, printed on the progress lines while a convergence is polled.
type spreadSnap struct {
	sent, dropped, dialFailures            uint64 // gossip transports (every pool)
	accepted, rebroadcasts, viaState, dups uint64 // membership record counters
	directSends, syncs                     uint64
	queued, queuing                        int // records still queued, and the nodes holding any
	granted, gaveUp, late                  uint64
	waiting                                int
}

// spreadSnapshot sums the counters of every live node.
func (r *runner) spreadSnapshot() spreadSnap {
	var s spreadSnap
	for _, n := range r.live("") {
		r.mu.RLock()
		d := n.d
		r.mu.RUnlock()
		if d == nil {
			continue
		}
		m := d.Gossip()
		if m == nil {
			continue
		}
		st := m.Stats()
		s.accepted += st.RecordsAccepted
		s.rebroadcasts += st.Rebroadcasts
		s.viaState += st.RecordsViaState
		s.dups += st.RecordsDuplicate
		s.directSends += st.DirectSends
		s.syncs += st.RecordSyncs
		q := 0
		for _, z := range m.Zones() {
			q += m.Queued(z)
			if tr, err := m.Transport(z); err == nil {
				ts := tr.Stats()
				s.sent += ts.PacketsSent
				s.dropped += ts.PacketsDropped
				s.dialFailures += ts.DialFailures
			}
		}
		s.queued += q
		if q > 0 {
			s.queuing++
		}
	}
	if r.gate != nil {
		s.granted, s.gaveUp, s.late = r.gate.granted.Load(), r.gate.gaveUp.Load(), r.gate.late.Load()
		s.waiting = r.gate.waiting()
	}
	return s
}

// line is the progress line for the spread since base, at simulated time el.
func (s spreadSnap) line(base spreadSnap, el time.Duration, frac float64) string {
	return fmt.Sprintf("  spread at %s: %.1f%%; packets sent %d, dropped %d, dial failures %d; records accepted %d (%d by push/pull), re-queued %d, duplicates %d, direct %d, probe syncs %d; queued %d at %d node(s); handshakes %d, gave up waiting %d, too late %d, waiting %d",
		fmtDur(el), frac*100, s.sent-base.sent, s.dropped-base.dropped, s.dialFailures-base.dialFailures,
		s.accepted-base.accepted, s.viaState-base.viaState, s.rebroadcasts-base.rebroadcasts, s.dups-base.dups, s.directSends-base.directSends, s.syncs-base.syncs,
		s.queued, s.queuing, s.granted-base.granted, s.gaveUp-base.gaveUp, s.late-base.late, s.waiting)
}
