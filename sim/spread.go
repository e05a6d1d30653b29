package sim

import (
	"fmt"
	"syscall"
	"time"
)

// spreadSnap is the gossip counters of every live node, summed: what a record's spread costs
// and loses, printed on the progress lines while a convergence is polled.
type spreadSnap struct {
	sent, taken, dropped, dialFailures     uint64 // gossip transports (every pool)
	accepted, rebroadcasts, viaState, dups uint64 // membership record counters
	directSends, tunnelUpSends, syncs      uint64
	queueDropped                           uint64 // records dropped because a node's worker queue was full
	queued, queuing                        int    // records still queued, and the nodes holding any
	granted, gaveUp, late, deferred        uint64
	waiting                                int
	// held is the wall time the gate's slots were held, summed; slots the gate's size; cpu the
	// process's CPU time (user + system) and at the wall clock of the snapshot: the line shows
	// how long a handshake held its slot and how much of the machine the run used meanwhile.
	held  time.Duration
	slots int
	cpu   time.Duration
	at    time.Time
}

// processCPU is the CPU time (user + system) this process has used.
func processCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// spreadSnapshot sums the counters of every live node.
func (r *runner) spreadSnapshot() spreadSnap {
	var s spreadSnap
	for _, n := range r.live("") {
		d := r.daemonOf(n)
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
		s.tunnelUpSends += st.TunnelUpSends
		s.syncs += st.RecordSyncs
		s.queueDropped += st.QueueDropped
		q := 0
		for _, z := range m.Zones() {
			q += m.Queued(z)
			if tr, err := m.Transport(z); err == nil {
				ts := tr.Stats()
				s.sent += ts.PacketsSent
				s.taken += ts.PacketsTaken
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
		s.deferred = r.gate.deferred.Load()
		s.waiting = r.gate.waiting()
		s.held, s.slots = time.Duration(r.gate.held.Load()), r.gate.slots
	}
	s.cpu, s.at = processCPU(), time.Now()
	return s
}

// line is the progress line for the spread since base, at simulated time el.
func (s spreadSnap) line(base spreadSnap, el time.Duration, frac float64) string {
	return fmt.Sprintf("  spread at %s: %.1f%%; packets sent %d, taken before memberlist %d, dropped %d, dial failures %d; records accepted %d (%d by push/pull), re-queued %d, duplicates %d, lost in full worker queues %d, direct %d, on tunnel up %d, probe syncs %d; queued %d at %d node(s); handshakes %d, gave up waiting %d, too late %d, deferred %d, waiting %d; slot held %s per handshake (%d slots); CPU %.2f cores",
		fmtDur(el), frac*100, s.sent-base.sent, s.taken-base.taken, s.dropped-base.dropped, s.dialFailures-base.dialFailures,
		s.accepted-base.accepted, s.viaState-base.viaState, s.rebroadcasts-base.rebroadcasts, s.dups-base.dups, s.queueDropped-base.queueDropped, s.directSends-base.directSends, s.tunnelUpSends-base.tunnelUpSends, s.syncs-base.syncs,
		s.queued, s.queuing, s.granted-base.granted, s.gaveUp-base.gaveUp, s.late-base.late, s.deferred-base.deferred, s.waiting,
		perHandshake(s.held-base.held, s.granted-base.granted), s.slots, cores(s.cpu-base.cpu, s.at.Sub(base.at)))
}

// perHandshake is the mean wall time a slot was held, rounded for a progress line.
func perHandshake(held time.Duration, n uint64) string {
	if n == 0 {
		return "-"
	}
	return (held / time.Duration(n)).Round(100 * time.Microsecond).String()
}

// cores is cpu over wall, in cores (0 when the interval is empty).
func cores(cpu, wall time.Duration) float64 {
	if wall <= 0 {
		return 0
	}
	return cpu.Seconds() / wall.Seconds()
}
