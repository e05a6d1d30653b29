package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/identity/authority"
	"github.com/ute-project/ute/node/state"
)

// runCLI runs the CLI in-process through run(), the same path main takes.
func runCLI(t *testing.T, args ...string) cliResult {
	t.Helper()
	var out, errb bytes.Buffer
	code := run(context.Background(), args, &out, &errb)
	return cliResult{code, out.String(), errb.String()}
}

// serveInProcess serves the authority in dir on loopback until the returned stop is called.
func serveInProcess(t *testing.T, dir string) (addr string, stop func()) {
	t.Helper()
	a, err := authority.Open(dir, authority.Options{})
	require.NoError(t, err)
	srv, err := a.Listen("127.0.0.1:0")
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx) }()
	stopped := false
	stop = func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		require.NoError(t, <-done)
		require.NoError(t, a.Close())
	}
	t.Cleanup(stop)
	return srv.Addr().String(), stop
}

// With no daemon running, `ute revoke` opens the store itself; the revocation is durable, stops
// renewal, and each kind of bad input gets its exit code and one line.
func TestRevokeCLIOffline(t *testing.T) {
	tmp := t.TempDir()
	authDir, policy := filepath.Join(tmp, "auth"), filepath.Join(tmp, "policy.yaml")
	require.NoError(t, os.WriteFile(policy, []byte(cliPolicy), 0o644))
	runCLI(t, "authority", "init", "--dir", authDir, "--trust-domain", "acme.internal", "--policy", policy).ok(t)
	tok := runCLI(t, "token", "create", "--dir", authDir, "--zone", "payments").ok(t)

	addr, stop := serveInProcess(t, authDir)
	key, err := identity.GenerateKey()
	require.NoError(t, err)
	fp := sha256.Sum256([]byte("n1"))
	j, err := authority.Join(context.Background(), authority.JoinParams{Addr: addr, Token: tok, Key: key, Name: "n1", HostFingerprint: fp[:]})
	require.NoError(t, err)
	stop()

	var rev authority.Revocation
	require.NoError(t, json.Unmarshal([]byte(runCLI(t, "revoke", "--dir", authDir, "serial:"+j.Node.Serial().String(), "--reason", "lost laptop", "--json").ok(t)), &rev))
	require.Len(t, rev.Serials, 1)
	assert.Equal(t, j.Node.Serial().Uint64(), rev.Serials[0].Serial)
	assert.False(t, rev.Serials[0].Already)
	assert.Equal(t, "spiffe://acme.internal/node/n1", rev.Serials[0].SPIFFEID)
	out := runCLI(t, "revoke", "--dir", authDir, "spiffe://acme.internal/node/n1", "--reason", "again").ok(t)
	assert.Contains(t, out, "serial 1 (spiffe://acme.internal/node/n1) was already revoked")
	assert.Contains(t, out, "lost laptop", "the first revocation's reason stands")

	runCLI(t, "revoke", "--dir", authDir, "spiffe://acme.internal/node/ghost", "--reason", "x").fails(t, 1, "revocation subject unknown: no certificate was ever issued to spiffe://acme.internal/node/ghost")
	runCLI(t, "revoke", "--dir", authDir, "serial:42", "--reason", "x").fails(t, 1, "serial 42 was never issued")
	agentOut := runCLI(t, "revoke", "--dir", authDir, "spiffe://acme.internal/zone/payments/agent/billing", "--reason", "x").ok(t)
	assert.Contains(t, agentOut, "revocation record seq 2 for spiffe://acme.internal/zone/payments/agent/billing, durable")
	agentOut = runCLI(t, "revoke", "--dir", authDir, "spiffe://acme.internal/zone/payments/agent/billing", "--reason", "x").ok(t)
	assert.Contains(t, agentOut, "already revoked by revocation record seq 2")
	runCLI(t, "revoke", "--dir", authDir, "node/n1", "--reason", "x").fails(t, 2, "revocation request malformed")
	runCLI(t, "revoke", "--dir", authDir, "serial:0", "--reason", "x").fails(t, 2, "serial:0")
	runCLI(t, "revoke", "--dir", authDir, "serial:1").fails(t, 2, "--reason")
	runCLI(t, "revoke", "--dir", authDir, "serial:1", "--reason", "a\nb").fails(t, 2, "control character")
	runCLI(t, "revoke", "--dir", authDir).fails(t, 2, "one SUBJECT")
	runCLI(t, "revoke", "serial:1", "--reason", "x").fails(t, 2, "needs --dir")
	runCLI(t, "revoke", "--dir", filepath.Join(tmp, "nowhere"), "serial:1", "--reason", "x").fails(t, 1, "not initialized")

	addr, _ = serveInProcess(t, authDir)
	newKey, err := identity.GenerateKey()
	require.NoError(t, err)
	_, err = authority.Renew(context.Background(), authority.RenewParams{Addr: addr, Authority: j.Authority, Current: j.Node, Key: key, NewKey: newKey})
	require.ErrorIs(t, err, authority.ErrRevoked)
}

