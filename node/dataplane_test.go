package node

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/node/state"
	"github.com/ute-project/ute/overlay/audit"
	"github.com/ute-project/ute/overlay/dtl"
	"github.com/ute-project/ute/overlay/tunnel"
)

// holdServer accepts flows and reads them, counting bytes; each conn's final read error is sent
// on errs. It never closes a conn itself, so only UTE can end a flow.
type holdServer struct {
	bytes atomic.Int64
	conns chan net.Conn
	errs  chan error
}

func serveHold(t *testing.T, a *Agent, port string) *holdServer {
	t.Helper()
	l, err := a.Listen("tcp", ":"+port)
	require.NoError(t, err)
	h := &holdServer{conns: make(chan net.Conn, 8), errs: make(chan error, 8)}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			h.conns <- c
			go func() {
				buf := make([]byte, 4096)
				for {
					n, err := c.Read(buf)
					h.bytes.Add(int64(n))
					if err != nil {
						h.errs <- err
						return
					}
				}
			}()
		}
	}()
	t.Cleanup(func() { _ = l.Close(); <-done })
	return h
}

// revokeEnv: node a hosts billing-api and billing-ops (payments), node b hosts ledger.
func revokeEnv(t *testing.T) (a, b *testNode, billing, ops *Agent, hold *holdServer) {
	ns := cluster(t,
		nodeSpec{name: "a", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "billing-api", Zone: "payments"}, {Name: "billing-ops", Zone: "payments"}}},
		nodeSpec{name: "b", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "ledger", Zone: "payments"}}},
	)
	a, b = ns["a"], ns["b"]
	hold = serveHold(t, agent(t, b, "payments", "ledger"), "8080")
	return a, b, agent(t, a, "payments", "billing-api"), agent(t, a, "payments", "billing-ops"), hold
}

// openHeld dials ledger, moves 1 KiB and returns the client conn and the server's conn.
func openHeld(t *testing.T, from *Agent, hold *holdServer) (net.Conn, net.Conn) {
	t.Helper()
	before := hold.bytes.Load()
	c, err := from.Dial(context.Background(), "tcp", "ledger.payments:8080")
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Close() })
	var srv net.Conn
	select {
	case srv = <-hold.conns:
	case <-time.After(5 * time.Second):
		t.Fatal("flow not delivered")
	}
	_, err = c.Write(make([]byte, 1024))
	require.NoError(t, err)
	require.Eventually(t, func() bool { return hold.bytes.Load() == before+1024 }, 5*time.Second, 2*time.Millisecond)
	return c, srv
}

// requireFlowCut asserts that both ends of a held flow fail within a bounded time and that no
// byte written after the revocation reaches the server.
func requireFlowCut(t *testing.T, client net.Conn, hold *holdServer, delivered int64) {
	t.Helper()
	select {
	case err := <-hold.errs:
		require.Error(t, err)
		require.NotErrorIs(t, err, io.EOF, "a cut flow must not look finished")
		t.Logf("server side: %v", err)
	case <-time.After(2 * time.Second):
		t.Fatal("the server's conn is still open 2 s after the revocation")
	}
	_ = client.SetReadDeadline(time.Now().Add(2 * time.Second))
	_, err := client.Read(make([]byte, 16))
	require.Error(t, err)
	require.False(t, errors.Is(err, os.ErrDeadlineExceeded), "the client's conn must fail, not time out: %v", err)
	require.NotErrorIs(t, err, io.EOF, "a cut flow must not look finished")
	t.Logf("client side: %v", err)
	_, _ = client.Write(make([]byte, 4096))
	time.Sleep(50 * time.Millisecond)
	assert.Equal(t, delivered, hold.bytes.Load(), "no byte after the revocation is delivered")
}

