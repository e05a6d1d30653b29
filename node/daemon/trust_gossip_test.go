package daemon

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"encoding/json"
	"errors"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/identity/record"
	"github.com/ute-project/ute/node"
	"github.com/ute-project/ute/node/state"
	"github.com/ute-project/ute/node/trustflow"
	"github.com/ute-project/ute/overlay/audit"
	"github.com/ute-project/ute/overlay/dtl"
	"github.com/ute-project/ute/overlay/tunnel"
)

// Denials only b sees become trust events signed by b and spread in the payments pool: a (the
// agent's node) and c (a member that saw nothing) compute the same score as b within the
// convergence time, and a node of another zone never receives them.
func TestTrustEventsConvergeInTheZone(t *testing.T) {
	ta := startAuthority(t)
	ds := cluster(t, ta,
		spec{name: "a", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "billing-api", Zone: "payments"}}},
		spec{name: "b", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "ledger", Zone: "payments"}}},
		spec{name: "c", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "fx", Zone: "payments"}}},
		spec{name: "s", zones: []string{"support"}, agents: []state.AgentSpec{{Name: "helpdesk", Zone: "support"}}},
	)
	a, b, c, s := ds["a"], ds["b"], ds["c"], ds["s"]
	waitMembers(t, "payments", 3, a, b, c)
	warm(t, a)
	for range 6 {
		require.ErrorIs(t, dialLedger(t, a, "9090"), dtl.ErrPolicy)
	}
	start := time.Now()
	require.Eventually(t, func() bool {
		return a.TrustScore(billingID) == 40 && b.TrustScore(billingID) == 40 && c.TrustScore(billingID) == 40
	}, 5*time.Second, 5*time.Millisecond, "scores a=%d b=%d c=%d", a.TrustScore(billingID), b.TrustScore(billingID), c.TrustScore(billingID))
	t.Logf("three members agree on 40 %v after the last denial", time.Since(start))
	aID := a.Node().ID().String()
	require.Eventually(t, func() bool { return c.TrustScore(aID) == 88 }, 3*time.Second, 5*time.Millisecond, "node a at c: %d", c.TrustScore(aID))
	// The same events, the same arithmetic: c's explanation lists b's six observations.
	x, err := backend{c.Daemon}.TrustExplain(context.Background(), billingID)
	require.NoError(t, err)
	require.Len(t, x.Events, 6)
	for _, ev := range x.Events {
		assert.Equal(t, "policy_denial", ev.Kind)
	}
	// Counted once the event is folded, a moment after its score is visible.
	require.Eventually(t, func() bool { return c.TrustEvents("accepted") >= 12 }, 3*time.Second, 5*time.Millisecond,
		"accepted at c: %d", c.TrustEvents("accepted"))
	require.Eventually(t, func() bool { return b.TrustEvents("published") == 12 }, 3*time.Second, 5*time.Millisecond,
		"six for the agent, six for its node: %d", b.TrustEvents("published"))
	// Another zone's member holds none of them.
	assert.Equal(t, 100, s.TrustScore(billingID))
	assert.Zero(t, s.trust.events.len())
	// c refuses the agent's allowed flow too: its own view is 40 (c never saw a probe).
	fx, err := c.Node().Agent("payments", "fx")
	require.NoError(t, err)
	l, err := fx.Listen("tcp", ":8080")
	require.NoError(t, err)
	defer func() { _ = l.Close() }()
	assert.Equal(t, 40, c.TrustScore(billingID))
}

// Admission takes the lower of the score the sender attests in its record and the receiver's
// own view, each side tested alone (the views are set in the engines directly, so that neither
// reaches the other through gossip).
func TestTrustAdmitsOnTheLowerOfAttestedAndOwnView(t *testing.T) {
	ta := startAuthority(t)
	a, b := paymentsPair(t, ta)
	require.NoError(t, dialLedgerListening(t, a, b))
	low := trustflow.Signal{Subject: billingID, Kind: trustflow.KindRegionDrift, Weight: 60, Reason: "test: view lowered here only"}

	// Attested low (a's view 40), b's own view 100.
	_, err := a.trust.eng.Observe(low)
	require.NoError(t, err)
	require.Equal(t, 100, b.TrustScore(billingID))
	require.ErrorIs(t, dialLedger(t, a, "8080"), dtl.ErrTrust, "attested 40 < min_trust 50")
	a.trust.eng.Forget(billingID)
	require.NoError(t, dialLedger(t, a, "8080"))

	// Attested 100, b's own view 40.
	_, err = b.trust.eng.Observe(low)
	require.NoError(t, err)
	require.ErrorIs(t, dialLedger(t, a, "8080"), dtl.ErrTrust, "own view 40 < min_trust 50")
	b.trust.eng.Forget(billingID)
	require.NoError(t, dialLedger(t, a, "8080"))
}

