package wireguard

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.zx2c4.com/wireguard/tun"
	"golang.zx2c4.com/wireguard/tun/tuntest"
)

const offset = 16 // wireguard-go reads and writes packets at this offset

// harness runs a Filter over a channel TUN: kernel() injects a packet the kernel sends, sent
// collects what the filter hands the device (Read), and deliver() writes what the device
// decrypted, collecting what reaches the kernel in delivered. With direct, the kernel side is a
// sockTUN instead, whose file can interrupt a blocked read, so the filter reads it directly.
type harness struct {
	t         *testing.T
	ch        *tuntest.ChannelTUN
	sock      *sockTUN
	f         *Filter
	sent      chan []byte
	delivered chan []byte
}

func newHarness(t *testing.T, cfg FilterConfig) *harness { return newHarnessMode(t, cfg, false) }

func newHarnessMode(t *testing.T, cfg FilterConfig, direct bool) *harness {
	h := &harness{t: t, ch: tuntest.NewChannelTUN(), sent: make(chan []byte, 256), delivered: make(chan []byte, 256)}
	cfg.Inner = h.ch.TUN()
	if direct {
		h.sock = newSockTUN(t, h.ch.Inbound)
		cfg.Inner = h.sock
	}
	h.f = NewFilter(cfg)
	require.Equal(t, direct, h.f.direct != nil, "the filter reads the kernel side directly exactly when it can interrupt a read")
	var wg sync.WaitGroup
	wg.Go(func() {
		bufs := [][]byte{make([]byte, 2048)}
		sizes := []int{0}
		for {
			n, err := h.f.Read(bufs, sizes, offset)
			if err != nil {
				return
			}
			for i := range n {
				h.sent <- append([]byte(nil), bufs[i][offset:offset+sizes[i]]...)
			}
		}
	})
	stop := make(chan struct{})
	wg.Go(func() {
		for {
			select {
			case p := <-h.ch.Inbound:
				select {
				case h.delivered <- p:
				case <-stop:
					return
				}
			case <-stop:
				return
			}
		}
	})
	t.Cleanup(func() {
		require.NoError(t, h.f.Close())
		close(stop)
		wg.Wait()
	})
	return h
}

func (h *harness) kernel(p []byte) {
	if h.sock != nil {
		_, err := h.sock.w.Write(p)
		require.NoError(h.t, err)
		return
	}
	h.ch.Outbound <- p
}

// sockTUN is a kernel side whose packets arrive on a SOCK_SEQPACKET socket pair: its file is
// nonblocking and in Go's poller, like a kernel TUN's, so a read deadline interrupts a blocked
// Read. Written packets go to inbound.
type sockTUN struct {
	r, w    *os.File
	inbound chan<- []byte
}

func newSockTUN(t *testing.T, inbound chan<- []byte) *sockTUN {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_SEQPACKET|syscall.SOCK_NONBLOCK|syscall.SOCK_CLOEXEC, 0)
	require.NoError(t, err)
	s := &sockTUN{r: os.NewFile(uintptr(fds[0]), "kernel-read"), w: os.NewFile(uintptr(fds[1]), "kernel-write"), inbound: inbound}
	t.Cleanup(func() { _ = s.w.Close() })
	return s
}

func (s *sockTUN) File() *os.File { return s.r }
func (s *sockTUN) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	n, err := s.r.Read(bufs[0][offset:])
	if err != nil {
		return 0, err
	}
	sizes[0] = n
	return 1, nil
}
func (s *sockTUN) Write(bufs [][]byte, offset int) (int, error) {
	for _, b := range bufs {
		s.inbound <- append([]byte(nil), b[offset:]...)
	}
	return len(bufs), nil
}
func (s *sockTUN) MTU() (int, error)        { return 1420, nil }
func (s *sockTUN) Name() (string, error)    { return "sock0", nil }
func (s *sockTUN) Events() <-chan tun.Event { return nil }
func (s *sockTUN) Close() error             { return s.r.Close() }
func (s *sockTUN) BatchSize() int           { return 1 }

