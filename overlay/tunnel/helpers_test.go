package tunnel

import (
	"context"
	"crypto/ed25519"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/overlay/dtl"
)

const testTD = "acme.internal"

var (
	errNotInZone = errors.New("node does not hold the zone")
	errRevoked   = errors.New("node is revoked")
)

// testPKI is a real authority issuing real node certificates through package identity.
type testPKI struct {
	key  ed25519.PrivateKey
	cert *identity.Certificate
	now  time.Time
}

func newPKI(t testing.TB, td string) *testPKI {
	t.Helper()
	key, err := identity.GenerateKey()
	require.NoError(t, err)
	now := time.Now()
	cert, err := identity.NewAuthority(td, key, now.Add(-time.Hour), 48*time.Hour)
	require.NoError(t, err)
	return &testPKI{key: key, cert: cert, now: now}
}

func (p *testPKI) node(t testing.TB, name string, zones ...string) tls.Certificate {
	t.Helper()
	key, err := identity.GenerateKey()
	require.NoError(t, err)
	var grants []identity.ZoneGrant
	for i, z := range zones {
		grants = append(grants, identity.ZoneGrant{Name: z, Prefixes: []netip.Prefix{netip.MustParsePrefix(fmt.Sprintf("100.100.%d.0/24", i+1))}})
	}
	cert, err := identity.Issue(p.cert, p.key, identity.IssueRequest{
		ID:        identity.NodeID(p.cert.ID.TrustDomain, name),
		PublicKey: key.Public().(ed25519.PublicKey),
		Claims:    identity.Claims{Zones: grants, Regions: []string{"eu-west-1"}, Fingerprint: make([]byte, 32)},
		NotBefore: p.now.Add(-time.Minute),
		NotAfter:  p.now.Add(24 * time.Hour),
	})
	require.NoError(t, err)
	tc, err := identity.TLSCertificate(key, cert)
	require.NoError(t, err)
	return tc
}

// nodeVerifier is the PeerVerifier the node will build: identity chain verification, zone grant
// in the certificate, and a revocation set.
type nodeVerifier struct {
	v       identity.Verifier
	mu      sync.Mutex
	revoked map[string]bool
}

func newNodeVerifier(p *testPKI) *nodeVerifier {
	return &nodeVerifier{v: identity.Verifier{Authority: p.cert}, revoked: map[string]bool{}}
}

func (n *nodeVerifier) revoke(id string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.revoked[id] = true
}

