package daemon

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/node/config"
	"github.com/ute-project/ute/node/localapi"
	"github.com/ute-project/ute/node/membership"
	"github.com/ute-project/ute/node/proxy"
	"github.com/ute-project/ute/node/state"
	"github.com/ute-project/ute/overlay/tunnel"
)

// Helper mode: the test binary (or a modified copy) acting as an unmodified program that talks
// SOCKS5 to an agent's proxy. It prints the reply code and exits.
const (
	helperSOCKS  = "UTE_TEST_PROXY_SOCKS"
	helperTarget = "UTE_TEST_PROXY_TARGET"
)

func TestMain(m *testing.M) {
	if addr := os.Getenv(helperSOCKS); addr != "" {
		code, err := socksConnect(addr, os.Getenv(helperTarget))
		if err != nil {
			fmt.Println("error", err)
			os.Exit(2)
		}
		fmt.Println(code)
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// socksConnect runs a SOCKS5 CONNECT with a domain-name target and returns the reply code.
func socksConnect(proxyAddr, target string) (byte, error) {
	c, err := net.DialTimeout("tcp", proxyAddr, 5*time.Second)
	if err != nil {
		return 0, err
	}
	defer func() { _ = c.Close() }()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	host, port, err := net.SplitHostPort(target)
	if err != nil {
		return 0, err
	}
	var p int
	_, _ = fmt.Sscan(port, &p)
	req := []byte{5, 1, 0, 5, 1, 0, 3, byte(len(host))}
	req = append(req, host...)
	req = append(req, byte(p>>8), byte(p))
	if _, err := c.Write(req); err != nil {
		return 0, err
	}
	var resp [12]byte
	if _, err := io.ReadFull(c, resp[:2]); err != nil {
		return 0, err
	}
	if _, err := io.ReadFull(c, resp[2:]); err != nil {
		return 0, err
	}
	return resp[3], nil
}

// proxyCluster is node a (billing-api.payments, proxies) and node b (ledger.payments forwarded
// to a local HTTP server that asks the local API who calls it; tickets.support), both with
// interface: proxy.
type proxyCluster struct {
	a, b      *testDaemon
	ledgerHit atomic.Int64
	mismatch  chan string
	local     netip.AddrPort // ledger's local server
}

func startProxyCluster(t *testing.T) *proxyCluster { return startProxyClusterPP(t, false) }

// startProxyClusterPP with pp set forwards ledger's flows with a PROXY v2 header to a raw TCP
// server that answers one line describing the header, instead of the whois HTTP server.
func startProxyClusterPP(t *testing.T, pp bool) *proxyCluster {
	t.Helper()
	ta := startAuthority(t)
	uid, gid := uint32(os.Geteuid()), uint32(os.Getegid())
	pc := &proxyCluster{mismatch: make(chan string, 16)}

	// Ledger's local server: a plain HTTP server that asks whois with the peer address it sees.
	var bdir string
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	pc.local = netip.MustParseAddrPort(ln.Addr().String())
	srv := &http.Server{ReadHeaderTimeout: 5 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		pc.ledgerHit.Add(1)
		cl, err := localapi.Dial(r.Context(), localapi.SocketPath(bdir))
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		defer func() { _ = cl.Close() }()
		who, err := cl.WhoIs(r.Context(), netip.MustParseAddrPort(r.RemoteAddr))
		if err != nil {
			http.Error(w, err.Error(), http.StatusForbidden)
			return
		}
		fmt.Fprintf(w, "ledger here; you are %s from %s", who.Agent, who.Node)
	})}
	if pp {
		go servePROXYEcho(ln, &pc.ledgerHit)
		t.Cleanup(func() { _ = ln.Close() })
	} else {
		go func() { _ = srv.Serve(ln) }()
		t.Cleanup(func() { _ = srv.Close() })
	}

	adir, apc := joinNode(t, ta, spec{name: "a", zones: []string{"payments"},
		agents: []state.AgentSpec{{Name: "billing-api", Zone: "payments", UID: uid, GID: gid}}})
	var bpc net.PacketConn
	bdir, bpc = joinNode(t, ta, spec{name: "b", zones: []string{"payments", "support"},
		agents: []state.AgentSpec{{Name: "ledger", Zone: "payments", UID: uid, GID: gid}, {Name: "tickets", Zone: "support", UID: uid, GID: gid}}})

	acfg := config.Default()
	acfg.Interface = config.InterfaceProxy
	bcfg := acfg
	bcfg.Agents = []config.AgentProxy{{Name: "ledger", Zone: "payments", Attest: true, ProxyProtocol: pp,
		Forward: []config.Forward{{Port: 8080, Target: pc.local}}}}
	onMismatch := func(agent, reason string) { pc.mismatch <- agent + ": " + reason }
	pc.a = startProxyDaemon(t, "a", adir, apc, acfg, onMismatch)
	pc.b = startProxyDaemon(t, "b", bdir, bpc, bcfg, nil)
	waitMembers(t, "payments", 2, pc.a, pc.b)
	return pc
}

