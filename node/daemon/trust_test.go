package daemon

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/node"
	"github.com/ute-project/ute/node/localapi"
	"github.com/ute-project/ute/node/membership"
	"github.com/ute-project/ute/node/metrics"
	"github.com/ute-project/ute/node/proxy"
	"github.com/ute-project/ute/node/state"
	"github.com/ute-project/ute/node/trustflow"
	"github.com/ute-project/ute/overlay/audit"
	"github.com/ute-project/ute/overlay/dtl"
	"github.com/ute-project/ute/overlay/tunnel"
)

// payments: a hosts billing-api, b hosts ledger (rule billing-* → ledger tcp/8080, min_trust 50,
// isolate_below 20, regions [eu-west-1]).
func paymentsPair(t *testing.T, ta *testAuthority) (a, b *testDaemon) {
	ds := cluster(t, ta,
		spec{name: "a", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "billing-api", Zone: "payments"}}},
		spec{name: "b", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "ledger", Zone: "payments"}}},
	)
	waitMembers(t, "payments", 2, ds["a"], ds["b"])
	warm(t, ds["a"])
	return ds["a"], ds["b"]
}

// warm waits until a knows ledger.payments (tunnel up and directory exchanged).
func warm(t *testing.T, a *testDaemon) {
	t.Helper()
	var last error
	require.Eventually(t, func() bool {
		last = dialLedger(t, a, "8080")
		return last == nil || errors.Is(last, dtl.ErrUnreachable)
	}, 5*time.Second, 20*time.Millisecond, "a never resolved ledger.payments: %v", last)
}

// directoryTimeoutForTest is node's directoryTimeout: how long a directory re-read may take.
const directoryTimeoutForTest = 5 * time.Second

var billingID = identity.AgentID("acme.internal", "payments", "billing-api").String()

func dialLedger(t *testing.T, from *testDaemon, port string) error {
	t.Helper()
	return dialLedgerAs(t, from, "billing-api", port)
}

// dialLedgerAs dials ledger.payments:port from agent name of from and closes the connection.
func dialLedgerAs(t *testing.T, from *testDaemon, name, port string) error {
	t.Helper()
	billing, err := from.Node().Agent("payments", name)
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := billing.Dial(ctx, "tcp", "ledger.payments:"+port)
	if err == nil {
		_ = c.Close()
	}
	return err
}

// Scenario 3: the node an agent runs on moves into a region outside its zone's placement. The
// node notices (its region file), its score drops to 0, it revokes itself with a signed record,
// and its peer cuts the live flow and refuses new ones, all within a second.
func TestTrustRegionDriftRevokesAndCutsWithinASecond(t *testing.T) {
	ta := startAuthority(t)
	a, b := paymentsPair(t, ta)
	conn := openFlow(t, a, b)
	aID := a.Node().ID().String()

	start := time.Now()
	require.NoError(t, os.WriteFile(filepath.Join(a.dir, FileRegion), []byte("us-east-1\n"), 0o644))
	require.Eventually(t, func() bool { return b.Node().Revoked(aID) }, time.Second, 5*time.Millisecond,
		"b did not hold a's self-revocation within 1 s of the drift")
	require.Eventually(t, func() bool {
		_, _ = conn.Write([]byte("x"))
		_, err := conn.Read(make([]byte, 1))
		return err != nil
	}, time.Second, 5*time.Millisecond, "the live flow was not cut")
	t.Logf("drift to revocation at the peer and flow cut: %v", time.Since(start))
	assert.Less(t, time.Since(start), time.Second+500*time.Millisecond)

	// The record is a's own, signed by a, and says why.
	e, ok := b.Store().Lookup(aID)
	require.True(t, ok)
	assert.Equal(t, aID, e.Record.Claims.Signer)
	assert.Contains(t, e.Record.Claims.Reason, "region_drift")
	assert.Contains(t, e.Record.Claims.Reason, "us-east-1")

	// New flows are refused; the explanation shows the signal and the arithmetic.
	require.Error(t, dialLedger(t, a, "8080"))
	x, err := backend{a.Daemon}.TrustExplain(context.Background(), aID)
	require.NoError(t, err)
	assert.Equal(t, 0, x.Score)
	assert.Equal(t, "isolate_and_revoke", x.Action)
	require.NotEmpty(t, x.Events)
	assert.Equal(t, "region_drift", x.Events[0].Kind)
	st, err := backend{a.Daemon}.Status(context.Background())
	require.NoError(t, err)
	assert.Contains(t, trustOf(st, aID).Reasons[0], "region_drift")
	assert.Equal(t, 0, trustOf(st, billingID).Score, "the node's agents drift with it")

	// The action is in a's audit log with its reasons, next to the revocation it caused, and the
	// log still verifies.
	require.Eventually(t, func() bool {
		a.mu.Lock()
		defer a.mu.Unlock()
		return a.retired
	}, 3*time.Second, 5*time.Millisecond, "a never finished revoking itself")
	require.NoError(t, a.Close())
	var trustEntries []audit.Record
	revoked := false
	for _, line := range strings.Split(readFile(t, filepath.Join(a.dir, node.DirAudit, audit.LogFile)), "\n") {
		var r audit.Record
		if line == "" || json.Unmarshal([]byte(line), &r) != nil {
			continue
		}
		if r.Event == node.EventTrust {
			trustEntries = append(trustEntries, r)
		}
		revoked = revoked || (r.Event == audit.EventRevoke && r.Fields["subject"] == aID)
	}
	require.NotEmpty(t, trustEntries)
	f := trustEntries[0].Fields
	assert.Equal(t, aID, f["subject"])
	assert.Equal(t, "isolate_and_revoke", f["action"])
	assert.Equal(t, "0", f["score"])
	assert.Contains(t, f["reasons"], "region_drift")
	assert.Contains(t, f["revocation"], "signed self-revocation")
	assert.True(t, revoked, "the revocation's own audit entry")
	rep, err := audit.VerifyWithKey(filepath.Join(a.dir, node.DirAudit), a.Node().Certificate().PublicKey())
	require.NoError(t, err)
	assert.True(t, rep.OK)
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	return string(b)
}

