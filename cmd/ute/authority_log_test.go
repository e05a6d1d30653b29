package main

import (
	"bufio"
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// `ute authority run` and `ute node run` take the same --log-level and --log-format values and
// refuse a bad one with the same words, before anything starts.
func TestAuthorityRunLogFlagsMatchNodeRun(t *testing.T) {
	tmp := t.TempDir()
	authDir, pol := filepath.Join(tmp, "auth"), filepath.Join(tmp, "policy.yaml")
	require.NoError(t, os.WriteFile(pol, []byte(cliPolicy), 0o644))
	ute(t, "authority", "init", "--dir", authDir, "--trust-domain", "acme.internal", "--policy", pol).ok(t)
	nodeDir := filepath.Join(tmp, "n1") // never joined: the flags are refused before the directory is read

	for _, bad := range [][]string{{"--log-format", "xml"}, {"--log-level", "verbose"}} {
		a := ute(t, append([]string{"authority", "run", "--dir", authDir, "--listen", "127.0.0.1:0"}, bad...)...)
		n := ute(t, append([]string{"node", "run", "--dir", nodeDir}, bad...)...)
		require.NotEqual(t, 0, a.code, "authority run %v must fail", bad)
		assert.Equal(t, n.code, a.code, "same exit code for %v", bad)
		assert.Equal(t, n.stderr, a.stderr, "same error for %v", bad)
		assert.Contains(t, a.stderr, bad[0]+": ", "names the flag")
		assert.Contains(t, a.stderr, `"`+bad[1]+`" is not a log`)
	}

	// text at info: the stop line is a logfmt line.
	logs := runAuthorityUntilListening(t, authDir, "--log-format", "text", "--log-level", "info")
	assert.Contains(t, logs, `level=INFO msg="authority stopped"`)
	// The default stays JSON.
	logs = runAuthorityUntilListening(t, authDir)
	assert.Contains(t, logs, `"msg":"authority stopped"`)
	// warn hides info lines.
	logs = runAuthorityUntilListening(t, authDir, "--log-format", "json", "--log-level", "warn")
	assert.NotContains(t, logs, "authority stopped")
}

// runAuthorityUntilListening starts `ute authority run` with extra flags, waits for its
// "listening" line, stops it with SIGTERM and returns what it logged.
func runAuthorityUntilListening(t *testing.T, dir string, extra ...string) string {
	t.Helper()
	cmd := exec.Command(uteBin, append([]string{"authority", "run", "--dir", dir, "--listen", "127.0.0.1:0"}, extra...)...)
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	var logs bytes.Buffer
	cmd.Stderr = &logs
	require.NoError(t, cmd.Start())
	exited := make(chan error, 1)
	first := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		if sc.Scan() {
			first <- sc.Text()
		}
		for sc.Scan() {
		}
		exited <- cmd.Wait()
	}()
	select {
	case l := <-first:
		require.True(t, strings.HasPrefix(l, "listening "), "first line %q", l)
	case err := <-exited:
		t.Fatalf("authority exited early: %v; logs: %s", err, logs.String())
	case <-time.After(20 * time.Second):
		_ = cmd.Process.Kill()
		<-exited
		t.Fatalf("authority did not start; logs: %s", logs.String())
	}
	require.NoError(t, cmd.Process.Signal(syscall.SIGTERM))
	select {
	case err := <-exited:
		require.NoError(t, err, "logs: %s", logs.String())
	case <-time.After(20 * time.Second):
		_ = cmd.Process.Kill()
		<-exited
		t.Fatal("authority did not stop on SIGTERM")
	}
	return logs.String()
}
