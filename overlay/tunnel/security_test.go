package tunnel

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/overlay/dtl"
)

func nextRefusal(t *testing.T, n *testNode) Refusal {
	t.Helper()
	select {
	case r := <-n.refusals:
		return r
	case <-time.After(5 * time.Second):
		t.Fatal("no refusal reported")
		return Refusal{}
	}
}

// TestHandshakeRefusedFromAttackerSide: a peer outside the zone, revoked, or from another trust
// domain never gets a tunnel; the server refuses in VerifyConnection with the verifier's error and
// the attacker's Dial fails.
func TestHandshakeRefusedFromAttackerSide(t *testing.T) {
	pki := newPKI(t, testTD)
	evil := newPKI(t, "evil.internal")
	cases := []struct {
		name     string
		cert     func() ([]string, *testPKI)
		revoke   bool
		wantSrv  error
		attacker string
	}{
		{
			name:     "node of another zone claims payments",
			cert:     func() ([]string, *testPKI) { return []string{"support"}, pki },
			wantSrv:  errNotInZone,
			attacker: "intruder",
		},
		{
			name:     "revoked node",
			cert:     func() ([]string, *testPKI) { return []string{"payments"}, pki },
			revoke:   true,
			wantSrv:  errRevoked,
			attacker: "revoked",
		},
		{
			name:     "node of another trust domain",
			cert:     func() ([]string, *testPKI) { return []string{"payments"}, evil },
			wantSrv:  identity.ErrTrustDomain,
			attacker: "foreign",
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			server := startNode(t, pki, "b", pki.node(t, "b", "payments"), []string{"payments"}, "")
			certZones, issuer := tc.cert()
			// The attacker serves "payments" whatever its certificate says.
			attacker := startNode(t, issuer, tc.attacker, issuer.node(t, tc.attacker, certZones...), []string{"payments"}, "")
			if tc.revoke {
				server.verifier.revoke(attacker.id)
			}
			// The attacker's own verifier trusts the server, so only the server's check stands.
			attacker.verifier.v = identity.Verifier{Authority: pki.cert}

			_, err := attacker.ep.Dial(ctxT(t), server.addr, server.id, "payments")
			require.ErrorIs(t, err, ErrRefusedByPeer)

			r := nextRefusal(t, server)
			assert.Equal(t, "payments", r.Zone)
			require.ErrorIs(t, r.Err, ErrPeerRefused)
			require.ErrorIs(t, r.Err, tc.wantSrv)
			st := server.ep.Stats()
			assert.Equal(t, uint64(1), st.HandshakesRefused)
			assert.Equal(t, 0, st.Tunnels, "no tunnel exists on the server")
			assert.Equal(t, uint64(0), st.TunnelsOpened)
			assert.Zero(t, server.admitter.calls.Load())
		})
	}
}

// TestClientRefusesServer: the dialing side verifies the server just as strictly.
func TestClientRefusesServer(t *testing.T) {
	pki := newPKI(t, testTD)
	t.Run("revoked server", func(t *testing.T) {
		a := startNode(t, pki, "a", pki.node(t, "a", "payments"), []string{"payments"}, "")
		b := startNode(t, pki, "b", pki.node(t, "b", "payments"), []string{"payments"}, "")
		a.verifier.revoke(b.id)
		_, err := a.ep.Dial(ctxT(t), b.addr, b.id, "payments")
		require.ErrorIs(t, err, ErrPeerRefused)
		require.ErrorIs(t, err, errRevoked)
		assert.Equal(t, uint64(1), a.ep.Stats().HandshakesRefused)
		assert.Equal(t, 0, b.ep.Stats().Tunnels)
	})
	t.Run("server is another node than dialed", func(t *testing.T) {
		a := startNode(t, pki, "a", pki.node(t, "a", "payments"), []string{"payments"}, "")
		b := startNode(t, pki, "b", pki.node(t, "b", "payments"), []string{"payments"}, "")
		_, err := a.ep.Dial(ctxT(t), b.addr, "spiffe://acme.internal/node/c", "payments")
		require.ErrorIs(t, err, ErrPeerMismatch)
	})
	t.Run("server certificate lacks the zone it offers", func(t *testing.T) {
		a := startNode(t, pki, "a", pki.node(t, "a", "payments"), []string{"payments"}, "")
		b := startNode(t, pki, "b", pki.node(t, "b", "support"), []string{"payments"}, "")
		_, err := a.ep.Dial(ctxT(t), b.addr, b.id, "payments")
		require.ErrorIs(t, err, ErrPeerRefused)
		require.ErrorIs(t, err, errNotInZone)
	})
}