func trustOf(st localapi.Status, subject string) localapi.TrustScore {
	for _, ts := range st.Trust {
		if ts.Subject == subject {
			return ts
		}
	}
	return localapi.TrustScore{Subject: subject, Score: -1}
}

// Repeated policy denials (lateral probing on a port no rule allows) lower the agent's score at
// the receiving node until even its allowed flow is refused with reason "trust"; the agent's
// node, charged a fifth of each weight, keeps its other flows.
func TestTrustPolicyDenialsEndInTrustRefusal(t *testing.T) {
	ta := startAuthority(t)
	a, b := paymentsPair(t, ta)
	require.NoError(t, dialLedgerListening(t, a, b), "allowed before")
	for i := range 6 {
		err := dialLedger(t, a, "9090")
		require.ErrorIs(t, err, dtl.ErrPolicy, "probe %d", i)
	}
	require.Eventually(t, func() bool { return b.TrustScore(billingID) == 40 }, 2*time.Second, 5*time.Millisecond,
		"score at b: %d", b.TrustScore(billingID))
	err := dialLedger(t, a, "8080")
	require.ErrorIs(t, err, dtl.ErrTrust)
	require.NotErrorIs(t, err, dtl.ErrPolicy)
	// The node's share of each denial is its own event, applied right after the agent's.
	require.Eventually(t, func() bool { return b.TrustScore(a.Node().ID().String()) == 88 }, 2*time.Second, 5*time.Millisecond,
		"node a: 6 × 10/5, got %d", b.TrustScore(a.Node().ID().String()))
	// a never saw the denials itself: b's signed trust events bring them, so a computes the same
	// score and attests it in billing-api's records.
	require.Eventually(t, func() bool { return a.TrustScore(billingID) == 40 }, 3*time.Second, 10*time.Millisecond,
		"score at a: %d", a.TrustScore(billingID))
	require.Eventually(t, func() bool { return a.TrustScore(a.Node().ID().String()) == 88 }, 3*time.Second, 10*time.Millisecond,
		"node a at a: %d", a.TrustScore(a.Node().ID().String()))

	st, err := backend{b.Daemon}.Status(context.Background())
	require.NoError(t, err)
	ts := trustOf(st, billingID)
	assert.Equal(t, 40, ts.Score)
	assert.Equal(t, "deny_flows", ts.Action)
	require.NotEmpty(t, ts.Reasons)
	assert.Contains(t, ts.Reasons[0], "policy_denial")
	x, err := backend{b.Daemon}.TrustExplain(context.Background(), billingID)
	require.NoError(t, err)
	assert.Len(t, x.Events, 6)
	assert.Equal(t, 50, x.MinTrust)
	assert.False(t, b.Node().Revoked(billingID), "40 is above isolate_below 20: denied, not isolated")
}

// A legitimate agent with steady traffic to its one allowed destination keeps full trust, and so
// does its node; nothing is listed in status.
func TestTrustSteadyTrafficKeepsFullTrust(t *testing.T) {
	ta := startAuthority(t)
	a, b := paymentsPair(t, ta)
	conn := openFlow(t, a, b)
	_ = conn
	for range 40 {
		require.NoError(t, dialLedger(t, a, "8080"))
	}
	time.Sleep(3 * trustTick) // let the trust loops drain and tick
	for _, d := range []*testDaemon{a, b} {
		assert.Equal(t, 100, d.TrustScore(billingID))
		assert.Equal(t, 100, d.TrustScore(a.Node().ID().String()))
		st, err := backend{d.Daemon}.Status(context.Background())
		require.NoError(t, err)
		assert.Empty(t, st.Trust, "node %s lists no score", d.name)
	}
}

