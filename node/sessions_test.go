package node

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/node/state"
)

// Issue 10 §8: the receiver dropped a session after 60 s idle while the sender still named its
// chain by hash, so the first flow after a pause was refused as chain-unknown and audited as a
// denial. Now the session lives as long as its tunnel: the flow after the pause is admitted on
// the cached chain, nothing is denied, and the session goes when the tunnel closes.
func TestChainCacheOutlivesIdleTunnel(t *testing.T) {
	ns := cluster(t,
		nodeSpec{name: "a", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "billing-api", Zone: "payments"}}},
		nodeSpec{name: "b", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "ledger", Zone: "payments"}}},
	)
	a, b := ns["a"], ns["b"]
	billing := agent(t, a, "payments", "billing-api")
	sink := serveSink(t, agent(t, b, "payments", "ledger"), "8080")
	ctx := context.Background()
	tun, err := a.tunnelTo(ctx, b.ID().String(), "payments")
	require.NoError(t, err)
	waitDirectory(t, a, "payments", "ledger")
	dial := func() *Provenance {
		t.Helper()
		c, err := billing.Dial(ctx, "tcp", "ledger.payments:8080")
		require.NoError(t, err)
		require.NoError(t, c.Close())
		select {
		case p := <-sink.whois:
			return p
		case <-time.After(5 * time.Second):
			require.FailNow(t, "no flow arrived")
			return nil
		}
	}
	dial()
	require.True(t, dial().chainCached, "precondition: the sender names its chain by hash")

	// Both clocks move on past twice the freshness window (the old idle limit), and a flow on
	// another session (same-node) makes b sweep its idle sessions.
	for _, n := range []*testNode{a, b} {
		n.clock.Advance(2*b.skew() + time.Second)
	}
	b.session("payments", "spiffe://acme.internal/node/other", make([]byte, 32))

	p := dial()
	assert.True(t, p.chainCached, "admitted on the chain cached before the pause")
	assert.Empty(t, denials(t, b), "nothing refused, nothing audited as a denial")
	assert.Zero(t, b.Stats().FlowsDenied)

	// The session goes with its tunnel.
	key := string(tun.Exporter())
	b.mu.Lock()
	_, ok := b.sessions[key]
	b.mu.Unlock()
	require.True(t, ok)
	require.NoError(t, tun.Close())
	require.Eventually(t, func() bool {
		b.mu.Lock()
		defer b.mu.Unlock()
		_, ok := b.sessions[key]
		return !ok
	}, 5*time.Second, 5*time.Millisecond, "the receiver forgets the session of a closed tunnel")
}