func startProxyDaemon(t *testing.T, name, dir string, pc net.PacketConn, cfg config.Config, onMismatch func(string, string)) *testDaemon {
	t.Helper()
	ft := membership.FastTiming()
	opts := Options{Dir: dir, Config: cfg, Logger: testLogger(name), PacketConn: pc, Timing: &ft, OnMismatch: onMismatch}
	d, err := Start(context.Background(), opts)
	require.NoError(t, err)
	t.Cleanup(func() { _ = d.Close() })
	return &testDaemon{Daemon: d, name: name, dir: dir, pc: pc, opts: opts}
}

func proxyOf(t *testing.T, d *testDaemon, agent string) ProxyInfo {
	t.Helper()
	for _, p := range d.Proxies() {
		if p.Agent+"."+p.Zone == agent {
			return p
		}
	}
	t.Fatalf("no proxy for %s on %s", agent, d.name)
	return ProxyInfo{}
}

func get(t *testing.T, c *http.Client, u string) (int, string) {
	t.Helper()
	resp, err := c.Get(u)
	require.NoError(t, err)
	defer func() { _ = resp.Body.Close() }()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp.StatusCode, string(b)
}

// connectDialer dials through an HTTP proxy with CONNECT, as HTTPS_PROXY clients do.
func connectDialer(proxyAddr string) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", proxyAddr)
		if err != nil {
			return nil, err
		}
		fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", addr, addr)
		br := bufio.NewReader(c)
		resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
		if err != nil {
			_ = c.Close()
			return nil, err
		}
		if resp.StatusCode != http.StatusOK {
			_ = c.Close()
			return nil, fmt.Errorf("CONNECT %s: %s", addr, resp.Status)
		}
		return c, nil
	}
}

// An unmodified HTTP client reaches ledger.payments by name through billing-api's SOCKS5 proxy,
// its HTTP proxy (absolute-form) and its HTTP CONNECT tunnel; each request is an admitted flow
// of billing-api, forwarded to ledger's local server, whose whois on the peer address it sees
// names billing-api on node a.
func TestProxyReachesAgentByNameAndWhoIsNamesCaller(t *testing.T) {
	pc := startProxyCluster(t)
	p := proxyOf(t, pc.a, "billing-api.payments")
	require.True(t, p.SOCKS.Addr().IsLoopback())
	require.True(t, p.HTTP.Addr().IsLoopback())
	want := "you are spiffe://acme.internal/zone/payments/agent/billing-api from spiffe://acme.internal/node/a"

	socks := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		Proxy: http.ProxyURL(&url.URL{Scheme: "socks5", Host: p.SOCKS.String()}), DisableKeepAlives: true}}
	code, body := get(t, socks, "http://ledger.payments:8080/")
	require.Equal(t, http.StatusOK, code, body)
	assert.Contains(t, body, want)

	plain := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		Proxy: http.ProxyURL(&url.URL{Scheme: "http", Host: p.HTTP.String()}), DisableKeepAlives: true}}
	code, body = get(t, plain, "http://ledger.payments:8080/absolute")
	require.Equal(t, http.StatusOK, code, body)
	assert.Contains(t, body, want)

	tunnel := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: connectDialer(p.HTTP.String()), DisableKeepAlives: true}}
	code, body = get(t, tunnel, "http://ledger.payments:8080/connect")
	require.Equal(t, http.StatusOK, code, body)
	assert.Contains(t, body, want)

	// By overlay IP as well.
	ledger, err := pc.b.Node().Agent("payments", "ledger")
	require.NoError(t, err)
	code, body = get(t, socks, "http://"+ledger.IP().String()+":8080/by-ip")
	require.Equal(t, http.StatusOK, code, body)
	assert.Contains(t, body, want)
	assert.Equal(t, int64(4), pc.ledgerHit.Load())

	// A local process with no forwarded flow behind its address learns nothing.
	cl, err := localapi.Dial(context.Background(), localapi.SocketPath(pc.b.dir))
	require.NoError(t, err)
	defer func() { _ = cl.Close() }()
	_, err = cl.WhoIs(context.Background(), netip.MustParseAddrPort("127.0.0.1:1"))
	require.ErrorIs(t, err, localapi.ErrNotFound)

	// An agent added through the local API while the daemon runs gets its proxies at once.
	exe, err := os.Executable()
	require.NoError(t, err)
	uid, gid := uint32(os.Geteuid()), uint32(os.Getegid())
	ca, err := localapi.Dial(context.Background(), localapi.SocketPath(pc.a.dir))
	require.NoError(t, err)
	defer func() { _ = ca.Close() }()
	_, err = ca.AddAgent(context.Background(), localapi.AgentSpec{Name: "billing-batch", Zone: "payments", Exe: exe, UID: &uid, GID: &gid})
	require.NoError(t, err)
	np := proxyOf(t, pc.a, "billing-batch.payments")
	batch := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		Proxy: http.ProxyURL(&url.URL{Scheme: "socks5", Host: np.SOCKS.String()}), DisableKeepAlives: true}}
	code, body = get(t, batch, "http://ledger.payments:8080/new")
	require.Equal(t, http.StatusOK, code, body)
	assert.Contains(t, body, "you are spiffe://acme.internal/zone/payments/agent/billing-batch from spiffe://acme.internal/node/a")
}

