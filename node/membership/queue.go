package membership

import (
	"math"
	"slices"
	"sync"
)

// recordQueue holds the records a pool still has to gossip. It replaces memberlist's
// TransmitLimitedQueue for records, for two reasons measured in the simulator (400 and 1,000
// nodes on two cores, docs/benchmarks.md): memberlist's queue counts a transmission when the
// message is taken for a packet, so a record whose packets were all dropped before they left
// this node (the background dial to a member without a tunnel failed, or was refused, or waited
// out its deadline) had spent its budget anyway, and the epidemic died out at 5–26 % of the
// zone; and it sends a record to the same member again and again. Here a transmission counts
// only once the transport handed the packet to a tunnel (gossip.Transport.SendPacket), a member
// that got a copy is not sent another, and attempts are bounded so that a node cut off from
// everyone stops trying.
type recordQueue struct {
	mu   sync.Mutex
	recs []*outRecord
	// cands is round's working list of one record's candidates, which pick may reorder and
	// shorten; it is reused from record to record and round to round while records are queued,
	// and dropped when the queue empties, so that a pool at rest holds no copy of its members.
	cands []Member
}

type outRecord struct {
	msg []byte
	// to is the members a copy was handed to, or is on its way to (an entry is removed again
	// when the packet is dropped here, so that the member may be tried later).
	to        map[string]bool
	delivered int // packets handed to a tunnel
	inflight  int // packets waiting for a background dial
	tries     int // packets that were dropped here
}

// maxTriesMult bounds the packets a record may lose before it is given up: this many times its
// transmission limit. Push/pull reconciles the members it never reached.
const maxTriesMult = 4

// retransmitLimit is memberlist's: mult·⌈log10(n+1)⌉ transmissions of each message per node.
func retransmitLimit(mult, n int) int {
	return mult * int(math.Ceil(math.Log10(float64(n+1))))
}

func (q *recordQueue) add(msg []byte) *outRecord {
	q.mu.Lock()
	defer q.mu.Unlock()
	r := &outRecord{msg: msg, to: map[string]bool{}}
	q.recs = append(q.recs, r)
	return r
}

// claim marks member as sent r outside the rounds (pool.sendOpen), unless a copy was handed to
// it or is on its way: the rounds then spend r's transmissions on other members. It reports
// whether the caller is to send.
func (q *recordQueue) claim(r *outRecord, member string) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	if r.to[member] {
		return false
	}
	r.to[member] = true
	return true
}

// unclaim undoes a claim whose packet was dropped here, so that a round may try the member.
// Such a packet counts neither as a transmission nor as a try: it was not the round's choice.
func (q *recordQueue) unclaim(r *outRecord, member string) {
	q.mu.Lock()
	defer q.mu.Unlock()
	delete(r.to, member)
}

// pending returns the records still queued (a copy of the list; the records are shared).
func (q *recordQueue) pending() []*outRecord {
	q.mu.Lock()
	defer q.mu.Unlock()
	return slices.Clone(q.recs)
}

// len is the number of records still queued.
func (q *recordQueue) len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.recs)
}

// send is a packet to hand to the transport for a round: the record and the member.
type send struct {
	rec    *outRecord
	member Member
}

// round plans one gossip round: for each queued record, up to fanout members it has not been
// handed to yet, chosen by pick from the candidates: members except those named in skip. It drops
// records that are done: delivered limit times, dropped limit·maxTriesMult times, or sent to every
// member. The caller sends the packets and reports each one's fate with done. members is only
// read (it is the pool's shared snapshot); pick gets a scratch list it may reorder, valid until it
// returns.
func (q *recordQueue) round(members []Member, skip []string, limit, fanout int, pick func(cands []Member, k int) []Member) []send {
	q.mu.Lock()
	defer q.mu.Unlock()
	out := make([]send, 0, len(q.recs)*max(fanout, 0))
	keep := q.recs[:0]
	for _, r := range q.recs {
		cands := q.cands[:0]
		for _, m := range members {
			if !r.to[m.NodeID] && !slices.Contains(skip, m.NodeID) {
				cands = append(cands, m)
			}
		}
		q.cands = cands
		if r.delivered >= limit || r.tries >= limit*maxTriesMult || (len(cands) == 0 && r.inflight == 0) {
			continue
		}
		keep = append(keep, r)
		// A record whose packets wait for dials sends fewer new ones: the budget is in flight.
		k := min(fanout, max(0, limit-r.delivered-r.inflight))
		for _, m := range pick(cands, k) {
			r.to[m.NodeID] = true
			r.inflight++
			out = append(out, send{rec: r, member: m})
		}
	}
	clear(q.recs[len(keep):])
	q.recs = keep
	if len(keep) == 0 {
		q.cands = nil
	} else {
		clear(q.cands[:cap(q.cands)]) // no departed member kept alive between rounds
	}
	return out
}

// done records the fate of one packet planned by round.
func (q *recordQueue) done(s send, sent bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	s.rec.inflight--
	if sent {
		s.rec.delivered++
		return
	}
	s.rec.tries++
	delete(s.rec.to, s.member.NodeID)
}
