package daemon

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/ute-project/ute/identity/authority"
	"github.com/ute-project/ute/node"
	"github.com/ute-project/ute/node/config"
	"github.com/ute-project/ute/node/localapi"
	"github.com/ute-project/ute/node/membership"
	"github.com/ute-project/ute/node/state"
	"github.com/ute-project/ute/overlay/tundev"
)

// netns is a named network namespace made for one test and deleted at its end.
type netns struct {
	name string
}

func needRoot(t testing.TB, tools ...string) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates network namespaces, veth pairs and TUN interfaces (CI runs as root)")
	}
	for _, tool := range append([]string{"ip"}, tools...) {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s is not installed", tool)
		}
	}
}

func run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	require.NoError(t, err, "%s %v: %s", name, args, out)
	return string(out)
}

func newNetns(t testing.TB, prefix string) *netns {
	t.Helper()
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	n := &netns{name: prefix + hex.EncodeToString(b)}
	run(t, "ip", "netns", "add", n.name)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", n.name).Run() })
	run(t, "ip", "-n", n.name, "link", "set", "lo", "up")
	return n
}

// do runs fn on an OS thread inside the namespace. Sockets, TUN devices and child processes
// created by fn belong to the namespace; the thread is discarded afterwards.
func (n *netns) do(t testing.TB, fn func()) {
	t.Helper()
	done := make(chan any, 1)
	go func() {
		runtime.LockOSThread()
		defer func() { done <- recover() }()
		fd, err := unix.Open("/run/netns/"+n.name, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			panic(err)
		}
		defer unix.Close(fd)
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			panic(err)
		}
		fn()
	}()
	if p := <-done; p != nil {
		panic(p)
	}
}