// A node restarted on its own address is not its own duplicate; a copy of its credentials
// running elsewhere at the same time is (scenario 4: saved credentials used elsewhere), and the
// peer isolates that identity.
func TestTrustDuplicateIdentity(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: waits out the duplicate confirmation")
	}
	ta := startAuthority(t)
	ds := cluster(t, ta,
		spec{name: "a", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "billing-api", Zone: "payments"}}},
	)
	a := ds["a"]
	bdir, bpc := joinNode(t, ta, spec{name: "b", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "ledger", Zone: "payments"}}})
	b := startDaemonWith(t, "b", bdir, bpc, func(o *Options) { o.DuplicateConfirm = 300 * time.Millisecond })
	waitMembers(t, "payments", 2, a, b)
	aID := a.Node().ID().String()
	require.NoError(t, dialLedgerListening(t, a, b))

	// Restart a on the same socket address, twice.
	for range 2 {
		addr := a.pc.LocalAddr().String()
		require.NoError(t, a.Close())
		require.NoError(t, a.pc.Close())
		pc, err := listenUDP(addr)
		require.NoError(t, err)
		t.Cleanup(func() { _ = pc.Close() })
		a = startDaemon(t, "a", a.dir, pc, true)
		require.Eventually(t, func() bool { return dialLedger(t, a, "8080") == nil }, 5*time.Second, 50*time.Millisecond)
	}
	time.Sleep(1200 * time.Millisecond) // four times the confirmation time
	assert.Equal(t, 100, b.TrustScore(aID), "a restarted node is not its own duplicate")
	assert.False(t, b.Node().Revoked(aID))

	// A thief runs a copy of a's directory from another address.
	thiefDir := filepath.Join(t.TempDir(), "a-copy")
	copyDir(t, a.dir, thiefDir)
	tpc, err := listenUDP("127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { _ = tpc.Close() })
	thief := startDaemon(t, "thief", thiefDir, tpc, true)
	require.NoError(t, thief.Node().AddPeer(node.Peer{Node: "b", Addr: b.Addr()}))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err = thief.Node().Tunnel(ctx, "b", "payments")
	require.NoError(t, err)
	// Both copies dial b (the signal compares the sources of inbound tunnels): a tunnel b
	// opened to a is closed so that a dials b itself.
	aAddr := a.Addr().String()
	require.Eventually(t, func() bool {
		inbound := false
		for _, tn := range b.Node().Endpoint().Tunnels() {
			if tn.Peer().NodeID != aID || !tn.Alive() {
				continue
			}
			if tn.Outbound() {
				_ = tn.Close()
			} else if tn.RemoteAddr().String() == aAddr {
				inbound = true
			}
		}
		if !inbound {
			_, _ = a.Node().Tunnel(ctx, "b", "payments")
		}
		return inbound
	}, 3*time.Second, 20*time.Millisecond, "a never held an inbound tunnel at b")
	start := time.Now()
	require.Eventually(t, func() bool { return b.Node().Revoked(aID) }, 3*time.Second, 10*time.Millisecond,
		"b did not isolate the duplicated identity (score %d)", b.TrustScore(aID))
	t.Logf("duplicate isolated %v after both copies held tunnels (confirmation 300ms)", time.Since(start))
	x, err := backend{b.Daemon}.TrustExplain(context.Background(), aID)
	require.NoError(t, err)
	require.NotEmpty(t, x.Events)
	assert.Equal(t, "duplicate_identity", x.Events[len(x.Events)-1].Kind)
	// Both copies are cut at b: once the old tunnel is gone, a new handshake is refused.
	require.Eventually(t, func() bool {
		_, err := thief.Node().Tunnel(ctx, "b", "payments")
		return errors.Is(err, tunnel.ErrRefusedByPeer)
	}, 3*time.Second, 20*time.Millisecond)
	require.Eventually(t, func() bool {
		_, err := a.Node().Tunnel(ctx, "b", "payments")
		return errors.Is(err, tunnel.ErrRefusedByPeer)
	}, 3*time.Second, 20*time.Millisecond)
}

// startDaemonWith is startDaemon with changed options.
func startDaemonWith(t *testing.T, name, dir string, pc net.PacketConn, mod func(*Options)) *testDaemon {
	t.Helper()
	ft := membership.FastTiming()
	opts := Options{Dir: dir, Config: netstackConfig(), Logger: testLogger(name), PacketConn: pc, NoAuthority: true, Timing: &ft}
	mod(&opts)
	d, err := Start(context.Background(), opts)
	require.NoError(t, err)
	t.Cleanup(func() { _ = d.Close() })
	return &testDaemon{Daemon: d, name: name, dir: dir, pc: pc, opts: opts}
}

func listenUDP(addr string) (net.PacketConn, error) { return net.ListenPacket("udp", addr) }