// TestServerLackingZoneFailsALPN: a server that does not hold the zone never offers its ALPN, so
// the handshake fails before any certificate is considered.
func TestServerLackingZoneFailsALPN(t *testing.T) {
	pki := newPKI(t, testTD)
	a := startNode(t, pki, "a", pki.node(t, "a", "payments", "support"), []string{"payments", "support"}, "")
	b := startNode(t, pki, "b", pki.node(t, "b", "support"), []string{"support"}, "")
	_, err := a.ep.Dial(ctxT(t), b.addr, b.id, "payments")
	require.ErrorIs(t, err, ErrZoneNotOffered)
	assert.Equal(t, 0, b.ep.Stats().Tunnels)
	// The two nodes share "support": that tunnel works and carries only support.
	tun, err := a.ep.Dial(ctxT(t), b.addr, b.id, "support")
	require.NoError(t, err)
	assert.Equal(t, "support", tun.Zone())
	// A zone this node does not hold is refused locally.
	_, err = b.ep.Dial(ctxT(t), a.addr, a.id, "payments")
	require.ErrorIs(t, err, ErrZoneNotServed)
}

// TestRejectedFlowDeliversNothing: the attacker sends a record the admitter refuses followed by
// payload in the same write; the handler is never called and not one payload byte is read.
func TestRejectedFlowDeliversNothing(t *testing.T) {
	_, b, tun := pair(t, "payments")
	record := rec(t, testRecord{Agent: "mallory", Deny: true})

	str, err := tun.conn.OpenStreamSync(ctxT(t))
	require.NoError(t, err)
	frame := []byte{byte(dtl.FrameRecord), 0, 0}
	binary.BigEndian.PutUint16(frame[1:], uint16(len(record)))
	frame = append(frame, record...)
	payload := []byte("GET /ledger HTTP/1.1\r\n\r\nsecret exfiltration attempt")
	_, err = str.Write(append(frame, payload...))
	require.NoError(t, err)

	err = readVerdict(str)
	var rej *RejectedError
	require.ErrorAs(t, err, &rej)
	assert.Equal(t, "policy", rej.Reason)
	require.ErrorIs(t, err, dtl.ErrPolicy)
	require.ErrorIs(t, err, ErrRejected)

	// The receiver stopped reading: further writes fail with its STOP_SENDING code.
	require.Eventually(t, func() bool {
		_, err := str.Write(make([]byte, 1024))
		var se *quic.StreamError
		return errors.As(err, &se) && se.ErrorCode == streamCodeReject
	}, 2*time.Second, 10*time.Millisecond)

	assert.Equal(t, int64(len(frame)), b.ep.preAdmitRead.Load(), "exactly the record frame was read")
	select {
	case <-b.streams:
		t.Fatal("handler received a rejected flow")
	default:
	}
	st := b.ep.Stats()
	assert.Equal(t, uint64(1), st.FlowsDenied)
	assert.Equal(t, uint64(0), st.FlowsAdmitted)
	assert.Equal(t, 0, st.ActiveFlows)

	// Through the API the refusal is the typed error.
	_, err = tun.OpenFlow(ctxT(t), record, nil, nil)
	require.ErrorAs(t, err, &rej)
	require.ErrorIs(t, err, dtl.ErrPolicy)
}

// TestBadFirstFrames: garbage, truncated, oversized, wrong-type and slow first frames are dropped
// without calling the admitter or a handler.
func TestBadFirstFrames(t *testing.T) {
	hdr := func(typ byte, n int) []byte {
		b := []byte{typ, 0, 0}
		binary.BigEndian.PutUint16(b[1:], uint16(n))
		return b
	}
	cases := []struct {
		name  string
		bytes []byte
		fin   bool
	}{
		{"garbage type", []byte("\x09garbage garbage"), true},
		{"truncated header", []byte{byte(dtl.FrameRecord), 0}, true},
		{"truncated body", append(hdr(byte(dtl.FrameRecord), 100), make([]byte, 10)...), true},
		{"oversized record", append(hdr(byte(dtl.FrameRecord), dtl.MaxRecordSize+1), make([]byte, 64)...), false},
		{"accept as first frame", hdr(byte(dtl.FrameAccept), 0), false},
		{"reject as first frame", append(hdr(byte(dtl.FrameReject), 2), 0xa0, 0xa0), false},
		{"empty record", hdr(byte(dtl.FrameRecord), 0), false},
		{"silent opener", nil, false},
		{"empty stream", nil, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, b, tun := pair(t, "payments")
			str, err := tun.conn.OpenStreamSync(ctxT(t))
			require.NoError(t, err)
			if tc.bytes != nil {
				_, err = str.Write(tc.bytes)
				require.NoError(t, err)
			} else if !tc.fin {
				// A stream only reaches the peer once it carries a frame; an empty write with
				// a zero-length STREAM frame is not possible, so send the first header byte.
				_, err = str.Write([]byte{byte(dtl.FrameRecord)})
				require.NoError(t, err)
			}
			if tc.fin {
				// The receiver may already have read the bad bytes and reset the stream, in which
				// case quic-go refuses the FIN; the reset asserted below is what matters.
				_ = str.Close()
			}
			_ = str.SetReadDeadline(time.Now().Add(5 * time.Second))
			_, err = io.ReadAll(str)
			var se *quic.StreamError
			require.ErrorAs(t, err, &se)
			assert.Equal(t, streamCodeBad, se.ErrorCode)

			st := b.ep.Stats()
			assert.Equal(t, uint64(1), st.FlowsDropped)
			assert.Zero(t, b.admitter.calls.Load())
			assert.LessOrEqual(t, b.ep.preAdmitRead.Load(), int64(dtl.FrameHeaderLen+100))
			select {
			case <-b.streams:
				t.Fatal("handler received a dropped flow")
			default:
			}
		})
	}
}