func TestRevokeEndsEstablishedFlows(t *testing.T) {
	for _, tc := range []struct {
		name string
		// revoke revokes on the given node; it returns the node whose Revoke is called.
		revoke     func(t *testing.T, a, b *testNode, billing *Agent)
		tunnelDies bool
	}{
		{
			name: "node revoked at the receiver",
			revoke: func(t *testing.T, a, b *testNode, _ *Agent) {
				require.NoError(t, b.Revoke(context.Background(), a.ID().String(), "compromised"))
			},
			tunnelDies: true,
		},
		{
			name: "agent revoked at the receiver",
			revoke: func(t *testing.T, _, b *testNode, billing *Agent) {
				require.NoError(t, b.Revoke(context.Background(), billing.ID().String(), "drifted"))
			},
		},
		{
			name: "agent revoked at its own node",
			revoke: func(t *testing.T, a, _ *testNode, billing *Agent) {
				require.NoError(t, a.Revoke(context.Background(), serialKey(billing.cert), "drifted"))
			},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, b, billing, ops, hold := revokeEnv(t)
			c, _ := openHeld(t, billing, hold)
			other, _ := openHeld(t, ops, hold)
			tun, err := a.tunnelTo(context.Background(), b.ID().String(), "payments")
			require.NoError(t, err)

			start := time.Now()
			tc.revoke(t, a, b, billing)
			requireFlowCut(t, c, hold, 2048)
			t.Logf("cut in %v", time.Since(start))

			if tc.tunnelDies {
				require.Eventually(t, func() bool { return !tun.Alive() }, 2*time.Second, 2*time.Millisecond)
				return
			}
			// Only the revoked agent's flow ended: billing-ops keeps its flow and the tunnel.
			assert.True(t, tun.Alive())
			_, err = other.Write(make([]byte, 100))
			require.NoError(t, err)
			require.Eventually(t, func() bool { return hold.bytes.Load() == 2148 }, 5*time.Second, 2*time.Millisecond)
			_, err = billing.Dial(context.Background(), "tcp", "ledger.payments:8080")
			require.ErrorIs(t, err, dtl.ErrRevoked)
		})
	}
}

func TestRevokeEndsLocalFlows(t *testing.T) {
	ns := threeNodes(t)
	b := ns["b"]
	hold := serveHold(t, agent(t, b, "payments", "ledger"), "8080")
	batch := agent(t, b, "payments", "billing-batch")
	c, _ := openHeld(t, batch, hold)
	require.NoError(t, b.Revoke(context.Background(), batch.ID().String(), "drifted"))
	requireFlowCut(t, c, hold, 1024)
}