func dialLedgerListening(t *testing.T, a, b *testDaemon) error {
	t.Helper()
	serveLedger(t, b)
	var last error
	require.Eventually(t, func() bool { last = dialLedger(t, a, "8080"); return last == nil }, 5*time.Second, 20*time.Millisecond,
		"first flow: %v", last)
	return last
}

// copyDir copies the regular files of a node directory (not its socket).
func copyDir(t *testing.T, from, to string) {
	t.Helper()
	require.NoError(t, filepath.WalkDir(from, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(from, p)
		dst := filepath.Join(to, rel)
		if d.IsDir() {
			return os.MkdirAll(dst, 0o700)
		}
		if !d.Type().IsRegular() {
			return nil
		}
		in, err := os.Open(p)
		if err != nil {
			return err
		}
		defer func() { _ = in.Close() }()
		info, _ := d.Info()
		out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, info.Mode().Perm())
		if err != nil {
			return err
		}
		_, err = io.Copy(out, in)
		return errors.Join(err, out.Close())
	}))
}

// A node whose authority is gone while its certificate is past three quarters of its life: the
// credential scheduler's failed renewal and the expiring certificate both become signals, from
// the real events (a renewal attempt against a dead authority, the certificate's own dates).
func TestTrustRenewalFailureAndExpiry(t *testing.T) {
	ta := startAuthority(t)
	dir, pc := joinNode(t, ta, spec{name: "a", zones: []string{"payments"}})
	ta.stop()
	st, err := state.Open(dir)
	require.NoError(t, err)
	cert, err := st.NodeCert()
	require.NoError(t, err)
	life := cert.X509.NotAfter.Sub(cert.X509.NotBefore)
	skew := time.Until(cert.X509.NotBefore.Add(life * 8 / 10))
	a := startDaemonWith(t, "a", dir, pc, func(o *Options) {
		o.Clock = func() time.Time { return time.Now().Add(skew) }
		o.Config.Renewal.Timeout = 300 * time.Millisecond
	})
	id := a.Node().ID().String()
	require.Eventually(t, func() bool { return a.TrustScore(id) == 75 }, 5*time.Second, 10*time.Millisecond,
		"score %d", a.TrustScore(id))
	x, err := backend{a.Daemon}.TrustExplain(context.Background(), id)
	require.NoError(t, err)
	var kinds []string
	for _, ev := range x.Events {
		kinds = append(kinds, ev.Kind)
	}
	assert.ElementsMatch(t, []string{"renewal_failure", "expiring_certificate"}, kinds)
	assert.Equal(t, "allow", x.Action, "75 is above min_trust: a failing renewal alone never isolates")
}

// An agent that probes destinations of its own node: its node sees the denials, attests the
// lowered score in the records it signs and spreads them as trust events (so a peer that saw no
// probe refuses the agent's allowed flow with reason "trust"); refused probes do not push it further; once the
// score is below isolate_below the node revokes its own agent with a signed record that reaches
// the peer.
func TestTrustOwnAgentAttestedThenRevoked(t *testing.T) {
	ta := startAuthority(t)
	ds := cluster(t, ta,
		spec{name: "a", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "billing-api", Zone: "payments"}, {Name: "vault", Zone: "payments"}}},
		spec{name: "b", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "ledger", Zone: "payments"}}},
	)
	a, b := ds["a"], ds["b"]
	waitMembers(t, "payments", 2, a, b)
	require.NoError(t, dialLedgerListening(t, a, b))
	billing, err := a.Node().Agent("payments", "billing-api")
	require.NoError(t, err)
	probe := func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		c, err := billing.Dial(ctx, "tcp", "vault.payments:9090")
		if err == nil {
			_ = c.Close()
		}
		return err
	}
	for range 6 {
		require.ErrorIs(t, probe(), dtl.ErrPolicy)
	}
	require.Eventually(t, func() bool { return a.TrustScore(billingID) == 40 }, 2*time.Second, 5*time.Millisecond)
	require.Eventually(t, func() bool { return b.TrustScore(billingID) == 40 }, 3*time.Second, 10*time.Millisecond,
		"b saw no probe itself but folds a's signed trust events: %d", b.TrustScore(billingID))
	err = dialLedger(t, a, "8080")
	require.ErrorIs(t, err, dtl.ErrTrust, "b refuses on the score a attests and its own view")

	// Refused for trust, further probes are consequences, not new evidence: the score stays.
	for range 3 {
		require.ErrorIs(t, probe(), dtl.ErrTrust)
	}
	time.Sleep(2 * trustTick)
	assert.Equal(t, 40, a.TrustScore(billingID))
	// One more signal of another kind (the queue other evidence enters by) takes the agent to
	// 0 < isolate_below 20: a revokes its own agent and the record reaches b.
	a.trust.observe(trustflow.Signal{Subject: billingID, Kind: trustflow.KindSignerMismatch, Reason: "test evidence"})
	require.Eventually(t, func() bool {
		for _, e := range b.Store().All() {
			if e.Record.Claims.Subject == billingID {
				return true
			}
		}
		return false
	}, 2*time.Second, 10*time.Millisecond, "b never held a's revocation of its agent (score at a: %d)", a.TrustScore(billingID))
	for _, e := range b.Store().All() {
		if e.Record.Claims.Subject == billingID {
			assert.Equal(t, a.Node().ID().String(), e.Record.Claims.Signer)
			assert.Contains(t, e.Record.Claims.Reason, "signer_mismatch")
		}
	}
	require.ErrorIs(t, dialLedger(t, a, "8080"), dtl.ErrRevoked)
	assert.False(t, a.Node().Revoked(a.Node().ID().String()), "the node itself stays")
}

