package node

import (
	"context"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/node/state"
	"github.com/ute-project/ute/overlay/audit"
	"github.com/ute-project/ute/overlay/dtl"
	"github.com/ute-project/ute/overlay/tunnel"
)

// agentLifetime is the agent certificate lifetime in these tests: well inside the node's
// (renewLifetime), so the node certificate does not cap it.
const agentLifetime = 10 * time.Minute

// noIdleSweep keeps the endpoints from closing flows as idle when the tests jump the clock.
var noIdleSweep = tunnel.Limits{FlowIdleTimeout: 24 * time.Hour}

// addAgent registers an agent with its own certificate lifetime in a node directory.
func (e *renewEnv) addAgent(t *testing.T, dir, name string, lifetime time.Duration) {
	t.Helper()
	d, err := state.Open(dir, state.WithClock(e.clk.Now))
	require.NoError(t, err)
	_, err = d.AddAgent(state.AgentSpec{Name: name, Zone: "payments", Exe: e.exe, Lifetime: lifetime})
	require.NoError(t, err)
}

// agentAudit returns the agent-renewed entries of n's audit log for agent name.
func agentAudit(t *testing.T, n *testNode, name string) []audit.Record {
	t.Helper()
	var out []audit.Record
	for _, r := range auditEntries(t, n) {
		if r.Event == eventAgentRenewed && strings.HasSuffix(r.Fields["agent"], "/agent/"+name) {
			out = append(out, r)
		}
	}
	return out
}

// viewSerial is the agent certificate serial n's directory view holds for name.zone.
func viewSerial(n *testNode, zone, name string) string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.view[zone][name].serial
}

