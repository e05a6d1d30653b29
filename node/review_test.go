package node

import (
	"context"
	"log/slog"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity/authority"
)

// A renewal that succeeds but hands back a certificate already past its half-life (a zone's
// max_cert_lifetime shorter than the authority's backdate, or a root about to expire capping
// NotAfter) must not make the scheduler renew again at once in a tight loop, each pass costing the
// authority a signature, a store transaction and an audit record: it backs off as after a failure.
func TestRenewalDueAgainAtOnceBacksOff(t *testing.T) {
	clk := &clock{}
	ta := startAuthorityWith(t, renewPolicy, authority.Options{Now: clk.Now, NodeLifetime: 30 * time.Second})
	exe, err := os.Executable()
	require.NoError(t, err)
	env := &renewEnv{clk: clk, auth: ta, exe: exe}
	dir := env.join(t, "a")

	timers := &fakeTimers{}
	logs := &logCounter{msgs: map[string]int{}}
	a := env.open(t, dir, Config{Authority: ta.addr, After: timers.After, Logger: slog.New(logs),
		RenewMinRetry: time.Second, RenewMaxRetry: 4 * time.Second})
	assert.Equal(t, time.Second, timers.await(t, 1), "the loop backs off after a renewal that is due again at once")
	time.Sleep(100 * time.Millisecond)
	assert.Equal(t, 1, timers.count(), "no further pass without a timer")
	renewed := 0
	for _, r := range auditEntries(t, a) {
		if r.Event == eventRenewed {
			renewed++
		}
	}
	assert.Equal(t, 1, renewed, "one renewal per pass")

	timers.fire(1)
	assert.Equal(t, 2*time.Second, timers.await(t, 2), "the backoff doubles while renewals keep coming back due")
}

// A directory exchange this node starts on a tunnel from before its renewal (the tunnel-up hook of
// a handshake that completed just after the swap, or a caller holding the old tunnel) would send
// agent certificates under the new node key to a peer that checks them against the old node
// certificate: the peer would drop every one of this node's agents from its view. The exchange is
// refused instead, and the peer's view keeps the agents.
func TestExchangeRefusedOnStaleTunnel(t *testing.T) {
	env := newRenewEnv(t)
	timers := &fakeTimers{}
	a := env.open(t, env.join(t, "a", "billing-api", "ledger-a"), Config{Authority: env.auth.addr, After: timers.After})
	b := env.open(t, env.join(t, "b", "ledger-b"), Config{})
	require.NoError(t, a.AddPeer(Peer{Node: "b", Addr: b.Addr()}))
	require.NoError(t, b.AddPeer(Peer{Node: "a", Addr: a.Addr()}))
	timers.await(t, 1)
	ctx := context.Background()
	old, err := a.Tunnel(ctx, b.ID().String(), "payments")
	require.NoError(t, err)
	billing := agent(t, a, "payments", "billing-api")

	env.clk.Advance(renewLifetime/2 + time.Minute)
	timers.fire(1)
	timers.await(t, 2)
	require.True(t, old.Stale())
	ledgerA := agent(t, a, "payments", "ledger-a").creds().cert
	require.Equal(t, serialKey(ledgerA), viewSerial(b, "payments", "ledger-a"), "the renewal was announced")

	_, err = a.exchange(ctx, billing, old)
	assert.ErrorIs(t, err, errStaleTunnel)
	assert.Equal(t, serialKey(ledgerA), viewSerial(b, "payments", "ledger-a"), "the peer still knows the renewed node's agents")
}
