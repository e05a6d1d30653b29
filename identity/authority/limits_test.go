package authority

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity"
)

// limitedAuthority is an authority served with explicit limits; srv is exposed so tests can fill
// its in-flight semaphore.
type limitedAuthority struct {
	*testAuthority
	srv  *Server
	stop func()
}

func startLimited(t *testing.T, clock *testClock, lim Limits) *limitedAuthority {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "auth")
	require.NoError(t, Init(dir, "acme.internal", writePolicy(t, testPolicy), Options{Now: clock.Now}))
	return serveLimited(t, dir, clock, lim)
}

func serveLimited(t *testing.T, dir string, clock *testClock, lim Limits) *limitedAuthority {
	t.Helper()
	a, err := Open(dir, Options{Now: clock.Now, Limits: lim})
	require.NoError(t, err)
	srv, err := a.Listen("127.0.0.1:0")
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			require.NoError(t, <-done)
			require.NoError(t, a.Close())
		})
	}
	t.Cleanup(stop)
	return &limitedAuthority{testAuthority: &testAuthority{Authority: a, dir: dir, addr: srv.Addr().String()}, srv: srv, stop: stop}
}

// rawClient speaks to the authority from a chosen loopback address, sending arbitrary bytes: the
// attacker's side of the join endpoint (no pin check, no retry on busy).
type rawClient struct {
	tr  *quic.Transport
	udp *net.UDPConn
}

func newRawClient(t *testing.T, localIP string) *rawClient {
	t.Helper()
	udp, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.ParseIP(localIP)})
	require.NoError(t, err, "bind %s (127.0.0.0/8 is local on Linux)", localIP)
	c := &rawClient{tr: &quic.Transport{Conn: udp}, udp: udp}
	t.Cleanup(func() {
		_ = c.tr.Close()
		_ = c.udp.Close()
	})
	return c
}

func (c *rawClient) dial(ctx context.Context, addr string) (*quic.Conn, error) {
	raddr, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		return nil, err
	}
	return c.tr.Dial(ctx, raddr, &tls.Config{
		MinVersion: tls.VersionTLS13, NextProtos: []string{ALPN}, ServerName: serverName, InsecureSkipVerify: true,
	}, &quic.Config{HandshakeIdleTimeout: handshakeTimeout, MaxIdleTimeout: requestTimeout})
}

// send writes payload as the whole request and returns the authority's answer as an error (nil
// for CodeOK), mapped like the real client maps it.
func (c *rawClient) send(ctx context.Context, addr string, payload []byte) error {
	ctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	conn, err := c.dial(ctx, addr)
	if err != nil {
		return busyError(err)
	}
	defer func() { _ = conn.CloseWithError(closeOK, "") }()
	str, err := conn.OpenStreamSync(ctx)
	if err != nil {
		return busyError(err)
	}
	if _, err := str.Write(payload); err != nil {
		return busyError(err)
	}
	_ = str.Close()
	body, err := readFrame(str, maxResponse)
	if err != nil {
		return busyError(err)
	}
	resp, err := DecodeResponse(body)
	if err != nil {
		return err
	}
	return errOf(resp.Code, resp.Message)
}

// malformedJoin is a well-framed join whose CBOR body is garbage.
func malformedJoin(i int) []byte {
	body := []byte{0xff, byte(i), byte(i >> 8)}
	return append(binary.BigEndian.AppendUint32([]byte{OpJoin}, uint32(len(body))), body...)
}

// flood sends n malformed joins from c with a few in parallel and checks each is refused as a
// protocol error.
func flood(t *testing.T, c *rawClient, addr string, n int) {
	t.Helper()
	const workers = 6
	errs := make(chan error, n)
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for i := w; i < n; i += workers {
				errs <- c.send(context.Background(), addr, malformedJoin(i))
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		require.ErrorIs(t, err, ErrProtocol)
	}
}

func auditOf(t *testing.T, a *Authority) []AuditRecord {
	t.Helper()
	recs, err := a.Audit()
	require.NoError(t, err)
	return recs
}

