package dtl

import (
	"fmt"
	"sync"
	"time"
)

// Replay window geometry, after WireGuard's replay filter: a ring of 64-bit blocks. One block is
// always being recycled, so the usable width is (ringBlocks-1)*64 = 8128 sequence numbers behind the
// highest one seen. Concurrent QUIC streams arrive out of order, which is why a bitmap is needed
// rather than a "must increase" rule.
const (
	replayBlockBits  = 64
	replayRingBlocks = 128 // power of two
	ReplayWindowSize = (replayRingBlocks - 1) * replayBlockBits
)

// ReplayWindow accepts each sequence number at most once and refuses numbers too far behind the
// highest seen. One window belongs to one tunnel session; it is safe for concurrent use by that
// session's streams. The zero value is ready to use.
type ReplayWindow struct {
	mu      sync.Mutex
	started bool
	last    uint64 // highest sequence number accepted
	ring    [replayRingBlocks]uint64
}

// Check accepts seq once: nil the first time, ErrReplay for a repeat, ErrTooOld (which also matches
// ErrReplay) when seq is more than ReplayWindowSize behind the highest accepted number. Only call it
// for records whose signature and session binding already verified, or an attacker could burn
// sequence numbers.
func (w *ReplayWindow) Check(seq uint64) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	block := seq / replayBlockBits
	switch {
	case !w.started || seq > w.last:
		if w.started {
			cur := w.last / replayBlockBits
			diff := block - cur
			if diff > replayRingBlocks {
				diff = replayRingBlocks
			}
			for i := uint64(1); i <= diff; i++ {
				w.ring[(cur+i)%replayRingBlocks] = 0
			}
		}
		w.started = true
		w.last = seq
	case w.last-seq > ReplayWindowSize:
		return fmt.Errorf("%w: sequence %d, highest seen %d", ErrTooOld, seq, w.last)
	}
	idx := block % replayRingBlocks
	bit := uint64(1) << (seq % replayBlockBits)
	if w.ring[idx]&bit != 0 {
		return fmt.Errorf("%w: sequence %d already admitted on this session", ErrReplay, seq)
	}
	w.ring[idx] |= bit
	return nil
}

// DefaultSkew is the freshness tolerance used when a Verifier leaves MaxSkew zero: records carry
// their issue time, and node clocks are assumed NTP-synchronised to well within this.
const DefaultSkew = 30 * time.Second

// CheckFresh refuses a record issued more than skew before now (ErrStale) or more than skew after
// now (ErrFuture). A non-positive skew fails closed with ErrConfig.
func CheckFresh(issuedAt, now time.Time, skew time.Duration) error {
	if skew <= 0 {
		return fmt.Errorf("%w: freshness skew must be positive", ErrConfig)
	}
	if d := now.Sub(issuedAt); d > skew {
		return fmt.Errorf("%w: issued %s ago, limit %s; check the sender's clock", ErrStale, d.Round(time.Millisecond), skew)
	}
	if d := issuedAt.Sub(now); d > skew {
		return fmt.Errorf("%w: issued %s ahead of this node's clock, limit %s; check clock sync", ErrFuture, d.Round(time.Millisecond), skew)
	}
	return nil
}