func TestChainCaching(t *testing.T) {
	ns := cluster(t,
		nodeSpec{name: "a", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "billing-api", Zone: "payments"}, {Name: "billing-ops", Zone: "payments"}}},
		nodeSpec{name: "b", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "ledger", Zone: "payments"}, {Name: "billing-batch", Zone: "payments"}}},
	)
	a, b := ns["a"], ns["b"]
	// billing-api signs a's directory exchanges (first by name); billing-ops never does, so its
	// chain reaches a session only through its own flows.
	billing := agent(t, a, "payments", "billing-api")
	ops := agent(t, a, "payments", "billing-ops")
	who := echoServer(t, agent(t, b, "payments", "ledger"), "8080")
	ctx := context.Background()
	dialFrom := func(from *Agent) *Provenance {
		t.Helper()
		c, err := from.Dial(ctx, "tcp", "ledger.payments:8080")
		require.NoError(t, err)
		exchangeMiB(t, c)
		require.NoError(t, c.Close())
		return <-who
	}
	dialOnce := func() *Provenance { return dialFrom(billing) }

	t.Run("the second flow on a session names its chain by hash", func(t *testing.T) {
		// The tunnel-up directory exchange was the session's first full-chain record, so even the
		// first Dial may already be hash-only; two dials make sure one of each was seen.
		first, second := dialOnce(), dialOnce()
		assert.True(t, second.chainCached)
		assert.Less(t, second.recordSize, 400, "hash-only record")
		assert.Equal(t, billing.IP(), second.SourceIP, "the source address survives the hash form")
		assert.Equal(t, billing.ID().String(), second.Agent)
		tun, err := a.tunnelTo(ctx, b.ID().String(), "payments")
		require.NoError(t, err)
		full, err := billing.Record(tun, toLedger)
		require.NoError(t, err)
		assert.Greater(t, len(full), 800, "full-chain record")
		t.Logf("record sizes: full %d B, hash-only %d B (first dial %d B)", len(full), second.recordSize, first.recordSize)
	})

	t.Run("hash-only record on a new session: chain-unknown, then the SDK resends the full chain", func(t *testing.T) {
		old, err := a.tunnelTo(ctx, b.ID().String(), "payments")
		require.NoError(t, err)
		require.NoError(t, old.Close())
		<-old.Done()
		fresh, err := a.tunnelTo(ctx, b.ID().String(), "payments")
		require.NoError(t, err)
		require.NotSame(t, old, fresh)
		// The new session's own directory exchange is done once a knows b admitted billing-api's
		// chain on it.
		hAPI := dtl.CertChain{Node: a.issuer.Raw(), Agent: billing.cert.Raw()}.Hash()
		require.Eventually(t, func() bool { return a.track(fresh).known.Known(hAPI) }, 5*time.Second, 2*time.Millisecond)

		// Raw: a hash b never admitted on this session is refused.
		h := dtl.CertChain{Node: a.issuer.Raw(), Agent: ops.cert.Raw()}.Hash()
		err = open(t, fresh, signCompact(t, ops, fresh, h[:], ops.key))
		require.ErrorIs(t, err, dtl.ErrChainUnknown)

		// SDK: make a's session state claim b knows ops' chain (as after b evicted it).
		ts := a.track(fresh)
		ts.known.Accepted(h)
		before := len(denials(t, b))
		p := dialFrom(ops)
		assert.False(t, p.chainCached, "the retry carried the full chain")
		assert.Equal(t, ops.ID().String(), p.Agent)
		// The SDK's first try is the raw probe's kind (same peer, reason, destination): the audit
		// log collapses it, and the summary counts it.
		require.NoError(t, b.audit.flushRefusals())
		assert.Equal(t, []string{"chain-unknown"}, denials(t, b)[before-1:], "the raw probe only: the SDK's first try is counted below")
		recs := auditEntries(t, b)
		last := recs[len(recs)-1]
		assert.Equal(t, audit.EventCollapsed, last.Event)
		assert.Equal(t, "chain-unknown", last.Fields["reason"])
		assert.Equal(t, "1", last.Fields["count"], "the SDK's first try")
		assert.True(t, ts.known.Known(h), "the full-chain accept re-teaches the sender")
		assert.True(t, dialFrom(ops).chainCached)
	})

	t.Run("forged hashes are refused", func(t *testing.T) {
		tun, err := a.tunnelTo(ctx, b.ID().String(), "payments")
		require.NoError(t, err)
		h := dtl.CertChain{Node: a.issuer.Raw(), Agent: billing.cert.Raw()}.Hash()
		require.True(t, a.track(tun).known.Known(h), "precondition: b caches billing's chain on this session")
		s := serveSink(t, agent(t, b, "payments", "billing-batch"), "8081")
		admittedBefore := b.Stats().FlowsAdmitted

		random := make([]byte, dtl.HashLen)
		_, _ = rand.Read(random)
		require.ErrorIs(t, open(t, tun, signCompact(t, billing, tun, random, billing.key)), dtl.ErrChainUnknown)

		// The right hash does not lend the cached chain's authority to another key.
		_, mallory, err := ed25519.GenerateKey(rand.Reader)
		require.NoError(t, err)
		require.ErrorIs(t, open(t, tun, signCompact(t, billing, tun, h[:], mallory)), dtl.ErrSignature)

		assert.Equal(t, admittedBefore, b.Stats().FlowsAdmitted)
		assert.Zero(t, s.conns.Load())
	})
}

