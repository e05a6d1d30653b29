package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/node/localapi"
	"github.com/ute-project/ute/sim/netlab"
)

// The multi-host suite: `ute authority run` and three `ute node run` daemons, each in a network
// namespace of its own on one bridge (sim/netlab), joined with one-time tokens through the real
// CLI, and agents that are real unmodified programs: `python3 -m http.server` serves, `curl`
// calls. It runs once per agent interface. Root only (CI is root); otherwise it skips.
//
// Hosts: auth (the authority), a (billing-api.payments: curl), b (ledger.payments and
// tickets.support: http.server each), c (helpdesk.support: curl).

const netnsPolicy = `zones:
  - name: payments
    cidr: 100.100.1.0/24
    regions: [eu-west-1]
    min_trust: 50
    isolate_below: 20
    rules:
      - from: billing-*
        to: ledger
        ports: [tcp/8080, tcp/5201, tcp/18080]
      - from: billing-*
        to: ledger-late
        ports: [tcp/8080]
  - name: support
    cidr: 100.100.2.0/24
    regions: [eu-west-1]
    min_trust: 50
    isolate_below: 20
    rules:
      - from: helpdesk
        to: tickets
        ports: [tcp/8080]
`

const (
	netnsTD       = "acme.internal"
	netnsNodePort = "7444"
	netnsSOCKS    = "127.0.0.1:1080" // every host is its own namespace: fixed ports never collide
	netnsHTTP     = "127.0.0.1:3128"
	netnsMetrics  = "127.0.0.1:9464"
	// revokeBudget is the design's bound: a revoked node loses connectivity within 1 s.
	revokeBudget = time.Second
	// healBudget bounds the time from restoring a cut link to the first new flow that succeeds.
	healBudget = 30 * time.Second
	// bigFile is the size of the file a live download reads while its node is revoked.
	bigFile = 256 << 20
)

// netnsTools are the unmodified programs the agents are, resolved to the executables the kernel
// runs (attestation fingerprints /proc/PID/exe, never a symlink or a pyenv shim).
type netnsTools struct{ curl, python string }

func findNetnsTools(t testing.TB) netnsTools {
	t.Helper()
	var tools netnsTools
	for _, c := range []struct {
		dst   *string
		cands []string
	}{{&tools.curl, []string{"/usr/bin/curl", "curl"}}, {&tools.python, []string{"/usr/bin/python3", "python3"}}} {
		for _, cand := range c.cands {
			p, err := exec.LookPath(cand)
			if err != nil {
				continue
			}
			if p, err = filepath.EvalSymlinks(p); err == nil {
				*c.dst = p
				break
			}
		}
		if *c.dst == "" {
			t.Skipf("skipping the network-namespace suite: %s is not installed (`make test` installs it as root on Debian)", c.cands[0])
		}
	}
	return tools
}

type netnsNode struct {
	name   string
	host   *netlab.Host
	dir    string
	proc   *netlab.Proc
	agents map[string]string // agent name -> overlay IP
}

type netnsWorld struct {
	t         *testing.T
	mode      string // the agent interface: proxy | tun
	transport string // quic | wireguard
	lab       *netlab.Lab
	tmp       string
	authDir   string
	auth      *netlab.Proc
	nodes     map[string]*netnsNode
	servers   map[string]*netlab.Proc // agent name -> http.server
	tools     netnsTools
}

func TestNetnsAgents(t *testing.T) {
	if testing.Short() {
		t.Skip("network-namespace suite: not in -short")
	}
	if err := netlab.Available(); err != nil {
		t.Skipf("skipping the network-namespace suite: %v (CI runs it as root)", err)
	}
	for _, v := range []struct{ name, iface, transport string }{
		{"proxy", "proxy", "quic"},
		{"tun", "tun", "quic"},
		{"tun-wireguard", "tun", "wireguard"},
	} {
		t.Run(v.name, func(t *testing.T) { runNetnsSuite(t, v.iface, v.transport) })
	}
}