func refusalsFrom(recs []AuditRecord, ip string) (individual []AuditRecord, summaries []AuditRecord) {
	for _, r := range recs {
		host, _, err := net.SplitHostPort(r.Remote)
		switch {
		case r.Outcome == OutcomeSuppressed && r.Remote == ip:
			summaries = append(summaries, r)
		case r.Outcome == OutcomeRefused && err == nil && host == ip:
			individual = append(individual, r)
		}
	}
	return individual, summaries
}

// The flood tests raise the connection limits: they measure the audit budget, not the busy path,
// and a busy refusal would land in the summary's count.
var floodLimits = Limits{MaxConnsPerSource: 64, MaxConns: 256}

func TestNoiseFloodIsSummarizedAndReplayStillAudited(t *testing.T) {
	clock := newTestClock()
	la := startLimited(t, clock, floodLimits)
	ctx := context.Background()
	tok := la.token(t, TokenSpec{Zones: []string{"payments"}})
	_, err := Join(ctx, joinParams(t, la.testAuthority, tok, "n1", clock))
	require.NoError(t, err)
	parsed, err := identity.ParseToken(tok)
	require.NoError(t, err)

	attacker := newRawClient(t, "127.0.0.1")
	const n = 500
	flood(t, attacker, la.addr, n/2)
	// The replay of a consumed token comes from the flooding address, mid-flood: still audited.
	_, err = Join(ctx, joinParams(t, la.testAuthority, tok, "n2", clock))
	require.ErrorIs(t, err, ErrTokenUsed)
	flood(t, attacker, la.addr, n/2)

	ind, sums := refusalsFrom(auditOf(t, la.Authority), "127.0.0.1")
	var noise, replays []AuditRecord
	for _, r := range ind {
		if r.WireCode == CodeTokenUsed {
			replays = append(replays, r)
		} else {
			noise = append(noise, r)
		}
	}
	require.Len(t, replays, 1, "the replay is audited individually")
	assert.Equal(t, parsed.ID, replays[0].TokenID)
	assert.Equal(t, "join", replays[0].Event)
	assert.Contains(t, replays[0].Reason, "join token already used")
	require.Len(t, noise, DefaultPerSourceBurst, "only the burst of the noise is audited one by one")
	for _, r := range noise {
		assert.Equal(t, CodeProtocol, r.WireCode)
	}
	assert.Empty(t, sums, "the summary waits for its interval to end")

	// The interval ends; the next refusal writes the summary (lazily) and is itself audited.
	clock.Advance(DefaultLimitInterval)
	require.ErrorIs(t, attacker.send(ctx, la.addr, malformedJoin(0)), ErrProtocol)
	ind, sums = refusalsFrom(auditOf(t, la.Authority), "127.0.0.1")
	require.Len(t, sums, 1)
	s := sums[0]
	assert.Equal(t, EventSuppressed, s.Event)
	assert.Equal(t, uint64(n-DefaultPerSourceBurst), s.Count)
	assert.Equal(t, map[string]uint64{"join/protocol": n - DefaultPerSourceBurst}, s.Reasons)
	assert.False(t, s.First.IsZero())
	assert.False(t, s.Last.Before(s.First))
	assert.Len(t, ind, DefaultPerSourceBurst+1+1, "burst + replay + the first refusal of the new interval")
}

