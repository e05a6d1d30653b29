package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity"
)

// uteBin is the ute binary built once by TestMain for the tests that run it as a subprocess.
var uteBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "ute-cli-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	uteBin = filepath.Join(dir, "ute")
	build := exec.Command("go", "build", "-o", uteBin, ".")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build ute:", err)
		_ = os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	_ = os.RemoveAll(dir)
	os.Exit(code)
}

const cliPolicy = `zones:
  - name: payments
    cidr: 100.100.1.0/24
    regions: [eu-west-1]
    min_trust: 50
    isolate_below: 20
  - name: research
    cidr: 100.100.2.0/24
    regions: [eu-west-1]
    min_trust: 40
    isolate_below: 10
`

type cliResult struct {
	code           int
	stdout, stderr string
}

func ute(t *testing.T, args ...string) cliResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, uteBin, args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else {
		require.NoError(t, err)
	}
	return cliResult{code, out.String(), errb.String()}
}

func (r cliResult) ok(t *testing.T) string {
	t.Helper()
	require.Equal(t, 0, r.code, "stderr: %s", r.stderr)
	return strings.TrimSpace(r.stdout)
}

// fails asserts exit code 1 and a single-line error containing want.
func (r cliResult) fails(t *testing.T, code int, want string) {
	t.Helper()
	require.Equal(t, code, r.code, "stdout: %s stderr: %s", r.stdout, r.stderr)
	msg := strings.TrimSuffix(r.stderr, "\n")
	assert.NotContains(t, msg, "\n", "errors are one line")
	assert.Contains(t, msg, want)
}

type daemon struct {
	cmd  *exec.Cmd
	addr string
	done chan error
}

// startDaemon runs `ute authority run` and waits for its "listening ADDR" line.
func startDaemon(t *testing.T, dir string) *daemon {
	t.Helper()
	cmd := exec.Command(uteBin, "authority", "run", "--dir", dir, "--listen", "127.0.0.1:0")
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	var logs bytes.Buffer
	cmd.Stderr = &logs
	require.NoError(t, cmd.Start())
	d := &daemon{cmd: cmd, done: make(chan error, 1)}
	lines := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			select {
			case lines <- sc.Text():
			default:
			}
		}
		d.done <- cmd.Wait()
	}()
	select {
	case l := <-lines:
		addr, ok := strings.CutPrefix(l, "listening ")
		require.True(t, ok, "unexpected first line %q", l)
		d.addr = addr
	case err := <-d.done:
		t.Fatalf("authority exited early: %v; logs: %s", err, logs.String())
	case <-time.After(20 * time.Second):
		_ = cmd.Process.Kill()
		t.Fatalf("authority did not start; logs: %s", logs.String())
	}
	t.Cleanup(func() { d.stop(t, syscall.SIGTERM) })
	return d
}

// stop signals the daemon and waits for it; safe to call twice.
func (d *daemon) stop(t *testing.T, sig syscall.Signal) error {
	t.Helper()
	if d.done == nil {
		return nil
	}
	_ = d.cmd.Process.Signal(sig)
	select {
	case err := <-d.done:
		d.done = nil
		return err
	case <-time.After(15 * time.Second):
		_ = d.cmd.Process.Kill()
		t.Fatal("authority did not stop")
		return nil
	}
}

func permOf(t *testing.T, path string) os.FileMode {
	t.Helper()
	st, err := os.Stat(path)
	require.NoError(t, err)
	return st.Mode().Perm()
}