// exec runs a program in the namespace and returns its combined output and error.
func (n *netns) exec(ctx context.Context, name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", n.name, name}, args...)...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// tunNode is one daemon with the TUN interface in its own namespace.
type tunNode struct {
	*Daemon
	ns     *netns
	dir    string
	addr   netip.AddrPort // underlay (veth) address
	agents map[string]*state.Agent
}

func realPath(t testing.TB, tool string) string {
	t.Helper()
	p, err := exec.LookPath(tool)
	require.NoError(t, err)
	p, err = filepath.EvalSymlinks(p)
	require.NoError(t, err)
	return p
}

// tunPair builds two namespaces joined by a veth pair, joins a node for each (zones payments and
// support) with the given agents, and starts both daemons with --interface tun.
func tunPair(t testing.TB, agentsA, agentsB []state.AgentSpec, tunOpts ...TUNOptions) (a, b *tunNode) {
	t.Helper()
	ta := startAuthority(t)
	nsA, nsB := newNetns(t, "utetA"), newNetns(t, "utetB")
	run(t, "ip", "link", "add", "veth-a", "netns", nsA.name, "type", "veth", "peer", "name", "veth-b", "netns", nsB.name)
	run(t, "ip", "-n", nsA.name, "addr", "add", "10.77.0.1/24", "dev", "veth-a")
	run(t, "ip", "-n", nsB.name, "addr", "add", "10.77.0.2/24", "dev", "veth-b")
	run(t, "ip", "-n", nsA.name, "link", "set", "veth-a", "up")
	run(t, "ip", "-n", nsB.name, "link", "set", "veth-b", "up")

	mk := func(name string, ns *netns, ip string, specs []state.AgentSpec) *tunNode {
		addr := netip.MustParseAddrPort(ip + ":17444")
		tok, err := ta.CreateToken(context.Background(), authority.TokenSpec{Zones: []string{"payments", "support"}, TTL: time.Minute})
		require.NoError(t, err)
		dir := filepath.Join(t.TempDir(), name)
		fp := sha256.Sum256([]byte(name))
		sd, err := node.Join(context.Background(), node.JoinParams{Dir: dir, Authority: ta.addr, Token: tok.Token, Name: name,
			HostFingerprint: fp[:], Advertise: addr.String()})
		require.NoError(t, err)
		tn := &tunNode{ns: ns, dir: dir, addr: addr, agents: map[string]*state.Agent{}}
		for _, as := range specs {
			ag, err := sd.AddAgent(as)
			require.NoError(t, err)
			tn.agents[as.Name] = ag
		}
		return tn
	}
	a = mk("tun-a", nsA, "10.77.0.1", agentsA)
	b = mk("tun-b", nsB, "10.77.0.2", agentsB)
	start := func(tn *tunNode) {
		tn.ns.do(t, func() {
			pc, err := net.ListenPacket("udp", tn.addr.String())
			require.NoError(t, err)
			t.Cleanup(func() { _ = pc.Close() })
			cfg := config.Default()
			cfg.Interface = config.InterfaceTUN
			ft := membership.FastTiming()
			opts := Options{Dir: tn.dir, Config: cfg, Logger: testLogger(filepath.Base(tn.dir)),
				PacketConn: pc, NoAuthority: true, Timing: &ft}
			if len(tunOpts) > 0 {
				opts.TUN = tunOpts[0]
			}
			d, err := Start(context.Background(), opts)
			require.NoError(t, err)
			tn.Daemon = d
			t.Cleanup(func() { _ = d.Close() })
		})
	}
	start(a)
	start(b)
	return a, b
}

func (tn *tunNode) whois(t *testing.T, addr netip.AddrPort) (localapi.WhoIs, error) {
	t.Helper()
	c, err := localapi.Dial(context.Background(), localapi.SocketPath(tn.dir))
	require.NoError(t, err)
	defer c.Close()
	return c.WhoIs(context.Background(), addr)
}

// waitReachable retries until a flow from src's agent reaches dst (membership and the directory
// exchange settle in the background after start).
func waitTunnel(t testing.TB, a, b *tunNode) {
	t.Helper()
	require.Eventually(t, func() bool {
		return len(a.members("payments")) == 2 && len(b.members("payments")) == 2
	}, 20*time.Second, 50*time.Millisecond, "the two nodes never saw each other")
}

// TestTUNRealPrograms: curl in namespace A fetches a page from `python3 -m http.server` bound to
// agent ledger's overlay IP in namespace B, both unmodified, through the kernel interfaces.
func TestTUNRealPrograms(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: two namespaces with real programs")
	}
	needRoot(t, "curl", "python3")
	curl, python := realPath(t, "curl"), realPath(t, "python3")
	// The interpreter itself (python3 may be a launcher script, e.g. pyenv's shim).
	pyOut, err := exec.Command(python, "-c", "import sys; print(sys.executable)").Output()
	require.NoError(t, err)
	interp := realPath(t, strings.TrimSpace(string(pyOut)))
	a, b := tunPair(t,
		[]state.AgentSpec{{Name: "billing-api", Zone: "payments", Exe: curl}, {Name: "billing-udp", Zone: "payments", Exe: interp}},
		[]state.AgentSpec{{Name: "ledger", Zone: "payments", Exe: python}, {Name: "tickets", Zone: "support", Exe: python}})
	billing, ledger, tickets := a.agents["billing-api"], b.agents["ledger"], b.agents["tickets"]

	// The interfaces exist with the agents' addresses and the zones' routes.
	info, ok := a.TUN()
	require.True(t, ok)
	assert.Equal(t, tundev.DefaultName, info.Name)
	assert.Contains(t, info.Addrs, netip.PrefixFrom(billing.IP, 32))
	routes, _ := a.ns.exec(context.Background(), "ip", "route", "show", "dev", "ute0")
	assert.Contains(t, routes, "100.100.1.0/24")
	assert.Contains(t, routes, "100.100.2.0/24")
	waitTunnel(t, a, b)

	// Unmodified server in B: python's http.server on ledger's overlay IP.
	www := t.TempDir()
	body := "hello from ledger " + hex.EncodeToString([]byte(t.Name()))
	require.NoError(t, os.WriteFile(filepath.Join(www, "index.html"), []byte(body), 0o644))
	srvCtx, stopSrv := context.WithCancel(context.Background())
	srv := exec.CommandContext(srvCtx, "ip", "netns", "exec", b.ns.name, python, "-m", "http.server", "8080",
		"--bind", ledger.IP.String(), "--directory", www)
	srvErr := &syncBuffer{}
	srv.Stderr = srvErr
	require.NoError(t, srv.Start())
	t.Cleanup(func() { stopSrv(); _ = srv.Wait() })
	url := fmt.Sprintf("http://%s:8080/index.html", ledger.IP)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var out string
	deadline := time.Now().Add(30 * time.Second)
	for {
		var err error
		out, err = a.ns.exec(ctx, curl, "-sS", "--max-time", "5", "--interface", billing.IP.String(), url)
		if err == nil {
			break
		}
		require.True(t, time.Now().Before(deadline), "curl never got through: %s", out)
		time.Sleep(200 * time.Millisecond)
	}
	assert.Equal(t, body, out)
	// The server saw the caller's overlay IP, not a proxy's.
	require.Eventually(t, func() bool { return strings.Contains(srvErr.String(), billing.IP.String()+" - - ") },
		5*time.Second, 20*time.Millisecond, "server log: %s", srvErr.String())
	stopSrv()
	_ = srv.Wait()

	t.Run("whois", func(t *testing.T) {
		// A real program asks who is calling while the connection is open: the peer it sees
		// names billing-api and its overlay IP.
		script := fmt.Sprintf(`
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((%q, 8080)); s.listen(4)
print("ready", flush=True)
c, a = s.accept()
print("%%s:%%d" %% a, flush=True)
sys.stdin.readline()
c.recv(65536)
c.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
c.close()
`, ledger.IP.String())
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		py := exec.CommandContext(ctx, "ip", "netns", "exec", b.ns.name, python, "-c", script)
		stdin, err := py.StdinPipe()
		require.NoError(t, err)
		stdout, err := py.StdoutPipe()
		require.NoError(t, err)
		require.NoError(t, py.Start())
		defer func() { _ = py.Process.Kill(); _ = py.Wait() }()
		lines := bufio.NewScanner(stdout)
		require.True(t, lines.Scan())
		require.Equal(t, "ready", lines.Text())
		curlDone := make(chan string, 1)
		go func() {
			o, _ := a.ns.exec(ctx, curl, "-sS", "--max-time", "20", "--interface", billing.IP.String(), url)
			curlDone <- o
		}()
		require.True(t, lines.Scan())
		peer := netip.MustParseAddrPort(lines.Text())
		assert.Equal(t, billing.IP, peer.Addr(), "the server's peer is billing-api's overlay IP")
		w, err := b.whois(t, peer)
		require.NoError(t, err)
		assert.Equal(t, billing.Cert.ID.String(), w.Agent)
		assert.Equal(t, billing.IP.String(), w.SourceIP)
		assert.Equal(t, a.Node().ID().String(), w.Node)
		assert.Equal(t, "payments", w.Zone)
		_, err = io.WriteString(stdin, "go\n")
		require.NoError(t, err)
		assert.Equal(t, "ok", <-curlDone)
		// Gone with the connection.
		require.Eventually(t, func() bool {
			_, err := b.whois(t, peer)
			return err != nil
		}, 5*time.Second, 20*time.Millisecond)
	})

	t.Run("cross-zone refused locally", func(t *testing.T) {
		before := b.tunStats(t).Inbound
		o, err := a.ns.exec(ctx, curl, "-sS", "--max-time", "5", "--interface", billing.IP.String(),
			fmt.Sprintf("http://%s:8080/", tickets.IP))
		require.Error(t, err, "curl must fail: %s", o)
		assert.Contains(t, o, "Couldn't connect", "a reset, not a timeout")
		requireAudited(t, &testDaemon{Daemon: a.Daemon, dir: a.dir}, EventTUNRefused, "cross_zone")
		assert.Equal(t, before, b.tunStats(t).Inbound, "nothing reached node B")
	})

	t.Run("other executable refused before the server accepts", func(t *testing.T) {
		before := b.tunStats(t).Inbound
		script := fmt.Sprintf(`
import socket
s = socket.socket(); s.bind((%q, 0)); s.settimeout(10)
try:
    s.connect((%q, 8080)); print("connected")
except ConnectionRefusedError:
    print("refused")
`, billing.IP.String(), ledger.IP.String())
		o, err := a.ns.exec(ctx, python, "-c", script)
		require.NoError(t, err, o)
		assert.Equal(t, "refused\n", o, "python is not billing-api's enrolled curl")
		requireAudited(t, &testDaemon{Daemon: a.Daemon, dir: a.dir}, EventWorkloadRefused, "billing-api.payments")
		assert.Equal(t, before, b.tunStats(t).Inbound, "no flow was originated at node B")
	})

	t.Run("udp attested", func(t *testing.T) {
		// billing-udp is enrolled as the interpreter: its datagram passes attestation (the UDP
		// socket is found by sock_diag) and is sent for admission, which ledger's node refuses by
		// policy (only tcp/8080 is allowed); billing-api's datagram from the same interpreter is
		// refused by attestation first.
		udp := a.agents["billing-udp"]
		send := func(from netip.Addr) {
			script := fmt.Sprintf(`
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((%q, 0))
s.sendto(b"query", (%q, 5353))
import time; time.sleep(1)
`, from, ledger.IP)
			o, err := a.ns.exec(ctx, interp, "-c", script)
			require.NoError(t, err, o)
		}
		refusedBefore := auditLines(t, a, EventWorkloadRefused, "")
		send(udp.IP)
		require.Eventually(t, func() bool { return auditLines(t, a, EventTUNRefused, ":5353") == 1 }, 10*time.Second, 20*time.Millisecond)
		assert.Equal(t, 1, auditLines(t, a, EventTUNRefused, `"reason":"policy"`), "refused by ledger's node, after attestation passed")
		assert.Equal(t, refusedBefore, auditLines(t, a, EventWorkloadRefused, ""), "billing-udp's interpreter passed attestation")
		mismatchBefore := auditLines(t, a, EventWorkloadRefused, "does not match")
		send(billing.IP)
		require.Eventually(t, func() bool {
			return auditLines(t, a, EventWorkloadRefused, "does not match") == mismatchBefore+1 &&
				auditLines(t, a, EventWorkloadRefused, "") == refusedBefore+1
		}, 10*time.Second, 20*time.Millisecond, "billing-api's UDP socket found and refused as another executable")
		assert.Equal(t, 1, auditLines(t, a, EventTUNRefused, ":5353"), "nothing was sent for billing-api")
	})

	t.Run("spoofed source dropped and counted", func(t *testing.T) {
		spoof := netip.MustParseAddr("100.100.1.250")
		run(t, "ip", "-n", a.ns.name, "addr", "add", spoof.String()+"/32", "dev", "ute0")
		before := a.tunStats(t).Spoofed
		script := fmt.Sprintf(`
import socket
for proto in (socket.SOCK_DGRAM,):
    s = socket.socket(socket.AF_INET, proto); s.bind((%q, 0))
    s.sendto(b"spoofed", (%q, 8080))
s = socket.socket(); s.bind((%q, 0)); s.settimeout(1)
try:
    s.connect((%q, 8080)); print("connected")
except Exception as e:
    print("failed", type(e).__name__)
`, spoof, ledger.IP, spoof, ledger.IP)
		o, err := a.ns.exec(ctx, python, "-c", script)
		require.NoError(t, err, o)
		assert.Contains(t, o, "failed")
		require.Eventually(t, func() bool { return a.tunStats(t).Spoofed >= before+2 }, 5*time.Second, 20*time.Millisecond,
			"stats %+v", a.tunStats(t))
	})
}