// bothReads runs test with the filter reading through its reader goroutine (channel TUN) and
// reading the kernel side directly (sockTUN).
func bothReads(t *testing.T, test func(t *testing.T, direct bool)) {
	for _, direct := range []bool{false, true} {
		name := "reader"
		if direct {
			name = "direct"
		}
		t.Run(name, func(t *testing.T) { test(t, direct) })
	}
}

func (h *harness) deliver(ps ...[]byte) {
	bufs := make([][]byte, len(ps))
	for i, p := range ps {
		bufs[i] = append(make([]byte, offset), p...)
	}
	n, err := h.f.Write(bufs, offset)
	require.NoError(h.t, err)
	require.Equal(h.t, len(ps), n)
}

func expectNone(t *testing.T, c chan []byte, within time.Duration) {
	t.Helper()
	select {
	case p := <-c:
		t.Fatalf("a packet passed: % x", p[:min(len(p), 40)])
	case <-time.After(within):
	}
}

func expectPacket(t *testing.T, c chan []byte, want []byte) {
	t.Helper()
	select {
	case p := <-c:
		require.Equal(t, want, p)
	case <-time.After(5 * time.Second):
		t.Fatal("no packet passed")
	}
}

var (
	a1  = "100.100.1.2"
	b1  = "100.100.1.18"
	out = tcp(a1+":40000", b1+":8080")
)

func TestFilterHoldsUntilAdmitted(t *testing.T) {
	bothReads(t, func(t *testing.T, direct bool) {
		decide := make(chan error)
		var calls atomic.Int32
		var h *harness
		h = newHarnessMode(t, FilterConfig{Admit: func(ctx context.Context, tp Tuple) error {
			calls.Add(1)
			require.Equal(t, out, tp)
			err := <-decide
			if err == nil {
				h.f.AddOutbound(tp, "flow")
			}
			return err
		}}, direct)
		syn, ack := packet(out, 0), packet(out, 10)
		h.kernel(syn)
		h.kernel(ack)
		expectNone(t, h.sent, 100*time.Millisecond)
		require.Equal(t, uint64(2), h.f.Stats().Held)
		decide <- nil
		expectPacket(t, h.sent, syn)
		expectPacket(t, h.sent, ack)
		// Later packets pass at once; the reply passes inbound; nothing asks for admission again.
		data := packet(out, 100)
		h.kernel(data)
		expectPacket(t, h.sent, data)
		reply := packet(out.Reverse(), 5)
		h.deliver(reply)
		expectPacket(t, h.delivered, reply)
		require.Equal(t, int32(1), calls.Load())
		st := h.f.Stats()
		require.Equal(t, uint64(2), st.Released)
		require.Equal(t, uint64(1), st.Admissions)
		require.Equal(t, 1, st.Flows)
	})
}

func TestFilterRefusedFlowNeverPasses(t *testing.T) {
	bothReads(t, func(t *testing.T, direct bool) {
		errNo := errors.New("refused by the receiver")
		var calls atomic.Int32
		h := newHarnessMode(t, FilterConfig{RefuseFor: time.Hour, Admit: func(context.Context, Tuple) error {
			calls.Add(1)
			return errNo
		}}, direct)
		for range 3 {
			h.kernel(packet(out, 0))
		}
		expectNone(t, h.sent, 200*time.Millisecond)
		require.Eventually(t, func() bool { return h.f.Stats().Refused == 3 }, 2*time.Second, 5*time.Millisecond)
		require.Equal(t, int32(1), calls.Load(), "a refused tuple is not asked again within RefuseFor")
		require.False(t, h.f.Admitted(out))
		// Nor does a reply-shaped packet from the device get in.
		h.deliver(packet(out.Reverse(), 0))
		expectNone(t, h.delivered, 100*time.Millisecond)
		require.Equal(t, uint64(1), h.f.Stats().Unadmitted)
	})
}