// signEvent signs a trust event as the node holding cert and key.
func signEvent(t *testing.T, cert *identity.Certificate, key ed25519.PrivateKey, subject, kind, zone string, weight uint64, at time.Time) []byte {
	t.Helper()
	nonce := bytes.Repeat([]byte{byte(at.UnixNano())}, record.TrustNonceLen)
	raw, err := record.SignTrustEvent(record.TrustEventClaims{TrustDomain: cert.ID.TrustDomain, Subject: subject, Kind: kind,
		Weight: weight, ObservedAt: at, Zone: zone, Observer: cert.ID.String(), ObserverCert: cert.Raw(), Nonce: nonce,
		Reason: "attacker-side test"}, key)
	require.NoError(t, err)
	return raw
}

// From the attacker's side: evidence cannot be forged. Each event below reaches b through the
// record path gossip uses and is dropped with its exact refusal and counted; none moves the
// victim's score. A replayed genuine event counts once. A revoked observer's events stop
// counting, including those accepted before.
func TestTrustEventsCannotBeForged(t *testing.T) {
	ta := startAuthority(t)
	ds := cluster(t, ta,
		spec{name: "a", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "billing-api", Zone: "payments"}}},
		spec{name: "b", zones: []string{"payments", "support"}, agents: []state.AgentSpec{{Name: "ledger", Zone: "payments"}}},
		spec{name: "m", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "mallory", Zone: "payments"}}},
		spec{name: "s", zones: []string{"support"}, agents: []state.AgentSpec{{Name: "helpdesk", Zone: "support"}}},
	)
	a, b, m, s := ds["a"], ds["b"], ds["m"], ds["s"]
	waitMembers(t, "payments", 3, a, b, m)
	waitMembers(t, "support", 2, b, s)
	aID := a.Node().ID().String()
	ctx := context.Background()
	now := time.Now().Truncate(time.Millisecond)
	accept := func(raw []byte, pool string) error {
		_, err := b.AcceptTrustEvent(ctx, raw, FromGossip, pool)
		return err
	}

	// A node of a look-alike authority (same trust domain name, another key): a non-member.
	fakeKey, err := identity.GenerateKey()
	require.NoError(t, err)
	fakeCA, err := identity.NewAuthority("acme.internal", fakeKey, now.Add(-time.Hour), 24*time.Hour)
	require.NoError(t, err)
	strangerKey, err := identity.GenerateKey()
	require.NoError(t, err)
	stranger, err := identity.Issue(fakeCA, fakeKey, identity.IssueRequest{
		ID: identity.NodeID("acme.internal", "m"), PublicKey: strangerKey.Public().(ed25519.PublicKey),
		Claims: identity.Claims{Zones: []identity.ZoneGrant{{Name: "payments", Prefixes: []netip.Prefix{netip.MustParsePrefix("100.100.1.240/28")}}},
			Regions: []string{"eu-west-1"}, Fingerprint: bytes.Repeat([]byte{1}, 32)},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour),
	})
	require.NoError(t, err)
	err = accept(signEvent(t, stranger, strangerKey, billingID, "region_drift", "payments", 100, now), "payments")
	require.ErrorIs(t, err, record.ErrSigner, "signed by a non-member")

	// s serves support only: it cannot report in payments, nor about payments' agent in support.
	sCert, sKey, err := s.Node().Credentials()
	require.NoError(t, err)
	c := record.TrustEventClaims{TrustDomain: "acme.internal", Subject: billingID, Kind: "duplicate_identity", Weight: 100,
		ObservedAt: now, Zone: "payments", Observer: sCert.ID.String(), ObserverCert: sCert.Raw(),
		Nonce: bytes.Repeat([]byte{2}, record.TrustNonceLen)}
	_, err = record.SignTrustEvent(c, sKey)
	require.ErrorIs(t, err, record.ErrNotAllowed, "the signer refuses too")
	c.Zone = "support"
	_, err = record.SignTrustEvent(c, sKey)
	require.ErrorIs(t, err, record.ErrNotAllowed)
	// Signed anyway (what a modified node can produce): refused at b.
	err = accept(signEvent(t, sCert, sKey, aID, "duplicate_identity", "support", 100, now), "support")
	require.ErrorIs(t, err, ErrTrustEventZone, "node a is not in support: a subject outside the observer's zones")

	// m (a payments member) signs a genuine-looking event; replaying it counts once.
	mCert, mKey, err := m.Node().Credentials()
	require.NoError(t, err)
	ev := signEvent(t, mCert, mKey, billingID, "policy_denial", "payments", 10, now)
	require.NoError(t, accept(ev, "payments"))
	require.ErrorIs(t, accept(ev, "payments"), ErrTrustEventReplay)
	isNew, err := b.Accept(ctx, ev, FromGossip)
	require.NoError(t, err, "the gossip path takes a replay as known, not as an error")
	assert.False(t, isNew)
	assert.Equal(t, 90, b.TrustScore(billingID), "counted once")
	// The same event arriving on another zone's pool is refused: events spread in their zone only.
	require.ErrorIs(t, accept(signEvent(t, mCert, mKey, billingID, "policy_denial", "payments", 10, now.Add(time.Millisecond)), "support"), ErrTrustEventZone)
	// Older than its retention (weight 100 decays in 10 h): void.
	require.ErrorIs(t, accept(signEvent(t, mCert, mKey, billingID, "signer_mismatch", "payments", 40, now.Add(-5*time.Hour)), "payments"), record.ErrExpired)
	// An inflated weight is capped at the zone's weight for the kind.
	require.NoError(t, accept(signEvent(t, mCert, mKey, billingID, "policy_denial", "payments", 100, now.Add(2*time.Millisecond)), "payments"))
	assert.Equal(t, 80, b.TrustScore(billingID), "policy_denial weighs 10 whatever the observer claims")
	// Tampered bytes: the signature fails.
	bad := bytes.Clone(ev)
	bad[len(bad)-1] ^= 1
	require.ErrorIs(t, accept(bad, "payments"), record.ErrSignature)

	for reason, want := range map[string]uint64{"signer": 1, "zone": 2, "replay": 2, "expired": 1, "signature": 1} {
		assert.Equal(t, want, b.TrustEvents(reason), "dropped as %s", reason)
	}

	// One member's word alone denies at most: m claims a duplicate of billing-api (100 points);
	// b denies the agent but neither cuts it nor revokes it, and neither does its node a.
	require.NoError(t, accept(signEvent(t, mCert, mKey, billingID, "duplicate_identity", "payments", 100, now.Add(3*time.Millisecond)), "payments"))
	require.Eventually(t, func() bool { return a.TrustScore(billingID) == 0 }, 3*time.Second, 10*time.Millisecond)
	time.Sleep(3 * trustTick)
	assert.False(t, b.Node().Revoked(billingID))
	assert.False(t, a.Node().Revoked(billingID), "a does not revoke its agent on one member's word")

	// m is revoked: its events stop counting everywhere, and new ones are refused.
	_, err = ta.RevokeSubject(ctx, mCert.ID.String(), "compromised")
	require.NoError(t, err)
	require.Eventually(t, func() bool { return b.Node().Revoked(mCert.ID.String()) }, 5*time.Second, 10*time.Millisecond)
	require.Eventually(t, func() bool { return b.TrustScore(billingID) == 100 && a.TrustScore(billingID) == 100 }, 3*time.Second, 10*time.Millisecond,
		"b=%d a=%d", b.TrustScore(billingID), a.TrustScore(billingID))
	require.ErrorIs(t, accept(signEvent(t, mCert, mKey, billingID, "policy_denial", "payments", 10, now.Add(4*time.Millisecond)), "payments"), ErrTrustEventObserver)
	assert.Equal(t, 100, b.TrustScore(billingID))
}