func TestConcurrentReplaysAreAllAudited(t *testing.T) {
	clock := newTestClock()
	// 20 joins at once from one address exceed its connection limit: the client retries busy.
	la := startLimited(t, clock, Limits{MaxConnsPerSource: 4})
	ctx := context.Background()
	tok := la.token(t, TokenSpec{Zones: []string{"payments"}})
	_, err := Join(ctx, joinParams(t, la.testAuthority, tok, "n1", clock))
	require.NoError(t, err)
	parsed, err := identity.ParseToken(tok)
	require.NoError(t, err)

	const n = 20
	errs := make(chan error, n)
	var wg sync.WaitGroup
	for i := range n {
		p := joinParams(t, la.testAuthority, tok, fmt.Sprintf("r%d", i), clock)
		wg.Go(func() {
			_, err := Join(ctx, p)
			errs <- err
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		require.ErrorIs(t, err, ErrTokenUsed, "busy refusals are retried by the client")
	}
	var used int
	for _, r := range auditOf(t, la.Authority) {
		require.NotEqual(t, CodeBusy, r.WireCode, "a busy refusal never gets a record of its own")
		if r.Outcome == OutcomeRefused && r.WireCode == CodeTokenUsed {
			assert.Equal(t, parsed.ID, r.TokenID)
			used++
		}
	}
	assert.Equal(t, n, used, "every replay leaves its own audit record (I3)")
	la.FlushSuppressed()
	for _, r := range auditOf(t, la.Authority) {
		if r.Outcome == OutcomeSuppressed {
			t.Logf("busy refusals retried: %v", r.Reasons)
		}
	}
}

func TestSecondSourceIsNotStarved(t *testing.T) {
	clock := newTestClock()
	la := startLimited(t, clock, floodLimits)
	first, second := newRawClient(t, "127.0.0.2"), newRawClient(t, "127.0.0.3")
	flood(t, first, la.addr, 60)
	flood(t, second, la.addr, DefaultPerSourceBurst)

	recs := auditOf(t, la.Authority)
	ind1, _ := refusalsFrom(recs, "127.0.0.2")
	ind2, _ := refusalsFrom(recs, "127.0.0.3")
	assert.Len(t, ind1, DefaultPerSourceBurst)
	assert.Len(t, ind2, DefaultPerSourceBurst, "the second source's first refusals are audited one by one")

	// Both summaries are pending; shutdown writes them.
	la.stop()
	a, err := Open(la.dir, Options{Now: clock.Now})
	require.NoError(t, err)
	t.Cleanup(func() { _ = a.Close() })
	recs = auditOf(t, a)
	_, sum1 := refusalsFrom(recs, "127.0.0.2")
	_, sum2 := refusalsFrom(recs, "127.0.0.3")
	require.Len(t, sum1, 1, "shutdown flushes the pending summary")
	assert.Equal(t, uint64(60-DefaultPerSourceBurst), sum1[0].Count)
	assert.Empty(t, sum2, "nothing of the second source was suppressed")
}

func TestPerSourceConnectionLimitRefusesWithoutAudit(t *testing.T) {
	clock := newTestClock()
	la := startLimited(t, clock, Limits{MaxConnsPerSource: 2})
	ctx := context.Background()
	hog := newRawClient(t, "127.0.0.4")
	// Two connections that never send a request hold both of the source's slots.
	for range 2 {
		conn, err := hog.dial(ctx, la.addr)
		require.NoError(t, err)
		t.Cleanup(func() { _ = conn.CloseWithError(closeOK, "") })
	}
	src := sourcePrefix(netip.MustParseAddr("127.0.0.4"))
	require.Eventually(t, func() bool {
		la.srv.conns.mu.Lock()
		defer la.srv.conns.mu.Unlock()
		return la.srv.conns.bySource[src] == 2
	}, 5*time.Second, 5*time.Millisecond, "the server has accepted both idle connections")
	before := auditOf(t, la.Authority)
	err := hog.send(ctx, la.addr, malformedJoin(2))
	require.ErrorIs(t, err, ErrBusy)
	assert.Contains(t, err.Error(), "2 connections from 127.0.0.4 already being served")
	assert.Equal(t, before, auditOf(t, la.Authority), "a busy refusal writes nothing")

	// Another source is served meanwhile.
	require.ErrorIs(t, newRawClient(t, "127.0.0.5").send(ctx, la.addr, malformedJoin(3)), ErrProtocol)

	la.FlushSuppressed()
	_, sums := refusalsFrom(auditOf(t, la.Authority), "127.0.0.4")
	require.Len(t, sums, 1)
	assert.Equal(t, uint64(1), sums[0].Count)
	assert.Equal(t, map[string]uint64{"busy/connections": 1}, sums[0].Reasons)
}

func TestInFlightCapAnswersBusy(t *testing.T) {
	clock := newTestClock()
	la := startLimited(t, clock, Limits{MaxInFlight: 2})
	for range cap(la.srv.inFlight) {
		la.srv.inFlight <- struct{}{}
	}
	tok := la.token(t, TokenSpec{Zones: []string{"payments"}})
	parsed, err := identity.ParseToken(tok)
	require.NoError(t, err)
	key := newKey(t)
	csr, err := createCSR(key, "b1", "", fingerprint("b1"))
	require.NoError(t, err)
	icsr, err := createIssuerCSR(key, "b1", "", fingerprint("b1"))
	require.NoError(t, err)
	body, err := wireEnc.Marshal(JoinRequest{TokenID: parsed.ID, Secret: parsed.Secret, CSR: csr, IssuerCSR: icsr})
	require.NoError(t, err)
	req := append(binary.BigEndian.AppendUint32([]byte{OpJoin}, uint32(len(body))), body...)
	before := auditOf(t, la.Authority)

	c := newRawClient(t, "127.0.0.6")
	err = c.send(context.Background(), la.addr, req)
	require.ErrorIs(t, err, ErrBusy)
	assert.Contains(t, err.Error(), "2 requests already being processed")
	assert.Equal(t, before, auditOf(t, la.Authority))
	rec, err := la.Store().Token(parsed.ID)
	require.NoError(t, err)
	assert.Empty(t, rec.ConsumedBy, "a busy join never reaches the token")

	for range cap(la.srv.inFlight) {
		<-la.srv.inFlight
	}
	require.NoError(t, c.send(context.Background(), la.addr, req), "the same request succeeds once capacity is back")
}

func TestSourcePrefix(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"192.0.2.7", "192.0.2.7/32"},
		{"::ffff:192.0.2.7", "192.0.2.7/32"},
		{"2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"},
		{"2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"},
		{"fe80::1%eth0", "fe80::/64"},
	} {
		t.Run(tc.in, func(t *testing.T) {
			assert.Equal(t, netip.MustParsePrefix(tc.want), sourcePrefix(netip.MustParseAddr(tc.in)))
		})
	}
	assert.Equal(t, "unknown", sourceLabel(sourceOf(&net.TCPAddr{})))
	assert.Equal(t, "192.0.2.7", sourceLabel(sourceOf(&net.UDPAddr{IP: net.ParseIP("192.0.2.7"), Port: 9})))
	assert.Equal(t, "2001:db8::/64", sourceLabel(sourceOf(&net.UDPAddr{IP: net.ParseIP("2001:db8::9")})))
}

