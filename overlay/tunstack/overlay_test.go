package tunstack

import (
	"context"
	"crypto/ed25519"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/overlay/tunnel"
)

// The stack spliced to real overlay packet flows: two tunnel endpoints on loopback QUIC, with
// real node certificates, the far one echoing every datagram of every packet flow.

const overlayZone = "payments"

type overlayPKI struct {
	key  ed25519.PrivateKey
	cert *identity.Certificate
}

func (p *overlayPKI) node(t *testing.T, name string) (tls.Certificate, string) {
	t.Helper()
	key, err := identity.GenerateKey()
	require.NoError(t, err)
	now := time.Now()
	id := identity.NodeID(p.cert.ID.TrustDomain, name)
	cert, err := identity.Issue(p.cert, p.key, identity.IssueRequest{
		ID:        id,
		PublicKey: key.Public().(ed25519.PublicKey),
		Claims: identity.Claims{
			Zones:       []identity.ZoneGrant{{Name: overlayZone, Prefixes: []netip.Prefix{netip.MustParsePrefix("100.80.0.0/16")}}},
			Regions:     []string{"eu-west-1"},
			Fingerprint: make([]byte, 32),
		},
		NotBefore: now.Add(-time.Minute),
		NotAfter:  now.Add(time.Hour),
	})
	require.NoError(t, err)
	tc, err := identity.TLSCertificate(key, cert)
	require.NoError(t, err)
	return tc, id.String()
}

type overlayVerifier struct{ v identity.Verifier }

func (o overlayVerifier) VerifyPeer(_ string, raw [][]byte) (tunnel.Peer, error) {
	cert, err := o.v.VerifyNodeDER(raw, time.Now())
	if err != nil {
		return tunnel.Peer{}, err
	}
	return tunnel.Peer{NodeID: cert.ID.String(), Certificate: cert.X509, Info: cert}, nil
}

// flowAdmitter admits every packet flow; the record is just the flow id (the tunnel is under
// test here, not admission).
type flowAdmitter struct{}

func (flowAdmitter) Admit(_ context.Context, req tunnel.FlowRequest) (tunnel.Admission, error) {
	if len(req.Record) != 8 {
		return tunnel.Admission{}, errors.New("test: record is not a flow id")
	}
	return tunnel.Admission{Agent: "program", Kind: tunnel.KindPacket, FlowID: binary.BigEndian.Uint64(req.Record)}, nil
}

// overlayEcho starts the far node, which echoes every datagram, and returns a tunnel to it.
func overlayEcho(t *testing.T) *tunnel.Tunnel {
	t.Helper()
	key, err := identity.GenerateKey()
	require.NoError(t, err)
	ca, err := identity.NewAuthority("acme.internal", key, time.Now().Add(-time.Hour), 48*time.Hour)
	require.NoError(t, err)
	pki := &overlayPKI{key: key, cert: ca}
	var echoes sync.WaitGroup
	start := func(name string, handler func(*tunnel.PacketFlow)) (*tunnel.Endpoint, netip.AddrPort, string) {
		pc, err := net.ListenPacket("udp", "127.0.0.1:0")
		require.NoError(t, err)
		cert, id := pki.node(t, name)
		ep, err := tunnel.New(tunnel.Config{
			PacketConn: pc, Certificate: cert, Zones: []string{overlayZone},
			Verifier: overlayVerifier{identity.Verifier{Authority: ca}}, Admitter: flowAdmitter{},
			PacketHandler: handler, Logger: slog.New(slog.DiscardHandler),
		})
		require.NoError(t, err)
		t.Cleanup(func() { _ = ep.Close(); echoes.Wait(); _ = pc.Close() })
		return ep, pc.LocalAddr().(*net.UDPAddr).AddrPort(), id
	}
	_, addr, id := start("far", func(pf *tunnel.PacketFlow) {
		echoes.Go(func() {
			defer pf.Close()
			for {
				b, err := pf.Receive(context.Background())
				if err != nil {
					return
				}
				if err := pf.Send(b); err != nil && !errors.Is(err, tunnel.ErrSendQueueFull) {
					return
				}
			}
		})
	})
	near, _, _ := start("near", nil)
	tun, err := near.Dial(ctx(t), addr, id, overlayZone)
	require.NoError(t, err)
	return tun
}

// flowConn is an overlay packet flow as the connected datagram conn a Handler returns: one Read
// or Write is one datagram.
type flowConn struct {
	pf *tunnel.PacketFlow

	mu       sync.Mutex
	deadline time.Time
}