// From the attacker's side: a compromised payments node (m) sends records that name another
// node's agent (billing-api on a). Each is refused, and the refusal is charged to m, the tunnel's
// authenticated peer, never to the agent the records name: nobody can lower a victim's score by
// sending records in its name.
func TestTrustCannotBeLoweredInAnotherAgentsName(t *testing.T) {
	ta := startAuthority(t)
	ds := cluster(t, ta,
		spec{name: "a", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "billing-api", Zone: "payments"}}},
		spec{name: "b", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "ledger", Zone: "payments"}}},
		spec{name: "m", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "mallory", Zone: "payments"}}},
	)
	a, b, m := ds["a"], ds["b"], ds["m"]
	waitMembers(t, "payments", 3, a, b, m)
	require.NoError(t, dialLedgerListening(t, a, b))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	tn, err := m.Node().Tunnel(ctx, "b", "payments")
	require.NoError(t, err)
	mdir, err := state.Open(m.dir)
	require.NoError(t, err)
	agents, err := mdir.Agents()
	require.NoError(t, err)
	require.Len(t, agents, 1)
	mallory := agents[0].Cert
	issuer, _, err := mdir.NodeIssuer()
	require.NoError(t, err)
	key, err := mdir.AgentKey("payments", "mallory")
	require.NoError(t, err)
	_, stranger, err := ed25519.GenerateKey(rand.Reader)
	require.NoError(t, err)
	dst := dtl.Destination{Agent: "ledger", Port: 8080, Proto: dtl.ProtoTCP}
	send := func(agent string, k []byte) error {
		c := &dtl.Claims{Version: dtl.Version1, Zone: "payments", Agent: agent,
			Chain: &dtl.CertChain{Node: issuer.Raw(), Agent: mallory.Raw()}, Node: m.Node().ID().String(),
			Fingerprint: mallory.Claims.Fingerprint, Region: "eu-west-1", Trust: 100, Destination: dst,
			FlowID: tn.NewFlowID(), Seq: 1, IssuedAt: time.Now()}
		rec, err := dtl.Sign(c, k, tn.Exporter())
		require.NoError(t, err)
		fc, err := tn.OpenFlow(ctx, rec, nil, nil)
		if err == nil {
			_ = fc.Close()
		}
		return err
	}
	require.ErrorIs(t, send(billingID, key), dtl.ErrClaimMismatch, "mallory's chain, billing-api's name")
	require.ErrorIs(t, send(billingID, stranger), dtl.ErrSignature, "billing-api's name, a stranger's signature")
	mID := m.Node().ID().String()
	require.Eventually(t, func() bool { return b.TrustScore(mID) == 20 }, 2*time.Second, 5*time.Millisecond,
		"m's score at b: %d", b.TrustScore(mID))
	assert.Equal(t, 100, b.TrustScore(billingID), "the named agent is untouched")
	assert.Equal(t, 100, b.TrustScore(a.Node().ID().String()), "and so is its node")
	require.NoError(t, dialLedger(t, a, "8080"), "billing-api still reaches ledger")
}

// Scenario 2 from a real event: a process that is not billing-api's enrolled executable uses
// billing-api's proxy. The proxy refuses it, and TrustFlow lowers the agent's score by the
// proxy-mismatch weight, once per minute however often the impostor tries; the enrolled workload
// keeps working at 75.
func TestTrustWorkloadMismatchLowersAgent(t *testing.T) {
	pc := startProxyCluster(t)
	p := proxyOf(t, pc.a, "billing-api.payments")
	exe, err := os.Executable()
	require.NoError(t, err)
	b, err := os.ReadFile(exe)
	require.NoError(t, err)
	impostor := filepath.Join(t.TempDir(), "billing-api")
	require.NoError(t, os.WriteFile(impostor, append(b, 0), 0o755))
	for range 2 {
		runHelper(t, impostor, p.SOCKS.String(), "ledger.payments:8080")
		<-pc.mismatch
	}
	require.Eventually(t, func() bool { return pc.a.TrustScore(billingID) == 75 }, 2*time.Second, 5*time.Millisecond,
		"score %d", pc.a.TrustScore(billingID))
	time.Sleep(2 * trustTick)
	x, err := backend{pc.a.Daemon}.TrustExplain(context.Background(), "billing-api.payments")
	require.NoError(t, err)
	require.Len(t, x.Events, 1, "rate-limited: one signal a minute")
	assert.Equal(t, "fingerprint_mismatch", x.Events[0].Kind)
	assert.Contains(t, x.Events[0].Reason, impostor)
	out := runHelper(t, exe, p.SOCKS.String(), "ledger.payments:8080")
	assert.Equal(t, fmt.Sprint(proxy.ReplySucceeded), out, "the enrolled workload still gets through at 75")
}