func TestCLIJoinFlowAndCrashSafety(t *testing.T) {
	tmp := t.TempDir()
	authDir, policy := filepath.Join(tmp, "auth"), filepath.Join(tmp, "policy.yaml")
	require.NoError(t, os.WriteFile(policy, []byte(cliPolicy), 0o644))

	ute(t, "authority", "init", "--dir", authDir, "--trust-domain", "acme.internal", "--policy", policy).ok(t)
	assert.Equal(t, os.FileMode(0o700), permOf(t, authDir))
	assert.Equal(t, os.FileMode(0o600), permOf(t, filepath.Join(authDir, "authority.key")))
	ute(t, "authority", "init", "--dir", authDir, "--trust-domain", "acme.internal", "--policy", policy).fails(t, 1, "already initialized")
	ute(t, "authority", "init", "--dir", authDir).fails(t, 2, "needs --dir, --trust-domain and --policy")

	d := startDaemon(t, authDir)
	// token create reaches the running daemon through its admin socket.
	tok := ute(t, "token", "create", "--dir", authDir, "--zone", "payments").ok(t)
	require.True(t, strings.HasPrefix(tok, "ute1."), tok)
	ute(t, "token", "create", "--dir", authDir, "--zone", "nope").fails(t, 1, `zone not in the authority's policy: "nope"`)

	nodeDir := filepath.Join(tmp, "n1")
	out := ute(t, "node", "join", "--dir", nodeDir, "--authority", d.addr, "--token", tok, "--name", "n1").ok(t)
	assert.Contains(t, out, "spiffe://acme.internal/node/n1")
	assert.Equal(t, os.FileMode(0o700), permOf(t, nodeDir))
	assert.Equal(t, os.FileMode(0o600), permOf(t, filepath.Join(nodeDir, "node.key")))
	for _, f := range []string{"node.crt", "authority.crt", "policy.yaml", "node.json"} {
		assert.FileExists(t, filepath.Join(nodeDir, f))
	}
	pol, err := os.ReadFile(filepath.Join(nodeDir, "policy.yaml"))
	require.NoError(t, err)
	assert.Equal(t, cliPolicy, string(pol))
	var info map[string]any
	raw, err := os.ReadFile(filepath.Join(nodeDir, "node.json"))
	require.NoError(t, err)
	require.NoError(t, json.Unmarshal(raw, &info))
	assert.Equal(t, "n1", info["name"])
	assert.Equal(t, "eu-west-1", info["region"])
	assert.Equal(t, d.addr, info["authority"])

	// Replay, malformed token, usage errors: each one line, the right exit code.
	ute(t, "node", "join", "--dir", filepath.Join(tmp, "n2"), "--authority", d.addr, "--token", tok, "--name", "n2").fails(t, 1, "join token already used")
	assert.NoDirExists(t, filepath.Join(tmp, "n2"), "a failed join leaves no directory behind")
	ute(t, "node", "join", "--dir", filepath.Join(tmp, "n3"), "--authority", d.addr, "--token", "ute1.garbage", "--name", "n3").fails(t, 1, "malformed")
	ute(t, "node", "join", "--dir", filepath.Join(tmp, "n3")).fails(t, 2, "needs --dir, --authority and --token")

	ip := ute(t, "agent", "add", "--dir", nodeDir, "--name", "billing", "--zone", "payments", "--exe", uteBin, "--label", "team=pay").ok(t)
	addr, err := netip.ParseAddr(ip)
	require.NoError(t, err, "agent add prints the IP, got %q", ip)
	assert.True(t, netip.MustParsePrefix("100.100.1.0/24").Contains(addr))
	assert.Equal(t, os.FileMode(0o600), permOf(t, filepath.Join(nodeDir, "agents", "payments", "billing", "agent.key")))
	ip2 := ute(t, "agent", "add", "--dir", nodeDir, "--name", "ledger", "--zone", "payments", "--exe", uteBin).ok(t)
	assert.NotEqual(t, ip, ip2)
	ute(t, "agent", "add", "--dir", nodeDir, "--name", "spy", "--zone", "research", "--exe", uteBin).
		fails(t, 1, "node n1 does not hold zone research")

	out = ute(t, "node", "renew", "--dir", nodeDir).ok(t)
	assert.Contains(t, out, "renewed spiffe://acme.internal/node/n1 (serial 2)")

	// Crash: SIGKILL right after a join returned, then restart on the same directory.
	tok2 := ute(t, "token", "create", "--dir", authDir, "--zone", "payments").ok(t)
	ute(t, "node", "join", "--dir", filepath.Join(tmp, "n4"), "--authority", d.addr, "--token", tok2, "--name", "n4").ok(t)
	require.NoError(t, d.cmd.Process.Kill())
	<-d.done
	d.done = nil

	// With the daemon dead (its socket file left behind), token create opens the store itself.
	tok3 := ute(t, "token", "create", "--dir", authDir, "--zone", "payments").ok(t)
	d2 := startDaemon(t, authDir)
	ute(t, "node", "join", "--dir", filepath.Join(tmp, "n5"), "--authority", d2.addr, "--token", tok2, "--name", "n5").
		fails(t, 1, "join token already used")
	var joined struct{ Serial string }
	require.NoError(t, json.Unmarshal([]byte(ute(t, "node", "join", "--dir", filepath.Join(tmp, "n6"), "--authority", d2.addr,
		"--token", tok3, "--name", "n6", "--json").ok(t)), &joined))
	assert.Equal(t, "4", joined.Serial, "serials 1 (join), 2 (renew), 3 (n4) were issued before the crash")
	// Each node owns its own slice of payments, and the slice n4 got just before the SIGKILL is
	// never handed to n6 after the restart.
	var grants []netip.Prefix
	for _, n := range []string{"n1", "n4", "n6"} {
		certs, err := identity.ReadCertificates(filepath.Join(tmp, n, "node.crt"))
		require.NoError(t, err)
		g, ok := certs[0].Claims.Zone("payments")
		require.True(t, ok)
		require.Len(t, g.Prefixes, 1)
		for _, prev := range grants {
			assert.False(t, prev.Overlaps(g.Prefixes[0]), "%s's slice %s overlaps %s", n, g.Prefixes[0], prev)
		}
		grants = append(grants, g.Prefixes[0])
	}
	assert.True(t, grants[0].Contains(addr), "n1's agent IP %s lies in n1's slice %s", addr, grants[0])

	var audit []map[string]any
	require.NoError(t, json.Unmarshal([]byte(ute(t, "authority", "audit", "--dir", authDir, "--json").ok(t)), &audit))
	refused := 0
	for _, r := range audit {
		if r["outcome"] == "refused" {
			refused++
		}
	}
	assert.Equal(t, 2, refused, "both replays were audited")
	require.NoError(t, d2.stop(t, syscall.SIGTERM), "SIGTERM stops the authority cleanly")
}