// Attacker side: a flow to another zone's agent is refused by the sending node before anything
// is dialed: SOCKS5 reply 0x02 (not allowed by ruleset), HTTP 403; nothing reaches node b.
func TestProxyRefusesCrossZoneLocally(t *testing.T) {
	pc := startProxyCluster(t)
	p := proxyOf(t, pc.a, "billing-api.payments")
	before := pc.b.Node().Stats()
	code, err := socksConnect(p.SOCKS.String(), "tickets.support:8080")
	require.NoError(t, err)
	assert.Equal(t, proxy.ReplyNotAllowed, code)

	tunnel := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DialContext: connectDialer(p.HTTP.String())}}
	_, err = tunnel.Get("http://tickets.support:8080/")
	require.Error(t, err)
	assert.Contains(t, err.Error(), "403")
	// By overlay IP of the other zone too.
	code, err = socksConnect(p.SOCKS.String(), "100.100.2.1:8080")
	require.NoError(t, err)
	assert.Equal(t, proxy.ReplyNotAllowed, code, "100.100.2.1 is in zone support")
	assertNoFlows(t, before, pc.b)
	assert.Zero(t, pc.ledgerHit.Load())
}

// Attacker side: a process whose executable is not billing-api's enrolled one (a copy of the
// enrolled binary with one byte added: same code, other digest) connects to billing-api's proxy.
// It is refused before any record is signed (node b admits nothing, ledger's server sees
// nothing), OnMismatch names the agent and the executable, and the audit log records it.
func TestProxyRefusesOtherExecutable(t *testing.T) {
	pc := startProxyCluster(t)
	p := proxyOf(t, pc.a, "billing-api.payments")
	admitted := pc.b.Node().Stats()

	exe, err := os.Executable()
	require.NoError(t, err)
	b, err := os.ReadFile(exe)
	require.NoError(t, err)
	impostor := filepath.Join(t.TempDir(), "billing-api")
	require.NoError(t, os.WriteFile(impostor, append(b, 0), 0o755))

	out := runHelper(t, impostor, p.SOCKS.String(), "ledger.payments:8080")
	assert.Equal(t, fmt.Sprint(proxy.ReplyNotAllowed), out)
	select {
	case m := <-pc.mismatch:
		assert.Contains(t, m, "billing-api.payments: ")
		assert.Contains(t, m, impostor)
	case <-time.After(5 * time.Second):
		t.Fatal("OnMismatch was not called")
	}
	assertNoFlows(t, admitted, pc.b)
	assert.Zero(t, pc.ledgerHit.Load())
	requireAudited(t, pc.a, EventWorkloadRefused, impostor)

	// The enrolled executable itself (the test binary, run as the same kind of child process) passes.
	out = runHelper(t, exe, p.SOCKS.String(), "ledger.payments:8080")
	assert.Equal(t, fmt.Sprint(proxy.ReplySucceeded), out)
}

// Attacker side with a real unmodified program: curl is not billing-api's enrolled executable,
// so its request through billing-api's proxy is refused.
func TestProxyRefusesCurl(t *testing.T) {
	curl, err := exec.LookPath("curl")
	if err != nil {
		t.Skip("curl is not installed; TestProxyRefusesOtherExecutable covers the same refusal with a re-executed binary")
	}
	pc := startProxyCluster(t)
	p := proxyOf(t, pc.a, "billing-api.payments")
	cmd := exec.Command(curl, "-sS", "--max-time", "10", "--proxy", "socks5h://"+p.SOCKS.String(), "http://ledger.payments:8080/")
	out, err := cmd.CombinedOutput()
	require.Error(t, err, "curl must fail: %s", out)
	select {
	case m := <-pc.mismatch:
		assert.Contains(t, m, "curl")
	case <-time.After(5 * time.Second):
		t.Fatal("OnMismatch was not called")
	}
	assert.Zero(t, pc.ledgerHit.Load())
}