func (n *nodeVerifier) VerifyPeer(zone string, raw [][]byte) (Peer, error) {
	cert, err := n.v.VerifyNodeDER(raw, time.Now())
	if err != nil {
		return Peer{}, err
	}
	if _, ok := cert.Claims.Zone(zone); !ok {
		return Peer{}, fmt.Errorf("%w: %s lacks %q", errNotInZone, cert.ID, zone)
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.revoked[cert.ID.String()] {
		return Peer{}, fmt.Errorf("%w: %s", errRevoked, cert.ID)
	}
	return Peer{NodeID: cert.ID.String(), Certificate: cert.X509, Info: cert}, nil
}

// testRecord stands in for a DTL record where the test is about the tunnel, not about dtl.
type testRecord struct {
	Agent string `json:"agent"`
	Kind  uint8  `json:"kind"`
	Flow  uint64 `json:"flow"`
	Deny  bool   `json:"deny"`
}

func rec(t testing.TB, r testRecord) []byte {
	t.Helper()
	if r.Kind == 0 {
		r.Kind = uint8(KindStream)
	}
	b, err := json.Marshal(r)
	require.NoError(t, err)
	return b
}

type overlayAddr string

func (a overlayAddr) Network() string { return "ute" }
func (a overlayAddr) String() string  { return string(a) }

// jsonAdmitter admits test records; it checks the session binding it is given is the tunnel's.
type jsonAdmitter struct {
	calls atomic.Int64
}

func (a *jsonAdmitter) Admit(_ context.Context, req FlowRequest) (Admission, error) {
	a.calls.Add(1)
	if len(req.Exporter) != dtl.ExporterLen || req.Peer.NodeID == "" || req.Zone == "" {
		return Admission{}, dtl.Deny(fmt.Errorf("%w: incomplete flow request", dtl.ErrConfig))
	}
	var r testRecord
	if err := json.Unmarshal(req.Record, &r); err != nil {
		return Admission{}, dtl.Deny(fmt.Errorf("%w: %w", dtl.ErrMalformed, err))
	}
	if r.Deny {
		return Admission{}, dtl.Deny(fmt.Errorf("%w: %s may not reach this agent", dtl.ErrPolicy, r.Agent))
	}
	return Admission{
		Agent:  r.Agent,
		Kind:   FlowKind(r.Kind),
		FlowID: r.Flow,
		Local:  overlayAddr("dst." + req.Zone),
		Remote: overlayAddr(r.Agent + "." + req.Zone),
		Info:   r,
	}, nil
}

type testNode struct {
	ep       *Endpoint
	id       string
	pc       net.PacketConn
	addr     netip.AddrPort
	verifier *nodeVerifier
	admitter *jsonAdmitter
	streams  chan *FlowConn
	packets  chan *PacketFlow
	refusals chan Refusal
}

type nodeOpt func(*Config)

func withLimits(l Limits) nodeOpt          { return func(c *Config) { c.Limits = l } }
func withClock(f func() time.Time) nodeOpt { return func(c *Config) { c.Clock = f } }

func quietLogger() *slog.Logger {
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// fastLimits keeps failure paths quick in tests.
func fastLimits() Limits {
	return Limits{
		HandshakeTimeout:  2 * time.Second,
		FirstFrameTimeout: 300 * time.Millisecond,
		BackoffBase:       20 * time.Millisecond,
		BackoffMax:        200 * time.Millisecond,
	}
}

// startNode starts an endpoint for node name holding cert zones; it serves those zones unless an
// option says otherwise. listen "" picks a free port.
func startNode(t testing.TB, pki *testPKI, name string, cert tls.Certificate, zones []string, listen string, opts ...nodeOpt) *testNode {
	t.Helper()
	if listen == "" {
		listen = "127.0.0.1:0"
	}
	pc, err := net.ListenPacket("udp", listen)
	require.NoError(t, err)
	n := &testNode{
		id:       identity.NodeID(pki.cert.ID.TrustDomain, name).String(),
		pc:       pc,
		addr:     pc.LocalAddr().(*net.UDPAddr).AddrPort(),
		verifier: newNodeVerifier(pki),
		admitter: &jsonAdmitter{},
		streams:  make(chan *FlowConn, 64),
		packets:  make(chan *PacketFlow, 64),
		refusals: make(chan Refusal, 16),
	}
	cfg := Config{
		PacketConn:    pc,
		Certificate:   cert,
		Zones:         zones,
		Verifier:      n.verifier,
		Admitter:      n.admitter,
		StreamHandler: func(c *FlowConn) { n.streams <- c },
		PacketHandler: func(p *PacketFlow) { n.packets <- p },
		OnRefused: func(r Refusal) {
			select {
			case n.refusals <- r:
			default:
			}
		},
		Logger: quietLogger(),
		Limits: fastLimits(),
	}
	for _, o := range opts {
		o(&cfg)
	}
	n.ep, err = New(cfg)
	require.NoError(t, err)
	t.Cleanup(n.stop)
	return n
}

func (n *testNode) stop() {
	_ = n.ep.Close()
	_ = n.pc.Close()
}

// pair starts two nodes a and b holding zone(s) and returns a's tunnel to b.
func pair(t testing.TB, zones ...string) (a, b *testNode, tun *Tunnel) {
	t.Helper()
	pki := newPKI(t, testTD)
	a = startNode(t, pki, "a", pki.node(t, "a", zones...), zones, "")
	b = startNode(t, pki, "b", pki.node(t, "b", zones...), zones, "")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	tun, err := a.ep.Dial(ctx, b.addr, b.id, zones[0])
	require.NoError(t, err)
	return a, b, tun
}

func recvStream(t testing.TB, n *testNode) *FlowConn {
	t.Helper()
	select {
	case c := <-n.streams:
		return c
	case <-time.After(5 * time.Second):
		t.Fatal("no stream flow delivered")
		return nil
	}
}

func ctxT(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// dialConcurrently dials b's zone tunnel from a n times at once and returns every result, so that
// tests can check the dials shared one tunnel.
func dialConcurrently(t testing.TB, a, b *testNode, zone string, n int) []*Tunnel {
	t.Helper()
	ctx := ctxT(t)
	var wg sync.WaitGroup
	got := make([]*Tunnel, n)
	for i := range got {
		wg.Go(func() {
			tun, err := a.ep.Dial(ctx, b.addr, b.id, zone)
			assert.NoError(t, err)
			got[i] = tun
		})
	}
	wg.Wait()
	return got
}
