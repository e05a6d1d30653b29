package tunnel

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/overlay/dtl"
)

// stallRecorder collects OnStalled reports.
type stallRecorder struct {
	mu      sync.Mutex
	reports []StallReport
}

func (s *stallRecorder) hook(r StallReport) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.reports = append(s.reports, r)
}

// total sums the reports of peer.
func (s *stallRecorder) total(peer string) (r StallReport) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, x := range s.reports {
		if x.Peer == peer {
			r.Stalled += x.Stalled
			r.Busy += x.Busy
			r.ConnsRefused += x.ConnsRefused
		}
	}
	return r
}

func (s *stallRecorder) all() []StallReport {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.reports)
}

func withStalls(s *stallRecorder) nodeOpt { return func(c *Config) { c.OnStalled = s.hook } }

// countVerdicts counts OnVerdict calls: stalled streams must not produce any.
func countVerdicts(n *atomic.Int64) nodeOpt {
	return func(c *Config) { c.OnVerdict = func(Verdict) { n.Add(1) } }
}

// openStalled opens a stream on tun that sends one byte of a record header and then nothing.
func openStalled(ctx context.Context, tun *Tunnel) (*quic.Stream, error) {
	str, err := tun.conn.OpenStreamSync(ctx)
	if err != nil {
		return nil, err
	}
	_, err = str.Write([]byte{byte(dtl.FrameRecord)})
	return str, err
}

func resetCode(t *testing.T, str *quic.Stream, within time.Duration) quic.StreamErrorCode {
	t.Helper()
	_ = str.SetReadDeadline(time.Now().Add(within))
	_, err := io.ReadAll(str)
	require.False(t, errors.Is(err, os.ErrDeadlineExceeded), "the stream was not reset within %s", within)
	code, ok := streamErrCode(err)
	require.True(t, ok, "want a stream reset, got %v", err)
	return code
}

// liveInUse is memInUse right after a collection: what the process retains, without the garbage
// the collector has not reached yet.
func liveInUse() uint64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapAlloc + m.StackInuse
}

// Environment of the attacker process of TestStalledStreamFloodBoundedPerPeer.
const (
	envFloodDir     = "UTE_TEST_FLOOD_DIR"
	envFloodTarget  = "UTE_TEST_FLOOD_TARGET"
	envFloodNode    = "UTE_TEST_FLOOD_NODE"
	envFloodConns   = "UTE_TEST_FLOOD_CONNS"
	envFloodStreams = "UTE_TEST_FLOOD_STREAMS"
)

