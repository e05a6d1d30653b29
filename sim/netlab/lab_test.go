package netlab

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// rootLinks is `ip -o link` in the root namespace.
func rootLinks(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("ip", "-o", "link").CombinedOutput()
	require.NoError(t, err, string(out))
	return string(out)
}

// Two hosts on the bridge reach each other (ICMP and TCP from sockets opened inside each host
// and from a process started in one), lose each other when one's link is cut or its traffic
// dropped, get each other back on Restore, and Close leaves no namespace, link or process.
func TestLabTwoHostsCutRestoreAndCleanup(t *testing.T) {
	linksBefore := rootLinks(t)
	lab := New(t, Options{Hosts: []string{"a", "b"}})
	a, b := lab.Host("a"), lab.Host("b")
	assert.Equal(t, "10.99.0.1", a.Addr.String())
	assert.Equal(t, "10.99.0.2", b.Addr.String())
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	rtt, err := pingWithin(ctx, a, b, 5*time.Second)
	require.NoError(t, err)
	t.Logf("a -> b echo in %v", rtt)

	// TCP from sockets opened inside the namespaces by this process.
	ln, err := b.Listen("tcp", b.Addr.String()+":0")
	require.NoError(t, err)
	defer func() { _ = ln.Close() }()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { defer func() { _ = c.Close() }(); _, _ = io.Copy(c, c) }()
		}
	}()
	echo := func() error {
		dctx, dcancel := context.WithTimeout(ctx, 2*time.Second)
		defer dcancel()
		c, err := a.Dial(dctx, "tcp", ln.Addr().String())
		if err != nil {
			return err
		}
		defer func() { _ = c.Close() }()
		_ = c.SetDeadline(time.Now().Add(2 * time.Second))
		if _, err := c.Write([]byte("hi")); err != nil {
			return err
		}
		buf := make([]byte, 2)
		if _, err := io.ReadFull(c, buf); err != nil {
			return err
		}
		if string(buf) != "hi" {
			return fmt.Errorf("echo %q", buf)
		}
		return nil
	}
	require.NoError(t, echo())
	// The listener lives in b only: the root namespace has no such address.
	_, err = net.DialTimeout("tcp", ln.Addr().String(), 300*time.Millisecond)
	require.Error(t, err, "b's listener is not reachable from the root namespace")

	// A command in a host sees only that host's interfaces.
	out, err := a.Run(ctx, "ip", "-o", "-4", "addr", "show", "dev", "eth0")
	require.NoError(t, err)
	assert.Contains(t, out, "10.99.0.1/24")

	// A long-running process, its output in a file, stopped at Close.
	sleeper, err := b.Start("sh", "-c", "echo started; exec sleep 300")
	require.NoError(t, err)
	require.NoError(t, sleeper.WaitOutput(ctx, "started"))
	pidsOut, err := exec.Command("ip", "netns", "pids", b.NS).Output()
	require.NoError(t, err)
	assert.Contains(t, strings.Fields(string(pidsOut)), fmt.Sprint(sleeper.Pid()), "the process runs inside b")

	// Cut: nothing passes; Restore: it does again.
	require.NoError(t, a.Cut(ctx))
	_, err = pingWithin(ctx, a, b, 700*time.Millisecond)
	require.Error(t, err, "a's link is cut")
	require.Error(t, echo(), "no TCP across a cut link")
	require.NoError(t, a.Restore(ctx))
	_, err = pingWithin(ctx, a, b, 5*time.Second)
	require.NoError(t, err, "restored")
	require.NoError(t, echo())

	// Drop: the link stays up, packets vanish.
	require.NoError(t, b.Drop(ctx))
	up, err := b.Run(ctx, "ip", "-o", "link", "show", "eth0")
	require.NoError(t, err)
	assert.Contains(t, up, "state UP", "a dropped host still sees its link up")
	_, err = pingWithin(ctx, a, b, 700*time.Millisecond)
	require.Error(t, err, "b's traffic is dropped")
	require.NoError(t, b.Restore(ctx))
	_, err = pingWithin(ctx, a, b, 5*time.Second)
	require.NoError(t, err, "restored after drop")

	// Close: every namespace, link and process is gone; Close again is a no-op.
	require.NoError(t, lab.Close())
	assert.Empty(t, lab.Leftovers())
	nsList, err := exec.Command("ip", "netns", "list").CombinedOutput()
	require.NoError(t, err)
	assert.NotContains(t, string(nsList), lab.ID(), "ip netns list has no namespace of this lab")
	// Other tests may add links to the root namespace meanwhile; none of the new ones may be a
	// name the lab uses (the bridge, its ports, the hosts' eth0).
	before := linkNames(linksBefore)
	for _, name := range linkNames(rootLinks(t)) {
		if !slices.Contains(before, name) {
			assert.NotRegexp(t, `^(br0|p[0-9]+|eth0)(@.*)?$`, name, "a lab link in the root namespace")
		}
	}
	assert.True(t, sleeper.Exited(), "the started process was stopped")
	assert.ErrorIs(t, syscall.Kill(sleeper.Pid(), 0), syscall.ESRCH)
	require.NoError(t, lab.Close())
	_, err = a.Start("true")
	require.ErrorIs(t, err, ErrClosed)
}

