package daemon

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/identity/record"
	"github.com/ute-project/ute/node"
	"github.com/ute-project/ute/node/revstore"
	"github.com/ute-project/ute/node/state"
	"github.com/ute-project/ute/overlay/tunnel"
)

// demo topology: a (payments), b (payments + support), c (support).
func threeNodes(t *testing.T, ta *testAuthority) map[string]*testDaemon {
	return cluster(t, ta,
		spec{name: "a", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "billing-api", Zone: "payments"}}},
		spec{name: "b", zones: []string{"payments", "support"}, agents: []state.AgentSpec{
			{Name: "ledger", Zone: "payments"}, {Name: "tickets", Zone: "support"}}},
		spec{name: "c", zones: []string{"support"}, agents: []state.AgentSpec{{Name: "helpdesk", Zone: "support"}}},
	)
}

// openFlow dials ledger.payments:8080 from billing-api on a and returns the live conn after one
// round trip, with ledger echoing.
func openFlow(t *testing.T, from, to *testDaemon) io.ReadWriteCloser {
	t.Helper()
	ledger, err := to.Node().Agent("payments", "ledger")
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
			go func() { defer func() { _ = c.Close() }(); _, _ = io.Copy(c, c) }()
		}
	}()
	billing, err := from.Node().Agent("payments", "billing-api")
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := billing.Dial(ctx, "tcp", "ledger.payments:8080")
	require.NoError(t, err)
	t.Cleanup(func() { _ = conn.Close() })
	_, err = conn.Write([]byte("ping"))
	require.NoError(t, err)
	buf := make([]byte, 4)
	_, err = io.ReadFull(conn, buf)
	require.NoError(t, err)
	require.Equal(t, "ping", string(buf))
	return conn
}

// A revocation at the authority reaches every daemon over the watch connection and gossip, and
// the revoked agent's live flow is cut; a member of another zone never holds the agent's record.
func TestDiscoveryRevocationAndCut(t *testing.T) {
	ta := startAuthority(t)
	ds := threeNodes(t, ta)
	a, b, c := ds["a"], ds["b"], ds["c"]
	waitMembers(t, "payments", 2, a, b)
	waitMembers(t, "support", 2, b, c)

	conn := openFlow(t, a, b)

	subject := identity.AgentID("acme.internal", "payments", "billing-api").String()
	start := time.Now()
	rev, err := ta.RevokeSubject(context.Background(), subject, "stolen token")
	require.NoError(t, err)
	require.NotZero(t, rev.Seq)
	for _, d := range []*testDaemon{a, b} {
		require.Eventually(t, func() bool { return d.Store().Revoked(subject) }, time.Second, 5*time.Millisecond,
			"node %s did not hold the revocation within 1 s", d.name)
	}
	t.Logf("revocation held by a and b %v after RevokeSubject returned", time.Since(start))

	// The flow is cut: the next read fails instead of echoing.
	require.Eventually(t, func() bool {
		_, werr := conn.Write([]byte("x"))
		buf := make([]byte, 1)
		_ = werr
		_, rerr := conn.Read(buf)
		return rerr != nil
	}, 2*time.Second, 10*time.Millisecond)

	// A new flow from the revoked agent is refused.
	billing, err := a.Node().Agent("payments", "billing-api")
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err = billing.Dial(ctx, "tcp", "ledger.payments:8080")
	require.Error(t, err)

	// c (support only) receives the authority's records over its own watch, like every node
	// (the authority is the trust anchor of all zones), but the payments pool never carried the
	// record to it: nothing of payments' gossip reaches a node outside the zone.
	assert.Empty(t, c.members("payments"), "c runs no payments pool")

	// Status over the local API shows the revocation.
	st, err := backend{b.Daemon}.Status(context.Background())
	require.NoError(t, err)
	found := false
	for _, r := range st.Revocations {
		found = found || r.Subject == subject
	}
	assert.True(t, found, "b's status lists the revocation")
}

// With the authority down, a node-signed revocation of its own agent still converges by gossip.
func TestNodeRevocationConvergesWithoutAuthority(t *testing.T) {
	ta := startAuthority(t)
	ds := threeNodes(t, ta)
	a, b := ds["a"], ds["b"]
	waitMembers(t, "payments", 2, a, b)
	ta.stop()

	ledger, err := b.Node().Agent("payments", "ledger")
	require.NoError(t, err)
	_ = ledger
	raw, err := b.Revoke(context.Background(), "ledger.payments", "decommissioned")
	require.NoError(t, err)
	rev, err := b.verif.VerifyRevocation(raw, time.Now())
	require.NoError(t, err)
	require.Eventually(t, func() bool { return a.Store().Revoked(rev.Key()) }, time.Second, 5*time.Millisecond)
	assert.Equal(t, "spiffe://acme.internal/node/b", rev.Claims.Signer)
}