// TestStalledStreamFloodBoundedPerPeer reproduces the stalled-stream flood attack, scaled to run in
// seconds: a legitimate peer opens 5 tunnels with 5,000 streams each that never deliver their
// first frame. The attacker runs in a process of its own (this test binary, re-executed), so that
// what is measured is the receiving node alone: its live memory (heap after a collection, plus
// goroutine stacks) stays within 64 MiB of its resting level, another peer's new flows keep being
// admitted promptly, and the flood is counted (never one verdict per stream) and reported in
// aggregate.
func TestStalledStreamFloodBoundedPerPeer(t *testing.T) {
	if testing.Short() {
		t.Skip("attack reproduction")
	}
	const (
		conns      = 5
		perConn    = 5000
		probeFlows = 200
	)
	pki := newPKI(t, testTD)
	dir := t.TempDir()
	require.NoError(t, identity.WriteKey(filepath.Join(dir, "ca.key"), pki.key))
	require.NoError(t, identity.WriteCertificates(filepath.Join(dir, "ca.crt"), pki.cert))
	lim := fastLimits()
	lim.FirstFrameTimeout = 5 * time.Second // the default: a stalled stream would otherwise be held this long
	lim.SweepInterval = 200 * time.Millisecond
	var stalls stallRecorder
	var verdicts atomic.Int64
	b := startNode(t, pki, "b", pki.node(t, "b", "payments"), []string{"payments"}, "", withLimits(lim), withStalls(&stalls), countVerdicts(&verdicts))
	honest := startNode(t, pki, "c", pki.node(t, "c", "payments"), []string{"payments"}, "")
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	go drainStreams(ctx, b)

	probe, err := honest.ep.Dial(ctx, b.addr, b.id, "payments")
	require.NoError(t, err)
	record := rec(t, testRecord{Agent: "billing"})
	openOne := func() time.Duration {
		start := time.Now()
		c, err := probe.OpenFlow(ctx, record, nil, nil)
		took := time.Since(start)
		require.NoError(t, err)
		_ = c.Close()
		return took
	}
	for range 20 {
		openOne() // warm up: the tunnel, the pools, the drain goroutines
	}
	verdicts.Store(0)
	resting := liveInUse()

	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^TestFloodAttackerProcess$", "-test.v")
	cmd.Env = append(os.Environ(), envFloodDir+"="+dir, envFloodTarget+"="+b.addr.String(), envFloodNode+"="+b.id,
		envFloodConns+"="+strconv.Itoa(conns), envFloodStreams+"="+strconv.Itoa(perConn))
	stdin, err := cmd.StdinPipe()
	require.NoError(t, err)
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	cmd.Stderr = os.Stderr
	require.NoError(t, cmd.Start())
	t.Cleanup(func() {
		_ = stdin.Close()
		_ = cmd.Wait()
	})
	attackDone := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if line := sc.Text(); strings.HasPrefix(line, "OPENED ") || strings.HasPrefix(line, "FAILED ") {
				attackDone <- line
			}
		}
		close(attackDone)
	}()

	var (
		peak     atomic.Uint64
		peakPend atomic.Int64
		wg       sync.WaitGroup
	)
	sampleCtx, stopSampling := context.WithCancel(ctx)
	wg.Go(func() {
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			if m := liveInUse(); m > peak.Load() {
				peak.Store(m)
			}
			if p := int64(b.ep.Stats().PendingStreams); p > peakPend.Load() {
				peakPend.Store(p)
			}
			select {
			case <-sampleCtx.Done():
				return
			case <-tick.C:
			}
		}
	})
	// Wait until the flood is on, then measure another peer's new flows while it runs.
	require.Eventually(t, func() bool { return b.ep.Stats().PendingStreams > 0 }, 30*time.Second, 5*time.Millisecond, "the attack started")
	var lat []time.Duration
	for range probeFlows {
		lat = append(lat, openOne())
	}
	var line string
	select {
	case line = <-attackDone:
	case <-ctx.Done():
		t.Fatal("the attacker did not finish")
	}
	for range 20 {
		lat = append(lat, openOne()) // and once every attacking stream is open
	}
	stopSampling()
	wg.Wait()

	require.Equal(t, fmt.Sprintf("OPENED %d", conns*perConn), line, "the attacker opened every stream")
	slices.Sort(lat)
	p50, p99 := lat[len(lat)/2], lat[len(lat)*99/100]
	grew := int64(peak.Load()) - int64(resting)
	st := b.ep.Stats()
	t.Logf("stalled-stream flood %d×%d: node memory +%.1f MiB over resting (peak live heap+stacks), peak pending %d; other peer's admission (%d flows) p50 %s p99 %s max %s; busy %d stalled %d tunnels closed %d",
		conns, perConn, float64(grew)/(1<<20), peakPend.Load(), len(lat), p50, p99, lat[len(lat)-1], st.StreamsBusy, st.FlowsStalled, st.TunnelsBusy)

	assert.Less(t, grew, int64(64<<20), "memory above resting must stay under 64 MiB")
	// PendingStreams counts every peer: the honest probe adds at most its one flow in flight.
	assert.LessOrEqual(t, peakPend.Load(), int64(b.ep.lim.MaxPendingPerPeer+1), "pending streams never exceed the peer's budget")
	assert.Less(t, p99, admissionBound, "another peer's admission p99 (true figures in docs/benchmarks.md)")
	assert.NotZero(t, st.StreamsBusy, "streams over the budget are reset at once")
	assert.Equal(t, int64(len(lat)), verdicts.Load(), "only the honest flows got a verdict: stalled and busy streams are counted, not reported one by one")

	// Every attacking stream ends reset (busy at once, stalled at its deadline, or cut with a
	// tunnel that filled with silent streams), never queued.
	require.Eventually(t, func() bool {
		s := b.ep.Stats()
		return s.PendingStreams == 0 && s.StreamsBusy+s.FlowsStalled <= conns*perConn
	}, 20*time.Second, 50*time.Millisecond, "every attacking stream is reset")
	require.Eventually(t, func() bool {
		var r StallReport
		for _, x := range stalls.all() {
			r.Busy += x.Busy
			r.Stalled += x.Stalled
		}
		s := b.ep.Stats()
		return r.Busy == s.StreamsBusy && r.Stalled == s.FlowsStalled
	}, 5*time.Second, 50*time.Millisecond, "the aggregate reports add up to the counters")
	for _, r := range stalls.all() {
		assert.Equal(t, identity.NodeID(testTD, "mallory").String(), r.Peer, "only the attacker is reported")
	}
}

