package memnet

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"math/big"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func newNet(t *testing.T, def Link) *Network {
	t.Helper()
	n, err := New(1, def)
	require.NoError(t, err)
	t.Cleanup(func() { _ = n.Close() })
	return n
}

func listen(t *testing.T, n *Network, host int) *Conn {
	t.Helper()
	c, err := n.Listen(netip.AddrPortFrom(HostAddr(host), 4500))
	require.NoError(t, err)
	return c
}

func read(t *testing.T, c *Conn, within time.Duration) (string, net.Addr, error) {
	t.Helper()
	require.NoError(t, c.SetReadDeadline(time.Now().Add(within)))
	buf := make([]byte, 2048)
	k, from, err := c.ReadFrom(buf)
	return string(buf[:k]), from, err
}

func TestDeliveryAndSourceAddress(t *testing.T) {
	n := newNet(t, Link{})
	a, b := listen(t, n, 1), listen(t, n, 2)
	k, err := a.WriteTo([]byte("hello"), b.LocalAddr())
	require.NoError(t, err)
	assert.Equal(t, 5, k)
	got, from, err := read(t, b, time.Second)
	require.NoError(t, err)
	assert.Equal(t, "hello", got)
	assert.Equal(t, a.LocalAddr().String(), from.String())
	st := n.Stats()
	assert.Equal(t, uint64(1), st.Delivered)
	assert.Equal(t, uint64(5), st.Bytes)

	// The sender's buffer is copied: reusing it after WriteTo changes nothing delivered.
	buf := []byte("abc")
	_, err = a.WriteTo(buf, b.LocalAddr())
	require.NoError(t, err)
	buf[0] = 'X'
	got, _, err = read(t, b, time.Second)
	require.NoError(t, err)
	assert.Equal(t, "abc", got)

	// A packet to nobody vanishes, as UDP's would.
	_, err = a.WriteTo([]byte("x"), net.UDPAddrFromAddrPort(netip.AddrPortFrom(HostAddr(9), 1)))
	require.NoError(t, err)
	assert.Equal(t, uint64(1), n.Stats().Unreachable)

	_, err = n.Listen(b.AddrPort())
	require.ErrorIs(t, err, ErrAddrInUse)
}

func TestLatencyDelaysAndKeepsOrder(t *testing.T) {
	n := newNet(t, Link{Latency: 30 * time.Millisecond})
	a, b := listen(t, n, 1), listen(t, n, 2)
	start := time.Now()
	for _, m := range []string{"1", "2", "3"} {
		_, err := a.WriteTo([]byte(m), b.LocalAddr())
		require.NoError(t, err)
	}
	// Nothing arrives before the latency has passed.
	_, _, err := read(t, b, 15*time.Millisecond)
	require.ErrorIs(t, err, os.ErrDeadlineExceeded)
	for _, want := range []string{"1", "2", "3"} {
		got, _, err := read(t, b, time.Second)
		require.NoError(t, err)
		assert.Equal(t, want, got)
	}
	assert.GreaterOrEqual(t, time.Since(start), 30*time.Millisecond)

	// A per-link setting overrides the default for that pair only.
	c := listen(t, n, 3)
	require.NoError(t, n.SetLink(HostAddr(1), HostAddr(3), Link{Latency: 0}))
	start = time.Now()
	_, err = a.WriteTo([]byte("fast"), c.LocalAddr())
	require.NoError(t, err)
	got, _, err := read(t, c, time.Second)
	require.NoError(t, err)
	assert.Equal(t, "fast", got)
	assert.Less(t, time.Since(start), 25*time.Millisecond)
	require.Error(t, n.SetLink(HostAddr(1), HostAddr(3), Link{Loss: 2}))
}

func TestLossRateIsSeededPerLink(t *testing.T) {
	count := func(seed uint64) uint64 {
		n, err := New(seed, Link{Loss: 0.3})
		require.NoError(t, err)
		defer func() { _ = n.Close() }()
		a, b := listen(t, n, 1), listen(t, n, 2)
		require.NoError(t, b.SetReadBuffer(1<<30))
		for range 2000 {
			_, err := a.WriteTo([]byte("p"), b.LocalAddr())
			require.NoError(t, err)
		}
		st := n.Stats()
		assert.Equal(t, uint64(2000), st.Lost+st.Delivered)
		return st.Lost
	}
	lost1, lost2, lost3 := count(7), count(7), count(8)
	assert.Equal(t, lost1, lost2, "the same seed loses the same packets")
	assert.InDelta(t, 600, float64(lost1), 90, "30%% of 2000 lost, within 3 sigma")
	assert.InDelta(t, 600, float64(lost3), 90)
}