func TestFilterHookThatForgetsToAddRefuses(t *testing.T) {
	bothReads(t, func(t *testing.T, direct bool) {
		h := newHarnessMode(t, FilterConfig{Admit: func(context.Context, Tuple) error { return nil }}, direct)
		h.kernel(packet(out, 0))
		expectNone(t, h.sent, 200*time.Millisecond)
		require.Eventually(t, func() bool { return h.f.Stats().Refusals == 1 }, 2*time.Second, 5*time.Millisecond)
	})
}

func TestFilterOverflowDropsAndCounts(t *testing.T) {
	bothReads(t, func(t *testing.T, direct bool) {
		decide := make(chan struct{})
		var h *harness
		h = newHarnessMode(t, FilterConfig{MaxHeldPerFlow: 4, MaxAdmissions: 1, Admit: func(_ context.Context, tp Tuple) error {
			<-decide
			h.f.AddOutbound(tp, nil)
			return nil
		}}, direct)
		for i := range 10 {
			h.kernel(packet(out, i))
		}
		// A second tuple while the only admission slot is taken: dropped, counted.
		h.kernel(packet(tcp(a1+":40001", b1+":8080"), 0))
		require.Eventually(t, func() bool { return h.f.Stats().Overflow == 7 }, 2*time.Second, 5*time.Millisecond)
		close(decide)
		for i := range 4 {
			expectPacket(t, h.sent, packet(out, i))
		}
		expectNone(t, h.sent, 100*time.Millisecond)
		st := h.f.Stats()
		require.Equal(t, uint64(4), st.Held)
		require.Equal(t, uint64(4), st.Released)
	})
}

func TestFilterInboundOnlyAdmitted(t *testing.T) {
	bothReads(t, func(t *testing.T, direct bool) {
		h := newHarnessMode(t, FilterConfig{Admit: func(context.Context, Tuple) error { return errors.New("no") }}, direct)
		in := tcp(b1+":50000", a1+":8080")
		h.deliver(packet(in, 0))
		expectNone(t, h.delivered, 100*time.Millisecond)
		h.f.AddInbound(in, nil)
		p := packet(in, 3)
		other := packet(tcp(b1+":50001", a1+":8080"), 0) // same hosts, another tuple
		h.deliver(other, p)
		expectPacket(t, h.delivered, p)
		expectNone(t, h.delivered, 100*time.Millisecond)
		// The local agent's reply leaves without an admission of its own.
		r := packet(in.Reverse(), 1)
		h.kernel(r)
		expectPacket(t, h.sent, r)
		// Not TCP or UDP (ICMP echo): dropped both ways.
		ping := tuntest.Ping(netip.MustParseAddr(a1), netip.MustParseAddr(b1))
		h.deliver(ping)
		h.kernel(ping)
		expectNone(t, h.delivered, 50*time.Millisecond)
		expectNone(t, h.sent, 50*time.Millisecond)
		require.Equal(t, uint64(2), h.f.Stats().NotFlow)
		require.Equal(t, uint64(2), h.f.Stats().Unadmitted)
	})
}

// TestFilterRemoveStopsAtOnce hammers the device side with packets of an admitted tuple from
// four goroutines while the tuple is removed: once Remove has returned, not one more packet
// reaches the kernel (the kernel side counts each packet inside its Write).
func TestFilterRemoveStopsAtOnce(t *testing.T) {
	kernel := &countingTUN{nullTUN: nullTUN{closed: make(chan struct{})}}
	f := NewFilter(FilterConfig{Inner: kernel})
	t.Cleanup(func() { _ = f.Close() })
	in := tcp(b1+":50000", a1+":8080")
	f.AddInbound(in, "prov")
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			bufs := [][]byte{append(make([]byte, offset), packet(in, 64)...)}
			for {
				select {
				case <-stop:
					return
				default:
				}
				_, _ = f.Write(bufs, offset)
			}
		})
	}
	require.Eventually(t, func() bool { return kernel.n.Load() > 1000 }, 5*time.Second, time.Millisecond)
	n := f.RemoveMatching(func(tp Tuple, info any) bool { return info == "prov" })
	passed := kernel.n.Load()
	require.Equal(t, 1, n)
	base := f.Stats().Unadmitted
	require.Eventually(t, func() bool { return f.Stats().Unadmitted > base+1000 }, 5*time.Second, time.Millisecond)
	close(stop)
	wg.Wait()
	require.Equal(t, passed, kernel.n.Load(), "packets passed after the removal returned")
}