func runNetnsSuite(t *testing.T, mode, transport string) {
	start := time.Now()
	w := newNetnsWorld(t, mode, transport)
	a, b, c := w.nodes["a"], w.nodes["b"], w.nodes["c"]
	ledger, tickets := b.agents["ledger"], b.agents["tickets"]
	t.Logf("%s/%s: lab up, daemons joined and running, gossip converged in %v", mode, transport, time.Since(start).Round(time.Millisecond))

	// Same zone: by name (proxy mode resolves agent names) and by overlay IP.
	if mode == "proxy" {
		out := w.mustCurl(a, "billing-api", "ledger.payments")
		assert.Equal(t, "ledger here\n", out)
		out = w.mustCurl(c, "helpdesk", "tickets.support")
		assert.Equal(t, "tickets here\n", out)
	}
	assert.Equal(t, "ledger here\n", w.mustCurl(a, "billing-api", ledger))
	assert.Equal(t, "tickets here\n", w.mustCurl(c, "helpdesk", tickets))
	if mode == "tun" {
		w.lateAgents()
	}

	// Another zone: refused by the sending node, nothing dialed, nothing reaches tickets' server.
	admittedSupport := w.metric(b.host, "ute_flows_admitted_total", `zone="support"`)
	ticketRequests := strings.Count(w.servers["tickets"].Output(), "GET /")
	targets := []string{tickets}
	if mode == "proxy" {
		targets = append(targets, "tickets.support")
		code, body := w.httpProxyGet(a, "tickets.support")
		assert.Contains(t, body, "refused at resolve (cross_zone)", "HTTP proxy answer, code %s", code)
		assert.Equal(t, "403", code)
		code, body = w.httpProxyGet(a, tickets)
		assert.Contains(t, body, "(cross_zone)", "by overlay IP, HTTP proxy answer, code %s", code)
	}
	for _, target := range targets {
		code, out := w.curlTimeout(a, "billing-api", target, w.tools.curl, 3)
		assert.NotEqual(t, 0, code, "billing-api -> %s in another zone must fail; got %q", target, out)
		if mode == "proxy" {
			// SOCKS5 reply 0x02 (not allowed by ruleset), which curl reports as error 97.
			assert.Contains(t, out, "(97)", "curl's SOCKS5 failure for %s", target)
		}
	}
	code, out := w.curlTimeout(c, "helpdesk", ledger, w.tools.curl, 3)
	assert.NotEqual(t, 0, code, "helpdesk -> ledger in another zone must fail; got %q", out)
	assert.Equal(t, admittedSupport, w.metric(b.host, "ute_flows_admitted_total", `zone="support"`), "node b admitted no cross-zone flow")
	assert.Equal(t, ticketRequests, strings.Count(w.servers["tickets"].Output(), "GET /"), "tickets' server saw no request")

	// Another executable on billing-api's interface: refused before ledger's server accepts.
	admittedBefore := w.metric(b.host, "ute_flows_admitted_total", `zone="payments"`)
	workloadBefore := w.metric(a.host, "ute_flows_denied_total", `reason="workload"`)
	requestsBefore := strings.Count(w.servers["ledger"].Output(), "GET /")
	pyOut := w.pythonGet(a, ledger)
	assert.Contains(t, pyOut, "refused", "python3 is not billing-api's enrolled curl: %s", pyOut)
	if mode == "proxy" {
		assert.Contains(t, pyOut, "403", "the HTTP proxy answers 403")
	}
	copied := filepath.Join(w.tmp, "bin", "curl")
	require.NoError(t, os.MkdirAll(filepath.Dir(copied), 0o755))
	copyFile(t, w.tools.curl, copied, 0o755)
	f, err := os.OpenFile(copied, os.O_APPEND|os.O_WRONLY, 0)
	require.NoError(t, err)
	_, err = f.Write([]byte{0}) // another digest: a different executable that still runs as curl
	require.NoError(t, err)
	require.NoError(t, f.Close())
	code, out = w.curlTimeout(a, "billing-api", ledger, copied, 3)
	assert.NotEqual(t, 0, code, "a modified curl at another path is refused; got %q", out)
	workloadRefused := w.metric(a.host, "ute_flows_denied_total", `reason="workload"`) - workloadBefore
	if transport == "wireguard" {
		// The WireGuard filter drops a refused SYN, so the client's retransmissions are refused
		// (and counted) again; the QUIC paths answer the first one.
		assert.GreaterOrEqual(t, workloadRefused, 2.0, "node a refused both by workload attestation")
	} else {
		assert.Equal(t, 2.0, workloadRefused, "node a refused both by workload attestation, once each")
	}
	assert.Equal(t, admittedBefore, w.metric(b.host, "ute_flows_admitted_total", `zone="payments"`), "node b admitted no flow")
	assert.Equal(t, requestsBefore, strings.Count(w.servers["ledger"].Output(), "GET /"), "ledger's server saw no request")
	// The enrolled curl still passes.
	assert.Equal(t, "ledger here\n", w.mustCurl(a, "billing-api", ledger))

	// Partition and heal: a's link is cut, flows fail; restored, a new flow succeeds in bounded time.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	require.NoError(t, a.host.Cut(ctx))
	code, out = w.curlTimeout(a, "billing-api", ledger, w.tools.curl, 2)
	assert.NotEqual(t, 0, code, "no flow while a's link is cut; got %q", out)
	time.Sleep(time.Second)
	require.NoError(t, a.host.Restore(ctx))
	restored := time.Now()
	var healed time.Duration
	for {
		code, out = w.curlTimeout(a, "billing-api", ledger, w.tools.curl, 3)
		if code == 0 && out == "ledger here\n" {
			healed = time.Since(restored)
			break
		}
		require.Less(t, time.Since(restored), healBudget, "no flow succeeded within %v of restoring a's link; last: %d %q\nnode a: %s", healBudget, code, out, a.proc.Output())
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("%s/%s: a new flow succeeded %v after a's link was restored", mode, transport, healed.Round(time.Millisecond))
	require.Eventually(t, func() bool { return tunnelUp(netnsStatus(t, a.dir), "payments", "spiffe://"+netnsTD+"/node/b") },
		10*time.Second, 100*time.Millisecond, "a's payments tunnel to b is up again")

	// Revocation: helpdesk (node c) holds a live download from tickets; `ute revoke` of node c at
	// the authority cuts it within 1 s, and a new flow is refused.
	dl := filepath.Join(w.tmp, "download.bin")
	// Rate-limited so that it lasts (16 s at most), fast enough that what the kernel buffered for
	// curl when the flow is cut drains in well under a second.
	live, err := w.startCurl(c, "helpdesk", tickets+":8080/big.bin", "--limit-rate", "16M", "-o", dl)
	require.NoError(t, err)
	require.Eventually(t, func() bool { st, err := os.Stat(dl); return err == nil && st.Size() > 1<<20 }, 15*time.Second, 20*time.Millisecond,
		"the download is flowing; curl: %s", live.Output())
	require.False(t, live.Exited(), "the download is live")
	require.Eventually(t, func() bool { up, _ := w.curlConn(c); return up }, 5*time.Second, 10*time.Millisecond)
	subject := "spiffe://" + netnsTD + "/node/c"
	called := time.Now()
	netnsUte(t, "revoke", "--dir", w.authDir, subject, "--reason", "host compromised")
	returned := time.Now()
	// Cut means no byte reaches curl's TCP connection any more: it was closed (a FIN or a reset:
	// the proxy, the QUIC tunnel stack) or its packets stopped (WireGuard drops the peer). The cut
	// is the first sample after which the connection was closed, or received nothing for 2 s.
	var (
		cut       time.Duration
		closed    bool
		lastBytes int64 = -1
		lastMove        = returned
	)
	for {
		up, n := w.curlConn(c)
		now := time.Now()
		if !up {
			cut, closed = now.Sub(returned), true
			break
		}
		if n != lastBytes {
			lastBytes, lastMove = n, now
		}
		if now.Sub(lastMove) > 2*time.Second {
			cut = lastMove.Sub(returned)
			break
		}
		require.Less(t, now.Sub(returned), 10*time.Second, "the revoked node's live flow still received bytes 10 s after the revocation; curl: %s\nnode c: %s\nnode b: %s",
			live.Output(), c.proc.Output(), b.proc.Output())
		time.Sleep(5 * time.Millisecond)
	}
	t.Logf("%s/%s: node c's live flow cut %v after `ute revoke` returned (%v after it was started; connection closed: %v)",
		mode, transport, cut.Round(time.Millisecond), returned.Add(cut).Sub(called).Round(time.Millisecond), closed)
	assert.Less(t, cut, revokeBudget, "revocation cuts the node's flows within 1 s")
	if closed {
		// curl ends once it has read what the kernel had buffered for it.
		select {
		case <-live.Done():
		case <-time.After(5 * time.Second):
			t.Fatalf("curl did not end within 5 s of its connection being closed; curl: %s", live.Output())
		}
		assert.Error(t, live.Err(), "curl ended with an error: the transfer was cut, not finished")
	} else {
		live.Kill() // its packets are dropped: it would wait for its own timeout
	}
	if st, err := os.Stat(dl); assert.NoError(t, err) {
		assert.Less(t, st.Size(), int64(bigFile), "the download did not complete")
	}
	code, out = w.curlTimeout(c, "helpdesk", tickets, w.tools.curl, 3)
	assert.NotEqual(t, 0, code, "a new flow of the revoked node fails; got %q", out)
	for _, n := range []*netnsNode{a, b} {
		require.Eventually(t, func() bool { return holdsRevocation(netnsStatus(t, n.dir), subject) }, 5*time.Second, 50*time.Millisecond)
	}
	// The other zone is untouched.
	assert.Equal(t, "ledger here\n", w.mustCurl(a, "billing-api", ledger))

	// Teardown: every namespace, link and process of the lab is gone.
	procs := append([]*netlab.Proc{w.auth, live}, func() []*netlab.Proc {
		var ps []*netlab.Proc
		for _, n := range w.nodes {
			ps = append(ps, n.proc)
		}
		for _, s := range w.servers {
			ps = append(ps, s)
		}
		return ps
	}()...)
	require.NoError(t, w.lab.Close())
	assert.Empty(t, w.lab.Leftovers())
	nsList, err := exec.Command("ip", "netns", "list").CombinedOutput()
	require.NoError(t, err)
	assert.NotContains(t, string(nsList), w.lab.ID())
	for _, p := range procs {
		assert.True(t, p.Exited(), "%s in %s stopped", p.Name, p.Host.Name)
	}
	t.Logf("%s/%s: suite took %v", mode, transport, time.Since(start).Round(time.Millisecond))
}

// newNetnsWorld builds the lab, the authority, three joined nodes with their agents, and the
// servers, and waits until every node lists its zone peers.
func newNetnsWorld(t *testing.T, mode, transport string) *netnsWorld {
	t.Helper()
	w := &netnsWorld{t: t, mode: mode, transport: transport, tmp: t.TempDir(), nodes: map[string]*netnsNode{}, servers: map[string]*netlab.Proc{}}
	w.tools = findNetnsTools(t)
	w.lab = netlab.New(t, netlab.Options{Hosts: []string{"auth", "a", "b", "c"}})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	var authAddr string
	w.authDir, authAddr, w.auth = netnsAuthority(t, ctx, w.lab.Host("auth"), w.tmp, netnsPolicy)

	type agentSpec struct{ name, zone, exe string }
	specs := []struct {
		node   string
		zones  []string
		agents []agentSpec
	}{
		{"a", []string{"payments"}, []agentSpec{{"billing-api", "payments", w.tools.curl}}},
		{"b", []string{"payments", "support"}, []agentSpec{{"ledger", "payments", w.tools.python}, {"tickets", "support", w.tools.python}}},
		{"c", []string{"support"}, []agentSpec{{"helpdesk", "support", w.tools.curl}}},
	}
	for _, s := range specs {
		n := netnsJoin(t, ctx, w.lab.Host(s.node), w.tmp, w.authDir, authAddr, s.zones...)
		for _, ag := range s.agents {
			n.agents[ag.name] = netnsUte(t, "agent", "add", "--dir", n.dir, "--name", ag.name, "--zone", ag.zone, "--exe", ag.exe)
		}
		w.nodes[s.node] = n
	}

	configs := map[string]string{
		"a": fmt.Sprintf("interface: %s\ntransport: %s\nmetrics: %s\n", mode, transport, netnsMetrics),
		"b": fmt.Sprintf("interface: %s\ntransport: %s\nmetrics: %s\n", mode, transport, netnsMetrics),
		"c": fmt.Sprintf("interface: %s\ntransport: %s\nmetrics: %s\n", mode, transport, netnsMetrics),
	}
	if mode == "proxy" {
		configs["a"] += "agents:\n  - name: billing-api\n    zone: payments\n    socks: " + netnsSOCKS + "\n    http: " + netnsHTTP + "\n"
		configs["c"] += "agents:\n  - name: helpdesk\n    zone: support\n    socks: " + netnsSOCKS + "\n    http: " + netnsHTTP + "\n"
		configs["b"] += "agents:\n  - name: ledger\n    zone: payments\n    forward:\n      8080: 127.0.0.1:18080\n" +
			"  - name: tickets\n    zone: support\n    forward:\n      8080: 127.0.0.1:18081\n"
	}
	for _, name := range []string{"a", "b", "c"} {
		if err := netnsRun(t, ctx, w.nodes[name], w.tmp, configs[name]); errors.Is(err, errInterfaceMissing) && mode == "tun" {
			t.Skipf("%s/%s variant skipped: %v; it needs the kernel TUN interface (and the transport) wired into the daemon "+
				"(overlay/tundev, overlay/tunstack, node/daemon/tun.go, overlay/wireguard and the checks in cmd/ute/noderun.go)", mode, transport, err)
		} else {
			require.NoError(t, err)
		}
		// The variant runs what it names: the daemon reports its interface and transport, and in
		// tun mode the kernel device holds the node's agents' overlay IPs.
		st := netnsStatus(t, w.nodes[name].dir)
		require.Equal(t, transport, st.Transport, "node %s transport", name)
		if mode == "tun" {
			require.Equal(t, "tun", st.Interface, "node %s interface", name)
			out, err := w.nodes[name].host.Run(ctx, "ip", "-o", "-4", "addr", "show")
			require.NoError(t, err)
			for agent, ip := range w.nodes[name].agents {
				assert.Contains(t, out, " "+ip+"/", "node %s holds %s's overlay IP on its interface", name, agent)
			}
		}
	}
	if mode == "tun" {
		// An agent added while the daemon runs is on the interface at once, with either transport.
		a := w.nodes["a"]
		ip := netnsUte(t, "agent", "add", "--dir", a.dir, "--name", "billing-late", "--zone", "payments", "--exe", w.tools.curl)
		require.Eventually(t, func() bool {
			out, err := a.host.Run(ctx, "ip", "-o", "-4", "addr", "show")
			return err == nil && strings.Contains(out, " "+ip+"/")
		}, 5*time.Second, 50*time.Millisecond, "the agent added at run time (%s) is not on node a's interface", ip)
		a.agents["billing-late"] = ip
	}
	// Servers: one http.server per agent of node b, each with a file naming it; started after the
	// daemons, since in tun mode they bind to the overlay IPs the daemon assigns.
	b := w.nodes["b"]
	for i, name := range []string{"ledger", "tickets"} {
		dir := filepath.Join(w.tmp, "www-"+name)
		require.NoError(t, os.MkdirAll(dir, 0o755))
		require.NoError(t, os.WriteFile(filepath.Join(dir, "hello.txt"), []byte(name+" here\n"), 0o644))
		// Sparse: served at full size, costs no disk.
		require.NoError(t, os.WriteFile(filepath.Join(dir, "big.bin"), nil, 0o644))
		require.NoError(t, os.Truncate(filepath.Join(dir, "big.bin"), bigFile))
		port, bind := strconv.Itoa(18080+i), "127.0.0.1"
		if mode == "tun" {
			port, bind = "8080", b.agents[name]
		}
		// -u: unbuffered, so "Serving HTTP" reaches the log file at once. Request lines go to stderr.
		srv, err := b.host.Start(w.tools.python, "-u", "-m", "http.server", port, "--bind", bind, "--directory", dir)
		require.NoError(t, err)
		w.servers[name] = srv
	}

	for name, srv := range w.servers {
		require.NoError(t, srv.WaitOutput(ctx, "Serving HTTP"), "server %s", name)
	}

	// Gossip found every zone peer (the join's bootstrap members are the only seed).
	a, c := w.nodes["a"], w.nodes["c"]
	require.Eventually(t, func() bool {
		return slices.Contains(zonePeers(netnsStatus(t, a.dir), "payments"), "spiffe://"+netnsTD+"/node/b") &&
			slices.Contains(zonePeers(netnsStatus(t, c.dir), "support"), "spiffe://"+netnsTD+"/node/b") &&
			len(zonePeers(netnsStatus(t, b.dir), "payments")) == 1 && len(zonePeers(netnsStatus(t, b.dir), "support")) == 1
	}, 20*time.Second, 100*time.Millisecond, "no gossip discovery; a: %s\nb: %s", a.proc.Output(), b.proc.Output())
	return w
}

// lateAgents checks agents added while the daemons run (`ute agent add` through the local API):
// billing-late on a (added by newNetnsWorld) reaches ledger on b, and ledger-late, added to b now,
// is reached by billing-api on a. In WireGuard mode this is the whole runtime path: the address on
// the kernel interface at once (wgAgentAdded), the receiving node admitting a source address it
// learns from the record, the sending node resolving an agent it has not seen announced yet, and
// both peers' allowed IPs taking the new address (wireguard-go drops a packet whose inner source
// is not in its peer's allowed IPs, and routes nothing to an address no peer holds, so an answered
// request proves both).
func (w *netnsWorld) lateAgents() {
	t := w.t
	t.Helper()
	a, b := w.nodes["a"], w.nodes["b"]
	assert.Equal(t, "ledger here\n", w.mustCurl(a, "billing-late", b.agents["ledger"]), "the agent added at run time reaches an agent")

	ip := netnsUte(t, "agent", "add", "--dir", b.dir, "--name", "ledger-late", "--zone", "payments", "--exe", w.tools.python)
	added := time.Now()
	b.agents["ledger-late"] = ip
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	dir := filepath.Join(w.tmp, "www-ledger-late")
	require.NoError(t, os.MkdirAll(dir, 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "hello.txt"), []byte("ledger-late here\n"), 0o644))
	// http.server binds to the overlay IP: this fails unless the address is on b's interface.
	srv, err := b.host.Start(w.tools.python, "-u", "-m", "http.server", "8080", "--bind", ip, "--directory", dir)
	require.NoError(t, err)
	w.servers["ledger-late"] = srv
	require.NoError(t, srv.WaitOutput(ctx, "Serving HTTP"), "ledger-late's server binds to its overlay IP %s on b's interface; node b: %s", ip, b.proc.Output())
	var (
		code int
		out  string
	)
	require.Eventually(t, func() bool {
		code, out = w.curlTimeout(a, "billing-api", ip, w.tools.curl, 3)
		return code == 0 && out == "ledger-late here\n"
	}, 20*time.Second, 200*time.Millisecond, "billing-api never reached ledger-late, added at run time; last: %d %q\nnode a: %s\nnode b: %s",
		code, out, a.proc.Output(), b.proc.Output())
	t.Logf("%s/%s: an agent added at run time was reached %v after `ute agent add` returned", w.mode, w.transport, time.Since(added).Round(time.Millisecond))
}

