package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/node/localapi"
)

// nodeProc is a `ute node run` subprocess.
type nodeProc struct {
	name, dir, listen string
	cmd               *exec.Cmd
	done              chan error
	mu                sync.Mutex
	logs              bytes.Buffer
}

func (p *nodeProc) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.logs.Write(b)
}

func (p *nodeProc) log() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.logs.String()
}

// freeUDP returns a loopback address no socket holds right now.
func freeUDP(t *testing.T) string {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := pc.LocalAddr().String()
	require.NoError(t, pc.Close())
	return addr
}

// startNode runs `ute node run` and waits for its "node ... up on ..." line.
func startNode(t *testing.T, name, dir, listen string, extra ...string) *nodeProc {
	t.Helper()
	p := &nodeProc{name: name, dir: dir, listen: listen, done: make(chan error, 1)}
	args := append([]string{"node", "run", "--dir", dir, "--listen", listen, "--log-level", "debug"}, extra...)
	p.cmd = exec.Command(uteBin, args...)
	stdout, err := p.cmd.StdoutPipe()
	require.NoError(t, err)
	p.cmd.Stderr = p
	require.NoError(t, p.cmd.Start())
	up := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			select {
			case up <- sc.Text():
			default:
			}
		}
		p.done <- p.cmd.Wait()
	}()
	select {
	case l := <-up:
		require.Contains(t, l, "up on "+listen)
	case err := <-p.done:
		t.Fatalf("node %s exited early: %v; logs: %s", name, err, p.log())
	case <-time.After(20 * time.Second):
		_ = p.cmd.Process.Kill()
		t.Fatalf("node %s did not start; logs: %s", name, p.log())
	}
	t.Cleanup(func() {
		_ = p.cmd.Process.Kill()
		select {
		case <-p.done:
		case <-time.After(5 * time.Second):
		}
	})
	return p
}

// stop sends sig and returns how long the node took to exit and its exit error.
func (p *nodeProc) stop(t *testing.T, sig syscall.Signal) (time.Duration, error) {
	t.Helper()
	start := time.Now()
	require.NoError(t, p.cmd.Process.Signal(sig))
	select {
	case err := <-p.done:
		p.done = make(chan error, 1)
		p.done <- err // for Cleanup
		return time.Since(start), err
	case <-time.After(10 * time.Second):
		t.Fatalf("node %s did not stop; logs: %s", p.name, p.log())
		return 0, nil
	}
}

func nodeStatus(t *testing.T, dir string) localapi.Status {
	t.Helper()
	r := ute(t, "status", "--dir", dir, "--json")
	require.Equal(t, 0, r.code, "status: %s", r.stderr)
	var st localapi.Status
	require.NoError(t, json.Unmarshal([]byte(r.stdout), &st))
	return st
}

func zonePeers(st localapi.Status, zone string) []string {
	var out []string
	for _, z := range st.Zones {
		if z.Name == zone {
			for _, p := range z.Peers {
				out = append(out, p.Node)
			}
		}
	}
	return out
}

func holdsRevocation(st localapi.Status, subject string) bool {
	for _, r := range st.Revocations {
		if r.Subject == subject {
			return true
		}
	}
	return false
}

