package tunstack

import (
	"context"
	"io"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// sinkHandler admits every flow to a loopback TCP sink that sends one byte and reads to the end.
type sinkHandler struct{ addr string }

func (h sinkHandler) Outbound(ctx context.Context, _ string, _, _ netip.AddrPort) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, "tcp", h.addr)
}

// oneByteSink accepts on l until it closes: each connection gets one byte, is read to its end
// and closed.
func oneByteSink(l net.Listener) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		go func() {
			defer func() { _ = c.Close() }()
			if _, err := c.Write([]byte{1}); err != nil {
				return
			}
			_, _ = io.Copy(io.Discard, c)
		}()
	}
}

// processCPU is this process's user and system CPU time.
func processCPU(tb testing.TB) time.Duration {
	var ru unix.Rusage
	require.NoError(tb, unix.Getrusage(unix.RUSAGE_SELF, &ru))
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkKernelTUNConnect is the stack's share of a new TCP connection through a real kernel
// TUN interface (root; a fresh network namespace), one connection at a time, reported as this
// process's CPU per connection (kernel client and loopback sink included, which no change to the
// stack alters) besides the wall time:
//
//   - out: a kernel client connects to a remote overlay address through the interface; the
//     Handler admits it to a loopback sink, which sends one byte; the client reads it and closes.
//   - in: DialFrom originates a connection to a kernel listener on the agent's address, which
//     sends one byte; it is read through the stack and the connection closed.
//
// It leaves out what the daemon adds around the stack (attestation, admission, QUIC), so that a
// change to the stack's per-connection path shows above the noise of a shared machine.
func BenchmarkKernelTUNConnect(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root to create a network namespace and a TUN interface")
	}
	sink, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(b, err)
	b.Cleanup(func() { _ = sink.Close() })
	go oneByteSink(sink)

	for _, dir := range []string{"out", "in"} {
		b.Run(dir, func(b *testing.B) {
			inTUNNamespace(b, "utecps0", sinkHandler{sink.Addr().String()}, func(st *Stack) {

				var one func() error
				if dir == "out" {
					dst := net.TCPAddrFromAddrPort(netip.AddrPortFrom(remote, 80))
					src := &net.TCPAddr{IP: agentA.AsSlice()}
					one = func() error {
						c, err := net.DialTCP("tcp4", src, dst) // on this thread: in the namespace
						if err != nil {
							return err
						}
						defer func() { _ = c.Close() }()
						_, err = io.ReadFull(c, make([]byte, 1))
						return err
					}
				} else {
					// Created on this thread, so in the namespace.
					l, err := net.Listen("tcp4", netip.AddrPortFrom(agentA, 0).String())
					require.NoError(b, err)
					defer func() { _ = l.Close() }()
					go oneByteSink(l)
					dst := netip.AddrPortFrom(agentA, uint16(l.Addr().(*net.TCPAddr).Port))
					src := netip.AddrPortFrom(remote, 0)
					one = func() error {
						ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
						defer cancel()
						c, err := st.DialFrom(ctx, TCP, src, dst)
						if err != nil {
							return err
						}
						defer func() { _ = c.Close() }()
						_, err = io.ReadFull(c, make([]byte, 1))
						return err
					}
				}
				require.NoError(b, one()) // warm: the first connection's one-time costs
				cpu0 := processCPU(b)
				b.ResetTimer()
				for range b.N {
					require.NoError(b, one())
				}
				b.StopTimer()
				b.ReportMetric(float64((processCPU(b)-cpu0).Microseconds())/float64(b.N), "cpu-µs/conn")
			})
		})
	}
}