func firstLine(out, containing string) string {
	for l := range strings.SplitSeq(out, "\n") {
		if strings.Contains(l, containing) {
			return strings.TrimSpace(l)
		}
	}
	return strings.TrimSpace(out)
}

// curlArgs returns the arguments that make agent (on node n) fetch /hello.txt at target:8080
// through this mode's interface.
func (w *netnsWorld) curlArgs(n *netnsNode, agent, target string, maxTime int) []string {
	args := []string{"-sS", "--max-time", strconv.Itoa(maxTime)}
	if w.mode == "proxy" {
		args = append(args, "--proxy", "socks5h://"+netnsSOCKS)
	} else {
		args = append(args, "--interface", n.agents[agent])
	}
	if !strings.Contains(target, "/") {
		target += ":8080/hello.txt"
	}
	return append(args, "http://"+target)
}

func (w *netnsWorld) curl(n *netnsNode, agent, target, bin string) (int, string) {
	return w.curlTimeout(n, agent, target, bin, 10)
}

// curlTimeout runs bin (curl or a copy) in n's namespace; returns its exit code and output.
func (w *netnsWorld) curlTimeout(n *netnsNode, agent, target, bin string, maxTime int) (int, string) {
	w.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(maxTime+10)*time.Second)
	defer cancel()
	cmd := n.host.Command(ctx, bin, w.curlArgs(n, agent, target, maxTime)...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return 0, out.String()
	case errors.As(err, &ee):
		return ee.ExitCode(), out.String()
	default:
		require.NoError(w.t, err)
		return -1, ""
	}
}

