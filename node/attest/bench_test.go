package attest

import (
	"net/netip"
	"testing"

	"github.com/stretchr/testify/require"
)

// benchConn is one held loopback connection from this process.
func benchConn(b *testing.B) (netip.AddrPort, netip.AddrPort) {
	c, srv := loopbackPair(b)
	return addrOf(c), srv
}

// BenchmarkVerifyCacheHit is the cost a new proxied flow pays once the agent's executable is
// known and its PID is among the hints: /proc/net/tcp lookup, fd check, fstat, status, cgroup,
// two stat reads.
func BenchmarkVerifyCacheHit(b *testing.B) {
	client, srv := benchConn(b)
	want := selfExpected(b)
	a := New(Options{})
	_, err := a.Verify(client, srv, want)
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

// BenchmarkSocketInode isolates the /proc/net/tcp lookup.
func BenchmarkSocketInode(b *testing.B) {
	client, srv := benchConn(b)
	a := New(Options{})
	for b.Loop() {
		if _, err := a.SocketInode(client, srv); err != nil {
			b.Fatal(err)
		}
	}
}