// A node may not revoke what it did not issue; the refusal names the rule.
func TestNodeRevokeRefusesOthersAgents(t *testing.T) {
	ta := startAuthority(t)
	ds := threeNodes(t, ta)
	_, err := ds["b"].Revoke(context.Background(), "billing-api.payments", "not mine")
	require.ErrorIs(t, err, node.ErrNotMine)
	_, err = ds["b"].Revoke(context.Background(), identity.NodeID("acme.internal", "a").String(), "not me")
	require.ErrorIs(t, err, node.ErrNotMine)
}

// Forged, foreign and malformed records pushed at the daemon are refused and change nothing.
func TestAcceptRefusesBadRecords(t *testing.T) {
	ta := startAuthority(t)
	ds := cluster(t, ta, spec{name: "a", zones: []string{"payments"}})
	a := ds["a"]
	// A record in the authority's name, signed by a key that is not the authority's.
	_, forger, err := ed25519.GenerateKey(rand.Reader)
	require.NoError(t, err)
	now := time.Now()
	forged, err := record.SignRevocation(record.RevocationClaims{TrustDomain: "acme.internal",
		Subject: identity.NodeID("acme.internal", "a").String(), Reason: "forged", IssuedAt: now, Expires: now.Add(time.Hour),
		Signer: identity.AuthorityID("acme.internal").String(), Seq: 1}, forger)
	require.NoError(t, err)
	_, err = a.Accept(context.Background(), forged, FromGossip)
	require.ErrorIs(t, err, record.ErrSignature)
	_, err = a.Accept(context.Background(), []byte("not a record"), FromGossip)
	require.ErrorIs(t, err, record.ErrMalformed)
	assert.Zero(t, a.Store().Len())
	assert.False(t, a.Node().Revoked(identity.NodeID("acme.internal", "a").String()))
}