func (w *netnsWorld) mustCurl(n *netnsNode, agent, target string) string {
	w.t.Helper()
	code, out := w.curl(n, agent, target, w.tools.curl)
	require.Equal(w.t, 0, code, "%s on node %s -> %s: %s\nnode %s log: %s", agent, n.name, target, out, n.name, n.proc.Output())
	return out
}

// startCurl starts a long curl of agent on node n (target is host:port/path).
func (w *netnsWorld) startCurl(n *netnsNode, agent, target string, extra ...string) (*netlab.Proc, error) {
	args := w.curlArgs(n, agent, target, 120)
	args = append(args[:len(args)-1], append(extra, args[len(args)-1])...)
	return n.host.Start(w.tools.curl, args...)
}

// httpProxyGet fetches target:8080/hello.txt with curl through the agent's HTTP proxy
// (absolute-form GET) and returns the status code and body.
func (w *netnsWorld) httpProxyGet(n *netnsNode, target string) (string, string) {
	w.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	out, _ := n.host.Run(ctx, w.tools.curl, "-sS", "--max-time", "10", "--proxy", "http://"+netnsHTTP, "-w", "\n%{http_code}", "http://"+target+":8080/hello.txt")
	body, code, _ := strings.Cut(strings.TrimSpace(out), "\n")
	if i := strings.LastIndex(out, "\n"); i >= 0 {
		body, code = out[:i], strings.TrimSpace(out[i+1:])
	}
	return code, body
}

