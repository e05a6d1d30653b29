// Package gossiptest builds real test nodes for gossip tests: an authority and node certificates
// through package identity, a PeerVerifier with zone grants and a revocation set, and a tunnel
// endpoint on a loopback UDP socket with a gossip Mux plugged into its control hooks.
//
// It is for tests only (it takes a testing.TB and fails the test on setup errors); it must never
// be imported by production code.
package gossiptest

import (
	"context"
	"crypto/ed25519"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/overlay/dtl"
	"github.com/ute-project/ute/overlay/gossip"
	"github.com/ute-project/ute/overlay/tunnel"
)

// Refusal sentinels of the test verifier.
var (
	ErrNotInZone = errors.New("gossiptest: node does not hold the zone")
	ErrRevoked   = errors.New("gossiptest: node is revoked")
)

// Authority is a real trust-domain root issuing node certificates.
type Authority struct {
	TrustDomain string
	Key         ed25519.PrivateKey
	Cert        *identity.Certificate
	now         time.Time
}

// NewAuthority creates an authority for td.
func NewAuthority(t testing.TB, td string) *Authority {
	t.Helper()
	key, err := identity.GenerateKey()
	require.NoError(t, err)
	now := time.Now()
	cert, err := identity.NewAuthority(td, key, now.Add(-time.Hour), 48*time.Hour)
	require.NoError(t, err)
	return &Authority{TrustDomain: td, Key: key, Cert: cert, now: now}
}

// NodeID is the SPIFFE ID string of node name.
func (a *Authority) NodeID(name string) string {
	return identity.NodeID(a.TrustDomain, name).String()
}

// NodeCert issues a node certificate for name granting zones.
func (a *Authority) NodeCert(t testing.TB, name string, zones ...string) tls.Certificate {
	t.Helper()
	key, err := identity.GenerateKey()
	require.NoError(t, err)
	var grants []identity.ZoneGrant
	for i, z := range zones {
		grants = append(grants, identity.ZoneGrant{Name: z, Prefixes: []netip.Prefix{netip.MustParsePrefix(fmt.Sprintf("100.100.%d.0/24", i+1))}})
	}
	cert, err := identity.Issue(a.Cert, a.Key, identity.IssueRequest{
		ID:        identity.NodeID(a.TrustDomain, name),
		PublicKey: key.Public().(ed25519.PublicKey),
		Claims:    identity.Claims{Zones: grants, Regions: []string{"eu-west-1"}, Fingerprint: make([]byte, 32)},
		NotBefore: a.now.Add(-time.Minute),
		NotAfter:  a.now.Add(24 * time.Hour),
	})
	require.NoError(t, err)
	tc, err := identity.TLSCertificate(key, cert)
	require.NoError(t, err)
	return tc
}

// Verifier is the PeerVerifier a node builds: chain to the authority, zone grant, revocation set.
type Verifier struct {
	v       identity.Verifier
	mu      sync.Mutex
	revoked map[string]bool
}

// NewVerifier trusts a.
func NewVerifier(a *Authority) *Verifier {
	return &Verifier{v: identity.Verifier{Authority: a.Cert}, revoked: map[string]bool{}}
}

// Revoke refuses nodeID from now on.
func (v *Verifier) Revoke(nodeID string) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.revoked[nodeID] = true
}

// Revoked reports whether nodeID was revoked.
func (v *Verifier) Revoked(nodeID string) bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.revoked[nodeID]
}

// VerifyPeer implements tunnel.PeerVerifier.
func (v *Verifier) VerifyPeer(zone string, raw [][]byte) (tunnel.Peer, error) {
	cert, err := v.v.VerifyNodeDER(raw, time.Now())
	if err != nil {
		return tunnel.Peer{}, err
	}
	if _, ok := cert.Claims.Zone(zone); !ok {
		return tunnel.Peer{}, fmt.Errorf("%w: %s lacks %q", ErrNotInZone, cert.ID, zone)
	}
	if v.Revoked(cert.ID.String()) {
		return tunnel.Peer{}, fmt.Errorf("%w: %s", ErrRevoked, cert.ID)
	}
	return tunnel.Peer{NodeID: cert.ID.String(), Certificate: cert.X509, Info: cert}, nil
}