// Three `ute node run` processes and `ute authority run`: the nodes find each other by gossip with
// no static peers (the authority's join response is the only bootstrap), `ute revoke` at the
// authority reaches every node, a node killed with SIGKILL enforces the revocation again as soon as
// it is back, and SIGTERM stops a node with exit 0 within 5 s.
func TestNodeRunGossipRevokeAndRestart(t *testing.T) {
	tmp := t.TempDir()
	authDir, policy := filepath.Join(tmp, "auth"), filepath.Join(tmp, "policy.yaml")
	require.NoError(t, os.WriteFile(policy, []byte(cliPolicy), 0o644))
	ute(t, "authority", "init", "--dir", authDir, "--trust-domain", "acme.internal", "--policy", policy).ok(t)
	auth := startDaemon(t, authDir)

	specs := []struct{ name, zones string }{{"a", "payments"}, {"b", "payments,research"}, {"c", "research"}}
	nodes := map[string]*nodeProc{}
	for _, s := range specs {
		args := []string{"token", "create", "--dir", authDir}
		for z := range strings.SplitSeq(s.zones, ",") {
			args = append(args, "--zone", z)
		}
		tok := ute(t, args...)
		require.Equal(t, 0, tok.code, tok.stderr)
		dir, listen := filepath.Join(tmp, s.name), freeUDP(t)
		r := ute(t, "node", "join", "--dir", dir, "--authority", auth.addr, "--token", strings.TrimSpace(tok.stdout),
			"--name", s.name, "--advertise", listen)
		require.Equal(t, 0, r.code, r.stderr)
		nodes[s.name] = startNode(t, s.name, dir, listen)
	}
	a, b, c := nodes["a"], nodes["b"], nodes["c"]

	// Discovery: every node lists its zone peers, learned by gossip.
	require.Eventually(t, func() bool {
		return slices.Contains(zonePeers(nodeStatus(t, a.dir), "payments"), "spiffe://acme.internal/node/b") &&
			slices.Contains(zonePeers(nodeStatus(t, c.dir), "research"), "spiffe://acme.internal/node/b") &&
			len(zonePeers(nodeStatus(t, b.dir), "payments")) == 1 && len(zonePeers(nodeStatus(t, b.dir), "research")) == 1
	}, 15*time.Second, 100*time.Millisecond, "no gossip discovery; a: %s\nb: %s", a.log(), b.log())
	assert.Empty(t, zonePeers(nodeStatus(t, a.dir), "research"), "a is not in research")
	// The daemon reports the version line `ute --version` prints.
	assert.Equal(t, strings.TrimPrefix(strings.TrimSpace(ute(t, "--version").stdout), "ute "), nodeStatus(t, a.dir).Version)

	// `ute agent add` while the daemon runs: the agent is live without a restart.
	r0 := ute(t, "agent", "add", "--dir", b.dir, "--name", "ledger", "--zone", "payments", "--exe", uteBin)
	require.Equal(t, 0, r0.code, r0.stderr)
	ip := strings.TrimSpace(r0.stdout)
	found := false
	for _, ag := range nodeStatus(t, b.dir).Agents {
		found = found || (ag.Name == "ledger" && ag.OverlayIP == ip && ag.ID == "spiffe://acme.internal/zone/payments/agent/ledger")
	}
	require.True(t, found, "the running node lists the new agent at %s", ip)

	// `ute revoke` against a node directory: the node signs the revocation of its own agent and
	// gossip carries it to the zone's other member; another node's agent is refused.
	r1 := ute(t, "revoke", "--dir", b.dir, "ledger.payments", "--reason", "decommissioned")
	require.Equal(t, 0, r1.code, r1.stderr)
	ledger := "spiffe://acme.internal/zone/payments/agent/ledger"
	require.Eventually(t, func() bool { return holdsRevocation(nodeStatus(t, a.dir), ledger) }, 5*time.Second, 50*time.Millisecond)
	ute(t, "revoke", "--dir", a.dir, "ledger.payments", "--reason", "not mine").fails(t, 1, "may revoke only itself or an agent it hosts")

	// Revoke c at the authority: every node holds the record.
	subject := "spiffe://acme.internal/node/c"
	r := ute(t, "revoke", "--dir", authDir, subject, "--reason", "host compromised")
	require.Equal(t, 0, r.code, r.stderr)
	for _, n := range []*nodeProc{a, b, c} {
		require.Eventually(t, func() bool { return holdsRevocation(nodeStatus(t, n.dir), subject) }, 5*time.Second, 50*time.Millisecond,
			"node %s never held the revocation; logs: %s", n.name, n.log())
	}

	// SIGKILL b after it accepted the revocation: back up, it holds and enforces it at once.
	b.stop(t, syscall.SIGKILL)
	b = startNode(t, "b", b.dir, b.listen)
	st := nodeStatus(t, b.dir)
	assert.True(t, holdsRevocation(st, subject), "the revocation survived SIGKILL")
	for _, p := range zonePeers(st, "research") {
		assert.NotEqual(t, subject, p, "the revoked node is no peer of b")
	}

	// SIGTERM: exit 0 within 5 s.
	took, err := a.stop(t, syscall.SIGTERM)
	require.NoError(t, err, "logs: %s", a.log())
	assert.Less(t, took, 5*time.Second)
}

const proxyPolicy = `zones:
  - name: payments
    cidr: 100.100.1.0/24
    regions: [eu-west-1]
    min_trust: 50
    isolate_below: 20
    rules:
      - from: billing-*
        to: ledger
        ports: [tcp/8080]
`

func freeTCP(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := l.Addr().String()
	require.NoError(t, l.Close())
	return addr
}

