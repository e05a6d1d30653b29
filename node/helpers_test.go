package node

import (
	"bufio"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"io"
	"math/big"
	"net"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/identity/authority"
	"github.com/ute-project/ute/node/state"
	"github.com/ute-project/ute/overlay/audit"
	"github.com/ute-project/ute/overlay/tunnel"
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
        ports: [tcp/8080, udp/5353]
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

// clock is a settable clock; each test node has its own.
type clock struct {
	mu  sync.Mutex
	off time.Duration
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return time.Now().Add(c.off)
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.off += d
}

type testAuthority struct {
	*authority.Authority
	addr string
}

func startAuthority(t testing.TB) *testAuthority {
	return startAuthorityWith(t, testPolicy, authority.Options{})
}

// startAuthorityWith initializes an authority with policy and opts in a temp dir and serves it on
// an ephemeral loopback port until the test ends.
func startAuthorityWith(t testing.TB, policy string, opts authority.Options) *testAuthority {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "auth")
	pol := filepath.Join(t.TempDir(), "policy.yaml")
	require.NoError(t, os.WriteFile(pol, []byte(policy), 0o644))
	require.NoError(t, authority.Init(dir, "acme.internal", pol, opts))
	a, err := authority.Open(dir, opts)
	require.NoError(t, err)
	srv, err := a.Listen("127.0.0.1:0")
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		require.NoError(t, <-done)
		require.NoError(t, a.Close())
	})
	return &testAuthority{Authority: a, addr: srv.Addr().String()}
}

type nodeSpec struct {
	name   string
	zones  []string
	agents []state.AgentSpec
	limits tunnel.Limits
	// refusals tunes the audit log's flood control (Config.AuditRefusals).
	refusals audit.FloodOptions
	// configure, when set, adjusts the node's Config before it opens (hooks).
	configure func(*Config)
}

type testNode struct {
	*Node
	dir   string
	clock *clock
}

// cluster joins every node through the authority, opens them and makes them peers of each other.
func cluster(t testing.TB, specs ...nodeSpec) map[string]*testNode {
	t.Helper()
	ta := startAuthority(t)
	exe, err := os.Executable()
	require.NoError(t, err)
	out := map[string]*testNode{}
	for _, s := range specs {
		tok, err := ta.CreateToken(context.Background(), authority.TokenSpec{Zones: s.zones, TTL: time.Minute})
		require.NoError(t, err)
		dir := filepath.Join(t.TempDir(), s.name)
		fp := sha256.Sum256([]byte(s.name))
		d, err := Join(context.Background(), JoinParams{Dir: dir, Authority: ta.addr, Token: tok.Token, Name: s.name, HostFingerprint: fp[:]})
		require.NoError(t, err)
		for _, as := range s.agents {
			// This test binary, as this user: the workload every SDK Dial checks (selfattest.go).
			as.Exe = exe
			if as.UID == 0 && as.GID == 0 {
				as.UID, as.GID = uint32(os.Geteuid()), uint32(os.Getegid())
			}
			_, err := d.AddAgent(as)
			require.NoError(t, err)
		}
		c := &clock{}
		cfg := Config{Dir: dir, Clock: c.Now, Limits: s.limits, AuditRefusals: s.refusals}
		if s.configure != nil {
			s.configure(&cfg)
		}
		n, err := Open(context.Background(), cfg)
		require.NoError(t, err)
		t.Cleanup(func() { require.NoError(t, n.Close()) })
		out[s.name] = &testNode{Node: n, dir: dir, clock: c}
	}
	for _, a := range out {
		for name, b := range out {
			if a != b {
				require.NoError(t, a.AddPeer(Peer{Node: name, Addr: b.Addr()}))
			}
		}
	}
	return out
}

// threeNodes is the demo topology: a (payments), b (payments + support), c (support).
func threeNodes(t testing.TB) map[string]*testNode {
	return cluster(t,
		nodeSpec{name: "a", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "billing-api", Zone: "payments"}}},
		nodeSpec{name: "b", zones: []string{"payments", "support"}, agents: []state.AgentSpec{
			{Name: "ledger", Zone: "payments"}, {Name: "billing-batch", Zone: "payments"},
			{Name: "tickets", Zone: "support"}}},
		nodeSpec{name: "c", zones: []string{"support"}, agents: []state.AgentSpec{{Name: "helpdesk", Zone: "support"}}},
	)
}

