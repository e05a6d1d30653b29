//go:build unix

package node

// Whole-node benchmarks for the data-plane performance targets of docs/design.md. Every benchmark
// measures its baseline in the same process and the same run and reports the ratio: on a shared
// 2-core machine absolute numbers drift from run to run, ratios measured side by side much less.
// `make bench` runs them and node/internal/benchrun turns their metrics into the results table;
// docs/benchmarks.md records a run.
//
// The nodes are real: joined through a real authority, one QUIC tunnel over loopback, every flow
// signed by its agent and fully admitted by the receiving node (chain, signature, session binding,
// policy, replay, audit). Both nodes live in this one process, so every CPU figure counts the
// sender's and the receiver's work together.

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/node/state"
	"github.com/ute-project/ute/overlay/dtl"
)

const (
	benchChunk  = 64 << 10 // bytes per Write, the same on every path
	benchBlock  = 32 << 20 // bytes per path per round of the throughput benchmark
	benchPort   = "8080"
	benchAgents = 4 // source agents on node a, used round-robin by the concurrent benchmark
)

// benchEnv is two nodes in zone payments over one real tunnel: node a hosts billing-1..N, node b
// hosts ledger.
type benchEnv struct {
	a, b    *testNode
	sources []*Agent
	ledger  *Agent
}

func newBenchEnv(b *testing.B) *benchEnv {
	b.Helper()
	var srcs []state.AgentSpec
	for i := range benchAgents {
		srcs = append(srcs, state.AgentSpec{Name: fmt.Sprintf("billing-%d", i+1), Zone: "payments"})
	}
	dsts := []state.AgentSpec{{Name: "ledger", Zone: "payments"}}
	ns := cluster(b,
		nodeSpec{name: "a", zones: []string{"payments"}, agents: srcs},
		nodeSpec{name: "b", zones: []string{"payments"}, agents: dsts},
	)
	e := &benchEnv{a: ns["a"], b: ns["b"], ledger: agent(b, ns["b"], "payments", "ledger")}
	for _, s := range srcs {
		e.sources = append(e.sources, agent(b, e.a, "payments", s.Name))
	}
	return e
}

// dial opens one admitted flow from src to ledger.
func (e *benchEnv) dial(ctx context.Context, src *Agent) (net.Conn, error) {
	return src.Dial(ctx, "tcp", "ledger.payments:"+benchPort)
}

// bareQUIC is the baseline: one plain quic-go connection over loopback between two UDP sockets,
// each behind its own quic.Transport as a node's endpoint is, TLS 1.3 with Ed25519 certificates on
// both sides, and the quic.Config of overlay/tunnel's endpoint (same flow-control windows).
type bareQUIC struct {
	conn   *quic.Conn
	cipher uint16
}

// tunnelQUICConfig mirrors the quic.Config that overlay/tunnel.New builds (endpoint.go) with the
// default tunnel.Limits. It sets no flow-control fields, so both use quic-go's default windows; if
// the endpoint starts tuning them, this must follow or the baseline stops being the same transport.
func tunnelQUICConfig() *quic.Config {
	return &quic.Config{
		HandshakeIdleTimeout:  3 * time.Second,
		MaxIdleTimeout:        30 * time.Second,
		KeepAlivePeriod:       10 * time.Second,
		MaxIncomingStreams:    4096,
		MaxIncomingUniStreams: -1,
		EnableDatagrams:       true,
	}
}

func selfSigned(b *testing.B, name string) tls.Certificate {
	b.Helper()
	pub, key, err := ed25519.GenerateKey(rand.Reader)
	require.NoError(b, err)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, pub, key)
	require.NoError(b, err)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// newBareQUIC connects two quic.Transports over loopback; serve runs on the server side for every
// stream the client opens. Everything it starts stops in b's cleanup.
func newBareQUIC(b *testing.B, serve func(*quic.Stream)) *bareQUIC {
	b.Helper()
	const alpn = "ute-bench"
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	var closers []func() error
	b.Cleanup(func() {
		cancel()
		for _, c := range slices.Backward(closers) {
			_ = c()
		}
		wg.Wait()
	})
	transport := func() *quic.Transport {
		pc, err := net.ListenPacket("udp", "127.0.0.1:0")
		require.NoError(b, err)
		tr := &quic.Transport{Conn: pc}
		closers = append(closers, pc.Close, tr.Close)
		return tr
	}
	srvTLS := &tls.Config{
		MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{selfSigned(b, "server")},
		NextProtos: []string{alpn}, ClientAuth: tls.RequireAnyClientCert, SessionTicketsDisabled: true,
	}
	ln, err := transport().Listen(srvTLS, tunnelQUICConfig())
	require.NoError(b, err)
	closers = append(closers, ln.Close)
	wg.Go(func() {
		conn, err := ln.Accept(ctx)
		if err != nil {
			return
		}
		for {
			s, err := conn.AcceptStream(ctx)
			if err != nil {
				return
			}
			wg.Go(func() { serve(s) })
		}
	})
	cliTLS := &tls.Config{
		MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{selfSigned(b, "client")},
		NextProtos: []string{alpn}, InsecureSkipVerify: true, SessionTicketsDisabled: true,
	}
	conn, err := transport().Dial(ctx, ln.Addr(), cliTLS, tunnelQUICConfig())
	require.NoError(b, err)
	closers = append(closers, func() error { return conn.CloseWithError(0, "") })
	return &bareQUIC{conn: conn, cipher: conn.ConnectionState().TLS.CipherSuite}
}