func TestRecordTooLargeRefusedBySender(t *testing.T) {
	_, _, tun := pair(t, "payments")
	_, err := tun.OpenFlow(ctxT(t), make([]byte, dtl.MaxRecordSize+1), nil, nil)
	require.ErrorIs(t, err, ErrFrameTooLarge)
}

func TestFlowLimits(t *testing.T) {
	pki := newPKI(t, testTD)
	lim := fastLimits()
	lim.MaxFlowsPerPeer = 3
	lim.MaxFlowsPerAgent = 2
	a := startNode(t, pki, "a", pki.node(t, "a", "payments"), []string{"payments"}, "")
	b := startNode(t, pki, "b", pki.node(t, "b", "payments"), []string{"payments"}, "", withLimits(lim))
	tun, err := a.ep.Dial(ctxT(t), b.addr, b.id, "payments")
	require.NoError(t, err)
	ctx := ctxT(t)
	open := func(agent string) error {
		c, err := tun.OpenFlow(ctx, rec(t, testRecord{Agent: agent}), nil, nil)
		if err == nil {
			t.Cleanup(func() { _ = c.Close() })
		}
		return err
	}
	require.NoError(t, open("billing"))
	require.NoError(t, open("billing"))
	err = open("billing")
	require.ErrorIs(t, err, dtl.ErrLimit, "per-agent limit")
	var rej *RejectedError
	require.ErrorAs(t, err, &rej)
	assert.Equal(t, "limit", rej.Reason)

	require.NoError(t, open("reports"))
	require.ErrorIs(t, open("audit"), dtl.ErrLimit, "per-peer limit")
	assert.Equal(t, 3, b.ep.Stats().ActiveFlows)
	assert.Equal(t, uint64(2), b.ep.Stats().FlowsDenied)

	// Closing a flow on the receiving side frees its place.
	s := recvStream(t, b)
	require.NoError(t, s.Close())
	require.NoError(t, open("audit"))
}

func TestIdleFlowsExpire(t *testing.T) {
	pki := newPKI(t, testTD)
	var mu = make(chan struct{}, 1)
	now := time.Unix(1_700_000_000, 0)
	clock := func() time.Time { mu <- struct{}{}; defer func() { <-mu }(); return now }
	advance := func(d time.Duration) { mu <- struct{}{}; now = now.Add(d); <-mu }
	lim := fastLimits()
	lim.FlowIdleTimeout = time.Minute
	lim.SweepInterval = time.Hour // the test sweeps by hand
	a := startNode(t, pki, "a", pki.node(t, "a", "payments"), []string{"payments"}, "")
	b := startNode(t, pki, "b", pki.node(t, "b", "payments"), []string{"payments"}, "", withLimits(lim), withClock(clock))
	tun, err := a.ep.Dial(ctxT(t), b.addr, b.id, "payments")
	require.NoError(t, err)
	ctx := ctxT(t)

	idle, err := tun.OpenFlow(ctx, rec(t, testRecord{Agent: "idle"}), nil, nil)
	require.NoError(t, err)
	idleSrv := recvStream(t, b)
	busy, err := tun.OpenFlow(ctx, rec(t, testRecord{Agent: "busy"}), nil, nil)
	require.NoError(t, err)
	busySrv := recvStream(t, b)
	_ = idle

	advance(45 * time.Second)
	_, err = busy.Write([]byte("ping"))
	require.NoError(t, err)
	_, err = io.ReadFull(busySrv, make([]byte, 4))
	require.NoError(t, err)
	assert.Zero(t, b.ep.SweepIdle(), "nothing idle for a minute yet")

	advance(30 * time.Second)
	assert.Equal(t, 1, b.ep.SweepIdle())
	_, err = idleSrv.Read(make([]byte, 1))
	require.ErrorIs(t, err, ErrFlowIdle)
	_, err = io.ReadAll(idle)
	var se *quic.StreamError
	require.ErrorAs(t, err, &se)
	assert.Equal(t, streamCodeIdle, se.ErrorCode)
	st := b.ep.Stats()
	assert.Equal(t, uint64(1), st.FlowsExpired)
	assert.Equal(t, 1, st.ActiveFlows)
}