// After a crash the accepted revocations are in force before any handshake: the revoked peer is
// refused at once by the restarted node.
func TestRestartEnforcesStoredRevocations(t *testing.T) {
	ta := startAuthority(t)
	ds := threeNodes(t, ta)
	a, b := ds["a"], ds["b"]
	waitMembers(t, "payments", 2, a, b)
	waitMembers(t, "support", 2, b, ds["c"])
	subject := identity.NodeID("acme.internal", "a").String()
	_, err := ta.RevokeSubject(context.Background(), subject, "host compromised")
	require.NoError(t, err)
	require.Eventually(t, func() bool { return b.Store().Revoked(subject) }, time.Second, 5*time.Millisecond)
	// a learns it is revoked and stops gossiping (a revoked node would only keep retrying); its
	// local API still answers.
	require.Eventually(t, func() bool { return len(a.Members("payments")) == 0 }, 3*retireGrace, 10*time.Millisecond)
	_, err = backend{a.Daemon}.Status(context.Background())
	require.NoError(t, err)

	// Restart b on the same directory (its store was closed uncleanly in a real crash; bbolt's
	// commit is durable either way).
	require.NoError(t, b.Close())
	pc := b.pc
	b2, err := Start(context.Background(), Options{Dir: b.dir, Config: b.opts.Config, Logger: b.opts.Logger, PacketConn: pc, NoAuthority: true, Timing: b.opts.Timing})
	require.NoError(t, err)
	t.Cleanup(func() { _ = b2.Close() })
	require.True(t, b2.Node().Revoked(subject), "the stored revocation is in force when Start returns")

	// a (revoked) cannot open a tunnel to the restarted b. First wait until a has seen its old
	// tunnel to b end, so that the dial below is a new handshake, not the stale tunnel.
	require.Eventually(t, func() bool {
		for _, tn := range a.Node().Snapshot().Tunnels {
			if tn.Peer == "spiffe://acme.internal/node/b" {
				return false
			}
		}
		return true
	}, 5*time.Second, 10*time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err = a.Node().Tunnel(ctx, "b", "payments")
	require.ErrorIs(t, err, tunnel.ErrRefusedByPeer)
	// ... while an unrevoked member (c) still reaches it: the refusal is the revocation's.
	_, err = ds["c"].Node().Tunnel(ctx, "b", "support")
	require.NoError(t, err)
}

// A policy release that drops a zone closes its tunnels on every node; an older release is
// refused.
func TestPolicyApplyConvergesAndStaleRefused(t *testing.T) {
	ta := startAuthority(t)
	ds := threeNodes(t, ta)
	b, c := ds["b"], ds["c"]
	waitMembers(t, "support", 2, b, c)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err := b.Node().Tunnel(ctx, "c", "support")
	require.NoError(t, err)

	_, oldRaw, err := ta.PolicyRelease()
	require.NoError(t, err)
	next := strings.SplitN(testPolicy, "  - name: support", 2)[0]
	applied, err := ta.ApplyPolicy(context.Background(), "next.yaml", []byte(next))
	require.NoError(t, err)
	for _, d := range []*testDaemon{b, c} {
		require.Eventually(t, func() bool {
			rel := d.Store().PolicyRelease()
			return rel != nil && rel.Claims.PolicyVersion == applied.Version
		}, 2*time.Second, 10*time.Millisecond, "node %s never got policy version %d", d.name, applied.Version)
	}
	require.Eventually(t, func() bool {
		for _, tn := range b.Node().Snapshot().Tunnels {
			if tn.Zone == "support" {
				return false
			}
		}
		return true
	}, 2*time.Second, 10*time.Millisecond, "b still holds a support tunnel")

	_, err = b.Accept(context.Background(), oldRaw, FromGossip)
	require.ErrorIs(t, err, revstore.ErrStalePolicy)
}

// Twenty nodes in two zones, no authority: a node revokes its agent, which holds live flows to
// nine other nodes. Every member of the zone holds the record and has cut the agent's flows within
// 1 s (gossip only); no member of the other zone ever holds it.
func TestTwentyNodesRevocationByGossip(t *testing.T) {
	if testing.Short() {
		t.Skip("20 daemons; skipped with -short")
	}
	ta := startAuthority(t)
	var pay, sup []*testDaemon
	for i := range 10 {
		s := spec{name: fmt.Sprintf("p%d", i), zones: []string{"payments"}, agents: []state.AgentSpec{{Name: fmt.Sprintf("ledger-%d", i), Zone: "payments"}}}
		if i == 0 {
			s.agents = []state.AgentSpec{{Name: "billing-api", Zone: "payments"}}
		}
		dir, pc := joinNode(t, ta, s)
		pay = append(pay, startDaemon(t, s.name, dir, pc, true))
		dir, pc = joinNode(t, ta, spec{name: fmt.Sprintf("s%d", i), zones: []string{"support"}})
		sup = append(sup, startDaemon(t, fmt.Sprintf("s%d", i), dir, pc, true))
	}
	waitMembers(t, "payments", 10, pay...)
	waitMembers(t, "support", 10, sup...)

	policy := strings.Replace(testPolicy, "to: ledger\n", "to: ledger-*\n", 1)
	_, err := ta.ApplyPolicy(context.Background(), "wide.yaml", []byte(policy))
	require.NoError(t, err)
	// The new release reaches the nodes by gossip from whichever node hears it first; the nodes
	// here have no watch, so hand it to one and let gossip do the rest.
	_, rel, err := ta.PolicyRelease()
	require.NoError(t, err)
	_, err = pay[0].Accept(context.Background(), rel, FromAuthority)
	require.NoError(t, err)
	for _, d := range pay {
		require.Eventually(t, func() bool { rr := d.Store().PolicyRelease(); return rr != nil && rr.Claims.PolicyVersion >= 2 },
			5*time.Second, 10*time.Millisecond, "node %s never got the wider policy", d.name)
	}

	billing, err := pay[0].Node().Agent("payments", "billing-api")
	require.NoError(t, err)
	for i := 1; i < 10; i++ {
		ledger, err := pay[i].Node().Agent("payments", fmt.Sprintf("ledger-%d", i))
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
				go func() { defer func() { _ = c.Close() }(); _, _ = io.Copy(c, c) }()
			}
		}()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		c, err := billing.Dial(ctx, "tcp", fmt.Sprintf("ledger-%d.payments:8080", i))
		cancel()
		require.NoError(t, err)
		t.Cleanup(func() { _ = c.Close() })
	}
	countFlows := func(d *testDaemon) int {
		n := 0
		d.Node().Endpoint().Flows(func(string, tunnel.Admission) { n++ })
		return n
	}
	for i := 1; i < 10; i++ {
		// A directory exchange with a peer is a flow too, for the moment it is open.
		require.Eventually(t, func() bool { return countFlows(pay[i]) == 1 }, 5*time.Second, 10*time.Millisecond,
			"node %s holds billing-api's flow and nothing else (%d flows)", pay[i].name, countFlows(pay[i]))
	}

	start := time.Now()
	raw, err := pay[0].Revoke(context.Background(), "billing-api.payments", "token stolen")
	require.NoError(t, err)
	rev, err := pay[0].verif.VerifyRevocation(raw, time.Now())
	require.NoError(t, err)
	for _, d := range pay {
		require.Eventually(t, func() bool { return d.Store().Revoked(rev.Key()) && (d == pay[0] || countFlows(d) == 0) },
			time.Second, 2*time.Millisecond, "node %s: record held %v, flows %d", d.name, d.Store().Revoked(rev.Key()), countFlows(d))
	}
	t.Logf("all 10 payments members held the record and cut the flow %v after Revoke returned", time.Since(start))
	time.Sleep(300 * time.Millisecond) // several gossip rounds: nothing may leak into support
	for _, d := range sup {
		assert.False(t, d.Store().Revoked(rev.Key()), "support member %s received a payments agent's revocation", d.name)
	}
}