// tally checks the limiter's conservation law: every event is either its own record or counted in
// exactly one summary.
type tally struct {
	individual int
	summarized uint64
	records    int
}

func (ty *tally) add(individual bool, due []AuditRecord) {
	if individual {
		ty.individual++
		ty.records++
	}
	ty.addDue(due)
}

func (ty *tally) addDue(due []AuditRecord) {
	for _, r := range due {
		ty.summarized += r.Count
		ty.records++
	}
}

func TestNoiseLimiterStaysBoundedUnderManySources(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	lim := Limits{MaxSources: 64, GlobalBurst: 100}
	l := newNoiseLimiter(lim, now)
	var ty tally
	const sources, each = 5000, 3
	for i := range sources {
		var ip netip.Addr
		if i%2 == 0 {
			ip = netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})
		} else {
			var b [16]byte
			b[0], b[1], b[6], b[7] = 0x20, 0x01, byte(i>>8), byte(i)
			b[15] = byte(i) // same /64 as its neighbours with other low bits
			ip = netip.AddrFrom16(b)
		}
		for range each {
			ty.add(l.admit(sourcePrefix(ip), "join/protocol", now, false))
		}
		srcs, pending := l.size()
		require.LessOrEqual(t, srcs, 64, "the source map is bounded")
		require.LessOrEqual(t, pending, 65, "at most one summary per remembered source plus the global one")
	}
	ty.addDue(l.flush(now, true))
	assert.Equal(t, uint64(sources*each), uint64(ty.individual)+ty.summarized, "no refusal is lost")
	assert.LessOrEqual(t, ty.records, 100+1, "records in one interval stay within the global budget plus the global summary")
	assert.Equal(t, 100, ty.individual, "the global budget went to individual records of new sources")
	_, pending := l.size()
	assert.Zero(t, pending)
}

