package main

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"encoding/json"
	"math/big"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/overlay/audit"
)

func runAuditCLI(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	code := run(context.Background(), args, &stdout, &stderr)
	return code, stdout.String(), stderr.String()
}

func writeAuditLog(t *testing.T, n int) (nodeDir, logDir string) {
	t.Helper()
	nodeDir = t.TempDir()
	logDir = filepath.Join(nodeDir, "audit")
	l, err := audit.Open(logDir, audit.Options{})
	require.NoError(t, err)
	for i := 0; i < n; i++ {
		require.NoError(t, l.Append(context.Background(), audit.Entry{Event: audit.EventAdmit, Fields: map[string]string{"flow": string(rune('a' + i))}}))
	}
	require.NoError(t, l.Close())
	return nodeDir, logDir
}

func TestAuditVerifyCLI(t *testing.T) {
	nodeDir, logDir := writeAuditLog(t, 5)

	code, out, errOut := runAuditCLI(t, "audit", "verify", "--dir", nodeDir)
	require.Equal(t, 0, code, errOut)
	assert.Contains(t, out, "ok, 5 entries")

	code, out, _ = runAuditCLI(t, "audit", "verify", "--dir", logDir, "--json")
	require.Equal(t, 0, code)
	var rep audit.Report
	require.NoError(t, json.Unmarshal([]byte(out), &rep))
	assert.True(t, rep.OK)
	assert.Equal(t, 5, rep.Entries)

	// Swap entries 2 and 3: exit 1 with one line naming entry 2.
	path := filepath.Join(logDir, audit.LogFile)
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	lines := strings.SplitAfter(string(b), "\n")
	lines[1], lines[2] = lines[2], lines[1]
	require.NoError(t, os.WriteFile(path, []byte(strings.Join(lines, "")), 0o600))

	code, out, errOut = runAuditCLI(t, "audit", "verify", "--dir", nodeDir)
	require.Equal(t, 1, code)
	assert.Empty(t, out)
	assert.Equal(t, 1, strings.Count(errOut, "\n"), "one line: %q", errOut)
	assert.Contains(t, errOut, "entry 2")
	assert.Contains(t, errOut, "reordered")

	code, out, _ = runAuditCLI(t, "audit", "verify", "--dir", nodeDir, "--json")
	require.Equal(t, 1, code)
	require.NoError(t, json.Unmarshal([]byte(out), &rep))
	assert.False(t, rep.OK)
	assert.Equal(t, 1, rep.FirstBad)
}

func TestAuditVerifyCLIUsage(t *testing.T) {
	code, _, errOut := runAuditCLI(t, "audit", "verify")
	assert.Equal(t, 2, code)
	assert.Contains(t, errOut, "--dir")

	code, _, errOut = runAuditCLI(t, "audit", "verify", "--dir", t.TempDir())
	assert.Equal(t, 1, code)
	assert.Contains(t, errOut, "no audit log")
	assert.Equal(t, 1, strings.Count(errOut, "\n"))
}

// signedNodeDir makes a node directory whose audit log heads are signed by the node key named in
// its node.crt, as a running node leaves it.
func signedNodeDir(t *testing.T, key ed25519.PrivateKey, entries int) string {
	t.Helper()
	now := time.Now()
	authKey, err := identity.GenerateKey()
	require.NoError(t, err)
	auth, err := identity.NewAuthority("acme.internal", authKey, now, time.Hour)
	require.NoError(t, err)
	grant := identity.ZoneGrant{Name: "payments", Prefixes: []netip.Prefix{netip.MustParsePrefix("100.100.1.0/28")}}
	fp := make([]byte, 32)
	nodeCert, err := identity.Issue(auth, authKey, identity.IssueRequest{
		ID: identity.NodeID("acme.internal", "n1"), PublicKey: key.Public().(ed25519.PublicKey),
		Claims:    identity.Claims{Zones: []identity.ZoneGrant{grant}, Regions: []string{"eu-west-1"}, Fingerprint: fp},
		NotBefore: now, NotAfter: now.Add(30 * time.Minute), Serial: big.NewInt(7),
	})
	require.NoError(t, err)
	dir := t.TempDir()
	require.NoError(t, identity.WriteCertificates(filepath.Join(dir, nodeCertFile), nodeCert))
	l, err := audit.Open(filepath.Join(dir, "audit"), audit.Options{Key: key})
	require.NoError(t, err)
	for i := range entries {
		require.NoError(t, l.Append(context.Background(), audit.Entry{Event: audit.EventDeny, Fields: map[string]string{"n": strconv.Itoa(i)}}))
	}
	require.NoError(t, l.Close())
	return dir
}

// An attacker who rewrites a node's whole audit log consistently (say, without the denials of an
// attack) can rebuild the hash chain and the head, but cannot sign the head with the node key:
// `ute audit verify --dir <node dir>` checks the head against node.crt and refuses.
func TestAuditVerifyCLIChecksHeadSignatureAgainstNodeCert(t *testing.T) {
	nodeKey, err := identity.GenerateKey()
	require.NoError(t, err)
	dir := signedNodeDir(t, nodeKey, 4)
	code, out, errOut := runAuditCLI(t, "audit", "verify", "--dir", dir)
	require.Equal(t, 0, code, errOut)
	assert.Contains(t, out, "head signed by the node key")

	// The forgery: the same node directory, the log rebuilt from scratch with two entries and the
	// head signed by a key the attacker holds.
	attackerKey, err := identity.GenerateKey()
	require.NoError(t, err)
	require.NoError(t, os.RemoveAll(filepath.Join(dir, "audit")))
	l, err := audit.Open(filepath.Join(dir, "audit"), audit.Options{Key: attackerKey})
	require.NoError(t, err)
	for i := range 2 {
		require.NoError(t, l.Append(context.Background(), audit.Entry{Event: audit.EventDeny, Fields: map[string]string{"n": strconv.Itoa(i)}}))
	}
	require.NoError(t, l.Close())

	code, _, errOut = runAuditCLI(t, "audit", "verify", "--dir", filepath.Join(dir, "audit"))
	require.Equal(t, 0, code, "the chain alone is consistent, which is why the node directory must be given: %s", errOut)
	code, out, errOut = runAuditCLI(t, "audit", "verify", "--dir", dir)
	require.Equal(t, 1, code, "stdout: %s", out)
	assert.Equal(t, 1, strings.Count(errOut, "\n"), "one line: %q", errOut)
	assert.Contains(t, errOut, "head not signed by the key of")
}
