package node

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/node/state"
	"github.com/ute-project/ute/overlay/audit"
	"github.com/ute-project/ute/overlay/dtl"
	"github.com/ute-project/ute/overlay/tunnel"
)

// refusalTally sums, per kind (the summary's or entry's key fields joined), the refusals the log
// accounts for: written one by one, or counted in refusals-collapsed entries.
func refusalTally(t *testing.T, recs []audit.Record, event string, key []string) (single map[string]int, total map[string]uint64) {
	t.Helper()
	single, total = map[string]int{}, map[string]uint64{}
	kindOf := func(f map[string]string) string {
		var k string
		for _, name := range key {
			k += name + "=" + f[name] + " "
		}
		return k
	}
	for _, r := range recs {
		switch {
		case r.Event == event:
			single[kindOf(r.Fields)]++
			total[kindOf(r.Fields)]++
		case r.Event == audit.EventCollapsed && r.Fields["of"] == event:
			n, err := strconv.ParseUint(r.Fields["count"], 10, 64)
			require.NoError(t, err)
			total[kindOf(r.Fields)] += n
		}
	}
	return single, total
}

func auditSize(t *testing.T, n *testNode) int64 {
	t.Helper()
	require.NoError(t, n.audit.Sync())
	info, err := os.Stat(filepath.Join(n.dir, DirAudit, audit.LogFile))
	require.NoError(t, err)
	return info.Size()
}

// Issue 10 §6: refused flows used to be audited one entry each (7,086 refusals/s grew the log by
// 4.37 MB/s). A peer's agent floods a destination its policy does not allow, over real tunnels:
// the receiving node writes the first denial at once, then one summary per window with the exact
// count, while the admitted flows in between are each audited. Scaled: a 200 ms window and a 2 s
// flood from 4 dialers; UTE_AUDIT_FLOOD=10s runs 10 s with the default 10 s window, and
// UTE_AUDIT_FLOOD_WORKERS sets the dialers (docs/benchmarks.md).
func TestRefusedFlowFloodIsCollapsed(t *testing.T) {
	window, flood := 200*time.Millisecond, 2*time.Second
	if v := os.Getenv("UTE_AUDIT_FLOOD"); v != "" {
		var err error
		flood, err = time.ParseDuration(v)
		require.NoError(t, err)
		window = audit.DefaultFloodWindow
	}
	ns := cluster(t,
		nodeSpec{name: "a", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "billing-api", Zone: "payments"}}},
		nodeSpec{name: "b", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "ledger", Zone: "payments"}},
			refusals: audit.FloodOptions{Window: window}},
	)
	a, b := ns["a"], ns["b"]
	billing := agent(t, a, "payments", "billing-api")
	sink := serveSink(t, agent(t, b, "payments", "ledger"), "8080")
	_, err := a.tunnelTo(context.Background(), b.ID().String(), "payments")
	require.NoError(t, err)
	waitDirectory(t, a, "payments", "ledger")
	sizeBefore := auditSize(t, b)
	statsBefore := b.AuditRefusals()

	ctx := context.Background()
	var refused, admitted atomic.Uint64
	deadline := time.Now().Add(flood)
	var wg sync.WaitGroup
	workers := 4
	if v := os.Getenv("UTE_AUDIT_FLOOD_WORKERS"); v != "" {
		var err error
		workers, err = strconv.Atoi(v)
		require.NoError(t, err)
	}
	for w := range workers {
		wg.Go(func() {
			for i := 0; time.Now().Before(deadline); i++ {
				if w == 0 && i%50 == 0 { // legitimate flows go on during the flood
					c, err := billing.Dial(ctx, "tcp", "ledger.payments:8080")
					if !assert.NoError(t, err) {
						return
					}
					_ = c.Close()
					admitted.Add(1)
					continue
				}
				_, err := billing.Dial(ctx, "tcp", "ledger.payments:9999") // no rule allows it
				if !assert.ErrorIs(t, err, dtl.ErrPolicy) {
					return
				}
				refused.Add(1)
			}
		})
	}
	wg.Wait()
	require.NoError(t, b.audit.flushRefusals())
	sizeAfter := auditSize(t, b)

	recs := auditEntries(t, b)
	single, total := refusalTally(t, recs, audit.EventDeny, denyKey)
	kind := "zone=payments peer=" + a.Certificate().ID.String() + " reason=policy dst=ledger:9999/tcp "
	assert.Equal(t, 1, single[kind], "the first denial is written as itself, once")
	assert.Equal(t, refused.Load(), total[kind], "exact count: every refused flow is accounted for")
	var admits uint64
	for _, r := range recs {
		if r.Event == audit.EventAdmit && r.Fields["dst"] == "ledger:8080/tcp" {
			admits++
		}
	}
	assert.Equal(t, admitted.Load(), admits, "admissions are never collapsed")
	require.Eventually(t, func() bool { return sink.conns.Load() == int64(admitted.Load()) }, 5*time.Second, 5*time.Millisecond)

	st := b.AuditRefusals()
	assert.Equal(t, refused.Load(), st.Refusals-statsBefore.Refusals)
	assert.Zero(t, st.Dropped)
	grew := sizeAfter - sizeBefore
	raw, err := os.ReadFile(filepath.Join(b.dir, DirAudit, audit.LogFile))
	require.NoError(t, err)
	var denyLine int
	for _, line := range bytes.Split(raw, []byte("\n")) {
		if bytes.Contains(line, []byte(`"event":"deny"`)) && bytes.Contains(line, []byte("ledger:9999/tcp")) {
			denyLine = len(line) + 1
		}
	}
	t.Logf("%d refused flows in %s (%.0f/s), %d admitted: the log grew by %d bytes (%.0f B/s) in %d summaries; one entry per refusal would have been %d bytes (%.0f B/s)",
		refused.Load(), flood, float64(refused.Load())/flood.Seconds(), admitted.Load(), grew, float64(grew)/flood.Seconds(), st.Summaries,
		uint64(denyLine)*refused.Load(), float64(uint64(denyLine)*refused.Load())/flood.Seconds())
	assert.Greater(t, refused.Load(), uint64(100), "the flood must be a flood")
	// One denial, at most one summary per window, and the admits (each under 1 KiB).
	assert.Less(t, grew, int64(int(flood/window)+3)*1024+int64(admitted.Load()+2)*1024)
	_, err = audit.VerifyWithKey(filepath.Join(b.dir, DirAudit), b.Certificate().X509.PublicKey.(ed25519.PublicKey))
	require.NoError(t, err)
}