// Scenario 4 with real nodes: a's directory is copied and run from another address. b sees one
// identity live at two places, collects a presence proof from each process, and the authority,
// checking the proofs itself, revokes a for everyone: a's sessions end. Before that, a restarts,
// renews its certificate and reconnects from its address: not a duplicate of itself.
func TestTrustDuplicateRevokedByAuthorityOnEvidence(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: end-to-end duplicate identity through the authority (8 s)")
	}
	ta := startAuthority(t)
	ds := cluster(t, ta,
		spec{name: "a", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "billing-api", Zone: "payments"}}},
	)
	a := ds["a"]
	bdir, bpc := joinNode(t, ta, spec{name: "b", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "ledger", Zone: "payments"}}})
	b := startDaemonWith(t, "b", bdir, bpc, func(o *Options) { o.DuplicateConfirm = 2 * time.Second; o.NoAuthority = false })
	waitMembers(t, "payments", 2, a, b)
	aID := a.Node().ID().String()
	require.NoError(t, dialLedgerListening(t, a, b))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	// Restart, renew, reconnect.
	serial := a.Node().Certificate().Serial().String()
	addr := a.pc.LocalAddr().String()
	require.NoError(t, a.Close())
	require.NoError(t, a.pc.Close())
	sd, err := state.Open(a.dir)
	require.NoError(t, err)
	_, err = node.RenewDir(ctx, sd, ta.addr, time.Now)
	require.NoError(t, err)
	pc, err := listenUDP(addr)
	require.NoError(t, err)
	t.Cleanup(func() { _ = pc.Close() })
	a = startDaemon(t, "a", a.dir, pc, false)
	require.NotEqual(t, serial, a.Node().Certificate().Serial().String(), "renewed")
	require.Eventually(t, func() bool { return dialLedger(t, a, "8080") == nil }, 5*time.Second, 50*time.Millisecond)
	time.Sleep(5 * time.Second) // more than twice the confirmation time
	assert.Equal(t, 100, b.TrustScore(aID), "a restarted, renewed node is not its own duplicate")
	assert.Equal(t, 100, b.TrustScore(billingID), "nor is its agent, whose flows before and after come from one node")
	assert.Zero(t, b.EvidenceSubmitted(aID))
	_, held := b.Store().Lookup(aID)
	assert.False(t, held)

	// The stolen copy.
	thiefDir := filepath.Join(t.TempDir(), "a-copy")
	copyDir(t, a.dir, thiefDir)
	tpc, err := listenUDP("127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { _ = tpc.Close() })
	thief := startDaemon(t, "thief", thiefDir, tpc, true)
	require.NoError(t, thief.Node().AddPeer(node.Peer{Node: "b", Addr: b.Addr()}))
	_, err = thief.Node().Tunnel(ctx, "b", "payments")
	require.NoError(t, err)
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
	}, 5*time.Second, 20*time.Millisecond, "a never held an inbound tunnel at b")
	start := time.Now()
	require.Eventually(t, func() bool { return b.EvidenceSubmitted(aID) != 0 }, 15*time.Second, 20*time.Millisecond,
		"b never obtained the authority's revocation on its evidence")
	t.Logf("evidence accepted and identity revoked %v after both copies held tunnels (confirmation 2s)", time.Since(start))
	require.Eventually(t, func() bool {
		e, ok := b.Store().Lookup(aID)
		return ok && e.Record.ByAuthority()
	}, 5*time.Second, 10*time.Millisecond)
	e, _ := b.Store().Lookup(aID)
	assert.Contains(t, e.Record.Claims.Reason, "duplicate identity")
	// The original learns it from the authority: revoked, its sessions end, it can no longer
	// open a tunnel to b.
	require.Eventually(t, func() bool { return a.Node().Revoked(aID) }, 5*time.Second, 10*time.Millisecond)
	require.ErrorIs(t, dialLedger(t, a, "8080"), dtl.ErrRevoked, "the original's own node refuses its revoked agent")
	// The copy never watched the authority, but b refuses its handshake: the identity is revoked.
	require.Eventually(t, func() bool {
		_, err := thief.Node().Tunnel(ctx, "b", "payments")
		return errors.Is(err, tunnel.ErrRefusedByPeer)
	}, 5*time.Second, 20*time.Millisecond)
	for _, tn := range b.Node().Endpoint().Tunnels() {
		assert.False(t, tn.Peer().NodeID == aID && tn.Alive(), "b holds no session of the revoked identity")
	}
	// b kept both copies' tunnels up (denied, not cut) from the confirmation until it held the
	// evidence: cutting them at the confirmation left only the proofs of the candidate phase,
	// which under load could all predate the overlap the authority requires, and then none
	// could be collected before the 10 s give-up.
	requireAudited(t, b, "duplicate_evidence", aID)
	var actions []string
	bLog, err := readAuditDir(filepath.Join(b.dir, "audit"))
	require.NoError(t, err)
	for line := range strings.SplitSeq(bLog, "\n") {
		var r audit.Record
		if json.Unmarshal([]byte(line), &r) != nil || r.Event != node.EventTrust || r.Fields["subject"] != aID {
			continue
		}
		actions = append(actions, r.Fields["action"])
	}
	require.NotEmpty(t, actions)
	assert.Equal(t, "deny_flows", actions[0], "confirmed duplicate held while the proofs are collected: %v", actions)
	i := slices.Index(actions, "duplicate_evidence")
	require.GreaterOrEqual(t, i, 0, "%v", actions)
	assert.NotContains(t, actions[:i], "isolate_and_revoke", "cut before the evidence was submitted: %v", actions)
}