// TestDupEveryBoundsTheDelay: the duplicate comparison runs at an eighth of the confirmation
// time, never more often than the trust tick and never less often than every 2 s, so that it
// adds at most 2 s to the 45 s default and nothing to a test's short confirmation.
func TestDupEveryBoundsTheDelay(t *testing.T) {
	for _, c := range []struct{ confirm, want time.Duration }{
		{0, 2 * time.Second},
		{45 * time.Second, 2 * time.Second},
		{8 * time.Second, time.Second},
		{300 * time.Millisecond, trustTick},
	} {
		tr := &trust{d: &Daemon{opts: Options{DuplicateConfirm: c.confirm}}, tick: trustTick}
		assert.Equal(t, c.want, tr.dupEvery(), "confirm %v", c.confirm)
	}
	// A longer tick (Options.TrustTick, the simulator's) is the floor, even above 2 s.
	tr := &trust{d: &Daemon{opts: Options{DuplicateConfirm: 300 * time.Millisecond}}, tick: 3 * time.Second}
	assert.Equal(t, 3*time.Second, tr.dupEvery())
}

// The trust loop's pace: while it holds nothing (a node's normal state) it wakes every
// trustRestTick instead of every tick, which still notices a region-file change within a second;
// a held score brings the tick back; Options.TrustTick sets the tick, and a tick longer than
// trustRestTick applies at rest too.
func TestTrustTickAtRestAndWhenHolding(t *testing.T) {
	for _, c := range []struct{ opt, held, rest time.Duration }{
		{0, trustTick, trustRestTick},
		{100 * time.Millisecond, 100 * time.Millisecond, trustRestTick},
		{2 * time.Second, 2 * time.Second, 2 * time.Second},
	} {
		tr, err := newTrust(&Daemon{opts: Options{TrustTick: c.opt}, now: time.Now, metrics: metrics.New()})
		require.NoError(t, err)
		assert.Equal(t, c.rest, tr.nextTick(), "TrustTick %v, nothing held", c.opt)
		_, err = tr.eng.Observe(trustflow.Signal{Subject: "spiffe://acme.internal/node/x", Kind: trustflow.KindPolicyDenial, Reason: "test"})
		require.NoError(t, err)
		assert.Equal(t, c.held, tr.nextTick(), "TrustTick %v, a score held", c.opt)
	}
	assert.Less(t, trustRestTick, time.Second, "a region drift is acted on within a second")
}

// Scenario 2 through the SDK, attacker side: billing-batch is enrolled on a as another
// executable (/bin/true, or a script), and this test binary — which holds a's node — dials as
// billing-batch. Each Dial is refused with node.ErrWorkloadMismatch before anything is sent (b's
// ledger accepts nothing and b's audit log never names billing-batch), a audits the refusal, and
// TrustFlow charges billing-batch one fingerprint_mismatch (rate-limited like the proxy's).
func TestTrustSDKWorkloadMismatchLowersAgent(t *testing.T) {
	ta := startAuthority(t)
	a, b := paymentsPair(t, ta)
	other := "/bin/true"
	if _, err := os.Stat(other); err != nil {
		other = filepath.Join(t.TempDir(), "true")
		require.NoError(t, os.WriteFile(other, []byte("#!/bin/sh\nexit 0\n"), 0o755))
	}
	uid, gid := uint32(os.Geteuid()), uint32(os.Getegid())
	_, err := backend{a.Daemon}.AddAgent(context.Background(), localapi.AgentSpec{Name: "billing-batch", Zone: "payments", Exe: other, UID: &uid, GID: &gid})
	require.NoError(t, err)
	ledger, err := b.Node().Agent("payments", "ledger")
	require.NoError(t, err)
	l, err := ledger.Listen("tcp", ":8080")
	require.NoError(t, err)
	t.Cleanup(func() { _ = l.Close() })
	accepted := make(chan net.Conn, 8)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			accepted <- c
		}
	}()

	batch, err := a.Node().Agent("payments", "billing-batch")
	require.NoError(t, err)
	batchID := batch.ID().String()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for range 2 {
		c, err := batch.Dial(ctx, "tcp", "ledger.payments:8080")
		require.Nil(t, c)
		require.ErrorIs(t, err, node.ErrWorkloadMismatch)
		assert.Contains(t, err.Error(), "not the enrolled executable "+other)
	}
	require.Eventually(t, func() bool { return a.TrustScore(batchID) == 100-proxyMismatchWeight }, 2*time.Second, 5*time.Millisecond,
		"score %d", a.TrustScore(batchID))
	time.Sleep(2 * trustTick)
	x, err := backend{a.Daemon}.TrustExplain(context.Background(), "billing-batch.payments")
	require.NoError(t, err)
	require.Len(t, x.Events, 1, "rate-limited: one signal a minute")
	assert.Equal(t, string(trustflow.KindFingerprintMismatch), x.Events[0].Kind)
	assert.Contains(t, x.Events[0].Reason, other)
	requireAudited(t, a, node.EventWorkloadRefused, batchID)
	assert.Equal(t, 100, a.TrustScore(billingID), "the other agent of the node is not charged")

	// The enrolled workload still gets through; once b has audited that later flow, it has
	// provably never seen a record of billing-batch.
	require.NoError(t, dialLedger(t, a, "8080"))
	select {
	case c := <-accepted:
		_ = c.Close()
	case <-time.After(5 * time.Second):
		t.Fatal("ledger never accepted billing-api's flow")
	}
	requireAudited(t, b, audit.EventAdmit, billingID)
	bLog, err := readAuditDir(filepath.Join(b.dir, "audit"))
	require.NoError(t, err)
	assert.NotContains(t, bLog, "billing-batch")
	assert.Empty(t, accepted, "nothing of billing-batch reached ledger")
}

