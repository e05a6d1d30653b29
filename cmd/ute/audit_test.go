package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

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
