package node

import (
	"context"
	"encoding/hex"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/node/attest"
	"github.com/ute-project/ute/node/state"
	"github.com/ute-project/ute/overlay/audit"
)

// otherExecutable is an executable that is not this test binary: /bin/true when there is one,
// else a small script.
func otherExecutable(t *testing.T) string {
	t.Helper()
	if p, err := exec.LookPath("true"); err == nil {
		if p, err = filepath.EvalSymlinks(p); err == nil {
			return p
		}
	}
	p := filepath.Join(t.TempDir(), "true")
	require.NoError(t, os.WriteFile(p, []byte("#!/bin/sh\nexit 0\n"), 0o755))
	return p
}

// Attacker side: billing-batch is enrolled as another executable (/bin/true); this test binary,
// which holds the node directory, dials as billing-batch. Every flow is refused before anything
// is resolved or sent: no tunnel, no record at b, nothing at the server; the refusal is audited at
// a and reported to TrustFlow's hook. The agent enrolled as this binary still dials.
func TestSDKDialFromAnotherExecutableIsRefused(t *testing.T) {
	var mu sync.Mutex
	var reported []string
	var verdictsAtB []FlowVerdict
	ns := cluster(t,
		nodeSpec{name: "a", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "billing-api", Zone: "payments"}},
			configure: func(c *Config) {
				c.OnWorkloadMismatch = func(agent identity.ID, reason string) {
					mu.Lock()
					defer mu.Unlock()
					reported = append(reported, agent.String()+": "+reason)
				}
			}},
		nodeSpec{name: "b", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "ledger", Zone: "payments"}},
			configure: func(c *Config) {
				c.OnFlowVerdict = func(v FlowVerdict) {
					mu.Lock()
					defer mu.Unlock()
					verdictsAtB = append(verdictsAtB, v)
				}
			}},
	)
	a, b := ns["a"], ns["b"]
	other := otherExecutable(t)
	_, err := a.Node.dir.AddAgent(state.AgentSpec{Name: "billing-batch", Zone: "payments", Exe: other,
		UID: uint32(os.Geteuid()), GID: uint32(os.Getegid())})
	require.NoError(t, err)
	require.NoError(t, a.ReloadAgents())
	s := serveSink(t, agent(t, b, "payments", "ledger"), "8080")
	batch := agent(t, a, "payments", "billing-batch")

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, network := range []string{"tcp", "udp"} {
		c, err := batch.Dial(ctx, network, "ledger.payments:8080")
		require.Nil(t, c)
		require.ErrorIs(t, err, ErrWorkloadMismatch, network)
		require.ErrorIs(t, err, attest.ErrMismatch, network)
		re, ok := errors.AsType[*RefusedError](err)
		require.True(t, ok, "%T", err)
		assert.Equal(t, "attest", re.Stage)
		assert.Equal(t, "workload", re.Reason)
		assert.Contains(t, err.Error(), "not the enrolled executable "+other)
	}
	_, err = batch.HTTPClient().Get("http://ledger.payments:8080/")
	require.ErrorIs(t, err, ErrWorkloadMismatch, "the HTTP client dials through Dial")

	// Nothing left a: no tunnel was opened (not even for name resolution), b saw no record.
	assert.Empty(t, a.Snapshot().Tunnels, "a refused flow opens no tunnel")
	mu.Lock()
	assert.Empty(t, verdictsAtB, "b received no record")
	assert.Len(t, reported, 3, "every refused Dial is reported to TrustFlow")
	assert.Contains(t, reported[0], "spiffe://acme.internal/zone/payments/agent/billing-batch: ")
	assert.Contains(t, reported[0], "not the enrolled "+other)
	mu.Unlock()
	assert.Zero(t, s.conns.Load())

	// Audited at a: the first refusal in full (identical ones are collapsed by flood control).
	var refusals []audit.Record
	for _, r := range auditEntries(t, a) {
		if r.Event == EventWorkloadRefused {
			refusals = append(refusals, r)
		}
	}
	require.NotEmpty(t, refusals)
	f := refusals[0].Fields
	assert.Equal(t, "spiffe://acme.internal/zone/payments/agent/billing-batch", f["agent"])
	assert.Equal(t, "sdk", f["via"])
	assert.Equal(t, "ledger.payments:8080", f["dst"])
	self, err := os.Executable()
	require.NoError(t, err)
	selfDigest, err := identity.FileDigest(self)
	require.NoError(t, err)
	assert.Equal(t, hex.EncodeToString(selfDigest[:]), f["exe_sha256"], "the executable that tried")
	assert.Contains(t, f["error"], ErrWorkloadMismatch.Error())

	// The enrolled workload (billing-api is this test binary, this uid) still gets through, and
	// the relay path (the daemon's interfaces) skips the own-process check.
	c, err := agent(t, a, "payments", "billing-api").Dial(ctx, "tcp", "ledger.payments:8080")
	require.NoError(t, err)
	require.NoError(t, c.Close())
	c, err = batch.Relay().Dial(ctx, "tcp", "ledger.payments:8080")
	require.NoError(t, err)
	require.NoError(t, c.Close())
	require.Eventually(t, func() bool { return s.conns.Load() == 2 }, 5*time.Second, 5*time.Millisecond)
}

// Attacker side: the same executable enrolled for another uid is refused too (the fingerprint
// names the uid and gid the agent runs as).
func TestSDKDialAsAnotherUIDIsRefused(t *testing.T) {
	ns := cluster(t, nodeSpec{name: "a", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "billing-api", Zone: "payments"}}})
	a := ns["a"]
	exe, err := os.Executable()
	require.NoError(t, err)
	uid := uint32(os.Geteuid()) + 1
	_, err = a.Node.dir.AddAgent(state.AgentSpec{Name: "billing-batch", Zone: "payments", Exe: exe, UID: uid, GID: uint32(os.Getegid())})
	require.NoError(t, err)
	require.NoError(t, a.ReloadAgents())
	_, err = agent(t, a, "payments", "billing-batch").Dial(context.Background(), "tcp", "ledger.payments:8080")
	require.ErrorIs(t, err, ErrWorkloadMismatch)
	assert.Contains(t, err.Error(), "the agent was enrolled for uid")
}