// Attacker side, duplicate agent identity seen in flows: node m mints billing-api, the name node a
// already serves, after its directory exchange with b (added at runtime, so b's directory has
// never shown m serving it, as with a node that never announces what it mints), and both present
// flows of "billing-api" to b. Flows issued by a, then m, then a again are one identity live at
// two endpoints: b charges billing-api duplicate_identity (score 0) and, on its own observation,
// cuts it locally; its next flows are refused. A single issuer — steady traffic, a restart — never
// alternates (TestTrustSteadyTrafficKeepsFullTrust, TestTrustDuplicateRevokedByAuthorityOnEvidence).
func TestTrustDuplicateAgentIdentity(t *testing.T) {
	ta := startAuthority(t)
	ds := cluster(t, ta,
		spec{name: "a", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "billing-api", Zone: "payments"}}},
		spec{name: "m", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "probe", Zone: "payments"}}},
		spec{name: "b", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "ledger", Zone: "payments"}}},
	)
	a, m, b := ds["a"], ds["m"], ds["b"]
	waitMembers(t, "payments", 3, a, m, b)
	serveLedger(t, b)
	// m's directory exchange with b is over before m mints the name.
	requireAudited(t, b, "directory", m.Node().ID().String())
	exe, err := os.Executable()
	require.NoError(t, err)
	uid, gid := uint32(os.Geteuid()), uint32(os.Getegid())
	_, err = backend{m.Daemon}.AddAgent(context.Background(), localapi.AgentSpec{Name: "billing-api", Zone: "payments", Exe: exe, UID: &uid, GID: &gid})
	require.NoError(t, err)
	for _, d := range []*testDaemon{a, a, m} {
		require.Eventually(t, func() bool { return dialLedger(t, d, "8080") == nil }, 5*time.Second, 20*time.Millisecond)
	}
	time.Sleep(2 * trustTick)
	assert.Equal(t, 100, b.TrustScore(billingID), "a then m: one switch of issuer, as an agent moved between nodes")
	// a again: the third presentation is admitted and confirms the duplicate; the confirmation
	// cuts the agent's flows at once, which may abort this very flow before its verdict is read
	// (stream code 0x206, tunnel's streamCodeAborted).
	if err := dialLedger(t, a, "8080"); err != nil {
		var se *quic.StreamError
		require.True(t, errors.As(err, &se) && se.ErrorCode == 0x206, "a again: neither admitted nor cut by the confirmation: %v", err)
	}
	require.Eventually(t, func() bool { return b.TrustScore(billingID) == 0 }, 2*time.Second, 5*time.Millisecond,
		"score %d", b.TrustScore(billingID))
	x, err := backend{b.Daemon}.TrustExplain(context.Background(), billingID)
	require.NoError(t, err)
	require.NotEmpty(t, x.Events)
	assert.Equal(t, string(trustflow.KindDuplicateIdentity), x.Events[0].Kind)
	assert.Contains(t, x.Events[0].Reason, "flows alternate")
	assert.Contains(t, x.Events[0].Reason, a.Node().ID().String())
	assert.Contains(t, x.Events[0].Reason, m.Node().ID().String())
	// b's own observation takes the remote agent below isolate_below: cut here, both copies.
	for _, d := range []*testDaemon{a, m} {
		require.Eventually(t, func() bool {
			err := dialLedger(t, d, "8080")
			return errors.Is(err, dtl.ErrRevoked) || errors.Is(err, dtl.ErrTrust)
		}, 5*time.Second, 20*time.Millisecond, "%s's billing-api still admitted at b", d.name)
	}
	assert.Equal(t, 100, b.TrustScore(a.Node().ID().String()), "the nodes themselves are not charged")
}

