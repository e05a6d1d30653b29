package tunstack

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/ute-project/ute/overlay/tundev"
)

// TestLargeUDPThroughKernelTUN: as TestLargeUDPThroughTheOverlay, with a real kernel TUN
// interface and a kernel UDP socket in a fresh network namespace (root only): the kernel hands
// the stack a 9,000- or 65,492-byte datagram as one packet at the default MTU, and takes the
// echo back whole; a larger one it fragments, and that is lost.
func TestLargeUDPThroughKernelTUN(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to create a network namespace and a TUN interface")
	}
	tun := overlayEcho(t) // its QUIC sockets stay in this namespace
	inTUNNamespace(t, "utebig0", overlayHandler{tun}, func(st *Stack) {

		// Created on this thread, so in the new namespace.
		uc, err := net.DialUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(agentA, 5000)),
			net.UDPAddrFromAddrPort(netip.AddrPortFrom(remote, 9000)))
		require.NoError(t, err)
		defer uc.Close()
		buf := make([]byte, 65535)
		for i, n := range []int{100, 9000, 60000, DefaultMTU - 28} {
			msg := make([]byte, n)
			for j := range msg {
				msg[j] = byte(j*11 + i)
			}
			_, err := uc.Write(msg)
			require.NoError(t, err, "send %d bytes", n)
			require.NoError(t, uc.SetReadDeadline(time.Now().Add(5*time.Second)))
			got, err := uc.Read(buf)
			require.NoError(t, err, fmt.Sprintf("the echo of the %d-byte datagram", n))
			require.Equal(t, n, got)
			assert.Equal(t, msg, buf[:got])
		}
		// (Unsupported is not checked: the kernel sends its own IPv6 neighbour discovery into the
		// new interface. A fragment would have lost its datagram above.)
		assert.Zero(t, st.Stats().UDPDropped)

		// One byte more and the kernel fragments the datagram, whose fragments the filter drops.
		before := st.Stats().Unsupported
		_, err = uc.Write(make([]byte, DefaultMTU-28+1))
		require.NoError(t, err)
		require.Eventually(t, func() bool { return st.Stats().Unsupported >= before+2 }, 5*time.Second, 10*time.Millisecond)
		require.NoError(t, uc.SetReadDeadline(time.Now().Add(200*time.Millisecond)))
		_, err = uc.Read(buf)
		require.Error(t, err, "nothing came back")
	})
}

// inTUNNamespace runs body on a thread of its own in a fresh network namespace (root only), with
// a kernel TUN interface name holding agentA and routing remote's /24, and a Stack on it with
// handler h and agentA local. Sockets body opens on its thread are in the namespace. The thread
// is never unlocked: the runtime discards it, and with it the namespace. A failure in body (a
// require's Goexit or a panic) is carried back to the caller's goroutine.
func inTUNNamespace(tb testing.TB, name string, h Handler, body func(st *Stack)) {
	tb.Helper()
	// finished is false when body or the setup stopped early: a failed require (already reported,
	// carried on with FailNow) or a panic (carried on as one).
	type outcome struct {
		finished bool
		panicked any
	}
	done := make(chan outcome, 1)
	go func() {
		runtime.LockOSThread()
		var out outcome
		defer func() {
			out.panicked = recover()
			done <- out
		}()
		require.NoError(tb, unix.Unshare(unix.CLONE_NEWNET))
		dev, err := tundev.Open(context.Background(), tundev.Config{Name: name, MTU: DefaultMTU,
			Addrs:  []netip.Prefix{netip.PrefixFrom(agentA, 32)},
			Routes: []netip.Prefix{netip.PrefixFrom(remote, 24).Masked()}}, nil)
		require.NoError(tb, err)
		defer func() { _ = dev.Close() }()
		st, err := New(dev.TUN(), DefaultMTU, h, nil)
		require.NoError(tb, err)
		defer func() { assert.NoError(tb, st.Close()) }()
		st.SetLocal([]netip.Addr{agentA})
		body(st)
		out.finished = true
	}()
	out := <-done
	if out.panicked != nil {
		panic(out.panicked)
	}
	if !out.finished {
		tb.FailNow()
	}
}