// TestFloodAttackerProcess is the attacker of TestStalledStreamFloodBoundedPerPeer, run in a
// process of its own; without its environment it does nothing. It prints "OPENED n" once every
// stream is open and holds them until its stdin closes.
func TestFloodAttackerProcess(t *testing.T) {
	dir := os.Getenv(envFloodDir)
	if dir == "" {
		t.Skip("run by TestStalledStreamFloodBoundedPerPeer only")
	}
	key, err := identity.ReadKey(filepath.Join(dir, "ca.key"))
	require.NoError(t, err)
	certs, err := identity.ReadCertificates(filepath.Join(dir, "ca.crt"))
	require.NoError(t, err)
	pki := &testPKI{key: key, cert: certs[0], now: time.Now()}
	target, err := netip.ParseAddrPort(os.Getenv(envFloodTarget))
	require.NoError(t, err)
	conns, err := strconv.Atoi(os.Getenv(envFloodConns))
	require.NoError(t, err)
	perConn, err := strconv.Atoi(os.Getenv(envFloodStreams))
	require.NoError(t, err)
	attacker := startNode(t, pki, "mallory", pki.node(t, "mallory", "payments"), []string{"payments"}, "")
	ctx, cancel := context.WithTimeout(context.Background(), 80*time.Second)
	defer cancel()
	var (
		opened atomic.Int64
		wg     sync.WaitGroup
	)
	// A determined attacker: when the node closes a tunnel, it dials another and goes on.
	var dials atomic.Int64
	for range conns {
		wg.Go(func() {
			var tun *Tunnel
			for n := 0; n < perConn && ctx.Err() == nil; {
				if tun == nil || !tun.Alive() {
					var err error
					if tun, err = attacker.ep.dialOnce(ctx, target, os.Getenv(envFloodNode), "payments"); err != nil {
						tun = nil
						time.Sleep(10 * time.Millisecond)
						continue
					}
					dials.Add(1)
				}
				if _, err := openStalled(ctx, tun); err != nil {
					tun = nil
					continue
				}
				n++
				opened.Add(1)
			}
		})
	}
	wg.Wait()
	fmt.Printf("DIALS %d\n", dials.Load())
	fmt.Printf("OPENED %d\n", opened.Load())
	_, _ = io.Copy(io.Discard, os.Stdin)
}

