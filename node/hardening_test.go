package node

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/node/state"
	"github.com/ute-project/ute/overlay/audit"
	"github.com/ute-project/ute/overlay/dtl"
	"github.com/ute-project/ute/overlay/tunnel"
)

// A flow whose record verifies but that the receiving endpoint refuses (here: the per-agent flow
// limit) must be audited as a denial with its reason, never as an admission. The node used to
// audit inside the Admitter, before the endpoint's own checks, so the log said "admit" for a flow
// the peer was refused.
func TestAuditRecordsEndpointRefusalsAsDenials(t *testing.T) {
	ns := cluster(t,
		nodeSpec{name: "a", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "billing-api", Zone: "payments"}}},
		nodeSpec{name: "b", zones: []string{"payments"}, limits: tunnel.Limits{MaxFlowsPerAgent: 1},
			agents: []state.AgentSpec{{Name: "ledger", Zone: "payments"}}},
	)
	a, b := ns["a"], ns["b"]
	billing := agent(t, a, "payments", "billing-api")
	ledger := agent(t, b, "payments", "ledger")
	sink := serveSink(t, ledger, "8080")
	_, err := a.tunnelTo(context.Background(), b.ID().String(), "payments")
	require.NoError(t, err)
	waitDirectory(t, b, "payments", "billing-api")
	waitDirectory(t, a, "payments", "ledger")
	// The tunnel-up directory exchange is itself a flow of billing-api; wait until it is gone.
	require.Eventually(t, func() bool { return b.Stats().ActiveFlows == 0 }, 5*time.Second, 5*time.Millisecond)

	first, err := billing.Dial(context.Background(), "tcp", "ledger.payments:8080")
	require.NoError(t, err)
	t.Cleanup(func() { _ = first.Close() })
	_, err = billing.Dial(context.Background(), "tcp", "ledger.payments:8080")
	require.ErrorIs(t, err, dtl.ErrLimit)
	require.ErrorIs(t, err, tunnel.ErrRejected)

	var admits, denies []audit.Record
	for _, r := range auditEntries(t, b) {
		if r.Fields["dst"] != "ledger:8080/tcp" {
			continue
		}
		switch r.Event {
		case audit.EventAdmit:
			admits = append(admits, r)
		case audit.EventDeny:
			denies = append(denies, r)
		}
	}
	require.Len(t, admits, 1, "only the flow that was admitted is audited as admitted")
	require.Len(t, denies, 1)
	assert.Equal(t, "limit", denies[0].Fields["reason"])
	assert.Equal(t, "true", denies[0].Fields["verified"], "the record itself verified")
	assert.Equal(t, billing.ID().String(), denies[0].Fields["agent"])
	assert.NotEqual(t, admits[0].Fields["seq"], denies[0].Fields["seq"])
	require.Eventually(t, func() bool { return sink.conns.Load() == 1 }, 5*time.Second, 5*time.Millisecond)
}

// A zone member announcing an agent certificate with the name of an agent the receiving node hosts
// must not shadow it: before, the name resolved to two destinations, lookups failed as ambiguous,
// and any peer of the zone could make a local agent unreachable by name.
func TestDirectoryCannotShadowLocalAgent(t *testing.T) {
	ns := cluster(t,
		nodeSpec{name: "a", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "billing-api", Zone: "payments"}}},
		nodeSpec{name: "b", zones: []string{"payments"}, agents: []state.AgentSpec{
			{Name: "ledger", Zone: "payments"}, {Name: "billing-batch", Zone: "payments"}}},
	)
	a, b := ns["a"], ns["b"]
	batch := agent(t, b, "payments", "billing-batch")
	ledger := agent(t, b, "payments", "ledger")
	sink := serveSink(t, ledger, "8080")

	grant, ok := a.Certificate().Claims.Zone("payments")
	require.True(t, ok)
	ip := grant.Prefixes[0].Addr().Next().Next().Next() // inside a's slice, unused
	iss, issKey := nodeIssuer(t, a)
	forged, _ := forgeAgent(t, iss, issKey, "payments", "ledger", ip)
	ba, err := b.tunnelTo(context.Background(), a.ID().String(), "payments")
	require.NoError(t, err)
	require.Equal(t, a.ID().String(), ba.Peer().NodeID)
	waitDirectory(t, b, "payments", "billing-api")

	accepted, refused := b.installDirectory(context.Background(), ba.Peer(), "payments", [][]byte{iss.Raw(), forged.Raw()})
	assert.Zero(t, accepted)
	assert.Equal(t, 1, refused)
	d, ok := b.lookup("payments", "ledger", ip, 8080)
	require.True(t, ok, "ledger.payments still resolves")
	assert.Empty(t, d.node, "to the local agent")
	assert.Equal(t, ledger.IP(), d.ip)
	_, ok = b.lookup("payments", "", ip, 8080)
	assert.False(t, ok, "the forged entry's address is not installed either")

	c, err := batch.Dial(context.Background(), "tcp", "ledger.payments:8080")
	require.NoError(t, err)
	require.NoError(t, c.Close())
	require.Eventually(t, func() bool { return sink.conns.Load() == 1 }, 5*time.Second, 5*time.Millisecond)
	var last audit.Record
	for _, r := range auditEntries(t, b) {
		if r.Event == eventDirectory && r.Fields["refused"] == "1" {
			last = r
		}
	}
	assert.Contains(t, last.Fields["error"], "already served")
}