// rtt measures n request/response round trips of one byte on a fresh stream of an echo server.
func (q *bareQUIC) rtt(b *testing.B, n int) []time.Duration {
	b.Helper()
	s, err := q.conn.OpenStreamSync(context.Background())
	require.NoError(b, err)
	defer func() { s.CancelRead(0); _ = s.Close() }()
	out := make([]time.Duration, 0, n)
	one := []byte{1}
	for range n {
		t0 := time.Now()
		if _, err := s.Write(one); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(s, one); err != nil {
			b.Fatal(err)
		}
		out = append(out, time.Since(t0))
	}
	return out
}

func echo(s *quic.Stream) {
	defer s.CancelRead(0)
	_, _ = io.Copy(s, s)
	_ = s.Close()
}

// path is one sender whose receiver reports every complete block, so that a measurement ends when
// the bytes have arrived, not when the last Write returned into a send buffer.
type path struct {
	w    io.Writer
	done chan error
	took time.Duration
}

func newPath(w io.Writer) *path { return &path{w: w, done: make(chan error, 1)} }

// receive reads r in blocks of benchBlock bytes and reports each on p.done until r fails.
func (p *path) receive(r io.Reader, stop <-chan struct{}) {
	buf := make([]byte, benchChunk)
	for {
		var got int
		var err error
		for got < benchBlock && err == nil {
			var n int
			n, err = r.Read(buf[:min(len(buf), benchBlock-got)])
			got += n
		}
		if got == benchBlock {
			err = nil
		}
		select {
		case p.done <- err:
		case <-stop:
			return
		}
		if err != nil {
			return
		}
	}
}