// denyAll refuses every flow: gossip nodes in these tests host no agents.
type denyAll struct{}

func (denyAll) Admit(context.Context, tunnel.FlowRequest) (tunnel.Admission, error) {
	return tunnel.Admission{}, dtl.Deny(fmt.Errorf("%w: no agents here", dtl.ErrUnreachable))
}

// Node is a test node: a tunnel endpoint on loopback with a gossip mux.
type Node struct {
	Name     string
	ID       string
	Addr     netip.AddrPort
	Zones    []string
	Endpoint *tunnel.Endpoint
	Mux      *gossip.Mux
	Verifier *Verifier
	Conn     net.PacketConn

	refusals chan tunnel.Refusal
	stopOnce sync.Once
}

// NodeOptions adjust StartNode.
type NodeOptions struct {
	// CertZones are the zones the certificate grants; default the served zones.
	CertZones []string
	// Authority issues the certificate; default the one passed to StartNode (which the
	// node's verifier trusts either way).
	Authority *Authority
	// Limits for the endpoint; default fast test limits.
	Limits *tunnel.Limits
}

// QuietLogger discards everything.
func QuietLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// FastLimits keeps failure paths quick.
func FastLimits() tunnel.Limits {
	return tunnel.Limits{
		HandshakeTimeout:  5 * time.Second, // generous: CI machines are loaded and -race is slow
		FirstFrameTimeout: time.Second,
		DialAttempts:      2,
		BackoffBase:       20 * time.Millisecond,
		BackoffMax:        100 * time.Millisecond,
	}
}

// StartNode starts node name serving zones, trusting auth. It stops when the test ends.
func StartNode(t testing.TB, auth *Authority, name string, zones []string, opt NodeOptions) *Node {
	t.Helper()
	issuer := auth
	if opt.Authority != nil {
		issuer = opt.Authority
	}
	certZones := opt.CertZones
	if certZones == nil {
		certZones = zones
	}
	lim := FastLimits()
	if opt.Limits != nil {
		lim = *opt.Limits
	}
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	require.NoError(t, err)
	n := &Node{
		Name:     name,
		ID:       issuer.NodeID(name),
		Addr:     pc.LocalAddr().(*net.UDPAddr).AddrPort(),
		Zones:    zones,
		Mux:      gossip.NewMux(QuietLogger()),
		Verifier: NewVerifier(auth),
		Conn:     pc,
		refusals: make(chan tunnel.Refusal, 64),
	}
	n.Endpoint, err = tunnel.New(tunnel.Config{
		PacketConn:      pc,
		Certificate:     issuer.NodeCert(t, name, certZones...),
		Zones:           zones,
		Verifier:        n.Verifier,
		Admitter:        denyAll{},
		ControlHandler:  n.Mux.ControlHandler,
		ControlDatagram: n.Mux.ControlDatagram,
		OnTunnel:        n.Mux.TunnelUp,
		OnRefused: func(r tunnel.Refusal) {
			select {
			case n.refusals <- r:
			default:
			}
		},
		Logger: QuietLogger(),
		Limits: lim,
	})
	if err != nil {
		_ = pc.Close()
	}
	require.NoError(t, err)
	t.Cleanup(n.Stop)
	return n
}

// Stop closes the endpoint and its socket (idempotent).
func (n *Node) Stop() {
	n.stopOnce.Do(func() {
		_ = n.Endpoint.Close()
		_ = n.Conn.Close()
	})
}

// Refusals returns the handshakes this node refused so far (non-blocking drain).
func (n *Node) Refusals() []tunnel.Refusal {
	var out []tunnel.Refusal
	for {
		select {
		case r := <-n.refusals:
			out = append(out, r)
		default:
			return out
		}
	}
}