// Attacker side, duplicate agent identity seen in directories: nodes a and m both announce
// billing-api to b. b refuses m's entry (the name is served), re-reads a's directory, finds a
// still announcing it, and charges billing-api duplicate_identity before billing-api has sent a
// single flow; b then cuts it locally, so neither copy's flows are admitted. a and m, which each
// host a billing-api, refuse the other's entry without charging their own agent.
func TestTrustDuplicateAgentDirectoryEntries(t *testing.T) {
	ta := startAuthority(t)
	ds := cluster(t, ta,
		spec{name: "a", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "billing-api", Zone: "payments"}}},
		spec{name: "m", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "billing-api", Zone: "payments"}}},
		spec{name: "b", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "ledger", Zone: "payments"}}},
	)
	a, m, b := ds["a"], ds["m"], ds["b"]
	waitMembers(t, "payments", 3, a, m, b)
	require.Eventually(t, func() bool { return b.TrustScore(billingID) == 0 }, 10*time.Second, 10*time.Millisecond,
		"b never charged billing-api: score %d", b.TrustScore(billingID))
	x, err := backend{b.Daemon}.TrustExplain(context.Background(), billingID)
	require.NoError(t, err)
	require.NotEmpty(t, x.Events)
	assert.Equal(t, string(trustflow.KindDuplicateIdentity), x.Events[0].Kind)
	assert.Contains(t, x.Events[0].Reason, "two directory entries")
	assert.Contains(t, x.Events[0].Reason, a.Node().ID().String())
	assert.Contains(t, x.Events[0].Reason, m.Node().ID().String())
	bLog, err := readAuditDir(filepath.Join(b.dir, "audit"))
	require.NoError(t, err)
	for _, line := range strings.Split(bLog, "\n") {
		assert.False(t, strings.Contains(line, `"event":"admit"`) && strings.Contains(line, "ledger:"),
			"the duplicate was charged from directories, before any flow to ledger: %s", line)
	}
	serveLedger(t, b)
	for _, d := range []*testDaemon{a, m} {
		require.Eventually(t, func() bool {
			err := dialLedger(t, d, "8080")
			return errors.Is(err, dtl.ErrRevoked) || errors.Is(err, dtl.ErrTrust)
		}, 5*time.Second, 20*time.Millisecond, "%s's billing-api still admitted at b", d.name)
	}
	for _, d := range []*testDaemon{a, m, b} {
		assert.Equal(t, 100, b.TrustScore(d.Node().ID().String()), "node %s is not charged", d.name)
	}
}

// No false duplicate from a stale directory entry: a served billing-api and is gone (crashed);
// m then announces billing-api to b. b cannot re-read a's directory, so nothing shows two live
// entries: billing-api keeps its trust, and b keeps the name with its first owner.
func TestTrustDirectoryConflictWithDeadHolderIsNotDuplicate(t *testing.T) {
	ta := startAuthority(t)
	ds := cluster(t, ta,
		spec{name: "a", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "billing-api", Zone: "payments"}}},
		spec{name: "b", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "ledger", Zone: "payments"}}},
	)
	a, b := ds["a"], ds["b"]
	waitMembers(t, "payments", 2, a, b)
	requireAudited(t, b, "directory", a.Node().ID().String())
	require.NoError(t, a.Close())
	mdir, mpc := joinNode(t, ta, spec{name: "m", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "billing-api", Zone: "payments"}}})
	m := startDaemon(t, "m", mdir, mpc, false)
	// b refuses m's entry (the name is a's) and tries to re-read a's directory, which fails.
	require.Eventually(t, func() bool {
		bLog, err := readAuditDir(filepath.Join(b.dir, "audit"))
		return err == nil && strings.Contains(bLog, m.Node().ID().String()) && strings.Contains(bLog, "already served by another node")
	}, 20*time.Second, 20*time.Millisecond, "b never refused m's billing-api entry")
	time.Sleep(directoryTimeoutForTest + 2*trustTick)
	assert.Equal(t, 100, b.TrustScore(billingID), "a dead holder's entry is not a live duplicate")
}

// serveLedger has b's agent ledger accept on :8080 and close every connection, until the test ends.
func serveLedger(t *testing.T, b *testDaemon) {
	t.Helper()
	ledger, err := b.Node().Agent("payments", "ledger")
	require.NoError(t, err)
	l, err := ledger.Listen("tcp", ":8080")
	require.NoError(t, err)
	t.Cleanup(func() { _ = l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			_ = c.Close()
		}
	}()
}
