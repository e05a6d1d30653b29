package daemon

import (
	"context"
	"io"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/node/state"
)

// BenchmarkTUNThroughput measures one TCP connection's throughput between two programs (this
// test binary, enrolled as both agents) in two network namespaces joined by a veth pair:
//
//   - tun: kernel socket → ute0 → gVisor → QUIC stream over the veth → gVisor → ute0 → kernel
//     socket, attested and admitted like any flow;
//   - sdk: the same two agents through the SDK (Agent.Dial / Agent.Listen), the QUIC stream
//     alone: what the TUN carriage adds is tun against sdk;
//   - veth: the same namespaces with no overlay (the ceiling);
//   - loopback: one namespace, no veth.
//
// Root only: go test -run '^$' -bench TUNThroughput ./node/daemon.
func BenchmarkTUNThroughput(b *testing.B) {
	benchTUN(b, TUNOptions{})
}

// BenchmarkTUNThroughputMTU1500 is the tun path with the interface at MTU 1,500: the kernel
// hands the stack MSS-sized segments instead of 64 KiB ones.
func BenchmarkTUNThroughputMTU1500(b *testing.B) {
	benchTUN(b, TUNOptions{MTU: 1500}, "tun")
}

func benchTUN(b *testing.B, o TUNOptions, only ...string) {
	needRoot(b)
	exe, err := os.Executable()
	require.NoError(b, err)
	a, bn := tunPair(b,
		[]state.AgentSpec{{Name: "billing-api", Zone: "payments", Exe: exe}},
		[]state.AgentSpec{{Name: "ledger", Zone: "payments", Exe: exe}}, o)
	waitTunnel(b, a, bn)
	src, dst := a.agents["billing-api"].IP, bn.agents["ledger"].IP

	b.Run("tun", func(b *testing.B) {
		throughput(b, bn.ns, a.ns, netip.AddrPortFrom(dst, 8080), netip.AddrPortFrom(src, 0))
	})
	if len(only) > 0 {
		return
	}
	b.Run("sdk", func(b *testing.B) {
		la, err := bn.Node().Agent("payments", "ledger")
		require.NoError(b, err)
		l, err := la.Listen("tcp", ":8080") // a port's own listener takes precedence over the TUN's
		require.NoError(b, err)
		defer l.Close()
		ag, err := a.Node().Agent("payments", "billing-api")
		require.NoError(b, err)
		sink(b, l, func() (net.Conn, error) { return ag.Dial(context.Background(), "tcp", "ledger.payments:8080") })
	})
	b.Run("veth", func(b *testing.B) {
		throughput(b, bn.ns, a.ns, netip.MustParseAddrPort("10.77.0.2:9090"), netip.MustParseAddrPort("10.77.0.1:0"))
	})
	b.Run("loopback", func(b *testing.B) {
		throughput(b, a.ns, a.ns, netip.MustParseAddrPort("127.0.0.1:9091"), netip.MustParseAddrPort("127.0.0.1:0"))
	})
}

// throughput sends to a listener made in server's namespace on to, from a socket made in
// client's namespace bound to from.
func throughput(b *testing.B, server, client *netns, to, from netip.AddrPort) {
	var l net.Listener
	server.do(b, func() {
		var err error
		l, err = net.Listen("tcp", to.String())
		require.NoError(b, err)
	})
	defer l.Close()
	sink(b, l, func() (c net.Conn, err error) {
		client.do(b, func() {
			// The first connection through the overlay may race the directory exchange.
			deadline := time.Now().Add(20 * time.Second)
			for {
				d := net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(from), Timeout: 5 * time.Second}
				if c, err = d.Dial("tcp", to.String()); err == nil || time.Now().After(deadline) {
					return
				}
				time.Sleep(100 * time.Millisecond)
			}
		})
		return c, err
	})
}

// sink writes b.N chunks of 64 KiB on the conn dial returns and checks that l's first
// connection received them all.
func sink(b *testing.B, l net.Listener, dial func() (net.Conn, error)) {
	const chunk = 64 << 10
	got := make(chan int64, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			got <- -1
			return
		}
		defer c.Close()
		n, _ := io.Copy(io.Discard, c)
		got <- n
	}()
	c, err := dial()
	require.NoError(b, err)
	buf := make([]byte, chunk)
	b.SetBytes(chunk)
	b.ResetTimer()
	for range b.N {
		if _, err := c.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	require.NoError(b, c.(interface{ CloseWrite() error }).CloseWrite())
	n := <-got
	b.StopTimer()
	_ = c.Close()
	require.Equal(b, int64(b.N)*chunk, n)
}