// Against a running `ute authority run`: a renewal whose answer was lost is completed by the next
// `ute node renew` with the same successor; `ute revoke` goes through the admin socket, stops the
// node's renewal and frees its name for a rejoin.
func TestRevokeAndRenewRetryThroughDaemon(t *testing.T) {
	tmp := t.TempDir()
	authDir, policy := filepath.Join(tmp, "auth"), filepath.Join(tmp, "policy.yaml")
	require.NoError(t, os.WriteFile(policy, []byte(cliPolicy), 0o644))
	ute(t, "authority", "init", "--dir", authDir, "--trust-domain", "acme.internal", "--policy", policy).ok(t)
	d := startDaemon(t, authDir)
	tok := ute(t, "token", "create", "--dir", authDir, "--zone", "payments").ok(t)
	nodeDir := filepath.Join(tmp, "n1")
	ute(t, "node", "join", "--dir", nodeDir, "--authority", d.addr, "--token", tok, "--name", "n1").ok(t)
	ute(t, "agent", "add", "--dir", nodeDir, "--name", "billing", "--zone", "payments", "--exe", uteBin).ok(t)

	// The node stages its key and the authority commits the renewal, but the node dies before
	// installing the answer: nothing of it reaches node.crt.
	nd, err := state.Open(nodeDir)
	require.NoError(t, err)
	staged, err := nd.RenewalKey()
	require.NoError(t, err)
	cur, err := nd.NodeCert()
	require.NoError(t, err)
	curKey, err := nd.NodeKey()
	require.NoError(t, err)
	ca, err := nd.AuthorityCert()
	require.NoError(t, err)
	lost, err := authority.Renew(context.Background(), authority.RenewParams{Addr: d.addr, Authority: ca, Current: cur, Key: curKey, NewKey: staged})
	require.NoError(t, err)

	// After a restart of both sides, `ute node renew` retries with the staged key and gets the
	// same successor instead of ErrSuperseded.
	require.NoError(t, d.stop(t, syscall.SIGTERM))
	d = startDaemon(t, authDir)
	var renewed joinView
	require.NoError(t, json.Unmarshal([]byte(ute(t, "node", "renew", "--dir", nodeDir, "--authority", d.addr, "--json").ok(t)), &renewed))
	assert.Equal(t, lost.Node.Serial().String(), renewed.Serial)
	installed, err := nd.NodeCert()
	require.NoError(t, err)
	assert.Equal(t, lost.NodeCertDER, installed.Raw(), "the node installed the certificate it had lost")
	ag, err := nd.Agent("payments", "billing")
	require.NoError(t, err)
	issuer, _, err := nd.NodeIssuer()
	require.NoError(t, err)
	assert.Equal(t, installed.Serial(), issuer.NodeSerial(), "the issuing CA was installed with the node certificate")
	require.NoError(t, identity.Verifier{Authority: ca}.VerifyAgent(issuer, ag.Cert, time.Now()),
		"agents were re-signed with the installed key")

	// Revoke the node by SPIFFE ID through the daemon's admin socket.
	out := ute(t, "revoke", "--dir", authDir, "spiffe://acme.internal/node/n1", "--reason", "compromised").ok(t)
	assert.Contains(t, out, "revoked serial 1 (spiffe://acme.internal/node/n1): compromised")
	assert.Contains(t, out, "revoked serial 2 (spiffe://acme.internal/node/n1): compromised")
	var again authority.Revocation
	require.NoError(t, json.Unmarshal([]byte(ute(t, "revoke", "--dir", authDir, "spiffe://acme.internal/node/n1", "--reason", "twice", "--json").ok(t)), &again))
	require.Len(t, again.Serials, 2)
	for _, s := range again.Serials {
		assert.True(t, s.Already, "revoking twice is fine and says so")
		assert.Equal(t, "compromised", s.Reason)
	}

	ute(t, "node", "renew", "--dir", nodeDir, "--authority", d.addr).fails(t, 1, "certificate revoked")
	ute(t, "revoke", "--dir", authDir, "spiffe://acme.internal/node/ghost", "--reason", "x").fails(t, 1, "revocation subject unknown")
	assert.Contains(t, out, "revocation record seq 1 for spiffe://acme.internal/node/n1, durable")
	agentOut := ute(t, "revoke", "--dir", authDir, "spiffe://acme.internal/zone/payments/agent/billing", "--reason", "x").ok(t)
	assert.Contains(t, agentOut, "revocation record seq 2 for spiffe://acme.internal/zone/payments/agent/billing")
	ute(t, "revoke", "--dir", authDir, "spiffe://acme.internal/node/N1", "--reason", "x").fails(t, 2, "revocation request malformed")

	// The name stays closed until the operator releases it; then a new node joins as n1.
	tok2 := ute(t, "token", "create", "--dir", authDir, "--zone", "payments").ok(t)
	ute(t, "node", "join", "--dir", filepath.Join(tmp, "n1x"), "--authority", d.addr, "--token", tok2, "--name", "n1").fails(t, 1, "ute authority release")
	lin := ute(t, "authority", "audit", "--dir", authDir, "--lineage", "n1").ok(t)
	assert.Contains(t, lin, "renews 1")
	assert.Contains(t, lin, "revoked")
	ute(t, "authority", "release", "--dir", authDir, "n1").fails(t, 2, "reason")
	rel := ute(t, "authority", "release", "--dir", authDir, "n1", "--reason", "host rebuilt").ok(t)
	assert.Contains(t, rel, "released spiffe://acme.internal/node/n1")
	out = ute(t, "node", "join", "--dir", filepath.Join(tmp, "n1b"), "--authority", d.addr, "--token", tok2, "--name", "n1").ok(t)
	assert.Contains(t, out, "spiffe://acme.internal/node/n1 (serial 3)")

	var audit []authority.AuditRecord
	require.NoError(t, json.Unmarshal([]byte(ute(t, "authority", "audit", "--dir", authDir, "--json").ok(t)), &audit))
	var events []string
	for _, r := range audit {
		if r.Event == "revoke" || r.Outcome == authority.OutcomeResent {
			events = append(events, string(r.Outcome)+":"+r.Subject)
		}
	}
	joined := strings.Join(events, " ")
	assert.Contains(t, joined, "resent:spiffe://acme.internal/node/n1", "the retried renewal is audited")
	assert.Equal(t, 4, strings.Count(joined, "revoked:spiffe://acme.internal/node/n1"), "two serials, revoked twice")
	assert.Contains(t, joined, "refused:", "the refused revocations are audited")
}