// assertNoFlows checks that d's endpoint saw no flow record since before.
func assertNoFlows(t *testing.T, before tunnel.Stats, d *testDaemon) {
	t.Helper()
	now := d.Node().Stats()
	assert.Equal(t, before.FlowsAdmitted, now.FlowsAdmitted, "flows admitted at %s", d.name)
	assert.Equal(t, before.FlowsDenied, now.FlowsDenied, "flows denied at %s", d.name)
	assert.Equal(t, before.FlowsDropped, now.FlowsDropped, "flows dropped at %s", d.name)
}

func runHelper(t *testing.T, exe, socksAddr, target string) string {
	t.Helper()
	cmd := exec.Command(exe, "-test.run=^$")
	cmd.Env = append(os.Environ(), helperSOCKS+"="+socksAddr, helperTarget+"="+target)
	out, err := cmd.Output()
	require.NoError(t, err, "%s", out)
	return strings.TrimSpace(string(out))
}

var auditMu sync.Mutex

// requireAudited waits until d's audit log holds event with a field containing s.
func requireAudited(t *testing.T, d *testDaemon, event, s string) {
	t.Helper()
	auditMu.Lock()
	defer auditMu.Unlock()
	require.Eventually(t, func() bool {
		b, err := readAuditDir(filepath.Join(d.dir, "audit"))
		return err == nil && strings.Contains(b, event) && strings.Contains(b, s)
	}, 5*time.Second, 20*time.Millisecond, "audit log has no %s entry naming %s", event, s)
}

func readAuditDir(dir string) (string, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return "", err
	}
	var sb strings.Builder
	for _, e := range ents {
		if e.IsDir() {
			continue
		}
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			return "", err
		}
		sb.Write(b)
	}
	return sb.String(), nil
}

// servePROXYEcho reads a PROXY protocol v2 header from each connection and answers one line:
// "src=IP:PORT dst=IP:PORT agent=ID node=ID".
func servePROXYEcho(ln net.Listener, hits *atomic.Int64) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer func() { _ = c.Close() }()
			hits.Add(1)
			var h [16]byte
			if _, err := io.ReadFull(c, h[:]); err != nil {
				return
			}
			if string(h[:12]) != "\r\n\r\n\x00\r\nQUIT\n" || h[12] != 0x21 || h[13] != 0x11 {
				fmt.Fprintf(c, "bad header %x\n", h)
				return
			}
			body := make([]byte, int(h[14])<<8|int(h[15]))
			if _, err := io.ReadFull(c, body); err != nil || len(body) < 12 {
				return
			}
			src := netip.AddrPortFrom(netip.AddrFrom4([4]byte(body[0:4])), uint16(body[8])<<8|uint16(body[9]))
			dst := netip.AddrPortFrom(netip.AddrFrom4([4]byte(body[4:8])), uint16(body[10])<<8|uint16(body[11]))
			tlv := map[byte]string{}
			for r := body[12:]; len(r) >= 3; {
				n := int(r[1])<<8 | int(r[2])
				if len(r) < 3+n {
					break
				}
				tlv[r[0]] = string(r[3 : 3+n])
				r = r[3+n:]
			}
			fmt.Fprintf(c, "src=%s dst=%s agent=%s node=%s\n", src, dst, tlv[proxy.TLVAgent], tlv[proxy.TLVNode])
		}()
	}
}

// With proxy_protocol: true, the local server learns its caller from the PROXY v2 header: the
// caller's overlay IP, the agent's overlay address, and the caller's agent and node IDs.
func TestProxyForwardsWithPROXYHeader(t *testing.T) {
	pc := startProxyClusterPP(t, true)
	p := proxyOf(t, pc.a, "billing-api.payments")
	billing, err := pc.a.Node().Agent("payments", "billing-api")
	require.NoError(t, err)
	ledger, err := pc.b.Node().Agent("payments", "ledger")
	require.NoError(t, err)
	c, err := net.Dial("tcp", p.SOCKS.String())
	require.NoError(t, err)
	defer func() { _ = c.Close() }()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	_, err = c.Write([]byte{5, 1, 0, 5, 1, 0, 3, 15})
	require.NoError(t, err)
	_, err = c.Write([]byte("ledger.payments\x1f\x90"))
	require.NoError(t, err)
	rep := make([]byte, 12)
	_, err = io.ReadFull(c, rep)
	require.NoError(t, err)
	require.Equal(t, proxy.ReplySucceeded, rep[3])
	line, err := bufio.NewReader(c).ReadString('\n')
	require.NoError(t, err)
	assert.Equal(t, fmt.Sprintf("src=%s:0 dst=%s:8080 agent=spiffe://acme.internal/zone/payments/agent/billing-api node=spiffe://acme.internal/node/a\n",
		billing.IP(), ledger.IP()), line)
}