// signCompact signs a hash-only record as billing would, with key (billing's or a forger's).
func signCompact(t *testing.T, a *Agent, tun *tunnel.Tunnel, hash []byte, key ed25519.PrivateKey) []byte {
	t.Helper()
	c := &dtl.Claims{
		Version: dtl.Version1, Zone: a.id.Zone, Agent: a.id.String(), ChainHash: hash,
		Node: a.n.cert.ID.String(), Fingerprint: a.cert.Claims.Fingerprint, Region: a.n.region, Trust: 100,
		Destination: toLedger, FlowID: tun.NewFlowID(), Seq: a.n.track(tun).seq.Add(1), IssuedAt: a.n.now(),
	}
	rec, err := dtl.Sign(c, key, tun.Exporter())
	require.NoError(t, err)
	return rec
}

// udpPingPong sends n datagrams from c to pc and answers each, checking content and WhoIs. QUIC
// datagrams are unreliable by design (a packet lost on a loaded loopback is not retransmitted), so
// like any UDP application it resends a ping until its pong arrives, and both ends skip duplicates
// of earlier rounds.
func udpPingPong(t *testing.T, c net.Conn, pc net.PacketConn, from *Agent, local bool, n int) {
	t.Helper()
	buf := make([]byte, 2048)
	seqOf := func(b []byte, prefix string) (uint32, bool) {
		if len(b) != 8 || string(b[:4]) != prefix {
			return 0, false
		}
		return binary.BigEndian.Uint32(b[4:]), true
	}
	for i := range n {
		msg := binary.BigEndian.AppendUint32([]byte("ping"), uint32(i))
		reply := append([]byte("pong"), msg[4:]...)
		deadline := time.Now().Add(10 * time.Second)
		answered := false
		for !answered {
			require.True(t, time.Now().Before(deadline), "no pong for ping %d within 10 s of resending", i)
			_, err := c.Write(msg)
			require.NoError(t, err)
			// Listener side: read until this round's ping arrives or the resend interval passes.
			_ = pc.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
			k, addr, err := pc.ReadFrom(buf)
			if errors.Is(err, os.ErrDeadlineExceeded) {
				continue
			}
			require.NoError(t, err)
			seq, ok := seqOf(buf[:k], "ping")
			require.True(t, ok, "unexpected datagram %q", buf[:k])
			if seq < uint32(i) {
				continue // a duplicate of an earlier round's resend
			}
			require.Equal(t, msg, buf[:k])
			ua, ok := addr.(*net.UDPAddr)
			require.True(t, ok)
			assert.Equal(t, from.IP(), ua.AddrPort().Addr(), "the listener sees the caller's overlay IP")
			if i == 0 {
				p, err := WhoIsPacket(pc, addr)
				require.NoError(t, err)
				assert.Equal(t, from.ID().String(), p.Agent)
				assert.Equal(t, dtl.ProtoUDP, p.Destination.Proto)
				assert.Equal(t, local, p.Local)
			}
			_, err = pc.WriteTo(reply, addr)
			require.NoError(t, err)
			// Dialer side: this round's pong, skipping pongs of earlier resends.
			for {
				_ = c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
				k, err = c.Read(buf)
				if errors.Is(err, os.ErrDeadlineExceeded) {
					break // lost: resend the ping
				}
				require.NoError(t, err)
				seq, ok := seqOf(buf[:k], "pong")
				require.True(t, ok, "unexpected datagram %q", buf[:k])
				if seq == uint32(i) {
					answered = true
					break
				}
			}
		}
	}
	_ = pc.SetReadDeadline(time.Time{})
	_ = c.SetReadDeadline(time.Time{})
}

