package wireguard

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.zx2c4.com/wireguard/tun"
	"golang.zx2c4.com/wireguard/tun/tuntest"
)

const offset = 16 // wireguard-go reads and writes packets at this offset

// harness runs a Filter over a channel TUN: kernel() injects a packet the kernel sends, sent
// collects what the filter hands the device (Read), and deliver() writes what the device
// decrypted, collecting what reaches the kernel in delivered.
type harness struct {
	t         *testing.T
	ch        *tuntest.ChannelTUN
	f         *Filter
	sent      chan []byte
	delivered chan []byte
}

func newHarness(t *testing.T, cfg FilterConfig) *harness {
	h := &harness{t: t, ch: tuntest.NewChannelTUN(), sent: make(chan []byte, 256), delivered: make(chan []byte, 256)}
	cfg.Inner = h.ch.TUN()
	h.f = NewFilter(cfg)
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

func (h *harness) kernel(p []byte) { h.ch.Outbound <- p }

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
	decide := make(chan error)
	var calls atomic.Int32
	var h *harness
	h = newHarness(t, FilterConfig{Admit: func(ctx context.Context, tp Tuple) error {
		calls.Add(1)
		require.Equal(t, out, tp)
		err := <-decide
		if err == nil {
			h.f.AddOutbound(tp, "flow")
		}
		return err
	}})
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
}

func TestFilterRefusedFlowNeverPasses(t *testing.T) {
	errNo := errors.New("refused by the receiver")
	var calls atomic.Int32
	h := newHarness(t, FilterConfig{RefuseFor: time.Hour, Admit: func(context.Context, Tuple) error {
		calls.Add(1)
		return errNo
	}})
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
}

func TestFilterHookThatForgetsToAddRefuses(t *testing.T) {
	h := newHarness(t, FilterConfig{Admit: func(context.Context, Tuple) error { return nil }})
	h.kernel(packet(out, 0))
	expectNone(t, h.sent, 200*time.Millisecond)
	require.Eventually(t, func() bool { return h.f.Stats().Refusals == 1 }, 2*time.Second, 5*time.Millisecond)
}

func TestFilterOverflowDropsAndCounts(t *testing.T) {
	decide := make(chan struct{})
	var h *harness
	h = newHarness(t, FilterConfig{MaxHeldPerFlow: 4, MaxAdmissions: 1, Admit: func(_ context.Context, tp Tuple) error {
		<-decide
		h.f.AddOutbound(tp, nil)
		return nil
	}})
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
}

func TestFilterInboundOnlyAdmitted(t *testing.T) {
	h := newHarness(t, FilterConfig{Admit: func(context.Context, Tuple) error { return errors.New("no") }})
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

func itoa(i int) string { return netip.AddrPortFrom(netip.IPv4Unspecified(), uint16(i)).String()[8:] }

// burstTUN hands out the same batch of packets on every Read (the kernel sending as fast as it
// can), so that BenchmarkFilterRead measures the filter's whole read path: the reader goroutine,
// the decision, the hand-over and the copy into the device's buffers.
type burstTUN struct {
	nullTUN
	pkt []byte
}

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

func BenchmarkFilterRead(b *testing.B) {
	p := packet(out, 1380)
	f := NewFilter(FilterConfig{Inner: &burstTUN{nullTUN: nullTUN{closed: make(chan struct{})}, pkt: p}})
	defer f.Close()
	f.AddOutbound(out, nil)
	bufs := make([][]byte, 64)
	for i := range bufs {
		bufs[i] = make([]byte, 2048)
	}
	sizes := make([]int, 64)
	b.SetBytes(int64(len(p)))
	b.ReportAllocs()
	for b.Loop() {
		// One packet per Read: the reader goroutine fills a batch of 64 ahead.
		if n, err := f.Read(bufs[:1], sizes, offset); err != nil || n != 1 {
			b.Fatal(n, err)
		}
	}
}
