package main

import (
	"context"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/node"
	"github.com/ute-project/ute/overlay/audit"
)

// forgeAuditAppend appends an entry chained to the last one without the node key, as anyone who
// can write the file can.
func forgeAuditAppend(t *testing.T, logDir string) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(logDir, audit.LogFile))
	require.NoError(t, err)
	var rec struct {
		Seq  uint64 `json:"seq"`
		Time string `json:"time"`
		Hash string `json:"hash"`
	}
	rec.Time, rec.Hash = "2026-01-01T00:00:00Z", strings.Repeat("0", 64) // the chain's genesis
	if lines := strings.Split(strings.TrimSuffix(string(b), "\n"), "\n"); lines[len(lines)-1] != "" {
		require.NoError(t, json.Unmarshal([]byte(lines[len(lines)-1]), &rec))
	}
	// The canonical record and its hash are all the chain asks for; only the head needs the key.
	body := `{"seq":` + jsonNum(rec.Seq+1) + `,"time":"` + rec.Time + `","event":"admit","prev":"` + rec.Hash + `"}`
	line := body[:len(body)-1] + `,"hash":"` + sha256Hex(body) + `"}` + "\n"
	f, err := os.OpenFile(filepath.Join(logDir, audit.LogFile), os.O_WRONLY|os.O_APPEND, 0o600)
	require.NoError(t, err)
	_, err = f.WriteString(line)
	require.NoError(t, err)
	require.NoError(t, f.Close())
}

// Issue 10 §4: entries after the last signed head make `ute audit verify` exit 1 unless
// --allow-unanchored-tail; --json never says ok for them.
func TestAuditVerifyCLIRefusesUnanchoredTail(t *testing.T) {
	key, err := identity.GenerateKey()
	require.NoError(t, err)
	dir := signedNodeDir(t, key, 3)
	forgeAuditAppend(t, filepath.Join(dir, "audit"))

	_, err = audit.VerifyWithKey(filepath.Join(dir, "audit"), key.Public().(ed25519.PublicKey))
	require.NoError(t, err, "the forged line chains correctly: only the signed head tells it apart")

	code, out, errOut := runAuditCLI(t, "audit", "verify", "--dir", dir)
	require.Equal(t, 1, code, "stdout: %s", out)
	assert.Equal(t, 1, strings.Count(errOut, "\n"), "one line: %q", errOut)
	assert.Contains(t, errOut, "1 entries after the last signed head (entries 4 to 4) are unanchored")
	assert.Contains(t, errOut, "--allow-unanchored-tail")

	code, out, _ = runAuditCLI(t, "audit", "verify", "--dir", dir, "--json")
	require.Equal(t, 1, code)
	var v auditView
	require.NoError(t, json.Unmarshal([]byte(out), &v))
	assert.False(t, v.OK, "never ok for an unanchored head")
	assert.False(t, v.HeadAnchored)
	assert.Equal(t, 1, v.Unanchored)

	code, out, errOut = runAuditCLI(t, "audit", "verify", "--dir", dir, "--allow-unanchored-tail")
	require.Equal(t, 0, code, errOut)
	assert.Contains(t, out, "1 unanchored")
}

// Issue 10 §4: a forged append, then a node start: the node does not sign over it; the entry is
// set aside, and verify keeps reporting it.
func TestAuditForgedAppendPlusNodeStartIsNotLaundered(t *testing.T) {
	env := newNodeEnv(t)
	dir := env.join(t, "n1")
	env.runNode(t, dir)
	forgeAuditAppend(t, filepath.Join(dir, node.DirAudit))

	env.runNode(t, dir)
	code, out, errOut := runAuditCLI(t, "audit", "verify", "--dir", dir)
	require.Equal(t, 1, code, "stdout: %s", out)
	assert.Contains(t, errOut, "was set aside by the node because it could not verify it")

	code, out, _ = runAuditCLI(t, "audit", "verify", "--dir", dir, "--json")
	require.Equal(t, 1, code)
	var v auditView
	require.NoError(t, json.Unmarshal([]byte(out), &v))
	assert.False(t, v.OK)
	require.Len(t, v.Aside, 1)
	assert.Equal(t, 1, v.Aside[0].Entries)
	assert.True(t, v.HeadAnchored, "the node's own chain is anchored and signed")
}

// Issue 10 §4: `ute audit verify` passes after a routine `ute node renew`, before the node runs
// again (the previous key handed over to the new one) and after.
func TestAuditVerifyPassesAfterRenewal(t *testing.T) {
	env := newNodeEnv(t)
	dir := env.join(t, "n1")
	env.runNode(t, dir)
	code, out, errOut := runAuditCLI(t, "audit", "verify", "--dir", dir)
	require.Equal(t, 0, code, errOut)
	before := out

	ute(t, "node", "renew", "--dir", dir, "--authority", env.addr).ok(t)
	code, out, errOut = runAuditCLI(t, "audit", "verify", "--dir", dir, "--json")
	require.Equal(t, 0, code, errOut)
	var v auditView
	require.NoError(t, json.Unmarshal([]byte(out), &v))
	assert.True(t, v.OK)
	assert.NotEmpty(t, v.Key)
	assert.Contains(t, before, v.Key[:16], "the head is still the previous key's, verified through its handover")
	assert.NotContains(t, errOut+out, "start it once")

	env.runNode(t, dir)
	code, out, errOut = runAuditCLI(t, "audit", "verify", "--dir", dir, "--json")
	require.Equal(t, 0, code, errOut)
	require.NoError(t, json.Unmarshal([]byte(out), &v))
	assert.True(t, v.OK)
	assert.NotContains(t, before, v.Key[:16], "now signed by the renewed key")
	assert.Empty(t, v.Aside)
}

type nodeEnv struct {
	authDir, addr string
}

func newNodeEnv(t *testing.T) *nodeEnv {
	t.Helper()
	tmp := t.TempDir()
	authDir, pol := filepath.Join(tmp, "auth"), filepath.Join(tmp, "policy.yaml")
	require.NoError(t, os.WriteFile(pol, []byte(cliPolicy), 0o644))
	ute(t, "authority", "init", "--dir", authDir, "--trust-domain", "acme.internal", "--policy", pol).ok(t)
	d := startDaemon(t, authDir)
	return &nodeEnv{authDir: authDir, addr: d.addr}
}

func (e *nodeEnv) join(t *testing.T, name string) string {
	t.Helper()
	tok := ute(t, "token", "create", "--dir", e.authDir, "--zone", "payments").ok(t)
	dir := filepath.Join(t.TempDir(), name)
	ute(t, "node", "join", "--dir", dir, "--authority", e.addr, "--token", tok, "--name", name).ok(t)
	return dir
}

// runNode starts the node in dir (which opens its audit log) and stops it.
func (e *nodeEnv) runNode(t *testing.T, dir string) {
	t.Helper()
	n, err := node.Open(context.Background(), node.Config{Dir: dir})
	require.NoError(t, err)
	require.NoError(t, n.Close())
}

func jsonNum(n uint64) string { return strconv.FormatUint(n, 10) }

func sha256Hex(s string) string {
	sum := sha256.Sum256([]byte(s))
	return hex.EncodeToString(sum[:])
}
