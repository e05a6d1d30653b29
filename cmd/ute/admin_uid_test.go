package main

import (
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity/authority"
)

// nobody is the unprivileged uid/gid a local attacker runs as.
const nobody = 65534

// The admin socket's file mode is the first gate; the daemon also checks the caller's uid with
// SO_PEERCRED, so that a socket whose mode was loosened by mistake (or a directory opened up for
// monitoring) still serves no one but root and the daemon's own user. This test loosens both on
// purpose and has an unprivileged local user try to mint a join token through the socket.
func TestAdminSocketRefusesOtherUsers(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: runs the attacker's CLI as uid 65534 (CI runs as root)")
	}
	// A directory the unprivileged user can traverse, with a copy of the binary it may execute.
	tmp, err := os.MkdirTemp("", "ute-uid-test-")
	require.NoError(t, err)
	t.Cleanup(func() { _ = os.RemoveAll(tmp) })
	require.NoError(t, os.Chmod(tmp, 0o755))
	bin := filepath.Join(tmp, "ute")
	copyFile(t, uteBin, bin, 0o755)
	policy := filepath.Join(tmp, "policy.yaml")
	require.NoError(t, os.WriteFile(policy, []byte(cliPolicy), 0o644))
	authDir := filepath.Join(tmp, "auth")
	ute(t, "authority", "init", "--dir", authDir, "--trust-domain", "acme.internal", "--policy", policy).ok(t)
	d := startDaemon(t, authDir)
	t.Cleanup(func() { _ = d.stop(t, syscall.SIGTERM) })

	// The misconfiguration: the directory traversable and the socket writable by everyone.
	require.NoError(t, os.Chmod(authDir, 0o711))
	require.NoError(t, os.Chmod(filepath.Join(authDir, authority.FileSocket), 0o666))

	attacker := exec.Command(bin, "token", "create", "--dir", authDir, "--zone", "payments")
	attacker.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: nobody, Gid: nobody}}
	attacker.Env = []string{"PATH=/usr/bin:/bin", "HOME=" + tmp}
	var stdout, stderr strings.Builder
	attacker.Stdout, attacker.Stderr = &stdout, &stderr
	err = attacker.Run()
	var ee *exec.ExitError
	require.ErrorAs(t, err, &ee, "the unprivileged caller must fail; stdout %q", stdout.String())
	assert.Equal(t, 1, ee.ExitCode())
	assert.NotContains(t, stdout.String(), "ute1.", "no token was printed")
	assert.Equal(t, 1, strings.Count(stderr.String(), "\n"), "one line: %q", stderr.String())

	// The authority minted nothing: its audit has no token record at all.
	var records []map[string]any
	require.NoError(t, json.Unmarshal([]byte(ute(t, "authority", "audit", "--dir", authDir, "--json").ok(t)), &records))
	for _, r := range records {
		assert.NotEqual(t, "token", r["event"], "a token was created for the unprivileged caller: %v", r)
	}
	// Root still gets through the same socket, and its token is the only one audited (which also
	// shows the check above looks at the right field).
	tok := ute(t, "token", "create", "--dir", authDir, "--zone", "payments").ok(t)
	assert.True(t, strings.HasPrefix(tok, "ute1."), tok)
	require.NoError(t, json.Unmarshal([]byte(ute(t, "authority", "audit", "--dir", authDir, "--json").ok(t)), &records))
	created := 0
	for _, r := range records {
		if r["event"] == "token" {
			created++
		}
	}
	assert.Equal(t, 1, created)
}

func copyFile(t *testing.T, from, to string, mode os.FileMode) {
	t.Helper()
	src, err := os.Open(from)
	require.NoError(t, err)
	defer func() { _ = src.Close() }()
	dst, err := os.OpenFile(to, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, mode)
	require.NoError(t, err)
	_, err = io.Copy(dst, src)
	require.NoError(t, err)
	require.NoError(t, dst.Close())
}