// pythonGet has python3 (not billing-api's enrolled curl) fetch ledger's page the way this
// mode offers: through the HTTP proxy, or straight to the overlay IP from billing-api's address.
// It prints "refused: ..." on failure and the body on success.
func (w *netnsWorld) pythonGet(n *netnsNode, target string) string {
	w.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var script string
	if w.mode == "proxy" {
		script = `import sys, urllib.request
h = urllib.request.ProxyHandler({"http": "http://` + netnsHTTP + `"})
try:
    print(urllib.request.build_opener(h).open("http://` + target + `:8080/hello.txt", timeout=3).read().decode(), end="")
except Exception as e:
    print("refused:", e)
`
	} else {
		script = `import socket
try:
    s = socket.create_connection(("` + target + `", 8080), timeout=3, source_address=("` + n.agents["billing-api"] + `", 0))
    s.sendall(b"GET /hello.txt HTTP/1.0\r\n\r\n")
    d = s.recv(4096)
    print(d.decode() if d else "refused: connection closed without an answer")
except Exception as e:
    print("refused:", e)
`
	}
	out, err := n.host.Run(ctx, w.tools.python, "-c", script)
	require.NoError(w.t, err)
	return out
}

// metric reads one sample of node host's Prometheus endpoint (0 when the series is absent).
func (w *netnsWorld) metric(h *netlab.Host, name, labels string) float64 {
	w.t.Helper()
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) { return h.Dial(ctx, network, addr) },
	}}
	resp, err := client.Get("http://" + netnsMetrics + "/metrics")
	require.NoError(w.t, err)
	defer func() { _ = resp.Body.Close() }()
	want := name
	if labels != "" {
		want += "{" + labels + "}"
	}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), want+" "); ok {
			f, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			require.NoError(w.t, err)
			return f
		}
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	return 0
}