// TestPendingBudgetResetsAtOnceAndDeadlineShrinks: over the tunnel's pending budget a stream is
// reset at once with 0x208; the stalled ones are reset at a deadline that shrank with the budget's
// fill, not at FirstFrameTimeout; none reaches OnVerdict, and the peer can open flows afterwards.
func TestPendingBudgetResetsAtOnceAndDeadlineShrinks(t *testing.T) {
	pki := newPKI(t, testTD)
	lim := fastLimits()
	lim.FirstFrameTimeout = 10 * time.Second
	lim.MinFirstFrameTimeout = 200 * time.Millisecond
	lim.MaxPendingPerConn = 4
	lim.MaxSilentPerConn = 100 // this test is about the budget alone: never close the tunnel
	lim.SweepInterval = 100 * time.Millisecond
	var stalls stallRecorder
	var verdicts atomic.Int64
	b := startNode(t, pki, "b", pki.node(t, "b", "payments"), []string{"payments"}, "", withLimits(lim), withStalls(&stalls), countVerdicts(&verdicts))
	a := startNode(t, pki, "a", pki.node(t, "a", "payments"), []string{"payments"}, "")
	ctx := ctxT(t)
	tun, err := a.ep.Dial(ctx, b.addr, b.id, "payments")
	require.NoError(t, err)

	var held []*quic.Stream
	for range 4 {
		str, err := openStalled(ctx, tun)
		require.NoError(t, err)
		held = append(held, str)
	}
	require.Eventually(t, func() bool { return b.ep.Stats().PendingStreams == 4 }, 5*time.Second, 10*time.Millisecond)
	over, err := openStalled(ctx, tun)
	require.NoError(t, err)
	assert.Equal(t, streamCodeBusy, resetCode(t, over, 2*time.Second), "over the budget: reset at once")

	// The fourth stream arrived with the budget full: its deadline is the floor, not 10 s.
	start := time.Now()
	assert.Equal(t, streamCodeBad, resetCode(t, held[3], 5*time.Second))
	assert.Less(t, time.Since(start), 3*time.Second, "the deadline shrinks under pressure")
	require.Eventually(t, func() bool { return b.ep.Stats().FlowsStalled >= 1 }, 5*time.Second, 10*time.Millisecond)
	st := b.ep.Stats()
	assert.Equal(t, uint64(1), st.StreamsBusy)
	assert.Zero(t, verdicts.Load(), "stalled and busy streams get no verdict each")
	require.Eventually(t, func() bool {
		r := stalls.total(a.id)
		return r.Busy == 1 && r.Stalled >= 1
	}, 5*time.Second, 10*time.Millisecond, "reported in aggregate")

	// With room in the budget again, the peer's flows are admitted.
	c, err := tun.OpenFlow(ctx, rec(t, testRecord{Agent: "billing"}), nil, nil)
	require.NoError(t, err)
	_ = recvStream(t, b)
	_ = c.Close()
}

// TestConnectionCapsPerPeerAndSource: a peer node over MaxConnsPerPeer has its extra tunnel
// closed after the handshake; a source address over MaxConnsPerSource is turned away before it.
func TestConnectionCapsPerPeerAndSource(t *testing.T) {
	pki := newPKI(t, testTD)
	lim := fastLimits()
	lim.MaxConnsPerPeer = 2
	lim.MaxConnsPerSource = 3
	lim.SweepInterval = 100 * time.Millisecond
	var stalls stallRecorder
	b := startNode(t, pki, "b", pki.node(t, "b", "payments"), []string{"payments"}, "", withLimits(lim), withStalls(&stalls))
	a := startNode(t, pki, "a", pki.node(t, "a", "payments"), []string{"payments"}, "", withLimits(fastLimits()))
	c := startNode(t, pki, "c", pki.node(t, "c", "payments"), []string{"payments"}, "", withLimits(fastLimits()))
	ctx := ctxT(t)

	first, err := a.ep.dialOnce(ctx, b.addr, b.id, "payments")
	require.NoError(t, err)
	_, err = a.ep.dialOnce(ctx, b.addr, b.id, "payments")
	require.NoError(t, err)
	_, err = a.ep.dialOnce(ctx, b.addr, b.id, "payments")
	require.Error(t, err, "a third tunnel of the same peer is refused")
	var appErr *quic.ApplicationError
	if errors.As(err, &appErr) {
		assert.Equal(t, codeBusy, appErr.ErrorCode)
	}
	require.Eventually(t, func() bool { return b.ep.Stats().TunnelsBusy == 1 }, 5*time.Second, 10*time.Millisecond)
	require.Eventually(t, func() bool { return stalls.total(a.id).ConnsRefused == 1 }, 5*time.Second, 10*time.Millisecond)

	// Another peer from the same address: one more fits the source cap, the next does not.
	_, err = c.ep.dialOnce(ctx, b.addr, b.id, "payments")
	require.NoError(t, err)
	_, err = c.ep.dialOnce(ctx, b.addr, b.id, "payments")
	require.Error(t, err, "the source address holds MaxConnsPerSource tunnels")
	assert.GreaterOrEqual(t, b.ep.Stats().TunnelsBusy, uint64(2), "counted (each refused Initial once)")

	// Closing a tunnel frees its place.
	require.NoError(t, first.Close())
	require.Eventually(t, func() bool {
		_, err := c.ep.dialOnce(ctx, b.addr, b.id, "payments")
		return err == nil
	}, 5*time.Second, 50*time.Millisecond, "a closed tunnel frees its place")
}

