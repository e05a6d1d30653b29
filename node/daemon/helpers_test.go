package daemon

import (
	"context"
	"crypto/sha256"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity/authority"
	"github.com/ute-project/ute/node"
	"github.com/ute-project/ute/node/config"
	"github.com/ute-project/ute/node/membership"
	"github.com/ute-project/ute/node/state"
)

const testPolicy = `zones:
  - name: payments
    cidr: 100.100.1.0/24
    regions: [eu-west-1]
    min_trust: 50
    isolate_below: 20
    rules:
      - from: billing-*
        to: ledger
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

type testAuthority struct {
	*authority.Authority
	addr   string
	stop   func()
	dir    string
	policy string
}

// startAuthority runs an authority on loopback until the test ends (or stop is called).
func startAuthority(t testing.TB) *testAuthority {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "auth")
	pol := filepath.Join(t.TempDir(), "policy.yaml")
	require.NoError(t, os.WriteFile(pol, []byte(testPolicy), 0o644))
	require.NoError(t, authority.Init(dir, "acme.internal", pol, authority.Options{}))
	a, err := authority.Open(dir, authority.Options{})
	require.NoError(t, err)
	srv, err := a.Listen("127.0.0.1:0")
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx) }()
	var once sync.Once
	ta := &testAuthority{Authority: a, addr: srv.Addr().String(), dir: dir, policy: pol}
	ta.stop = func() {
		once.Do(func() {
			cancel()
			require.NoError(t, <-done)
			require.NoError(t, a.Close())
		})
	}
	t.Cleanup(ta.stop)
	return ta
}

type spec struct {
	name   string
	zones  []string
	agents []state.AgentSpec
}

type testDaemon struct {
	*Daemon
	name string
	dir  string
	pc   net.PacketConn
	opts Options
}

// joinNode joins a node directory with an advertised loopback socket it keeps for the daemon.
func joinNode(t testing.TB, ta *testAuthority, s spec) (dir string, pc net.PacketConn) {
	t.Helper()
	exe, err := os.Executable()
	require.NoError(t, err)
	pc, err = net.ListenPacket("udp", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { _ = pc.Close() })
	tok, err := ta.CreateToken(context.Background(), authority.TokenSpec{Zones: s.zones, TTL: time.Minute})
	require.NoError(t, err)
	dir = filepath.Join(t.TempDir(), s.name)
	fp := sha256.Sum256([]byte(s.name))
	d, err := node.Join(context.Background(), node.JoinParams{Dir: dir, Authority: ta.addr, Token: tok.Token, Name: s.name,
		HostFingerprint: fp[:], Advertise: pc.LocalAddr().String()})
	require.NoError(t, err)
	for _, as := range s.agents {
		// This test binary, as this user: the workload an SDK Dial checks (node/selfattest.go).
		as.Exe = exe
		if as.UID == 0 && as.GID == 0 {
			as.UID, as.GID = uint32(os.Geteuid()), uint32(os.Getegid())
		}
		_, err := d.AddAgent(as)
		require.NoError(t, err)
	}
	return dir, pc
}

// testLogger keeps the daemons quiet unless UTE_TEST_LOG is set.
func testLogger(name string) *slog.Logger {
	if os.Getenv("UTE_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug})).With("node", name)
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// startDaemon starts a daemon on a joined directory with fast gossip timings.
func startDaemon(t testing.TB, name, dir string, pc net.PacketConn, noAuthority bool) *testDaemon {
	t.Helper()
	ft := membership.FastTiming()
	opts := Options{Dir: dir, Config: netstackConfig(), Logger: testLogger(name), PacketConn: pc, NoAuthority: noAuthority, Timing: &ft}
	d, err := Start(context.Background(), opts)
	require.NoError(t, err)
	td := &testDaemon{Daemon: d, name: name, dir: dir, pc: pc, opts: opts}
	t.Cleanup(func() { _ = d.Close() })
	return td
}

// cluster joins and starts every node; no node is given a static peer: the authority's join
// response is the only bootstrap.
func cluster(t testing.TB, ta *testAuthority, specs ...spec) map[string]*testDaemon {
	t.Helper()
	out := map[string]*testDaemon{}
	for _, s := range specs {
		dir, pc := joinNode(t, ta, s)
		out[s.name] = startDaemon(t, s.name, dir, pc, false)
	}
	return out
}

// waitMembers waits until every daemon's pool of zone counts want members.
func waitMembers(t testing.TB, zone string, want int, ds ...*testDaemon) {
	t.Helper()
	require.Eventually(t, func() bool {
		for _, d := range ds {
			if len(d.members(zone)) != want {
				return false
			}
		}
		return true
	}, 20*time.Second, 20*time.Millisecond, "zone %s never reached %d members", zone, want)
}

// netstackConfig is the default configuration with the agents embedded in the test process:
// these tests dial through the daemon's Agent handles, not through per-agent proxies.
func netstackConfig() config.Config {
	c := config.Default()
	c.Interface = config.InterfaceNetstack
	return c
}
