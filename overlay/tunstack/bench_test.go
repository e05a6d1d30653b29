package tunstack

import (
	"io"
	"net"
	"net/netip"
	"testing"

	"github.com/stretchr/testify/require"
)

// BenchmarkStackOutbound: one TCP connection from a program (a second gVisor stack standing in
// for the kernel) through the Stack to a loopback TCP sink the Handler dials.
func BenchmarkStackOutbound(b *testing.B) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(b, err)
	defer l.Close()
	got := make(chan int64, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			got <- -1
			return
		}
		n, _ := io.Copy(io.Discard, c)
		_ = c.Close()
		got <- n
	}()
	st, k := newStackB(b, &handler{tcp: l.Addr().String()})
	_ = st
	c, err := k.net.DialTCPAddrPort(netip.AddrPortFrom(remote, 80))
	require.NoError(b, err)
	const chunk = 64 << 10
	buf := make([]byte, chunk)
	b.SetBytes(chunk)
	b.ResetTimer()
	for range b.N {
		if _, err := c.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	require.NoError(b, c.CloseWrite())
	n := <-got
	b.StopTimer()
	require.Equal(b, int64(b.N)*chunk, n)
}

func newStackB(b *testing.B, h Handler) (*Stack, *kernel) {
	b.Helper()
	k := newKernelTB(b)
	st, err := New(k.dev, mtu, h, nil)
	require.NoError(b, err)
	st.SetLocal([]netip.Addr{agentA})
	b.Cleanup(func() { _ = st.Close() })
	return st, k
}
