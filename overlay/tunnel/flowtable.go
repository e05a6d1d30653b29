package tunnel

import (
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"
)

// flowTable tracks admitted inbound flows: it enforces the per-peer and per-agent limits and
// expires idle flows by the injected clock.
type flowTable struct {
	lim Limits

	mu       sync.Mutex
	perPeer  map[string]int
	perAgent map[string]int
	flows    map[*flowEntry]struct{}
}

type flowEntry struct {
	peer, agent string
	adm         Admission                  // the admission, for CloseFlows' predicate
	last        atomic.Int64               // unix nanoseconds of the last byte moved, by the injected clock
	close       func(quic.StreamErrorCode) // resets the flow; set by activate, guarded by flowTable.mu
	released    bool                       // guarded by flowTable.mu
}

func newFlowTable(lim Limits) *flowTable {
	return &flowTable{
		lim:      lim,
		perPeer:  make(map[string]int),
		perAgent: make(map[string]int),
		flows:    make(map[*flowEntry]struct{}),
	}
}

// reserve admits a flow into the table or refuses it with ErrFlowLimit naming the limit.
func (ft *flowTable) reserve(peer string, adm Admission, now time.Time) (*flowEntry, error) {
	agent := adm.Agent
	ft.mu.Lock()
	defer ft.mu.Unlock()
	if n := ft.perPeer[peer]; n >= ft.lim.MaxFlowsPerPeer {
		return nil, fmt.Errorf("%w: peer %s has %d flows (MaxFlowsPerPeer)", ErrFlowLimit, peer, n)
	}
	if n := ft.perAgent[agent]; n >= ft.lim.MaxFlowsPerAgent {
		return nil, fmt.Errorf("%w: agent %s has %d flows (MaxFlowsPerAgent)", ErrFlowLimit, agent, n)
	}
	ft.perPeer[peer]++
	ft.perAgent[agent]++
	e := &flowEntry{peer: peer, agent: agent, adm: adm}
	e.last.Store(now.UnixNano())
	ft.flows[e] = struct{}{}
	return e, nil
}

// activate gives the entry the function that closes its flow; until then sweeps skip it.
func (ft *flowTable) activate(e *flowEntry, closeFn func(quic.StreamErrorCode)) {
	ft.mu.Lock()
	defer ft.mu.Unlock()
	e.close = closeFn
}

func (ft *flowTable) release(e *flowEntry) {
	ft.mu.Lock()
	defer ft.mu.Unlock()
	if e.released {
		return
	}
	e.released = true
	delete(ft.flows, e)
	if ft.perPeer[e.peer]--; ft.perPeer[e.peer] <= 0 {
		delete(ft.perPeer, e.peer)
	}
	if ft.perAgent[e.agent]--; ft.perAgent[e.agent] <= 0 {
		delete(ft.perAgent, e.agent)
	}
}

func (e *flowEntry) touch(now time.Time) { e.last.Store(now.UnixNano()) }

// sweep expires flows idle for FlowIdleTimeout and returns how many.
func (ft *flowTable) sweep(now time.Time) int {
	cutoff := now.Add(-ft.lim.FlowIdleTimeout).UnixNano()
	var idle []func(quic.StreamErrorCode)
	ft.mu.Lock()
	for e := range ft.flows {
		if e.close != nil && e.last.Load() <= cutoff {
			idle = append(idle, e.close)
		}
	}
	ft.mu.Unlock()
	// close calls back into release, so it runs without the lock.
	for _, c := range idle {
		c(streamCodeIdle)
	}
	return len(idle)
}

func (ft *flowTable) closeAll() {
	ft.closeMatching(func(*flowEntry) bool { return true }, streamCodeClosed)
}

// closeMatching resets the activated flows that match and returns how many.
func (ft *flowTable) closeMatching(match func(*flowEntry) bool, code quic.StreamErrorCode) int {
	ft.mu.Lock()
	var hit []func(quic.StreamErrorCode)
	for e := range ft.flows {
		if e.close != nil && match(e) {
			hit = append(hit, e.close)
		}
	}
	ft.mu.Unlock()
	// close calls back into release, so it runs without the lock.
	for _, c := range hit {
		c(code)
	}
	return len(hit)
}

func (ft *flowTable) len() int {
	ft.mu.Lock()
	defer ft.mu.Unlock()
	return len(ft.flows)
}