// An agent of a running node outlives its certificate: at half-life the node reissues it by
// itself (no Config.Authority: agent issuance is local), new serial, same identity and overlay
// IP, swapped into the handle in use; flows opened before keep running; flows opened after carry
// the new certificate; the peer's directory holds the new certificate before anyone dials; and
// past the old certificate's expiry both directions still work, while a record signed with the
// old chain is refused by the peer as expired (what every flow would get without the scheduler).
func TestAgentCertificateRenewedAtHalfLife(t *testing.T) {
	env := newRenewEnv(t)
	timers := &fakeTimers{}
	dirA := env.join(t, "a")
	env.addAgent(t, dirA, "billing-api", agentLifetime)
	env.addAgent(t, dirA, "ledger-a", agentLifetime)
	a := env.open(t, dirA, Config{After: timers.After, Limits: noIdleSweep})
	b := env.open(t, env.join(t, "b", "billing-batch", "ledger-b"), Config{Limits: noIdleSweep})
	require.NoError(t, a.AddPeer(Peer{Node: "b", Addr: b.Addr()}))
	require.NoError(t, b.AddPeer(Peer{Node: "a", Addr: a.Addr()}))

	billing := agent(t, a, "payments", "billing-api")
	ledgerA := agent(t, a, "payments", "ledger-a")
	old := billing.creds()
	oldLedger := ledgerA.creds().cert
	// The scheduler sleeps until the first agent half-life, not the node's (30 min).
	wait := timers.await(t, 1)
	assert.WithinDuration(t, old.cert.RenewAt(), env.clk.Now().Add(wait), 5*time.Second)

	ledgerB := serveSink(t, agent(t, b, "payments", "ledger-b"), "8080")
	ledgerASink := serveSink(t, ledgerA, "8080")
	oldFlow := dialWrite(t, billing, "ledger-b.payments:8080", "before ")
	defer func() { _ = oldFlow.Close() }()
	assert.Equal(t, serialKey(old.cert), nextWhoIs(t, ledgerB).AgentSerial)
	waitDirectory(t, b, "payments", "ledger-a")
	assert.Equal(t, serialKey(oldLedger), viewSerial(b, "payments", "ledger-a"))

	env.clk.Advance(wait + time.Second)
	timers.fire(1)
	next := timers.await(t, 2) // the pass, its swap and its announcement are complete

	cur := billing.creds()
	require.NotEqual(t, old.cert.Serial(), cur.cert.Serial(), "reissue issues a new serial")
	assert.Equal(t, old.cert.ID, cur.cert.ID, "same identity")
	assert.Equal(t, []netip.Addr{billing.IP()}, cur.cert.Claims.OverlayIPs, "same overlay IP")
	assert.Equal(t, "billing-api", billing.Name())
	assert.True(t, cur.cert.PublicKey().Equal(old.cert.PublicKey()), "the agent keeps its key")
	assert.Same(t, old.node, cur.node, "the node certificate did not change")
	require.NoError(t, a.verif.VerifyAgent(cur.node, cur.cert, env.clk.Now()))
	assert.WithinDuration(t, cur.cert.RenewAt(), env.clk.Now().Add(next), 5*time.Second, "next wait is the new half-life")
	onDisk, err := a.Node.dir.Agent("payments", "billing-api")
	require.NoError(t, err)
	assert.Equal(t, cur.cert.Serial(), onDisk.Cert.Serial())

	for name, prev := range map[string]*identity.Certificate{"billing-api": old.cert, "ledger-a": oldLedger} {
		recs := agentAudit(t, a, name)
		require.Len(t, recs, 1, name)
		assert.Equal(t, causeHalfLife, recs[0].Fields["cause"])
		assert.Equal(t, prev.Serial().String(), recs[0].Fields["old_serial"])
	}
	newLedger := ledgerA.creds().cert
	require.NotEqual(t, oldLedger.Serial(), newLedger.Serial())
	// The announcement reached the peer before any lookup there.
	assert.Equal(t, serialKey(newLedger), viewSerial(b, "payments", "ledger-a"))

	// The flow opened before keeps working; a flow opened now carries the new certificate.
	_, err = oldFlow.Write([]byte("after "))
	require.NoError(t, err)
	newFlow := dialWrite(t, billing, "ledger-b.payments:8080", "new ")
	defer func() { _ = newFlow.Close() }()
	p := nextWhoIs(t, ledgerB)
	assert.Equal(t, serialKey(cur.cert), p.AgentSerial)
	assert.Equal(t, billing.ID().String(), p.Agent)

	// Past the old certificates' expiry.
	env.clk.Advance(old.cert.X509.NotAfter.Sub(env.clk.Now()) + time.Second)
	_, err = oldFlow.Write([]byte("expired "))
	require.NoError(t, err, "a flow admitted before the reissue still runs")
	late := dialWrite(t, billing, "ledger-b.payments:8080", "late ")
	defer func() { _ = late.Close() }()
	assert.Equal(t, serialKey(cur.cert), nextWhoIs(t, ledgerB).AgentSerial)
	in := dialWrite(t, agent(t, b, "payments", "billing-batch"), "ledger-a.payments:8080", "by name ")
	defer func() { _ = in.Close() }()
	assert.Equal(t, "spiffe://acme.internal/zone/payments/agent/billing-batch", nextWhoIs(t, ledgerASink).Agent)
	// The clock jump outlived b's session state, so b asked once for the full chain again
	// (chain-unknown, answered by the SDK); nothing else was refused, and nothing as expired.
	for _, reason := range denials(t, b) {
		assert.Equal(t, "chain-unknown", reason, "no flow of a's agents was refused")
	}

	// Control: the chain the scheduler replaced is refused as expired by the peer.
	tun, err := a.Tunnel(context.Background(), "b", "payments")
	require.NoError(t, err)
	ts := a.track(tun)
	rec, err := billing.signWith(old, tun.Exporter(), tun.NewFlowID(), ts.seq.Add(1),
		dtl.Destination{Agent: "ledger-b", Port: 8080, Proto: dtl.ProtoTCP}, nil)
	require.NoError(t, err)
	_, err = tun.OpenFlow(context.Background(), rec, nil, nil)
	require.ErrorIs(t, err, dtl.ErrChain, "refused by the peer's chain check")
	var expired []audit.Record
	for _, r := range auditEntries(t, b) {
		if r.Event == audit.EventDeny && r.Fields["reason"] != "chain-unknown" {
			expired = append(expired, r)
		}
	}
	require.Len(t, expired, 1, "only the control was refused")
	assert.Equal(t, "chain", expired[0].Fields["reason"])
	assert.Contains(t, expired[0].Fields["error"], identity.ErrExpired.Error())

	require.NoError(t, oldFlow.Close())
	require.NoError(t, newFlow.Close())
	require.NoError(t, late.Close())
	require.Eventually(t, func() bool {
		return ledgerB.bytes.Load() == int64(len("before after expired new late "))
	}, 5*time.Second, 5*time.Millisecond, "every flow delivered everything")
}