// TestTunnelFullOfSilentStreamsIsClosed: when a stream finds the tunnel's pending budget full of
// streams that never sent their first frame, the tunnel is closed (0x105) instead of handing the
// attacker the credit for the next stream; its pending streams count as stalled, none gets a
// verdict, and the peer can dial again.
func TestTunnelFullOfSilentStreamsIsClosed(t *testing.T) {
	pki := newPKI(t, testTD)
	lim := fastLimits()
	lim.FirstFrameTimeout = 10 * time.Second
	lim.MaxPendingPerConn = 4
	lim.SweepInterval = 100 * time.Millisecond
	var stalls stallRecorder
	var verdicts atomic.Int64
	b := startNode(t, pki, "b", pki.node(t, "b", "payments"), []string{"payments"}, "", withLimits(lim), withStalls(&stalls), countVerdicts(&verdicts))
	a := startNode(t, pki, "a", pki.node(t, "a", "payments"), []string{"payments"}, "")
	ctx := ctxT(t)
	tun, err := a.ep.Dial(ctx, b.addr, b.id, "payments")
	require.NoError(t, err)
	for range 4 {
		_, err := openStalled(ctx, tun)
		require.NoError(t, err)
	}
	require.Eventually(t, func() bool { return b.ep.Stats().PendingStreams == 4 }, 5*time.Second, 10*time.Millisecond)
	_, err = openStalled(ctx, tun)
	require.NoError(t, err)
	select {
	case <-tun.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the tunnel full of silent streams was not closed")
	}
	var appErr *quic.ApplicationError
	require.ErrorAs(t, context.Cause(tun.conn.Context()), &appErr)
	assert.Equal(t, codeBusy, appErr.ErrorCode)
	require.Eventually(t, func() bool {
		s := b.ep.Stats()
		return s.PendingStreams == 0 && s.FlowsStalled == 4 && s.StreamsBusy == 1 && s.TunnelsBusy == 1
	}, 5*time.Second, 10*time.Millisecond, "%+v", b.ep.Stats())
	require.Eventually(t, func() bool {
		r := stalls.total(a.id)
		return r.Stalled == 4 && r.Busy == 1 && r.ConnsRefused == 1
	}, 5*time.Second, 10*time.Millisecond)
	assert.Zero(t, verdicts.Load(), "no stream of the closed tunnel got a verdict of its own")

	again, err := a.ep.Dial(ctx, b.addr, b.id, "payments")
	require.NoError(t, err)
	c, err := again.OpenFlow(ctx, rec(t, testRecord{Agent: "billing"}), nil, nil)
	require.NoError(t, err)
	_ = recvStream(t, b)
	_ = c.Close()
}