func (c *flowConn) Read(p []byte) (int, error) {
	c.mu.Lock()
	dl := c.deadline
	c.mu.Unlock()
	ctx := context.Background()
	if !dl.IsZero() {
		var cancel context.CancelFunc
		ctx, cancel = context.WithDeadline(ctx, dl)
		defer cancel()
	}
	b, err := c.pf.Receive(ctx)
	if errors.Is(err, context.DeadlineExceeded) {
		return 0, &net.OpError{Op: "read", Net: "udp", Err: errTimeout{}}
	}
	if err != nil {
		return 0, err
	}
	return copy(p, b), nil
}

type errTimeout struct{}

func (errTimeout) Error() string   { return "i/o timeout" }
func (errTimeout) Timeout() bool   { return true }
func (errTimeout) Temporary() bool { return true }

func (c *flowConn) Write(p []byte) (int, error) {
	if err := c.pf.Send(p); err != nil {
		return 0, err
	}
	return len(p), nil
}

func (c *flowConn) Close() error                     { return c.pf.Close() }
func (c *flowConn) LocalAddr() net.Addr              { return c.pf.LocalAddr() }
func (c *flowConn) RemoteAddr() net.Addr             { return c.pf.RemoteAddr() }
func (c *flowConn) SetDeadline(t time.Time) error    { return c.SetReadDeadline(t) }
func (c *flowConn) SetWriteDeadline(time.Time) error { return nil }
func (c *flowConn) SetReadDeadline(t time.Time) error {
	c.mu.Lock()
	c.deadline = t
	c.mu.Unlock()
	return nil
}

// overlayHandler opens a packet flow on tun for every UDP flow a local program starts.
type overlayHandler struct{ tun *tunnel.Tunnel }

func (h overlayHandler) Outbound(ctx context.Context, proto string, _, _ netip.AddrPort) (net.Conn, error) {
	if proto != UDP {
		return nil, errRefused
	}
	id := h.tun.NewFlowID()
	pf, err := h.tun.OpenPacketFlow(ctx, id, binary.BigEndian.AppendUint64(nil, id), nil, nil)
	if err != nil {
		return nil, err
	}
	return &flowConn{pf: pf}, nil
}

// TestLargeUDPThroughTheOverlay: a local program's UDP datagrams far larger than a QUIC
// datagram cross the interface, the stack and a real overlay packet flow to the far node, and
// its echo comes back the same way, whole. The interface has the default MTU, so the program's
// datagrams are not fragmented on the way in.
func TestLargeUDPThroughTheOverlay(t *testing.T) {
	tun := overlayEcho(t)
	k := newKernelMTU(t, DefaultMTU)
	st, err := New(k.dev, DefaultMTU, overlayHandler{tun}, nil, Options{UDPIdle: 5 * time.Second})
	require.NoError(t, err)
	st.SetLocal([]netip.Addr{agentA})
	t.Cleanup(func() { require.NoError(t, st.Close()) })

	uc, err := k.net.DialUDPAddrPort(netip.AddrPortFrom(agentA, 5000), netip.AddrPortFrom(remote, 9000))
	require.NoError(t, err)
	defer uc.Close()
	buf := make([]byte, 65535)
	for i, n := range []int{100, 4000, 60000, 1200, DefaultMTU - 28} {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			msg := make([]byte, n)
			for j := range msg {
				msg[j] = byte(j*13 + i)
			}
			_, err := uc.Write(msg)
			require.NoError(t, err)
			require.NoError(t, uc.SetReadDeadline(time.Now().Add(5*time.Second)))
			got, err := uc.Read(buf)
			require.NoError(t, err, "the echo of the %d-byte datagram", n)
			require.Equal(t, n, got)
			assert.Equal(t, msg, buf[:got])
		})
	}
	s := st.Stats()
	assert.Zero(t, s.UDPDropped)
	assert.Zero(t, s.Unsupported, "no fragments")
	assert.EqualValues(t, 1, s.Outbound, "one flow")

	// Past the interface MTU (65,520 - 28 header bytes over IPv4) the sender's IP layer
	// fragments the datagram, and the filter drops fragments: the MTU is the limit over ute0.
	_, err = uc.Write(make([]byte, DefaultMTU-28+1))
	require.NoError(t, err)
	require.Eventually(t, func() bool { return st.Stats().Unsupported >= 1 }, 5*time.Second, 10*time.Millisecond)
	require.NoError(t, uc.SetReadDeadline(time.Now().Add(200*time.Millisecond)))
	_, err = uc.Read(buf)
	require.Error(t, err, "nothing came back")
}