// tunnelUp reports whether st lists an up tunnel to peer in zone.
func tunnelUp(st localapi.Status, zone, peer string) bool {
	for _, z := range st.Zones {
		if z.Name != zone {
			continue
		}
		for _, p := range z.Peers {
			if p.Node == peer && p.Tunnel == localapi.TunnelUp {
				return true
			}
		}
	}
	return false
}

// errInterfaceMissing is returned by netnsRun when this build of ute refuses the interface.
var errInterfaceMissing = errors.New("interface not in this build")

// netnsUte runs the ute binary in the root namespace (the local API and the authority's admin
// socket are Unix sockets: reachable from any network namespace) and returns its trimmed stdout.
func netnsUte(tb testing.TB, args ...string) string {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, uteBin, args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	require.NoError(tb, cmd.Run(), "ute %s: %s", strings.Join(args, " "), errb.String())
	return strings.TrimSpace(out.String())
}

func netnsStatus(tb testing.TB, dir string) localapi.Status {
	tb.Helper()
	var st localapi.Status
	require.NoError(tb, json.Unmarshal([]byte(netnsUte(tb, "status", "--dir", dir, "--json")), &st))
	return st
}

// netnsAuthority initialises an authority in tmp/auth with policy and runs it in host h.
func netnsAuthority(tb testing.TB, ctx context.Context, h *netlab.Host, tmp, policy string) (dir, addr string, p *netlab.Proc) {
	tb.Helper()
	dir = filepath.Join(tmp, "auth")
	file := filepath.Join(tmp, "policy.yaml")
	require.NoError(tb, os.WriteFile(file, []byte(policy), 0o644))
	netnsUte(tb, "authority", "init", "--dir", dir, "--trust-domain", netnsTD, "--policy", file)
	addr = h.Addr.String() + ":7443"
	p, err := h.Start(uteBin, "authority", "run", "--dir", dir, "--listen", addr)
	require.NoError(tb, err)
	require.NoError(tb, p.WaitOutput(ctx, "listening "))
	return dir, addr, p
}