type countingTUN struct {
	nullTUN
	n atomic.Int64
}

func (c *countingTUN) Write(b [][]byte, _ int) (int, error) {
	c.n.Add(int64(len(b)))
	return len(b), nil
}

func TestFilterIdleSweep(t *testing.T) {
	var gone []Tuple
	var mu sync.Mutex
	h := newHarness(t, FilterConfig{IdleTimeout: time.Minute, OnRemove: func(tp Tuple, _ any) {
		mu.Lock()
		gone = append(gone, tp)
		mu.Unlock()
	}})
	h.f.AddOutbound(out, nil)
	require.Zero(t, h.f.SweepIdle(time.Now()))
	require.Equal(t, 1, h.f.SweepIdle(time.Now().Add(2*time.Minute)))
	mu.Lock()
	require.Equal(t, []Tuple{out}, gone)
	mu.Unlock()
	require.False(t, h.f.Admitted(out))
}

func TestParseTuple(t *testing.T) {
	for _, tp := range []Tuple{out, out.Reverse(), {Src: netip.MustParseAddr("fd00::1"), Dst: netip.MustParseAddr("fd00::2"), SrcPort: 1, DstPort: 53, Proto: ProtoUDP}} {
		got, ok := ParseTuple(packet(tp, 0))
		require.True(t, ok)
		require.Equal(t, tp, got)
	}
	frag := packet(out, 0)
	frag[7] = 1 // fragment offset 1: no ports
	_, ok := ParseTuple(frag)
	require.False(t, ok)
	_, ok = ParseTuple(packet(out, 0)[:22])
	require.False(t, ok)
}

func FuzzParseTuple(f *testing.F) {
	f.Add(packet(out, 0))
	f.Add(packet(Tuple{Src: netip.MustParseAddr("fd00::1"), Dst: netip.MustParseAddr("fd00::2"), SrcPort: 1, DstPort: 53, Proto: ProtoUDP}, 4))
	f.Add([]byte{0x45})
	f.Fuzz(func(t *testing.T, p []byte) {
		tp, ok := ParseTuple(p)
		if ok && tp.Proto != ProtoTCP && tp.Proto != ProtoUDP {
			t.Fatalf("parsed protocol %d", tp.Proto)
		}
	})
}

// nullTUN is a kernel side that never produces packets and discards writes, so that the
// benchmarks measure the filter alone.
type nullTUN struct{ closed chan struct{} }

func (n *nullTUN) File() *os.File { return nil }
func (n *nullTUN) Read([][]byte, []int, int) (int, error) {
	<-n.closed
	return 0, os.ErrClosed
}
func (n *nullTUN) Write(b [][]byte, _ int) (int, error) { return len(b), nil }
func (n *nullTUN) MTU() (int, error)                    { return 1420, nil }
func (n *nullTUN) Name() (string, error)                { return "null", nil }
func (n *nullTUN) Events() <-chan tun.Event             { return nil }
func (n *nullTUN) Close() error                         { close(n.closed); return nil }
func (n *nullTUN) BatchSize() int                       { return 1 }