// With nothing due (no Config.Authority, agents capped by the node certificate) the scheduler
// sets no timer at all; registering an agent whose half-life comes first wakes it, and an agent
// revoked by its serial is never reissued (a new serial would escape the revocation), neither
// by the scheduler nor by Node.Agent.
func TestAgentSchedulerWakesAndSkipsRevoked(t *testing.T) {
	env := newRenewEnv(t)
	timers := &fakeTimers{}
	dir := env.join(t, "a", "ledger-a") // default lifetime: capped by the node certificate
	a := env.open(t, dir, Config{After: timers.After})
	capped := agent(t, a, "payments", "ledger-a")
	assert.False(t, capped.creds().cert.X509.NotAfter.Before(a.Certificate().X509.NotAfter), "capped by the node")
	time.Sleep(50 * time.Millisecond)
	assert.Zero(t, timers.count(), "nothing due: no timer")

	env.addAgent(t, dir, "billing-api", agentLifetime)
	env.addAgent(t, dir, "billing-old", agentLifetime)
	billing := agent(t, a, "payments", "billing-api")
	revoked := agent(t, a, "payments", "billing-old")
	oldRevoked := revoked.creds().cert
	assert.WithinDuration(t, billing.creds().cert.RenewAt(), env.clk.Now().Add(timers.await(t, 1)), 5*time.Second)
	require.NoError(t, a.Revoke(context.Background(), serialKey(oldRevoked), "compromised"))

	oldBilling := billing.creds().cert
	env.clk.Advance(agentLifetime/2 + time.Minute)
	timers.fire(1)
	timers.await(t, 2)
	assert.NotEqual(t, oldBilling.Serial(), billing.creds().cert.Serial(), "the live agent was reissued")
	assert.Equal(t, oldRevoked.Serial(), revoked.creds().cert.Serial(), "the revoked agent was not")
	again, err := a.Agent("payments", "billing-old")
	require.NoError(t, err)
	assert.Equal(t, oldRevoked.Serial(), again.creds().cert.Serial(), "nor by Node.Agent")
	st, err := a.Node.dir.Agent("payments", "billing-old")
	require.NoError(t, err)
	assert.Equal(t, oldRevoked.Serial(), st.Cert.Serial(), "nor on disk")
	assert.Empty(t, agentAudit(t, a, "billing-old"))
	assert.Equal(t, capped.creds().cert.Serial(), agent(t, a, "payments", "ledger-a").creds().cert.Serial(), "the capped agent is left to the node's renewal")
	assert.Empty(t, agentAudit(t, a, "ledger-a"))
}

// Listen and ListenPacket share one address check.
func TestListenAddress(t *testing.T) {
	a := &Agent{id: identity.AgentID("acme.internal", "payments", "ledger"), ip: netip.MustParseAddr("100.100.1.5")}
	for _, tc := range []struct {
		proto         dtl.Proto
		network, addr string
		port          uint16
		err           string
	}{
		{dtl.ProtoTCP, "tcp", ":8080", 8080, ""},
		{dtl.ProtoTCP, "tcp4", "100.100.1.5:80", 80, ""},
		{dtl.ProtoTCP, "tcp", "0.0.0.0:1", 1, ""},
		{dtl.ProtoUDP, "udp", "[::]:65535", 65535, ""},
		{dtl.ProtoUDP, "udp6", ":5353", 5353, ""},
		{dtl.ProtoTCP, "udp", ":8080", 0, `network "udp"; SDK agents listen on tcp`},
		{dtl.ProtoUDP, "tcp", ":5353", 0, `network "tcp"; SDK agents listen for datagrams on udp`},
		{dtl.ProtoICMP, "tcp", ":1", 0, "SDK agents listen on tcp or udp"},
		{dtl.ProtoTCP, "tcp", "8080", 0, `listen address "8080"`},
		{dtl.ProtoTCP, "tcp", "100.100.1.6:8080", 0, "100.100.1.6 is not agent ledger's overlay IP 100.100.1.5"},
		{dtl.ProtoUDP, "udp", ":0", 0, `port "0" must be 1..65535`},
		{dtl.ProtoTCP, "tcp", ":65536", 0, `port "65536" must be 1..65535`},
		{dtl.ProtoTCP, "tcp", ":http", 0, `port "http" must be 1..65535`},
	} {
		t.Run(tc.proto.String()+" "+tc.network+" "+tc.addr, func(t *testing.T) {
			k, err := a.listenKey(tc.proto, tc.network, tc.addr)
			if tc.err != "" {
				require.ErrorIs(t, err, ErrUnsupported)
				assert.Contains(t, err.Error(), tc.err)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, listenKey{"payments", "ledger", tc.port}, k)
		})
	}
}