func (tn *tunNode) tunStats(t *testing.T) struct{ Inbound, Spoofed, Refused uint64 } {
	t.Helper()
	info, ok := tn.TUN()
	require.True(t, ok)
	return struct{ Inbound, Spoofed, Refused uint64 }{info.Stats.Inbound, info.Stats.Spoofed, info.Stats.Refused}
}

// TestTUNInterfaceLifecycle: the interface carries every agent, one added at run time gets its
// address at once, and everything is removed on Close.
func TestTUNInterfaceLifecycle(t *testing.T) {
	needRoot(t)
	exe, err := os.Executable()
	require.NoError(t, err)
	a, _ := tunPair(t, []state.AgentSpec{{Name: "billing-api", Zone: "payments", Exe: exe}}, nil)
	c, err := localapi.Dial(context.Background(), localapi.SocketPath(a.dir))
	require.NoError(t, err)
	defer c.Close()
	ag, err := c.AddAgent(context.Background(), localapi.AgentSpec{Name: "billing-batch", Zone: "payments", Exe: exe})
	require.NoError(t, err)
	addrs, _ := a.ns.exec(context.Background(), "ip", "addr", "show", "dev", "ute0")
	assert.Contains(t, addrs, a.agents["billing-api"].IP.String()+"/32")
	assert.Contains(t, addrs, ag.OverlayIP+"/32", "an agent added at run time is on the interface at once")
	require.NoError(t, a.Close())
	links, _ := a.ns.exec(context.Background(), "ip", "link", "show")
	assert.NotContains(t, links, "ute0", "Close removes the interface")
}

// syncBuffer collects a child's output while the test reads it.
type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// auditLines counts tn's audit entries of event whose line contains sub.
func auditLines(t *testing.T, tn *tunNode, event, sub string) int {
	t.Helper()
	auditMu.Lock()
	defer auditMu.Unlock()
	b, err := readAuditDir(filepath.Join(tn.dir, "audit"))
	require.NoError(t, err)
	n := 0
	for _, l := range strings.Split(b, "\n") {
		if strings.Contains(l, `"event":"`+event+`"`) && strings.Contains(l, sub) {
			n++
		}
	}
	return n
}