func agent(t testing.TB, n *testNode, zone, name string) *Agent {
	t.Helper()
	a, err := n.Agent(zone, name)
	require.NoError(t, err)
	return a
}

// sink is a listener whose every accepted conn is drained and counted: what an agent received.
type sink struct {
	conns atomic.Int64
	bytes atomic.Int64
	whois chan *Provenance
}

func serveSink(t testing.TB, a *Agent, port string) *sink {
	t.Helper()
	l, err := a.Listen("tcp", ":"+port)
	require.NoError(t, err)
	s := &sink{whois: make(chan *Provenance, 16)}
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			s.conns.Add(1)
			if p, err := WhoIs(c); err == nil {
				select {
				case s.whois <- p:
				default:
				}
			}
			wg.Go(func() {
				defer func() { _ = c.Close() }()
				n, _ := io.Copy(io.Discard, c)
				s.bytes.Add(n)
			})
		}
	})
	t.Cleanup(func() { _ = l.Close(); wg.Wait() })
	return s
}

// auditEntries reads a node's audit log after checking its hash chain.
func auditEntries(t testing.TB, n *testNode) []audit.Record {
	t.Helper()
	require.NoError(t, n.audit.Sync())
	dir := filepath.Join(n.dir, DirAudit)
	rep, err := audit.Verify(dir)
	require.NoError(t, err)
	require.True(t, rep.OK)
	f, err := os.Open(filepath.Join(dir, audit.LogFile))
	require.NoError(t, err)
	defer func() { _ = f.Close() }()
	var out []audit.Record
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var r audit.Record
		require.NoError(t, json.Unmarshal(sc.Bytes(), &r))
		out = append(out, r)
	}
	return out
}

// denials lists the reasons of the deny entries in a node's audit log.
func denials(t testing.TB, n *testNode) []string {
	var out []string
	for _, r := range auditEntries(t, n) {
		if r.Event == audit.EventDeny {
			out = append(out, r.Fields["reason"])
		}
	}
	return out
}

// forgeAgent signs an agent certificate with a node key directly, skipping identity.Issue's
// constraint checks: what a compromised node outside the zone could produce.
func forgeAgent(t testing.TB, issuer *identity.Certificate, issuerKey ed25519.PrivateKey, zone, name string, ip netip.Addr) (*identity.Certificate, ed25519.PrivateKey) {
	t.Helper()
	pub, key, err := ed25519.GenerateKey(rand.Reader)
	require.NoError(t, err)
	fp := sha256.Sum256([]byte(name))
	ext, err := identity.MarshalClaims(identity.Claims{Zones: []identity.ZoneGrant{{Name: zone}}, OverlayIPs: []netip.Addr{ip}, Fingerprint: fp[:]})
	require.NoError(t, err)
	u, err := url.Parse(identity.AgentID(issuer.ID.TrustDomain, zone, name).String())
	require.NoError(t, err)
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(now.UnixNano()), Subject: pkix.Name{CommonName: name},
		NotBefore: now.Add(-time.Minute).Truncate(time.Second), NotAfter: now.Add(time.Hour).Truncate(time.Second),
		URIs: []*url.URL{u}, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage:     []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth},
		ExtraExtensions: []pkix.Extension{{Id: identity.OIDClaims, Value: ext}},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, issuer.X509, pub, issuerKey)
	require.NoError(t, err)
	c, err := identity.ParseCertificate(der)
	require.NoError(t, err)
	return c, key
}

// nodeIssuer is n's issuing certificate and key, the pair that signs its agents.
func nodeIssuer(t testing.TB, n *testNode) (*identity.Certificate, ed25519.PrivateKey) {
	t.Helper()
	c, k, err := n.Node.dir.NodeIssuer()
	require.NoError(t, err)
	return c, k
}

func nodeKey(t testing.TB, n *testNode) ed25519.PrivateKey {
	t.Helper()
	k, err := n.Node.dir.NodeKey()
	require.NoError(t, err)
	return k
}

var _ net.Conn = (*localConn)(nil)

// waitDirectory waits until n's view of zone holds the remote agent name (the tunnel-up directory
// exchange runs asynchronously).
func waitDirectory(t testing.TB, n *testNode, zone, name string) {
	t.Helper()
	require.Eventually(t, func() bool {
		_, ok := n.lookup(zone, name, netip.Addr{}, 1)
		return ok
	}, 5*time.Second, 2*time.Millisecond, "%s never learned %s.%s", n.ID(), name, zone)
}
