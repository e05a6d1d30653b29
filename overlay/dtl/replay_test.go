package dtl

import (
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestReplayWindow(t *testing.T) {
	type step struct {
		seq  uint64
		want error // nil: accepted
	}
	cases := []struct {
		name  string
		steps []step
	}{
		{"in order from zero", []step{{0, nil}, {1, nil}, {2, nil}}},
		{"duplicate", []step{{5, nil}, {5, ErrReplay}}},
		{"zero twice", []step{{0, nil}, {0, ErrReplay}}},
		{"out of order within window", []step{{10, nil}, {3, nil}, {7, nil}, {11, nil}, {3, ErrReplay}, {7, ErrReplay}}},
		{"edge of window accepted", []step{{ReplayWindowSize + 100, nil}, {100, nil}, {100, ErrReplay}}},
		{"one past the window is too old", []step{{ReplayWindowSize + 100, nil}, {99, ErrTooOld}}},
		{"large jump clears the ring", []step{{1, nil}, {2, nil}, {1 << 40, nil}, {1<<40 - 1, nil}, {2, ErrTooOld}}},
		{"jump of exactly one block", []step{{63, nil}, {64, nil}, {127, nil}, {0, nil}, {63, ErrReplay}, {64, ErrReplay}}},
		{"block reuse forgets nothing inside the window", []step{{0, nil}, {64 * 127, nil}, {1, nil}, {64*128 + 5, nil}, {0, ErrTooOld}, {64 * 127, ErrReplay}}},
		{"maximum sequence", []step{{^uint64(0), nil}, {^uint64(0), ErrReplay}, {^uint64(0) - 1, nil}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var w ReplayWindow
			for i, s := range tc.steps {
				err := w.Check(s.seq)
				if s.want == nil {
					require.NoError(t, err, "step %d seq %d", i, s.seq)
				} else {
					require.ErrorIs(t, err, s.want, "step %d seq %d", i, s.seq)
				}
			}
		})
	}
	assert.ErrorIs(t, ErrTooOld, ErrReplay, "too-old is a kind of replay")
}

// TestReplayWindowSlidingExhaustive walks a long shuffled-within-window sequence and checks the
// window against a reference set.
func TestReplayWindowSlidingExhaustive(t *testing.T) {
	var w ReplayWindow
	seen := map[uint64]bool{}
	var highest uint64
	// Deterministic out-of-order pattern: every number is delivered within a few hundred of its
	// neighbours, and every 7th number is delivered twice.
	for base := uint64(0); base < 40000; base += 512 {
		for i := uint64(0); i < 512; i++ {
			seq := base + (i*389)%512
			for rep := 0; rep < 1+int(seq%7/6); rep++ {
				err := w.Check(seq)
				switch {
				case seen[seq]:
					require.ErrorIs(t, err, ErrReplay, "seq %d", seq)
				case highest > seq && highest-seq > ReplayWindowSize:
					require.ErrorIs(t, err, ErrTooOld)
				default:
					require.NoError(t, err, "seq %d", seq)
					seen[seq] = true
					highest = max(highest, seq)
				}
			}
		}
	}
	assert.Len(t, seen, 40448)
}

func TestReplayWindowConcurrent(t *testing.T) {
	var w ReplayWindow
	var accepted atomic.Int64
	var wg sync.WaitGroup
	const workers, each = 8, 2000
	for g := 0; g < workers; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Every worker offers the same numbers: exactly one offer of each may win.
			for seq := uint64(0); seq < each; seq++ {
				if w.Check(seq) == nil {
					accepted.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	assert.Equal(t, int64(each), accepted.Load())
}

func TestCheckFresh(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	cases := []struct {
		name   string
		issued time.Time
		skew   time.Duration
		want   error
	}{
		{"now", now, time.Second, nil},
		{"just inside past", now.Add(-time.Second), time.Second, nil},
		{"just inside future", now.Add(time.Second), time.Second, nil},
		{"stale", now.Add(-time.Second - time.Millisecond), time.Second, ErrStale},
		{"future", now.Add(time.Second + time.Millisecond), time.Second, ErrFuture},
		{"zero time", time.Time{}, time.Second, ErrStale},
		{"no skew fails closed", now, 0, ErrConfig},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := CheckFresh(tc.issued, now, tc.skew)
			if tc.want == nil {
				require.NoError(t, err)
			} else {
				require.ErrorIs(t, err, tc.want)
			}
		})
	}
}
