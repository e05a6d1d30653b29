package main

import (
	"context"
	"crypto/ed25519"
	"crypto/sha256"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/identity/authority"
	"github.com/ute-project/ute/identity/record"
)

const cliPolicyV2 = cliPolicy + `  - name: ops
    cidr: 100.100.3.0/24
    regions: [eu-west-1]
    min_trust: 30
    isolate_below: 5
`

func policyVersion(t *testing.T, dir string) (uint64, []byte) {
	t.Helper()
	a, err := authority.Open(dir, authority.Options{})
	require.NoError(t, err)
	defer func() { require.NoError(t, a.Close()) }()
	v, raw, err := a.PolicyRelease()
	require.NoError(t, err)
	return v, raw
}

// With no daemon, `ute policy apply` signs and stores each new version itself; a bad file is
// refused with its file and line and changes nothing.
func TestPolicyApplyOffline(t *testing.T) {
	tmp := t.TempDir()
	authDir, policy := filepath.Join(tmp, "auth"), filepath.Join(tmp, "policy.yaml")
	require.NoError(t, os.WriteFile(policy, []byte(cliPolicy), 0o644))
	runCLI(t, "authority", "init", "--dir", authDir, "--trust-domain", "acme.internal", "--policy", policy).ok(t)

	next := filepath.Join(tmp, "v2.yaml")
	require.NoError(t, os.WriteFile(next, []byte(cliPolicyV2), 0o644))
	out := runCLI(t, "policy", "apply", "--dir", authDir, next).ok(t)
	assert.Contains(t, out, "policy version 2 applied from "+next)
	assert.Contains(t, out, "zones payments, research, ops")
	out = runCLI(t, "policy", "apply", "--dir", authDir, policy).ok(t)
	assert.Contains(t, out, "policy version 3 applied")

	bad := filepath.Join(tmp, "bad.yaml")
	require.NoError(t, os.WriteFile(bad, []byte(cliPolicy+"    bogus: 1\n"), 0o644))
	runCLI(t, "policy", "apply", "--dir", authDir, bad).fails(t, 1, "policy refused: "+bad+":12:5: zones[1].bogus: unknown field")
	runCLI(t, "policy", "apply", "--dir", authDir).fails(t, 2, "one FILE")
	runCLI(t, "policy", "apply", next).fails(t, 2, "needs --dir")
	v, raw := policyVersion(t, authDir)
	assert.Equal(t, uint64(3), v, "the refused file changed nothing")
	a, err := authority.Open(authDir, authority.Options{})
	require.NoError(t, err)
	rel, err := record.Verifier{Certs: identity.Verifier{Authority: a.Certificate()}}.VerifyPolicy(raw, time.Now())
	require.NoError(t, a.Close())
	require.NoError(t, err)
	assert.Equal(t, cliPolicy, string(rel.Claims.Policy))
}

// Against a running `ute authority run`: a node watching the authority receives `ute revoke`'s
// record and `ute policy apply`'s release through the daemon, which holds the store.
func TestRevokeAndPolicyApplyReachWatcherThroughDaemon(t *testing.T) {
	tmp := t.TempDir()
	authDir, policy := filepath.Join(tmp, "auth"), filepath.Join(tmp, "policy.yaml")
	require.NoError(t, os.WriteFile(policy, []byte(cliPolicy), 0o644))
	ute(t, "authority", "init", "--dir", authDir, "--trust-domain", "acme.internal", "--policy", policy).ok(t)
	d := startDaemon(t, authDir)

	join := func(name string) (*authority.Joined, ed25519.PrivateKey) {
		key, err := identity.GenerateKey()
		require.NoError(t, err)
		fp := sha256.Sum256([]byte(name))
		tok := ute(t, "token", "create", "--dir", authDir, "--zone", "payments").ok(t)
		j, err := authority.Join(context.Background(), authority.JoinParams{Addr: d.addr, Token: tok, Key: key, Name: name, HostFingerprint: fp[:], Advertise: "127.0.0.1:7946"})
		require.NoError(t, err)
		return j, key
	}
	w, key := join("watcher")
	join("victim")

	records, policies := make(chan []byte, 8), make(chan []byte, 8)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		_, err := authority.Watch(ctx, authority.WatchParams{
			Addr: d.addr, Anchor: w.Authority, Certificate: w.Node, Key: key, PolicyVersion: 1,
			OnRecord: func(raw []byte) error { records <- raw; return nil },
			OnPolicy: func(raw []byte) error { policies <- raw; return nil },
		})
		assert.NoError(t, err)
	}()
	t.Cleanup(func() { cancel(); <-done })

	out := ute(t, "revoke", "--dir", authDir, "spiffe://acme.internal/node/victim", "--reason", "compromised").ok(t)
	assert.Contains(t, out, "revocation record seq 1 for spiffe://acme.internal/node/victim, durable")
	v := record.Verifier{Certs: identity.Verifier{Authority: w.Authority}}
	select {
	case raw := <-records:
		r, err := v.VerifyRevocation(raw, time.Now())
		require.NoError(t, err)
		assert.Equal(t, uint64(1), r.Claims.Seq)
		assert.Equal(t, "spiffe://acme.internal/node/victim", r.Claims.Subject)
	case <-time.After(10 * time.Second):
		t.Fatal("the watcher never received the revocation record")
	}

	next := filepath.Join(tmp, "v2.yaml")
	require.NoError(t, os.WriteFile(next, []byte(cliPolicyV2), 0o644))
	assert.Contains(t, ute(t, "policy", "apply", "--dir", authDir, next).ok(t), "policy version 2 applied")
	select {
	case raw := <-policies:
		rel, err := v.VerifyPolicy(raw, time.Now())
		require.NoError(t, err)
		assert.Equal(t, uint64(2), rel.Claims.PolicyVersion)
		assert.Equal(t, cliPolicyV2, string(rel.Claims.Policy))
	case <-time.After(10 * time.Second):
		t.Fatal("the watcher never received the policy release")
	}
}