// linkNames lists the interface names of `ip -o link` output (indexes and states may change).
func linkNames(out string) []string {
	var names []string
	for l := range strings.SplitSeq(strings.TrimSpace(out), "\n") {
		f := strings.Fields(l)
		if len(f) > 1 {
			names = append(names, strings.TrimSuffix(f[1], ":"))
		}
	}
	return names
}

func pingWithin(ctx context.Context, from, to *Host, d time.Duration) (time.Duration, error) {
	pctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	return from.Ping(pctx, to.Addr)
}

// A crashed run's namespace (named for a PID that no longer exists) and the process inside it are
// removed when the next lab starts; a namespace of a live run is left alone.
func TestSweepRemovesLeftoversOfDeadRuns(t *testing.T) {
	if err := Available(); err != nil {
		t.Skipf("skipping: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// A PID that existed and is gone.
	dead := exec.Command("true")
	require.NoError(t, dead.Run())
	deadPid := dead.Process.Pid
	require.False(t, processAlive(deadPid))

	stale := fmt.Sprintf("%s%d-abc123-h0", Prefix, deadPid)
	live := fmt.Sprintf("%s%d-abc123-h0", Prefix, os.Getpid())
	for _, ns := range []string{stale, live} {
		require.NoError(t, ipCmd(ctx, "netns", "add", ns))
		t.Cleanup(func() { _ = removeNS(context.Background(), ns) })
	}
	require.NoError(t, ipCmd(ctx, "-n", stale, "link", "add", "v0", "type", "veth", "peer", "name", "v1"))
	orphan := exec.Command("ip", "netns", "exec", stale, "sleep", "300")
	require.NoError(t, orphan.Start())
	orphanDone := make(chan error, 1)
	go func() { orphanDone <- orphan.Wait() }()
	// `ip netns exec` enters the namespace after it starts; the sweep can only find the process
	// once it is in there.
	require.Eventually(t, func() bool {
		out, err := exec.CommandContext(ctx, "ip", "netns", "pids", stale).Output()
		return err == nil && len(bytes.TrimSpace(out)) > 0
	}, 5*time.Second, 10*time.Millisecond, "the orphan never entered the stale namespace")

	lab := New(t, Options{Hosts: []string{"x"}}) // sweeps first
	names, err := listNS()
	require.NoError(t, err)
	assert.NotContains(t, names, stale, "the dead run's namespace is removed")
	assert.Contains(t, names, live, "a live run's namespace is kept")
	select {
	case <-orphanDone:
	case <-time.After(5 * time.Second):
		t.Fatal("the process in the dead run's namespace was not killed")
	}
	require.NoError(t, lab.Close())
}

func TestNewRefusesBadHostNames(t *testing.T) {
	if err := Available(); err != nil {
		t.Skipf("skipping: %v", err)
	}
	for _, hosts := range [][]string{{"br"}, {"a", "a"}, {"Upper"}, {"waytoolongname"}} {
		l := &Lab{tb: t, id: fmt.Sprintf("%s%d-ffffff-", Prefix, os.Getpid()), logDir: t.TempDir()}
		l.bridge = l.id + "br"
		l.subnet = netip.MustParsePrefix("10.99.0.0/24")
		err := l.build(Options{Hosts: hosts, MTU: 1500})
		require.Error(t, err, "%v", hosts)
		require.NoError(t, l.Close())
	}
}

func TestParseEchoReply(t *testing.T) {
	req := echoRequest(7, 9, []byte("x"))
	_, _, err := ParseEchoReply(req)
	require.ErrorIs(t, err, ErrBadICMP, "a request is not a reply")
	rep := append([]byte(nil), req...)
	rep[0], rep[2], rep[3] = 0, 0, 0
	rep[2], rep[3] = byte(checksum(rep)>>8), byte(checksum(rep))
	id, seq, err := ParseEchoReply(rep)
	require.NoError(t, err)
	assert.Equal(t, [2]uint16{7, 9}, [2]uint16{id, seq})
	rep[8] ^= 1
	_, _, err = ParseEchoReply(rep)
	require.ErrorIs(t, err, ErrBadICMP, "checksum")
	_, _, err = ParseEchoReply(rep[:5])
	require.ErrorIs(t, err, ErrBadICMP, "short")
}

func FuzzParseEchoReply(f *testing.F) {
	f.Add([]byte{})
	f.Add(echoRequest(1, 1, nil))
	f.Add([]byte{0, 0, 0xff, 0xff, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		id, seq, err := ParseEchoReply(b)
		if err != nil {
			if !errors.Is(err, ErrBadICMP) {
				t.Fatalf("error not ErrBadICMP: %v", err)
			}
			return
		}
		if len(b) < 8 || b[0] != 0 || checksum(b) != 0 {
			t.Fatalf("accepted %x", b)
		}
		_, _ = id, seq
	})
}