// netnsJoin creates a token for zones and joins host h as node h.Name (the join runs inside the
// host: it reaches the authority over the underlay).
func netnsJoin(tb testing.TB, ctx context.Context, h *netlab.Host, tmp, authDir, authAddr string, zones ...string) *netnsNode {
	tb.Helper()
	n := &netnsNode{name: h.Name, host: h, dir: filepath.Join(tmp, h.Name), agents: map[string]string{}}
	args := []string{"token", "create", "--dir", authDir, "--region", "eu-west-1"}
	for _, z := range zones {
		args = append(args, "--zone", z)
	}
	tok := netnsUte(tb, args...)
	_, err := h.Run(ctx, uteBin, "node", "join", "--dir", n.dir, "--authority", authAddr, "--token", tok,
		"--name", h.Name, "--region", "eu-west-1", "--advertise", h.Addr.String()+":"+netnsNodePort)
	require.NoError(tb, err)
	return n
}

// netnsRun starts `ute node run` for n in its host with config text, and waits for "up on".
// A build that refuses the config's interface gives errInterfaceMissing.
func netnsRun(tb testing.TB, ctx context.Context, n *netnsNode, tmp, config string) error {
	tb.Helper()
	cfg := filepath.Join(tmp, n.name+".yaml")
	require.NoError(tb, os.WriteFile(cfg, []byte(config), 0o600))
	var err error
	n.proc, err = n.host.Start(uteBin, "node", "run", "--dir", n.dir, "--config", cfg,
		"--listen", n.host.Addr.String()+":"+netnsNodePort, "--log-level", "debug")
	require.NoError(tb, err)
	if err := n.proc.WaitOutput(ctx, "up on "); err != nil {
		if strings.Contains(n.proc.Output(), "not available in this version") {
			return fmt.Errorf("%w: %s", errInterfaceMissing, firstLine(n.proc.Output(), "not available"))
		}
		return fmt.Errorf("node %s did not start: %w", n.name, err)
	}
	return nil
}

// curlConn reports whether a curl of node n holds an established TCP connection to the agent
// interface (the local proxy's port in proxy mode, the server's overlay port 8080 in tun mode)
// and how many bytes it has received (tcp_info, from ss inside n's namespace).
func (w *netnsWorld) curlConn(n *netnsNode) (bool, int64) {
	w.t.Helper()
	port := "8080"
	if w.mode == "proxy" {
		_, port, _ = net.SplitHostPort(netnsSOCKS)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	out, err := n.host.Run(ctx, "ss", "-tinH", "state", "established", "( dport = :"+port+" )")
	require.NoError(w.t, err)
	if strings.TrimSpace(out) == "" {
		return false, 0
	}
	var total int64
	for _, f := range strings.Fields(out) {
		if v, ok := strings.CutPrefix(f, "bytes_received:"); ok {
			b, err := strconv.ParseInt(v, 10, 64)
			require.NoError(w.t, err)
			total += b
		}
	}
	return true, total
}
