package attest

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// A Diag answers for the network namespace it was opened in, from any goroutine: a socket that
// lives only in another namespace is found through a Diag opened there, and not by a lookup made
// from this namespace (the per-lookup socket of a nil Diag), which must come back empty rather
// than find some other socket.
func TestDiagAnswersForItsNamespace(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to create a network namespace (CI runs as root)")
	}
	type inNS struct {
		diag         *Diag
		client, srv  netip.AddrPort
		udpC, udpSrv netip.AddrPort
		err          error
	}
	got := make(chan inNS, 1)
	release := make(chan struct{})
	t.Cleanup(func() { close(release) })
	go func() {
		// Never unlocked: the thread ends with the goroutine instead of returning to the
		// runtime in another namespace.
		runtime.LockOSThread()
		var closers []func() error
		got <- func() (r inNS) {
			if r.err = unix.Unshare(unix.CLONE_NEWNET); r.err != nil {
				return r
			}
			// Children fork from this thread, so `ip` runs in the new namespace.
			if out, err := exec.Command("ip", "link", "set", "lo", "up").CombinedOutput(); err != nil {
				r.err = fmt.Errorf("ip link set lo up: %w: %s", err, out)
				return r
			}
			if r.diag, r.err = OpenDiag(2); r.err != nil {
				return r
			}
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if r.err = err; err != nil {
				return r
			}
			closers = append(closers, ln.Close)
			c, err := net.Dial("tcp", ln.Addr().String())
			if r.err = err; err != nil {
				return r
			}
			closers = append(closers, c.Close)
			uc, err := net.DialUDP("udp", nil, &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 9})
			if r.err = err; err != nil {
				return r
			}
			closers = append(closers, uc.Close)
			r.client, r.srv = addrOf(c), netip.MustParseAddrPort(ln.Addr().String())
			r.udpC, r.udpSrv = netip.MustParseAddrPort(uc.LocalAddr().String()), netip.MustParseAddrPort(uc.RemoteAddr().String())
			return r
		}()
		<-release
		for _, c := range closers {
			_ = c()
		}
	}()
	r := <-got
	require.NoError(t, r.err)
	t.Cleanup(func() { _ = r.diag.Close() })
	require.NotNil(t, r.diag)
	want := selfExpected(t)

	p, err := New(Options{Diag: r.diag}).Verify(r.client, r.srv, want)
	require.NoError(t, err, "the Diag opened in the namespace finds its socket from this goroutine")
	assert.Equal(t, os.Getpid(), p.PID)
	p, err = New(Options{Diag: r.diag}).VerifyUDP(r.udpC, r.udpSrv, want)
	require.NoError(t, err, "and its UDP socket")
	assert.Equal(t, os.Getpid(), p.PID)

	_, err = New(Options{}).Verify(r.client, r.srv, want)
	require.ErrorIs(t, err, ErrNoOwner, "looked up from this namespace, the socket is not there")
	_, err = New(Options{}).VerifyUDP(r.udpC, r.udpSrv, want)
	require.ErrorIs(t, err, ErrNoOwner)
}

// A socket reused after a lookup that gave up may still hold that lookup's answer: the next
// lookup skips it by its sequence number and returns its own.
func TestDiagSkipsStaleAnswers(t *testing.T) {
	d, err := OpenDiag(1)
	require.NoError(t, err)
	t.Cleanup(func() { _ = d.Close() })
	c, srv := loopbackPair(t)
	want, err := New(Options{}).SocketInode(addrOf(c), srv)
	require.NoError(t, err)

	// An earlier request, about another socket, whose answer nobody read.
	other, otherSrv := loopbackPair(t)
	dc := <-d.pool
	req := make([]byte, nlmsgHdrLen+inetDiagReqLen)
	ne := binary.NativeEndian
	ne.PutUint32(req[0:], uint32(len(req)))
	ne.PutUint16(req[4:], sockDiagByFamily)
	ne.PutUint16(req[6:], syscall.NLM_F_REQUEST)
	ne.PutUint32(req[8:], 999)
	req[nlmsgHdrLen] = syscall.AF_INET
	req[nlmsgHdrLen+1] = syscall.IPPROTO_TCP
	ne.PutUint32(req[nlmsgHdrLen+4:], 0xffffffff)
	putSockID(req[nlmsgHdrLen+8:], syscall.AF_INET, addrOf(other), otherSrv)
	require.NoError(t, syscall.Sendto(dc.fd, req, 0, &syscall.SockaddrNetlink{Family: syscall.AF_NETLINK}))
	d.pool <- dc

	s, err := d.lookup(unix.IPPROTO_TCP, addrOf(c), srv)
	require.NoError(t, err)
	assert.Equal(t, want, s.inode, "the stale answer about the other socket was taken for this lookup's")
}

// Close waits for a socket that is lent out, and lookups after it fail with ErrDiagClosed.
func TestDiagClose(t *testing.T) {
	d, err := OpenDiag(2)
	require.NoError(t, err)
	lent := <-d.pool
	closed := make(chan struct{})
	go func() { _ = d.Close(); close(closed) }()
	// Close has taken the idle socket once the pool is empty; it then waits for the lent one.
	require.Eventually(t, func() bool { return len(d.pool) == 0 }, 5*time.Second, time.Millisecond)
	assert.Never(t, func() bool { return isClosed(closed) }, 100*time.Millisecond, 5*time.Millisecond,
		"Close returned while a socket was lent out")
	_, err = d.lookup(unix.IPPROTO_TCP, netip.MustParseAddrPort("127.0.0.1:1"), netip.MustParseAddrPort("127.0.0.1:2"))
	require.ErrorIs(t, err, ErrDiagClosed)
	d.pool <- lent
	<-closed
	require.NoError(t, d.Close(), "a second Close is a no-op")
}

func isClosed(c chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}