func TestPartitionAndHeal(t *testing.T) {
	n := newNet(t, Link{})
	a, b, c := listen(t, n, 1), listen(t, n, 2), listen(t, n, 3)
	n.Partition([]netip.Addr{HostAddr(1)}, []netip.Addr{HostAddr(2), HostAddr(3)})
	assert.False(t, n.Reachable(a.AddrPort(), b.AddrPort()))
	assert.True(t, n.Reachable(b.AddrPort(), c.AddrPort()))
	_, err := a.WriteTo([]byte("across"), b.LocalAddr())
	require.NoError(t, err)
	_, _, err = read(t, b, 20*time.Millisecond)
	require.ErrorIs(t, err, os.ErrDeadlineExceeded, "a packet crossed the partition")
	_, err = b.WriteTo([]byte("inside"), c.LocalAddr())
	require.NoError(t, err)
	got, _, err := read(t, c, time.Second)
	require.NoError(t, err)
	assert.Equal(t, "inside", got)
	assert.Equal(t, uint64(1), n.Stats().Partitioned)

	n.Heal()
	assert.True(t, n.Reachable(a.AddrPort(), b.AddrPort()))
	require.NoError(t, c.Close())
	assert.False(t, n.Reachable(b.AddrPort(), c.AddrPort()), "nothing listens at a closed conn's address")
	_, err = a.WriteTo([]byte("healed"), b.LocalAddr())
	require.NoError(t, err)
	got, _, err = read(t, b, time.Second)
	require.NoError(t, err)
	assert.Equal(t, "healed", got)
}

func TestCloseUnblocksReaders(t *testing.T) {
	n := newNet(t, Link{Latency: time.Hour})
	a, b := listen(t, n, 1), listen(t, n, 2)
	errc := make(chan error, 1)
	go func() {
		_, _, err := b.ReadFrom(make([]byte, 10))
		errc <- err
	}()
	_, err := a.WriteTo([]byte("late"), b.LocalAddr()) // in flight when the network closes
	require.NoError(t, err)
	require.NoError(t, n.Close())
	select {
	case err := <-errc:
		require.ErrorIs(t, err, net.ErrClosed)
	case <-time.After(2 * time.Second):
		t.Fatal("ReadFrom still blocked after Close")
	}
	_, err = a.WriteTo([]byte("x"), b.LocalAddr())
	require.ErrorIs(t, err, net.ErrClosed)
	_, err = n.Listen(netip.AddrPortFrom(HostAddr(5), 1))
	require.ErrorIs(t, err, net.ErrClosed)
	// The address is free again once its conn is closed.
	n2 := newNet(t, Link{})
	c := listen(t, n2, 1)
	require.NoError(t, c.Close())
	_ = listen(t, n2, 1)
}

func TestFullQueueDrops(t *testing.T) {
	n := newNet(t, Link{})
	a, b := listen(t, n, 1), listen(t, n, 2)
	require.NoError(t, b.SetReadBuffer(10))
	for range 3 {
		_, err := a.WriteTo([]byte("12345"), b.LocalAddr())
		require.NoError(t, err)
	}
	st := n.Stats()
	assert.Equal(t, uint64(2), st.Delivered)
	assert.Equal(t, uint64(1), st.Unreachable)
}