// The node signs its audit head with its key, so an attacker who cuts the last entries (say, the
// denials of an attack) and rewrites the head to match is caught by verification against the node
// certificate's key; before, the head was unsigned and such a cut verified clean.
func TestAuditHeadIsSignedByNodeKey(t *testing.T) {
	ns := cluster(t,
		nodeSpec{name: "a", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "billing-api", Zone: "payments"}}},
	)
	a := ns["a"]
	billing := agent(t, a, "payments", "billing-api")
	for port := range 3 { // three destinations: three kinds of denial, each written at once
		_, err := billing.Dial(context.Background(), "tcp", "billing-api.payments:"+strconv.Itoa(9+port)) // no rule: denied
		require.ErrorIs(t, err, dtl.ErrPolicy)
	}
	require.NoError(t, a.audit.Sync())
	dir := filepath.Join(a.dir, DirAudit)
	pub := a.Certificate().X509.PublicKey.(ed25519.PublicKey)
	rep, err := audit.VerifyWithKey(dir, pub)
	require.NoError(t, err)
	require.True(t, rep.Signed)
	require.Equal(t, 3, rep.Entries)

	// Cut the last denial and write a head that anchors what is left, as an attacker would.
	b, err := os.ReadFile(filepath.Join(dir, audit.LogFile))
	require.NoError(t, err)
	lines := bytes.SplitAfter(bytes.TrimSuffix(b, []byte("\n")), []byte("\n"))
	kept := bytes.Join(lines[:2], nil)
	require.NoError(t, os.WriteFile(filepath.Join(dir, audit.LogFile), kept, 0o600))
	var second struct {
		Hash string `json:"hash"`
	}
	require.NoError(t, json.Unmarshal(lines[1], &second))
	require.NoError(t, os.WriteFile(filepath.Join(dir, audit.HeadFile), []byte(`{"count":2,"hash":"`+second.Hash+`"}`+"\n"), 0o600))

	_, err = audit.Verify(dir)
	require.NoError(t, err, "the unkeyed chain alone cannot see the cut")
	_, err = audit.VerifyWithKey(dir, pub)
	require.ErrorIs(t, err, audit.ErrHeadSignature)
}

// A directory exchange that failed (the tunnel closed under it, the peer refused) must not make
// the next lookup miss believe the directory is fresh: the retry runs at once, not a refresh
// interval later.
func TestFailedDirectoryRefreshIsRetriedAtOnce(t *testing.T) {
	ns := cluster(t, nodeSpec{name: "a", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "billing-api", Zone: "payments"}}})
	a := ns["a"]
	k := refreshKey{"spiffe://acme.internal/node/b", "payments"}
	ctx := context.Background()
	failed := errors.New("tunnel closed during the exchange")
	require.ErrorIs(t, a.refresh(ctx, k, false, func(context.Context) error { return failed }), failed)
	calls := 0
	require.NoError(t, a.refresh(ctx, k, false, func(context.Context) error { calls++; return nil }))
	assert.Equal(t, 1, calls, "a failed refresh must not suppress the next one")
	require.NoError(t, a.refresh(ctx, k, false, func(context.Context) error { calls++; return nil }))
	assert.Equal(t, 1, calls, "a successful refresh does suppress an immediate repeat")
}
