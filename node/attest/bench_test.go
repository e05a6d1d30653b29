package attest

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"testing"

	"github.com/stretchr/testify/require"
)

// benchConn is one held loopback connection from this process.
func benchConn(b *testing.B) (netip.AddrPort, netip.AddrPort) {
	c, srv := loopbackPair(b)
	return addrOf(c), srv
}

// BenchmarkVerifyCacheHit is the cost a new flow through the TUN interface pays once the agent's
// executable is known and its PID is among the hints: a sock_diag lookup on the interface's open
// sockets (a send and a receive), the open of the process's /proc directory, the fd check (a
// readlink), its ids (an fstat of the directory) and the executable's key (a stat), and a close.
func BenchmarkVerifyCacheHit(b *testing.B) {
	client, srv := benchConn(b)
	want := selfExpected(b)
	d, err := OpenDiag(1)
	require.NoError(b, err)
	b.Cleanup(func() { _ = d.Close() })
	a := New(Options{Diag: d})
	_, err = a.Verify(client, srv, want)
	require.NoError(b, err)
	b.ResetTimer()
	for b.Loop() {
		if _, err := a.Verify(client, srv, want); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkVerifyCacheMiss is the first flow of a process: a full /proc scan and a SHA-256 of the
// whole executable (here the test binary, reported in MB/s as SetBytes).
func BenchmarkVerifyCacheMiss(b *testing.B) {
	client, srv := benchConn(b)
	want := selfExpected(b)
	for b.Loop() {
		if _, err := New(Options{}).Verify(client, srv, want); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkSocketInode isolates the sock_diag lookup: on a socket opened for each lookup (the
// proxy's and the SDK's way before Diag) and on a Diag's open socket (the TUN interface's).
func BenchmarkSocketInode(b *testing.B) {
	client, srv := benchConn(b)
	d, err := OpenDiag(1)
	require.NoError(b, err)
	b.Cleanup(func() { _ = d.Close() })
	for _, bc := range []struct {
		name string
		diag *Diag
	}{{"per-lookup", nil}, {"diag", d}} {
		b.Run(bc.name, func(b *testing.B) {
			a := New(Options{Diag: bc.diag})
			for b.Loop() {
				if _, err := a.SocketInode(client, srv); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkVerifyNewConnManyFDs is what the TUN interface pays per new flow from a busy agent:
// a new connection each time (the previous one closed, as a client opening one connection per
// request does) from a process that holds 1,000 other descriptors, its PID hinted, its
// executable's digest cached. The descriptor scan that confirms which process holds the socket
// grows with the descriptors the process holds.
func BenchmarkVerifyNewConnManyFDs(b *testing.B) {
	for range 1000 {
		f, err := os.Open(os.DevNull)
		require.NoError(b, err)
		b.Cleanup(func() { _ = f.Close() })
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(b, err)
	b.Cleanup(func() { _ = ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			_ = c.Close()
		}
	}()
	srv := netip.MustParseAddrPort(ln.Addr().String())
	want := selfExpected(b)
	a := New(Options{})
	b.ResetTimer()
	for b.Loop() {
		b.StopTimer()
		c, err := net.Dial("tcp", srv.String())
		require.NoError(b, err)
		b.StartTimer()
		if _, err := a.Verify(addrOf(c), srv, want); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		_ = c.Close()
		b.StartTimer()
	}
}

// BenchmarkVerifySelf is what an SDK agent's Dial pays (node.Agent.Dial): this process's
// executable through the digest cache, compared with the enrolled fingerprint.
func BenchmarkVerifySelf(b *testing.B) {
	want := selfExpected(b)
	a := New(Options{})
	_, err := a.VerifySelf(want)
	require.NoError(b, err)
	for b.Loop() {
		if _, err := a.VerifySelf(want); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkVerifyNewProcess is the first connection of a client that runs one process per
// connection (curl, a shell script): its PID is in no hint, so /proc is scanned. The holder is
// bash, which opens the connection and execs sleep; only Verify is timed.
func BenchmarkVerifyNewProcess(b *testing.B) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(b, err)
	b.Cleanup(func() { _ = ln.Close() })
	srv := netip.MustParseAddrPort(ln.Addr().String())
	script := fmt.Sprintf("exec 3<>/dev/tcp/127.0.0.1/%d; exec sleep 60", srv.Port())
	a := New(Options{})
	want := Expected{Digest: []byte("any: the cost is finding the process")}
	for b.Loop() {
		b.StopTimer()
		cmd := exec.Command("bash", "-c", script)
		require.NoError(b, cmd.Start())
		c, err := ln.Accept()
		require.NoError(b, err)
		b.StartTimer()
		_, err = a.Verify(netip.MustParseAddrPort(c.RemoteAddr().String()), srv, want)
		b.StopTimer()
		require.ErrorIs(b, err, ErrMismatch)
		_ = c.Close()
		_ = cmd.Process.Kill()
		_, _ = cmd.Process.Wait()
		b.StartTimer()
	}
}