// An agent flow between two `ute node run` processes (interface proxy: this test process is the
// agent's enrolled workload and connects through its HTTP CONNECT proxy; the other node forwards
// the admitted flow to a local echo server), then `ute revoke` at the authority: the live flow is
// cut and a new one is refused.
func TestNodeRunAgentFlowCutByRevocation(t *testing.T) {
	tmp := t.TempDir()
	authDir, policy := filepath.Join(tmp, "auth"), filepath.Join(tmp, "policy.yaml")
	require.NoError(t, os.WriteFile(policy, []byte(proxyPolicy), 0o644))
	ute(t, "authority", "init", "--dir", authDir, "--trust-domain", "acme.internal", "--policy", policy).ok(t)
	auth := startDaemon(t, authDir)
	self, err := os.Executable()
	require.NoError(t, err)

	echo, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { _ = echo.Close() })
	go func() {
		for {
			c, err := echo.Accept()
			if err != nil {
				return
			}
			go func() { defer func() { _ = c.Close() }(); _, _ = io.Copy(c, c) }()
		}
	}()

	httpProxy := freeTCP(t)
	cfgs := map[string]string{
		"a": "interface: proxy\nagents:\n  - name: billing-api\n    zone: payments\n    http: " + httpProxy + "\n",
		"b": "interface: proxy\nagents:\n  - name: ledger\n    zone: payments\n    forward:\n      8080: " + echo.Addr().String() + "\n",
	}
	agents := map[string]string{"a": "billing-api", "b": "ledger"}
	nodes := map[string]*nodeProc{}
	for _, name := range []string{"a", "b"} {
		tok := ute(t, "token", "create", "--dir", authDir, "--zone", "payments")
		require.Equal(t, 0, tok.code, tok.stderr)
		dir, listen := filepath.Join(tmp, name), freeUDP(t)
		r := ute(t, "node", "join", "--dir", dir, "--authority", auth.addr, "--token", strings.TrimSpace(tok.stdout), "--name", name, "--advertise", listen)
		require.Equal(t, 0, r.code, r.stderr)
		r = ute(t, "agent", "add", "--dir", dir, "--name", agents[name], "--zone", "payments", "--exe", self)
		require.Equal(t, 0, r.code, r.stderr)
		cfg := filepath.Join(tmp, name+".yaml")
		require.NoError(t, os.WriteFile(cfg, []byte(cfgs[name]), 0o600))
		nodes[name] = startNode(t, name, dir, listen, "--config", cfg)
	}
	require.Eventually(t, func() bool {
		return slices.Contains(zonePeers(nodeStatus(t, nodes["a"].dir), "payments"), "spiffe://acme.internal/node/b")
	}, 15*time.Second, 100*time.Millisecond)

	connect := func() (net.Conn, error) {
		c, err := net.DialTimeout("tcp", httpProxy, 5*time.Second)
		if err != nil {
			return nil, err
		}
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := fmt.Fprintf(c, "CONNECT ledger.payments:8080 HTTP/1.1\r\nHost: ledger.payments:8080\r\n\r\n"); err != nil {
			_ = c.Close()
			return nil, err
		}
		br := bufio.NewReader(c)
		line, err := br.ReadString('\n')
		if err != nil || !strings.Contains(line, " 200") {
			_ = c.Close()
			return nil, fmt.Errorf("CONNECT answered %q: %v", line, err)
		}
		for {
			l, err := br.ReadString('\n')
			if err != nil {
				_ = c.Close()
				return nil, err
			}
			if l == "\r\n" {
				break
			}
		}
		return c, nil
	}
	c, err := connect()
	require.NoError(t, err, "logs a: %s\nlogs b: %s", nodes["a"].log(), nodes["b"].log())
	defer func() { _ = c.Close() }()
	_, err = c.Write([]byte("ping"))
	require.NoError(t, err)
	buf := make([]byte, 4)
	_, err = io.ReadFull(c, buf)
	require.NoError(t, err)
	require.Equal(t, "ping", string(buf), "the admitted flow reached ledger's server and came back")

	subject := "spiffe://acme.internal/zone/payments/agent/billing-api"
	r := ute(t, "revoke", "--dir", authDir, subject, "--reason", "token stolen")
	require.Equal(t, 0, r.code, r.stderr)
	start := time.Now()
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err = c.Read(buf)
	require.Error(t, err, "the revoked agent's live flow is cut")
	var ne net.Error
	require.False(t, errors.As(err, &ne) && ne.Timeout(), "the flow was cut, not left hanging: %v", err)
	t.Logf("flow cut %v after ute revoke returned", time.Since(start))
	for _, n := range nodes {
		require.Eventually(t, func() bool { return holdsRevocation(nodeStatus(t, n.dir), subject) }, 5*time.Second, 50*time.Millisecond)
	}
	if c2, err := connect(); err == nil {
		_, _ = c2.Write([]byte("ping"))
		_ = c2.SetReadDeadline(time.Now().Add(3 * time.Second))
		_, err = io.ReadFull(c2, buf)
		_ = c2.Close()
		require.Error(t, err, "a new flow of the revoked agent carries nothing")
	}
}