func TestReconnectAfterPeerRestart(t *testing.T) {
	pki := newPKI(t, testTD)
	bCert := pki.node(t, "b", "payments")
	a := startNode(t, pki, "a", pki.node(t, "a", "payments"), []string{"payments"}, "")
	b := startNode(t, pki, "b", bCert, []string{"payments"}, "")
	addr := b.addr.String()
	first, err := a.ep.Dial(ctxT(t), b.addr, b.id, "payments")
	require.NoError(t, err)

	b.stop()
	b2 := startNode(t, pki, "b", bCert, []string{"payments"}, addr)

	// The restarted node shares the stateless reset key (derived from its node key), so the old
	// tunnel dies on its next packet instead of after the idle timeout.
	_, _ = first.OpenFlow(ctxT(t), rec(t, testRecord{Agent: "x"}), nil, nil)
	select {
	case <-first.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("old tunnel still alive after the peer restarted")
	}
	second, err := a.ep.Dial(ctxT(t), b2.addr, b2.id, "payments")
	require.NoError(t, err)
	require.NotSame(t, first, second)
	c, err := second.OpenFlow(ctxT(t), rec(t, testRecord{Agent: "x"}), nil, nil)
	require.NoError(t, err)
	defer c.Close()
	recvStream(t, b2).Close()
}

func TestDialRetriesUntilPeerComesUp(t *testing.T) {
	pki := newPKI(t, testTD)
	bCert := pki.node(t, "b", "payments")
	lim := fastLimits()
	lim.HandshakeTimeout = 300 * time.Millisecond
	lim.DialAttempts = 20
	a := startNode(t, pki, "a", pki.node(t, "a", "payments"), []string{"payments"}, "", withLimits(lim))
	// Reserve a port, release it, and bring the peer up there a little later.
	placeholder := startNode(t, pki, "b", bCert, []string{"payments"}, "")
	addr, id := placeholder.addr, placeholder.id
	placeholder.stop()

	started := make(chan *testNode, 1)
	go func() {
		time.Sleep(500 * time.Millisecond)
		started <- startNode(t, pki, "b", bCert, []string{"payments"}, addr.String())
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	tun, err := a.ep.Dial(ctx, addr, id, "payments")
	<-started
	require.NoError(t, err)
	assert.True(t, tun.Alive())
	assert.Positive(t, a.ep.Stats().DialFailures, "at least one attempt failed before the peer was up")
}

func TestDialGivesUpAfterAttempts(t *testing.T) {
	pki := newPKI(t, testTD)
	lim := fastLimits()
	lim.HandshakeTimeout = 100 * time.Millisecond
	lim.DialAttempts = 3
	a := startNode(t, pki, "a", pki.node(t, "a", "payments"), []string{"payments"}, "", withLimits(lim))
	gone := startNode(t, pki, "b", pki.node(t, "b", "payments"), []string{"payments"}, "")
	gone.stop()
	_, err := a.ep.Dial(ctxT(t), gone.addr, gone.id, "payments")
	require.Error(t, err)
	var timeout *quic.IdleTimeoutError
	var hs *quic.HandshakeTimeoutError
	assert.True(t, errors.As(err, &timeout) || errors.As(err, &hs) || errors.Is(err, context.DeadlineExceeded), "got %v", err)
	assert.Equal(t, uint64(3), a.ep.Stats().DialFailures)
}

func TestBackoffIsJitteredAndCapped(t *testing.T) {
	l := Limits{BackoffBase: 100 * time.Millisecond, BackoffMax: time.Second}
	for attempt := 1; attempt <= 40; attempt++ {
		want := min(l.BackoffBase<<min(attempt-1, 30), l.BackoffMax)
		d := l.backoff(attempt)
		assert.GreaterOrEqual(t, d, want/2, "attempt %d", attempt)
		assert.LessOrEqual(t, d, want, "attempt %d", attempt)
	}
}
