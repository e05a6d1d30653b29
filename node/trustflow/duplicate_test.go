package trustflow

import (
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestAgentDuplicate(t *testing.T) {
	c := newClock()
	d := &AgentDuplicateDetector{Window: time.Minute}
	const ag = "spiffe://acme.internal/zone/payments/agent/billing-api"
	const x, y = "spiffe://acme.internal/node/a", "spiffe://acme.internal/node/m"
	at := func(s int) time.Time { return c.Now().Add(time.Duration(s) * time.Second) }

	// Steady traffic from its one node, then a move to another node: one switch of issuer.
	for s := range 30 {
		_, dup := d.Observe(ag, x, at(s))
		require.False(t, dup)
	}
	for s := 30; s < 200; s++ {
		_, dup := d.Observe(ag, y, at(s))
		require.False(t, dup, "a moved agent is not a duplicate (second %d)", s)
	}
	// Back to x long after the window: a second move, not two live issuers.
	_, dup := d.Observe(ag, x, at(300))
	require.False(t, dup)

	// Interleaved within the window: x, y, x.
	_, dup = d.Observe(ag, y, at(310))
	require.False(t, dup)
	got, dup := d.Observe(ag, x, at(320))
	require.True(t, dup)
	assert.Equal(t, Duplicate{Subject: ag, Addrs: []string{x, y}, Since: at(300)}, got)
	_, dup = d.Observe(ag, y, at(321))
	assert.False(t, dup, "reported once")

	// Another agent of the same names is independent; empty names are ignored.
	_, dup = d.Observe(ag+"-2", x, at(321))
	assert.False(t, dup)
	_, dup = d.Observe("", x, at(321))
	assert.False(t, dup)
	_, dup = d.Observe(ag, "", at(321))
	assert.False(t, dup)

	// Once one issuer alone is left in the window, a new interleaving is reported again.
	_, dup = d.Observe(ag, y, at(400))
	require.False(t, dup)
	_, dup = d.Observe(ag, x, at(405))
	require.False(t, dup, "x's last presentation (320) is outside the window: a move")
	got, dup = d.Observe(ag, y, at(410))
	require.True(t, dup)
	assert.Equal(t, at(400), got.Since)
}

// The detector's memory is bounded: agents presented long ago are forgotten first, and a flood
// of fresh names evicts the oldest, never grows past the bound.
func TestAgentDuplicateBounded(t *testing.T) {
	c := newClock()
	d := &AgentDuplicateDetector{}
	for i := range maxAgentsTracked + 50 {
		d.Observe(fmt.Sprintf("spiffe://acme.internal/zone/z/agent/a%d", i), "spiffe://acme.internal/node/n", c.Now())
	}
	assert.Len(t, d.seen, maxAgentsTracked)
	d.Observe("spiffe://acme.internal/zone/z/agent/late", "spiffe://acme.internal/node/n", c.Now().Add(2*DefaultAgentWindow))
	assert.Len(t, d.seen, 1, "agents outside the window are forgotten first")
}
