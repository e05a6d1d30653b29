package node

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/node/state"
	"github.com/ute-project/ute/overlay/dtl"
	"github.com/ute-project/ute/overlay/tunnel"
)

// The offset is read from the refusal dtl.CheckFresh words; if that wording changes, this fails.
func TestClockOffsetReadsCheckFresh(t *testing.T) {
	now := time.Date(2026, 12, 6, 4, 0, 0, 0, time.UTC)
	reject := func(issued time.Time) error {
		d := dtl.Deny(dtl.CheckFresh(issued, now, 30*time.Second))
		return &tunnel.RejectedError{Reason: d.Reason, Code: d.Code, Message: d.Err.Error()}
	}
	off, known, ok := clockOffset(reject(now.Add(2*time.Minute + 500*time.Millisecond)))
	require.True(t, ok)
	require.True(t, known)
	assert.Equal(t, 2*time.Minute+500*time.Millisecond, off, "the sender is ahead")
	off, known, ok = clockOffset(reject(now.Add(-90 * time.Second)))
	require.True(t, ok && known)
	assert.Equal(t, -90*time.Second, off, "the sender is behind")

	_, known, ok = clockOffset(&tunnel.RejectedError{Reason: "stale", Code: dtl.ReasonStale, Message: "too old"})
	assert.True(t, ok, "a stale refusal is skew even when the peer does not say by how much")
	assert.False(t, known)
	_, _, ok = clockOffset(&tunnel.RejectedError{Reason: "policy", Code: dtl.ReasonPolicy, Message: "issued 2m0s ago"})
	assert.False(t, ok)
	_, _, ok = clockOffset(errors.New("issued 2m0s ago"))
	assert.False(t, ok, "only a peer's refusal counts")
}

// Issue 10 §8: a node whose clock is off by more than the freshness window had its directory
// exchange refused by the peer as future (or stale), and the SDK reported the name as unknown at
// resolve. Now Dial says skew, with the offset the peer measured; once the names are known, a
// flow refused for the same reason says so at admission.
func TestSkewedClockIsReportedAsSkew(t *testing.T) {
	ns := cluster(t,
		nodeSpec{name: "a", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "billing-api", Zone: "payments"}}},
		nodeSpec{name: "b", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "ledger", Zone: "payments"}}},
	)
	a, b := ns["a"], ns["b"]
	billing := agent(t, a, "payments", "billing-api")
	serveSink(t, agent(t, b, "payments", "ledger"), "8080")
	ctx := context.Background()

	a.clock.Advance(2 * time.Minute)
	_, err := billing.Dial(ctx, "tcp", "ledger.payments:8080")
	var re *RefusedError
	require.ErrorAs(t, err, &re)
	assert.Equal(t, "resolve", re.Stage)
	assert.Equal(t, "skew", re.Reason, "not unknown-name: %v", err)
	require.True(t, re.OffsetKnown)
	assert.InDelta(t, (2 * time.Minute).Seconds(), re.ClockOffset.Seconds(), 5, "a is about 2 min ahead of b")
	assert.ErrorIs(t, err, dtl.ErrFuture)
	assert.NotErrorIs(t, err, ErrUnknownName)
	assert.Contains(t, err.Error(), "ahead of the peer's")

	// Clocks agree again: the names resolve and a flow is admitted.
	a.clock.Advance(-2 * time.Minute)
	c, err := billing.Dial(ctx, "tcp", "ledger.payments:8080")
	require.NoError(t, err)
	require.NoError(t, c.Close())

	// a falls behind: the name is known, so the refusal comes at admission, as skew.
	a.clock.Advance(-2 * time.Minute)
	_, err = billing.Dial(ctx, "tcp", "ledger.payments:8080")
	require.ErrorAs(t, err, &re)
	assert.Equal(t, "admission", re.Stage)
	assert.Equal(t, "skew", re.Reason)
	require.True(t, re.OffsetKnown)
	assert.InDelta(t, (-2 * time.Minute).Seconds(), re.ClockOffset.Seconds(), 5, "a is about 2 min behind b")
	assert.ErrorIs(t, err, dtl.ErrStale)
	assert.Contains(t, err.Error(), "behind the peer's")
}

// The refusal message comes from the peer: reading the offset out of it never panics, and an
// offset it reports is the one the message states.
func FuzzClockOffset(f *testing.F) {
	f.Add(uint8(dtl.ReasonFuture), "dtl: record is from the future: issued 1m59.997s ahead of this node's clock, limit 30s")
	f.Add(uint8(dtl.ReasonStale), "dtl: record is stale: issued 45s ago, limit 30s; check the sender's clock")
	f.Add(uint8(dtl.ReasonStale), "issued -5s ago")
	f.Add(uint8(dtl.ReasonFuture), "issued 9999999999999h ahead")
	f.Add(uint8(dtl.ReasonStale), "")
	f.Add(uint8(dtl.ReasonFuture), "issued 1s ago")
	f.Add(uint8(dtl.ReasonStale), "issued 0s ago")
	f.Fuzz(func(t *testing.T, code uint8, msg string) {
		off, known, ok := clockOffset(&tunnel.RejectedError{Code: dtl.ReasonCode(code), Message: msg})
		if !ok {
			require.False(t, known)
			return
		}
		require.Contains(t, []dtl.ReasonCode{dtl.ReasonStale, dtl.ReasonFuture}, dtl.ReasonCode(code))
		if known {
			if dtl.ReasonCode(code) == dtl.ReasonFuture {
				require.GreaterOrEqual(t, off, time.Duration(0), "the sign follows the reason code")
			} else {
				require.LessOrEqual(t, off, time.Duration(0), "the sign follows the reason code")
			}
		}
	})
}