// Refused handshakes are collapsed per source prefix and reason: a revoked node that keeps
// redialing is one tunnel-refused entry, then a summary counting every further refusal.
func TestRefusedHandshakesCollapsePerSource(t *testing.T) {
	ns := cluster(t,
		nodeSpec{name: "a", zones: []string{"payments"}, limits: tunnel.Limits{DialAttempts: 1}},
		nodeSpec{name: "b", zones: []string{"payments"}},
	)
	a, b := ns["a"], ns["b"]
	ctx := context.Background()
	require.NoError(t, b.Revoke(ctx, a.Certificate().ID.String(), "compromised"))
	before := b.Stats().HandshakesRefused
	const attempts = 20
	for range attempts {
		_, err := a.Tunnel(ctx, "b", "payments")
		require.ErrorIs(t, err, tunnel.ErrRefusedByPeer)
	}
	require.Eventually(t, func() bool { return b.Stats().HandshakesRefused-before >= attempts }, 5*time.Second, 5*time.Millisecond)
	require.NoError(t, b.audit.flushRefusals())
	refusedAtB := b.Stats().HandshakesRefused - before

	single, total := refusalTally(t, auditEntries(t, b), eventTunnelRefused, tunnelRefusalKey)
	kind := "zone=payments source=127.0.0.1 reason=revoked "
	assert.Equal(t, 1, single[kind], "the first refusal from the source is written as itself")
	assert.Equal(t, refusedAtB, total[kind], "every refused handshake is counted: %v", total)
	assert.Len(t, total, 1, "one kind: %v", total)
}

func TestRefusalSourcePrefix(t *testing.T) {
	for addr, want := range map[net.Addr]string{
		&net.UDPAddr{IP: net.ParseIP("198.51.100.7"), Port: 4433}:                  "198.51.100.7",
		&net.UDPAddr{IP: net.ParseIP("::ffff:198.51.100.7"), Port: 4433}:           "198.51.100.7",
		&net.UDPAddr{IP: net.ParseIP("2001:db8:1:2:3:4:5:6"), Port: 4433}:          "2001:db8:1:2::/64",
		&net.UDPAddr{IP: net.ParseIP("2001:db8:1:2:ffff::1"), Port: 1, Zone: "e0"}: "2001:db8:1:2::/64",
		&net.UnixAddr{Name: "/tmp/x"}:                                              "unknown",
	} {
		assert.Equal(t, want, refusalSource(addr), "%v", addr)
	}
	assert.Equal(t, "unknown", refusalSource(nil))
}