// quic-go runs unmodified over a memnet conn (plain net.PacketConn path) with latency and loss.
func TestQUICOverMemnet(t *testing.T) {
	n := newNet(t, Link{Latency: 2 * time.Millisecond, Jitter: time.Millisecond, Loss: 0.02})
	srvConn, cliConn := listen(t, n, 1), listen(t, n, 2)
	srvTr := &quic.Transport{Conn: srvConn}
	cliTr := &quic.Transport{Conn: cliConn}
	t.Cleanup(func() { _ = cliTr.Close(); _ = srvTr.Close() })
	ln, err := srvTr.Listen(serverTLS(t), &quic.Config{})
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	payload := make([]byte, 256<<10)
	_, _ = rand.Read(payload)
	errc := make(chan error, 1)
	go func() {
		conn, err := ln.Accept(ctx)
		if err != nil {
			errc <- err
			return
		}
		s, err := conn.AcceptStream(ctx)
		if err != nil {
			errc <- err
			return
		}
		got, err := io.ReadAll(s)
		if err == nil && string(got) != string(payload) {
			err = errors.New("payload corrupted")
		}
		errc <- err
		_ = conn.CloseWithError(0, "")
	}()
	conn, err := cliTr.Dial(ctx, srvConn.LocalAddr(), &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"memnet-test"}}, &quic.Config{}) //nolint:gosec // test of the transport only
	require.NoError(t, err)
	s, err := conn.OpenStreamSync(ctx)
	require.NoError(t, err)
	_, err = s.Write(payload)
	require.NoError(t, err)
	require.NoError(t, s.Close())
	require.NoError(t, <-errc)
	assert.NotZero(t, n.Stats().Lost, "the link lost packets and QUIC recovered them")
}

func serverTLS(t *testing.T) *tls.Config {
	t.Helper()
	pub, key, err := ed25519.GenerateKey(rand.Reader)
	require.NoError(t, err)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, pub, key)
	require.NoError(t, err)
	return &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}, NextProtos: []string{"memnet-test"}}
}

func TestHostAddrIsUniqueAndInRange(t *testing.T) {
	seen := map[netip.Addr]bool{}
	pfx := netip.MustParsePrefix("198.18.0.0/15")
	for i := range 70000 {
		a := HostAddr(i)
		require.True(t, pfx.Contains(a), "%v", a)
		require.False(t, seen[a], "HostAddr(%d) = %v repeats", i, a)
		seen[a] = true
	}
}

// A trace splits a packet's way: the link's delay lies between Sent and Queued, and the time it
// sat in the receiver's queue between Queued and Read. Nothing is traced when tracing is off,
// and starting a trace clears the last one.
func TestTraceSplitsLinkDelayFromQueueWait(t *testing.T) {
	const latency = 30 * time.Millisecond
	n := newNet(t, Link{Latency: latency})
	a, b := listen(t, n, 1), listen(t, n, 2)

	_, err := a.WriteTo([]byte("untraced"), b.LocalAddr())
	require.NoError(t, err)
	_, _, err = read(t, b, time.Second)
	require.NoError(t, err)
	assert.Empty(t, n.Traced(b.AddrPort()), "a packet read while tracing was off")

	n.Trace(true)
	_, err = a.WriteTo([]byte("first"), b.LocalAddr())
	require.NoError(t, err)
	_, err = a.WriteTo([]byte("second!"), b.LocalAddr())
	require.NoError(t, err)
	time.Sleep(latency + 50*time.Millisecond) // both wait in b's queue before the reads
	for range 2 {
		_, _, err = read(t, b, time.Second)
		require.NoError(t, err)
	}
	tr := n.Traced(b.AddrPort())
	require.Len(t, tr, 2)
	assert.Equal(t, []int{5, 7}, []int{tr[0].Size, tr[1].Size})
	for _, p := range tr {
		assert.Equal(t, a.AddrPort(), p.From)
		assert.GreaterOrEqual(t, p.Queued.Sub(p.Sent), latency, "the link's delay")
		assert.GreaterOrEqual(t, p.Read.Sub(p.Queued), 40*time.Millisecond, "the wait in the queue")
	}
	assert.Empty(t, n.Traced(a.AddrPort()), "a read nothing")

	n.Trace(false)
	_, err = a.WriteTo([]byte("after"), b.LocalAddr())
	require.NoError(t, err)
	_, _, err = read(t, b, time.Second)
	require.NoError(t, err)
	assert.Len(t, n.Traced(b.AddrPort()), 2, "stopped tracing keeps the trace and adds nothing")
	n.Trace(true)
	assert.Empty(t, n.Traced(b.AddrPort()), "a new trace starts empty")
}