func TestUDPFlows(t *testing.T) {
	ns := threeNodes(t)
	a, b := ns["a"], ns["b"]
	billing := agent(t, a, "payments", "billing-api")
	ledger := agent(t, b, "payments", "ledger")
	pc, err := ledger.ListenPacket("udp", ":5353")
	require.NoError(t, err)
	t.Cleanup(func() { _ = pc.Close() })
	ctx := context.Background()

	t.Run("datagrams both ways through two nodes, WhoIs on the listener", func(t *testing.T) {
		c, err := billing.Dial(ctx, "udp", "ledger.payments:5353")
		require.NoError(t, err)
		defer func() { _ = c.Close() }()
		udpPingPong(t, c, pc, billing, false, 20)
		_, err = WhoIs(c)
		require.ErrorIs(t, err, ErrNoProvenance, "the dialing side has no peer provenance")
		_, err = pc.WriteTo([]byte("x"), &net.UDPAddr{IP: billing.IP().AsSlice(), Port: 1})
		require.ErrorIs(t, err, ErrNoFlow, "a listener cannot start flows")
	})

	t.Run("same-node datagrams are admitted too", func(t *testing.T) {
		batch := agent(t, b, "payments", "billing-batch")
		c, err := batch.Dial(ctx, "udp", "ledger.payments:5353")
		require.NoError(t, err)
		defer func() { _ = c.Close() }()
		udpPingPong(t, c, pc, batch, true, 5)
	})

	t.Run("a datagram for a flow id never admitted is dropped and counted", func(t *testing.T) {
		tun, err := a.tunnelTo(ctx, b.ID().String(), "payments")
		require.NoError(t, err)
		before := b.Stats().DatagramsDropped
		require.NoError(t, tun.SendRawDatagram(tun.NewFlowID(), []byte("smuggled")))
		require.Eventually(t, func() bool { return b.Stats().DatagramsDropped == before+1 }, 5*time.Second, 2*time.Millisecond)
		_ = pc.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		_, _, err = pc.ReadFrom(make([]byte, 64))
		require.ErrorIs(t, err, os.ErrDeadlineExceeded, "nothing was delivered")
	})

	t.Run("a UDP flow the policy refuses delivers nothing", func(t *testing.T) {
		other, err := ledger.ListenPacket("udp", ":9999")
		require.NoError(t, err)
		defer func() { _ = other.Close() }()
		_, err = billing.Dial(ctx, "udp", "ledger.payments:9999")
		var re *RefusedError
		require.ErrorAs(t, err, &re)
		assert.Equal(t, "policy", re.Reason)
		require.ErrorIs(t, err, dtl.ErrPolicy)
		_ = other.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		_, _, err = other.ReadFrom(make([]byte, 64))
		require.ErrorIs(t, err, os.ErrDeadlineExceeded)
		_, err = billing.Dial(ctx, "udp", "ledger.payments:5354")
		require.ErrorIs(t, err, dtl.ErrPolicy, "no rule for udp/5354 either, listener or not")
	})

	t.Run("revoking the agent ends its UDP flow", func(t *testing.T) {
		c, err := billing.Dial(ctx, "udp", "ledger.payments:5353")
		require.NoError(t, err)
		defer func() { _ = c.Close() }()
		udpPingPong(t, c, pc, billing, false, 1)
		require.NoError(t, b.Revoke(ctx, billing.ID().String(), "drifted"))
		_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
		_, err = c.Read(make([]byte, 64))
		require.ErrorIs(t, err, net.ErrClosed, "the flow ended, it did not time out")
		_, err = c.Write([]byte("after"))
		require.Error(t, err)
		_ = pc.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		_, _, err = pc.ReadFrom(make([]byte, 64))
		require.ErrorIs(t, err, os.ErrDeadlineExceeded)
	})
}