// BenchmarkFilterWrite is the per-packet cost of the fast path toward the kernel (device to
// kernel: parse, one map lookup under a read lock), 128 packets a batch, with 10,000 admitted
// tuples in the table.
func BenchmarkFilterWrite(b *testing.B) {
	f := NewFilter(FilterConfig{Inner: &nullTUN{closed: make(chan struct{})}})
	defer f.Close()
	for i := range 10000 {
		f.AddInbound(tcp(b1+":"+itoa(10000+i), a1+":8080"), nil)
	}
	in := tcp(b1+":15000", a1+":8080")
	bufs := make([][]byte, 128)
	for i := range bufs {
		bufs[i] = append(make([]byte, offset), packet(in, 1380)...)
	}
	b.SetBytes(int64(len(bufs) * 1420))
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		if _, err := f.Write(bufs, offset); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*len(bufs)), "ns/packet")
}

// BenchmarkFilterOutbound is the per-packet decision toward the device (kernel to device).
func BenchmarkFilterOutbound(b *testing.B) {
	f := NewFilter(FilterConfig{Inner: &nullTUN{closed: make(chan struct{})}})
	defer f.Close()
	f.AddOutbound(out, nil)
	p := packet(out, 1380)
	now := f.coarse.Load()
	b.ReportAllocs()
	for b.Loop() {
		if !f.outbound(p, now) {
			b.Fatal("dropped")
		}
	}
}

// processCPU is the CPU time (user and system) the test process has used.
func processCPU(b *testing.B) time.Duration {
	var ru syscall.Rusage
	require.NoError(b, syscall.Getrusage(syscall.RUSAGE_SELF, &ru))
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func itoa(i int) string { return netip.AddrPortFrom(netip.IPv4Unspecified(), uint16(i)).String()[8:] }

// burstTUN hands out the same batch of packets on every Read (the kernel sending as fast as it
// can), so that BenchmarkFilterRead measures the filter's whole read path: the reader goroutine,
// the decision, the hand-over and the copy into the device's buffers.
type burstTUN struct {
	nullTUN
	pkt  []byte
	file *os.File // nil: no interruptible file, the filter reads through its reader goroutine
}

func (b *burstTUN) File() *os.File { return b.file }

func (b *burstTUN) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	select {
	case <-b.closed:
		return 0, os.ErrClosed
	default:
	}
	for i := range bufs {
		sizes[i] = copy(bufs[i][offset:], b.pkt)
	}
	return len(bufs), nil
}
func (b *burstTUN) BatchSize() int { return 64 }

// BenchmarkFilterRead is the filter's whole read path per packet, one packet per Read: through
// the reader goroutine (a device without an interruptible file: a batch of 64 read ahead, each
// packet handed over and copied), and directly (a kernel TUN: read into the device's buffers
// and decided in place).
func BenchmarkFilterRead(b *testing.B) {
	for _, direct := range []bool{false, true} {
		name := "reader"
		if direct {
			name = "direct"
		}
		b.Run(name, func(b *testing.B) {
			p := packet(out, 1380)
			inner := &burstTUN{nullTUN: nullTUN{closed: make(chan struct{})}, pkt: p}
			if direct {
				r, w, err := os.Pipe() // only its deadline is used
				require.NoError(b, err)
				b.Cleanup(func() { _ = r.Close(); _ = w.Close() })
				inner.file = r
			}
			f := NewFilter(FilterConfig{Inner: inner})
			defer f.Close()
			require.Equal(b, direct, f.direct != nil)
			f.AddOutbound(out, nil)
			bufs := make([][]byte, 64)
			for i := range bufs {
				bufs[i] = make([]byte, 2048)
			}
			sizes := make([]int, 64)
			b.SetBytes(int64(len(p)))
			b.ReportAllocs()
			cpu0 := processCPU(b)
			for b.Loop() {
				if n, err := f.Read(bufs[:1], sizes, offset); err != nil || n != 1 {
					b.Fatal(n, err)
				}
			}
			// The process's CPU per packet, both goroutines included: what wall time per op hides
			// when the reader goroutine runs on another core, and what load hardly changes.
			b.ReportMetric(float64((processCPU(b)-cpu0).Nanoseconds())/float64(b.N), "cpu-ns/op")
		})
	}
}