// send moves one block, waits for the receiver to have it and returns how long that took.
func (p *path) send(b *testing.B, buf []byte) time.Duration {
	t0 := time.Now()
	for sent := 0; sent < benchBlock; sent += len(buf) {
		if _, err := p.w.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	if err := <-p.done; err != nil {
		b.Fatal(err)
	}
	d := time.Since(t0)
	p.took += d
	return d
}

func (p *path) mbps(blocks int) float64 {
	return float64(blocks) * benchBlock / p.took.Seconds() / 1e6
}

// BenchmarkThroughput moves the same bytes, in the same 64 KiB writes, over three paths in every
// round (their order rotating, so that drift and GC hit all three alike): an agent flow through two
// nodes, one bare quic-go stream with the same TLS and QUIC settings (the baseline of the ≥ 0.8
// target), and a loopback TCP connection (context: what the kernel alone does). The MB/s figures
// are totals over all rounds; the ratios are the medians of the per-round ratios, because other
// work on a shared machine comes in bursts that a total would charge to whichever path was running.
func BenchmarkThroughput(b *testing.B) {
	e := newBenchEnv(b)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	b.Cleanup(func() { close(stop); wg.Wait() })

	// Agent flow: admitted by node b, accepted by ledger.
	l, err := e.ledger.Listen("tcp", ":"+benchPort)
	require.NoError(b, err)
	b.Cleanup(func() { _ = l.Close() })
	ac, err := e.dial(context.Background(), e.sources[0])
	require.NoError(b, err)
	b.Cleanup(func() { _ = ac.Close() })
	sc, err := l.Accept()
	require.NoError(b, err)
	b.Cleanup(func() { _ = sc.Close() })
	agentPath := newPath(ac)
	wg.Go(func() { agentPath.receive(sc, stop) })

	// Bare quic-go stream.
	var quicPath *path
	ready := make(chan *quic.Stream, 1)
	q := newBareQUIC(b, func(s *quic.Stream) { ready <- s })
	qs, err := q.conn.OpenStreamSync(context.Background())
	require.NoError(b, err)
	quicPath = newPath(qs)
	wg.Go(func() {
		select {
		case s := <-ready:
			defer s.CancelRead(0)
			quicPath.receive(s, stop)
		case <-stop:
		}
	})

	// Loopback TCP.
	tl, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(b, err)
	b.Cleanup(func() { _ = tl.Close() })
	tc, err := net.Dial("tcp", tl.Addr().String())
	require.NoError(b, err)
	b.Cleanup(func() { _ = tc.Close() })
	ts, err := tl.Accept()
	require.NoError(b, err)
	b.Cleanup(func() { _ = ts.Close() })
	tcpPath := newPath(tc)
	wg.Go(func() { tcpPath.receive(ts, stop) })

	paths := []*path{agentPath, quicPath, tcpPath}
	buf := make([]byte, benchChunk)
	// One untimed block per path so that congestion windows have opened before measuring.
	for _, p := range paths {
		p.send(b, buf)
		p.took = 0
	}
	blocks := 0
	var agentQUIC, quicTCP []float64
	ld := startLoad(b)
	for b.Loop() {
		var took [3]time.Duration
		for i := range paths {
			j := (blocks + i) % len(paths)
			took[j] = paths[j].send(b, buf)
		}
		// A ratio of rates is the inverse ratio of times for the same bytes.
		agentQUIC = append(agentQUIC, took[1].Seconds()/took[0].Seconds())
		quicTCP = append(quicTCP, took[2].Seconds()/took[1].Seconds())
		blocks++
	}
	b.StopTimer()
	ld.report(b)
	b.ReportMetric(agentPath.mbps(blocks), "agent-MB/s")
	b.ReportMetric(quicPath.mbps(blocks), "quic-MB/s")
	b.ReportMetric(tcpPath.mbps(blocks), "tcp-MB/s")
	b.ReportMetric(median(agentQUIC), "agent/quic")
	b.ReportMetric(median(quicTCP), "quic/tcp")
	b.Logf("blocks=%d×%d MiB per path; bare QUIC cipher suite %s", blocks, benchBlock>>20, tls.CipherSuiteName(q.cipher))
}

func median(v []float64) float64 {
	slices.Sort(v)
	return v[len(v)/2]
}

// cpuTime is this process's user+system CPU time so far.
func cpuTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatalf("getrusage: %v", err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// load measures what the rest of the machine did while a benchmark ran: the CPU time all
// processes used (from /proc/stat) minus this process's own, as an average number of busy cores.
// Wall-clock results (throughput, flows/s) on a shared machine are only meaningful beside it.
type load struct {
	busy, own time.Duration
	start     time.Time
	ok        bool
}

func startLoad(b *testing.B) load {
	busy, ok := machineBusy()
	return load{busy: busy, own: cpuTime(b), start: time.Now(), ok: ok}
}

// report adds the "others-cores" metric. It reports nothing where /proc/stat is unreadable or the
// measurement was too short for its 10 ms ticks to mean anything.
func (l load) report(b *testing.B) {
	busy, ok := machineBusy()
	if !l.ok || !ok || time.Since(l.start) < 500*time.Millisecond {
		return
	}
	others := (busy - l.busy) - (cpuTime(b) - l.own)
	b.ReportMetric(max(others.Seconds(), 0)/time.Since(l.start).Seconds(), "others-cores")
}

// machineBusy is the non-idle CPU time of the whole machine: user, nice, system, irq, softirq and
// steal of /proc/stat's first line, in USER_HZ ticks (always 100 per second there).
func machineBusy() (time.Duration, bool) {
	raw, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, false
	}
	line, _, _ := strings.Cut(string(raw), "\n")
	f := strings.Fields(line)
	if len(f) < 9 || f[0] != "cpu" {
		return 0, false
	}
	var ticks int64
	for _, i := range []int{1, 2, 3, 6, 7, 8} {
		v, err := strconv.ParseInt(f[i], 10, 64)
		if err != nil {
			return 0, false
		}
		ticks += v
	}
	return time.Duration(ticks) * 10 * time.Millisecond, true
}

// percentile is the nearest-rank percentile p (0..1) of d, which it sorts.
func percentile(d []time.Duration, p float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	slices.Sort(d)
	i := int(p*float64(len(d))+0.5) - 1
	return d[min(max(i, 0), len(d)-1)]
}

func us(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

// BenchmarkDialAdmitted is flow admission one flow at a time: the latency of Dial returning an
// admitted conn (record signing, the receiver's full admission and the verdict's way back) at p50
// and p99, the process CPU per flow (sender and receiver; the flow's Close and the listener's
// accept included), and, in the same run, the RTT of one bare quic-go round trip, which is the
// least any admission that waits for a verdict can take. Target: p50 ≤ 1 RTT + 150 µs, CPU per
// flow ≤ 150 µs.
func BenchmarkDialAdmitted(b *testing.B) {
	e := newBenchEnv(b)
	_ = serveSink(b, e.ledger, benchPort)
	q := newBareQUIC(b, echo)
	ctx := context.Background()
	src := e.sources[0]
	// The tunnel, the zone directory and the first-record paths are set up outside the measurement.
	for range 16 {
		c, err := e.dial(ctx, src)
		require.NoError(b, err)
		require.NoError(b, c.Close())
	}
	rtts := q.rtt(b, 500)

	lat := make([]time.Duration, 0, 1<<14)
	ld := startLoad(b)
	cpu0 := cpuTime(b)
	for b.Loop() {
		t0 := time.Now()
		c, err := e.dial(ctx, src)
		if err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Since(t0))
		_ = c.Close()
	}
	cpu := cpuTime(b) - cpu0
	b.StopTimer()
	ld.report(b)
	rtts = append(rtts, q.rtt(b, 500)...)
	rtt := percentile(rtts, 0.5)
	p50, p99 := percentile(lat, 0.5), percentile(lat, 0.99)
	b.ReportMetric(us(p50), "p50-µs")
	b.ReportMetric(us(p99), "p99-µs")
	b.ReportMetric(us(rtt), "rtt-µs")
	b.ReportMetric(us(p50-rtt), "p50-over-rtt-µs")
	b.ReportMetric(us(cpu)/float64(len(lat)), "cpu-µs/flow")
}

// BenchmarkNewFlows is new flows per second per node: workers goroutines open and close flows from
// the billing agents of node a to ledger on node b as fast as admission lets them. On this machine
// both nodes share the same 2 cores, so the figure is what one core pair does for sender and
// receiver together. Target ≥ 5,000 flows/s.
func BenchmarkNewFlows(b *testing.B) {
	for _, workers := range []int{8, 32} {
		b.Run(fmt.Sprintf("workers=%d", workers), func(b *testing.B) {
			e := newBenchEnv(b)
			_ = serveSink(b, e.ledger, benchPort)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			for _, src := range e.sources {
				c, err := e.dial(ctx, src)
				require.NoError(b, err)
				require.NoError(b, c.Close())
			}
			work := make(chan struct{})
			var flows atomic.Int64
			var failed atomic.Pointer[error]
			var wg sync.WaitGroup
			ld := startLoad(b)
			cpu0, t0 := cpuTime(b), time.Now()
			for w := range workers {
				src := e.sources[w%len(e.sources)]
				wg.Go(func() {
					for range work {
						c, err := e.dial(ctx, src)
						if err != nil {
							failed.CompareAndSwap(nil, &err)
							cancel()
							continue
						}
						_ = c.Close()
						flows.Add(1)
					}
				})
			}
			// b.Loop hands out the flows; the workers, not this loop, are what is measured.
			for b.Loop() {
				select {
				case work <- struct{}{}:
				case <-ctx.Done():
				}
			}
			close(work)
			wg.Wait()
			wall, cpu := time.Since(t0), cpuTime(b)-cpu0
			b.StopTimer()
			ld.report(b)
			if err := failed.Load(); err != nil && !errors.Is(*err, context.Canceled) {
				b.Fatal(*err)
			}
			n := float64(flows.Load())
			b.ReportMetric(n/wall.Seconds(), "flows/s")
			b.ReportMetric(us(cpu)/n, "cpu-µs/flow")
			// What the CPU alone allows, whatever else runs: flows per second of CPU time, both
			// nodes' work together.
			b.ReportMetric(n/cpu.Seconds(), "flows/cpu-s")
		})
	}
}

// BenchmarkRecordSize signs the record a billing agent sends to ledger with the real certificates
// of a joined node, in both forms: the full chain (node and agent certificates, what every flow
// carries today) and the chain-hash form (once the peer has cached the chain). It reports the size
// on the wire and the signing cost.
func BenchmarkRecordSize(b *testing.B) {
	e := newBenchEnv(b)
	src := e.sources[0]
	chain := &dtl.CertChain{Node: src.n.issuer.Raw(), Agent: src.cert.Raw()}
	h := chain.Hash()
	aad := make([]byte, 32)
	for _, tc := range []struct {
		name  string
		chain *dtl.CertChain
		hash  []byte
	}{{"chain", chain, nil}, {"chain-hash", nil, h[:]}} {
		b.Run(tc.name, func(b *testing.B) {
			c := &dtl.Claims{
				Version: dtl.Version1, Zone: src.Zone(), Agent: src.ID().String(),
				Chain: tc.chain, ChainHash: tc.hash, Node: src.n.cert.ID.String(),
				Fingerprint: src.cert.Claims.Fingerprint, Region: src.n.region, Trust: src.n.trust,
				FlowID: 2, Seq: 1, IssuedAt: time.Now(),
				Destination: dtl.Destination{Agent: "ledger", Port: 8080, Proto: dtl.ProtoTCP},
			}
			var size int
			for b.Loop() {
				raw, err := dtl.Sign(c, src.key, aad)
				if err != nil {
					b.Fatal(err)
				}
				size = len(raw)
			}
			b.ReportMetric(float64(size), "bytes/record")
		})
	}
}
