package membership

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"time"
)

// joinGrace is how long Join keeps waiting for the seeds still being dialed once one has
// answered. One live seed is enough for memberlist to learn the pool; a few more guard against a
// seed whose own view is partial; but a black-holed seed, whose dial only ends at its timeout,
// must not hold up a join that already has a live seed.
const joinGrace = 250 * time.Millisecond

// Join joins zone's pool through seeds. Each seed is dialed first over the zone's tunnel, which
// proves its identity (a seed whose address answers with another certificate, or that refuses
// ours, fails here with the tunnel's sentinel); then memberlist exchanges state with the seeds
// that answered. It returns how many seeds it joined through, and the seeds' errors when none.
//
// Seeds are dialed JoinParallel at a time, each address for at most JoinSeedTimeout, so that a
// dead or black-holed seed (whose QUIC dial waits for the handshake timeout) cannot spend the
// caller's whole deadline while live seeds wait behind it. The order changes between calls:
// seeds whose last dial failed go last, the longest-failed first, and the others are shuffled.
// Once a seed has answered, Join waits joinGrace for the dials still running, launches no more,
// and joins through the seeds that answered.
func (m *Membership) Join(ctx context.Context, zone string, seeds []Seed) (int, error) {
	p, err := m.pool(zone)
	if err != nil {
		return 0, err
	}
	groups := p.joinOrder(seeds)
	if len(groups) == 0 {
		return 0, errors.New("membership: no seeds to join")
	}
	answered, errs := p.dialSeeds(ctx, groups)
	if len(answered) == 0 {
		if len(errs) == 0 {
			errs = append(errs, fmt.Errorf("membership: join zone %s: no seed answered: %w", zone, ctx.Err()))
		}
		return 0, errors.Join(errs...)
	}
	if len(errs) > 0 {
		m.log.Debug("join: some seeds did not answer", "zone", zone, "answered", len(answered), "err", errors.Join(errs...))
	}
	addrs := make([]string, 0, len(answered))
	for _, s := range answered {
		// memberlist's Join takes "name/addr" strings, and a SPIFFE ID holds slashes; the
		// transport learns the name for the address instead.
		release := p.tr.Hint(s.Addr, s.NodeID)
		defer release()
		addrs = append(addrs, s.Addr.String())
	}
	n, err := p.ml().Join(addrs)
	if n == 0 {
		return 0, errors.Join(append(errs, fmt.Errorf("membership: join zone %s: %w", zone, err))...)
	}
	return n, nil
}

// joinOrder drops this node and repeated seeds, orders the rest (never-failed seeds shuffled,
// then failed ones, longest-failed first) and groups the addresses of one node ID together in
// that order: the endpoint coalesces concurrent dials to one node ID, so a node's addresses are
// tried one after another by one dialer.
func (p *pool) joinOrder(seeds []Seed) [][]Seed {
	self := p.m.cfg.NodeID
	p.mu.Lock()
	failed := make(map[Seed]time.Time, len(p.failed))
	for _, s := range seeds {
		if at, ok := p.failed[s]; ok {
			failed[s] = at
		}
	}
	// Seeds no longer offered are forgotten: the memory is bounded by the seed list.
	p.failed = failed
	p.mu.Unlock()

	uniq := make([]Seed, 0, len(seeds))
	for _, s := range seeds {
		if s.NodeID != self && !slices.Contains(uniq, s) {
			uniq = append(uniq, s)
		}
	}
	rand.Shuffle(len(uniq), func(i, j int) { uniq[i], uniq[j] = uniq[j], uniq[i] })
	slices.SortStableFunc(uniq, func(a, b Seed) int {
		ta, fa := failed[a]
		tb, fb := failed[b]
		switch {
		case fa != fb && fa:
			return 1
		case fa != fb:
			return -1
		case fa:
			return ta.Compare(tb)
		}
		return 0
	})
	var groups [][]Seed
	at := map[string]int{}
	for _, s := range uniq {
		if i, ok := at[s.NodeID]; ok {
			groups[i] = append(groups[i], s)
			continue
		}
		at[s.NodeID] = len(groups)
		groups = append(groups, []Seed{s})
	}
	return groups
}

type seedResult struct {
	answered Seed // valid when ok
	ok       bool
	errs     []error
}

// dialSeeds dials groups in order, JoinParallel at a time, until one answers (then joinGrace
// more for the dials already running), every group is done, or ctx ends. The dials run on
// goroutines the Membership owns, under its context rather than ctx: a dial still running when
// Join returns is not cut mid-handshake (which would leave the seed holding a tunnel its dialer
// abandoned) but ends within JoinSeedTimeout per address, its outcome kept for the next Join's
// order; Close stops them.
func (p *pool) dialSeeds(ctx context.Context, groups [][]Seed) (answered []Seed, errs []error) {
	m := p.m
	results := make(chan seedResult, len(groups)) // never blocks a dial that outlives the call
	var (
		next, running int
		graceC        <-chan time.Time
	)
	for {
		for running < m.cfg.JoinParallel && next < len(groups) && len(answered) == 0 && ctx.Err() == nil {
			g := groups[next]
			if !m.spawn(func() { results <- p.dialSeed(g) }) {
				return answered, append(errs, ErrClosed)
			}
			next++
			running++
		}
		if running == 0 {
			return answered, errs
		}
		select {
		case r := <-results:
			running--
			errs = append(errs, r.errs...)
			if r.ok {
				answered = append(answered, r.answered)
				if graceC == nil {
					grace := time.NewTimer(joinGrace)
					defer grace.Stop()
					graceC = grace.C
				}
			}
		case <-graceC:
			return answered, errs
		case <-ctx.Done():
			return answered, append(errs, fmt.Errorf("membership: %d seed dials still running: %w", running, ctx.Err()))
		}
	}
}

// spawn runs f on a goroutine the Membership owns (Close waits for it); false once closed.
func (m *Membership) spawn(f func()) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return false
	}
	m.wg.Go(f)
	return true
}

// dialSeed dials a node's addresses one after another, each for at most JoinSeedTimeout, and
// remembers which failed.
func (p *pool) dialSeed(addrs []Seed) seedResult {
	var errs []error
	for _, s := range addrs {
		ctx, cancel := context.WithTimeout(p.m.ctx, p.m.cfg.JoinSeedTimeout)
		_, err := p.m.cfg.Endpoint.Dial(ctx, s.Addr, s.NodeID, p.zone)
		cancel()
		p.mu.Lock()
		if err == nil {
			delete(p.failed, s)
		} else if p.m.ctx.Err() == nil {
			p.failed[s] = time.Now()
		}
		p.mu.Unlock()
		if err == nil {
			return seedResult{answered: s, ok: true}
		}
		errs = append(errs, fmt.Errorf("membership: seed %s at %s: %w", s.NodeID, s.Addr, err))
		if p.m.ctx.Err() != nil {
			break
		}
	}
	return seedResult{errs: errs}
}