func TestNoiseLimiterIntervals(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	l := newNoiseLimiter(Limits{PerSourceBurst: 2, Interval: time.Minute}, now)
	src := sourcePrefix(netip.MustParseAddr("192.0.2.1"))
	var got []bool
	for range 5 {
		ind, due := l.admit(src, "join/csr", now, false)
		require.Empty(t, due)
		got = append(got, ind)
	}
	assert.Equal(t, []bool{true, true, false, false, false}, got)
	assert.Empty(t, l.flush(now.Add(59*time.Second), false), "interval not over")
	due := l.flush(now.Add(time.Minute), false)
	require.Len(t, due, 1)
	assert.Equal(t, uint64(3), due[0].Count)
	assert.Equal(t, "192.0.2.1", due[0].Remote)
	assert.Equal(t, OutcomeSuppressed, due[0].Outcome)
	assert.Contains(t, due[0].Reason, "3 unauthenticated refusals")
	// The bucket refilled over the minute: the source is audited again.
	ind, due := l.admit(src, "join/csr", now.Add(time.Minute), false)
	assert.True(t, ind)
	assert.Empty(t, due)
	// A busy refusal is never individual, even with budget left.
	ind, _ = l.admit(src, "busy/connections", now.Add(time.Minute), true)
	assert.False(t, ind)
}

func BenchmarkNoiseLimiterAdmit(b *testing.B) {
	now := time.Unix(1_700_000_000, 0)
	l := newNoiseLimiter(Limits{}, now)
	srcs := make([]netip.Prefix, 8192)
	for i := range srcs {
		srcs[i] = sourcePrefix(netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)}))
	}
	i := 0
	for b.Loop() {
		_, _ = l.admit(srcs[i%len(srcs)], "join/protocol", now.Add(time.Duration(i)*time.Millisecond), false)
		i++
	}
}

// FuzzNoiseLimiter drives the limiter with arbitrary event sequences (each three bytes: source,
// clock step, flags) and checks its invariants: nothing lost, memory bounded, no panic.
func FuzzNoiseLimiter(f *testing.F) {
	f.Add([]byte{1, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0})
	f.Add([]byte{1, 0, 1, 2, 255, 0, 3, 0, 2, 1, 60, 0, 200, 1, 1})
	f.Add([]byte{0, 0, 0, 255, 255, 3, 17, 9, 2})
	f.Fuzz(func(t *testing.T, ops []byte) {
		now := time.Unix(1_700_000_000, 0)
		lim := Limits{Interval: time.Minute, PerSourceBurst: 2, GlobalBurst: 5, MaxSources: 8}
		l := newNoiseLimiter(lim, now)
		var ty tally
		events := 0
		for i := 0; i+2 < len(ops); i += 3 {
			now = now.Add(time.Duration(ops[i+1]) * time.Second)
			ip := netip.AddrFrom4([4]byte{10, 0, 0, ops[i] % 32})
			if ops[i+2]&2 != 0 {
				ty.addDue(l.flush(now, false))
			}
			ty.add(l.admit(sourcePrefix(ip), "join/protocol", now, ops[i+2]&1 != 0))
			events++
			srcs, pending := l.size()
			if srcs > lim.MaxSources || pending > lim.MaxSources+1 {
				t.Fatalf("limiter grew to %d sources, %d pending summaries", srcs, pending)
			}
		}
		ty.addDue(l.flush(now, true))
		if uint64(ty.individual)+ty.summarized != uint64(events) {
			t.Fatalf("%d events but %d individual + %d summarized", events, ty.individual, ty.summarized)
		}
	})
}
