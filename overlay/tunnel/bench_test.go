package tunnel

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/stretchr/testify/require"
)

const benchChunk = 64 << 10

// drainStreams reads and discards every stream flow delivered to n.
func drainStreams(ctx context.Context, n *testNode) {
	for {
		select {
		case c := <-n.streams:
			go func() {
				_, _ = io.Copy(io.Discard, c)
				_ = c.Close()
			}()
		case <-ctx.Done():
			return
		}
	}
}

// bareQUICPair is one plain quic-go stream over loopback with the same TLS keys: the baseline.
func bareQUICPair(b *testing.B, cert tls.Certificate) (w *quic.Stream) {
	b.Helper()
	tconf := &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"bench"}, InsecureSkipVerify: true}
	ln, err := quic.ListenAddr("127.0.0.1:0", tconf, &quic.Config{})
	require.NoError(b, err)
	b.Cleanup(func() { _ = ln.Close() })
	ctx := context.Background()
	go func() {
		conn, err := ln.Accept(ctx)
		if err != nil {
			return
		}
		s, err := conn.AcceptStream(ctx)
		if err != nil {
			return
		}
		_, _ = io.Copy(io.Discard, s)
	}()
	conn, err := quic.DialAddr(ctx, ln.Addr().String(), tconf, &quic.Config{})
	require.NoError(b, err)
	b.Cleanup(func() { _ = conn.CloseWithError(0, "") })
	s, err := conn.OpenStreamSync(ctx)
	require.NoError(b, err)
	return s
}

func pump(b *testing.B, w io.Writer, bytes int) time.Duration {
	buf := make([]byte, benchChunk)
	start := time.Now()
	for sent := 0; sent < bytes; sent += len(buf) {
		if _, err := w.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	return time.Since(start)
}

// BenchmarkFlowThroughput moves the same bytes over an admitted flow and over a bare quic-go stream
// in the same run and reports the ratio (target ≥ 0.8 for the whole agent path, docs/design.md (performance targets)).
func BenchmarkFlowThroughput(b *testing.B) {
	_, srv, tun := pair(b, "payments")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go drainStreams(ctx, srv)
	flow, err := tun.OpenFlow(ctx, rec(b, testRecord{Agent: "bench"}), nil, nil)
	require.NoError(b, err)
	defer flow.Close()
	bare := bareQUICPair(b, srv.ep.cfg.Certificate)

	const per = 16 << 20
	var tFlow, tBare time.Duration
	// Each iteration moves per bytes on each of the two paths; the MB/s column counts both.
	b.SetBytes(2 * per)
	b.ResetTimer()
	for b.Loop() {
		tFlow += pump(b, flow, per)
		tBare += pump(b, bare, per)
	}
	b.StopTimer()
	flowMBs := float64(per*b.N) / tFlow.Seconds() / 1e6
	bareMBs := float64(per*b.N) / tBare.Seconds() / 1e6
	b.ReportMetric(flowMBs, "flow-MB/s")
	b.ReportMetric(bareMBs, "bare-MB/s")
	b.ReportMetric(flowMBs/bareMBs, "flow/bare")
}

// BenchmarkFlowAdmission is one flow's open → record → accept round trip (the admitter here does
// no signature work; dtl's own benchmarks cost the record verification).
func BenchmarkFlowAdmission(b *testing.B) {
	_, srv, tun := pair(b, "payments")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go drainStreams(ctx, srv)
	record := rec(b, testRecord{Agent: "bench"})
	for b.Loop() {
		c, err := tun.OpenFlow(ctx, record, nil, nil)
		if err != nil {
			b.Fatal(err)
		}
		_ = c.Close()
	}
}

// BenchmarkNewFlows opens flows from parallel goroutines over one tunnel and reports flows/s
// (target ≥ 5,000 per node).
func BenchmarkNewFlows(b *testing.B) {
	lim := fastLimits()
	pki := newPKI(b, testTD)
	a := startNode(b, pki, "a", pki.node(b, "a", "payments"), []string{"payments"}, "", withLimits(lim))
	srv := startNode(b, pki, "b", pki.node(b, "b", "payments"), []string{"payments"}, "", withLimits(lim))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	tun, err := a.ep.Dial(ctx, srv.addr, srv.id, "payments")
	require.NoError(b, err)
	go drainStreams(ctx, srv)
	record := rec(b, testRecord{Agent: "bench"})
	b.SetParallelism(8)
	start := time.Now()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			c, err := tun.OpenFlow(ctx, record, nil, nil)
			if err != nil {
				b.Error(err)
				return
			}
			_ = c.Close()
		}
	})
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "flows/s")
}

var _ net.Conn = (*FlowConn)(nil)