// TestAgentStreamLarge moves a checksummed stream between agents on two nodes: 1 GiB with
// UTE_LONG=1 (make test runs it that way without -race), 32 MiB otherwise.
func TestAgentStreamLarge(t *testing.T) {
	size := int64(32 << 20)
	if os.Getenv("UTE_LONG") == "1" {
		size = 1 << 30
	}
	ns := threeNodes(t)
	billing := agent(t, ns["a"], "payments", "billing-api")
	_ = echoServer(t, agent(t, ns["b"], "payments", "ledger"), "8080")
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	c, err := billing.Dial(ctx, "tcp", "ledger.payments:8080")
	require.NoError(t, err)
	defer func() { _ = c.Close() }()
	if d, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(d)
	}

	sent := make(chan [32]byte, 1)
	sendErr := make(chan error, 1)
	start := time.Now()
	go func() {
		h := sha256.New()
		buf := make([]byte, 256<<10)
		_, _ = rand.Read(buf)
		if _, err := c.Write(binary.BigEndian.AppendUint64(nil, uint64(size))); err != nil {
			sendErr <- err
			return
		}
		for left := size; left > 0; {
			n := min(int64(len(buf)), left)
			binary.BigEndian.PutUint64(buf, uint64(left)) // every chunk differs
			if _, err := c.Write(buf[:n]); err != nil {
				sendErr <- err
				return
			}
			h.Write(buf[:n])
			left -= n
		}
		var d [32]byte
		copy(d[:], h.Sum(nil))
		sent <- d
		sendErr <- nil
	}()
	var got [32]byte
	_, err = io.ReadFull(c, got[:])
	require.NoError(t, err)
	require.NoError(t, <-sendErr)
	want := <-sent
	assert.Equal(t, want, got, "the server's SHA-256 of %d bytes matches ours", size)
	el := time.Since(start)
	t.Logf("%d MiB in %v (%.0f Mbit/s)", size>>20, el, float64(size)*8/el.Seconds()/1e6)
	back := make([]byte, (1<<20)+32)
	_, err = io.ReadFull(c, back)
	require.NoError(t, err)
	sum := sha256.Sum256(back[:1<<20])
	assert.Equal(t, sum[:], back[1<<20:], "and the reply arrives intact")
	assert.Equal(t, uint64(0), ns["b"].Stats().FlowsDenied)
	var admits int
	for _, r := range auditEntries(t, ns["b"]) {
		if r.Event == audit.EventAdmit {
			admits++
		}
	}
	assert.GreaterOrEqual(t, admits, 1)
}

// TestTunnelUpToldBothEnds: Config.TunnelUp, where the gossip mux sends its queued records over
// a new tunnel, is told the tunnel at both ends once the node has registered it.
func TestTunnelUpToldBothEnds(t *testing.T) {
	type told struct{ peer, zone string }
	seen := map[string]chan told{"a": make(chan told, 8), "b": make(chan told, 8)}
	spec := func(name string, agents ...state.AgentSpec) nodeSpec {
		return nodeSpec{name: name, zones: []string{"payments"}, agents: agents, configure: func(c *Config) {
			c.TunnelUp = func(tun *tunnel.Tunnel) {
				select { // never block the endpoint's goroutine: only the first tunnel is read
				case seen[name] <- told{tun.Peer().NodeID, tun.Zone()}:
				default:
				}
			}
		}}
	}
	ns := cluster(t,
		spec("a", state.AgentSpec{Name: "billing-api", Zone: "payments"}),
		spec("b", state.AgentSpec{Name: "ledger", Zone: "payments"}))
	hold := serveHold(t, agent(t, ns["b"], "payments", "ledger"), "8080")
	openHeld(t, agent(t, ns["a"], "payments", "billing-api"), hold)
	for name, peer := range map[string]string{"a": "b", "b": "a"} {
		select {
		case got := <-seen[name]:
			assert.Equal(t, told{ns[peer].ID().String(), "payments"}, got, "node %s is told its tunnel with %s", name, peer)
		case <-time.After(5 * time.Second):
			t.Fatalf("node %s was not told of its tunnel with %s", name, peer)
		}
	}
}
