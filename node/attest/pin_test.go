package attest

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

func TestIsProcFS(t *testing.T) {
	assert.True(t, isProcFS("/proc"))
	assert.False(t, isProcFS(t.TempDir()), "a directory shaped like /proc pins nothing")
	assert.False(t, isProcFS(filepath.Join(t.TempDir(), "missing")))
	assert.True(t, New(Options{}).pinned)
	assert.False(t, New(Options{Proc: t.TempDir()}).pinned)
}

// startSleeper starts a process that lives until the test ends.
func startSleeper(t *testing.T) *exec.Cmd {
	t.Helper()
	cmd := exec.Command("sleep", "60")
	require.NoError(t, cmd.Start())
	t.Cleanup(func() { _ = cmd.Process.Kill(); _, _ = cmd.Process.Wait() })
	return cmd
}

// forcePID starts a sleeper that gets pid (free again: its process was reaped), by setting the
// kernel's last allocated PID just below it. Root only; other processes forking at the same
// moment can take the number first, so it tries a few times. On failure it says why.
func forcePID(pid int) (*exec.Cmd, string) {
	if os.Geteuid() != 0 {
		return nil, "forcing a PID to be reused needs root (/proc/sys/kernel/ns_last_pid)"
	}
	for range 50 {
		if err := os.WriteFile("/proc/sys/kernel/ns_last_pid", []byte(strconv.Itoa(pid-1)), 0); err != nil {
			return nil, fmt.Sprintf("cannot set ns_last_pid: %v", err)
		}
		cmd := exec.Command("sleep", "60")
		if cmd.Start() != nil {
			continue
		}
		if cmd.Process.Pid == pid {
			return cmd, ""
		}
		_ = cmd.Process.Kill()
		_, _ = cmd.Process.Wait()
	}
	return nil, fmt.Sprintf("PID %d was taken by other processes every time", pid)
}

// reusePID is forcePID for a test, which it skips when the PID cannot be forced.
func reusePID(t *testing.T, pid int) *exec.Cmd {
	t.Helper()
	cmd, why := forcePID(pid)
	if cmd == nil {
		t.Skipf("%s; the exit half of this test ran", why)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _, _ = cmd.Process.Wait() })
	return cmd
}

// What Attester.pinned relies on: an open /proc/<pid> directory refers to its process only.
// Once the process exits nothing can be read through it, and when another process gets the same
// PID the directory still does not reach it, while a fresh open of /proc/<pid> does.
func TestProcDirectoryPinsItsProcess(t *testing.T) {
	first := startSleeper(t)
	pid := first.Process.Pid
	pidfd, err := openDir(unix.AT_FDCWD, fmt.Sprintf("/proc/%d", pid))
	require.NoError(t, err)
	t.Cleanup(func() { _ = unix.Close(pidfd) })
	_, err = startTimeAt(pidfd)
	require.NoError(t, err)
	var buf [256]byte
	_, err = unix.Readlinkat(pidfd, "exe", buf[:])
	require.NoError(t, err)

	require.NoError(t, first.Process.Kill())
	_, _ = first.Process.Wait()
	_, err = unix.Readlinkat(pidfd, "exe", buf[:])
	require.Error(t, err, "the exited process's directory still reads")
	_, err = readAt(pidfd, "status", maxProcFile)
	require.Error(t, err)

	second := reusePID(t, pid)
	fresh, err := openDir(unix.AT_FDCWD, fmt.Sprintf("/proc/%d", pid))
	require.NoError(t, err, "PID %d is live again", second.Process.Pid)
	t.Cleanup(func() { _ = unix.Close(fresh) })
	_, err = unix.Readlinkat(fresh, "exe", buf[:])
	require.NoError(t, err)
	_, err = unix.Readlinkat(pidfd, "exe", buf[:])
	require.Error(t, err, "the old directory reached the process that reused its PID")
	_, err = readAt(pidfd, "status", maxProcFile)
	require.Error(t, err)
}

// Attacker side, on the real /proc: the process that holds the connection exits right after it
// was found holding it, and (as root) another process takes its PID before its executable is
// read. The connection must never be attributed to the newcomer, with no start-time check left
// to catch it.
func TestHolderReplacedDuringAttestationIsRefused(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { _ = ln.Close() })
	port := ln.Addr().(*net.TCPAddr).Port
	// The holder: bash opens the connection on descriptor 3 and execs sleep, one process.
	holder := exec.Command("bash", "-c", fmt.Sprintf("exec 3<>/dev/tcp/127.0.0.1/%d; exec sleep 60", port))
	require.NoError(t, holder.Start())
	t.Cleanup(func() { _ = holder.Process.Kill(); _, _ = holder.Process.Wait() })
	require.NoError(t, ln.(*net.TCPListener).SetDeadline(time.Now().Add(10*time.Second)))
	srv, err := ln.Accept()
	require.NoError(t, err)
	t.Cleanup(func() { _ = srv.Close() })
	client := netip.MustParseAddrPort(srv.RemoteAddr().String())
	server := netip.MustParseAddrPort(ln.Addr().String())
	holderPID := holder.Process.Pid

	var replaced *exec.Cmd
	var skip string
	a := New(Options{between: func(pid int) {
		if pid != holderPID {
			return
		}
		_ = holder.Process.Kill()
		_, _ = holder.Process.Wait()
		replaced, skip = forcePID(pid)
	}})
	t.Cleanup(func() {
		if replaced != nil {
			_ = replaced.Process.Kill()
			_, _ = replaced.Process.Wait()
		}
	})
	// Any digest: attributed to anything, the connection would fail as a mismatch; it must fail
	// before, at reading the holder.
	p, err := a.Verify(client, server, Expected{Digest: []byte("never compared")})
	require.Error(t, err)
	assert.NotErrorIs(t, err, ErrMismatch, "the process behind the reused PID was fingerprinted: %+v", p)
	assert.ErrorIs(t, err, ErrUnreadable)
	if replaced != nil {
		assert.Equal(t, holderPID, replaced.Process.Pid)
	} else {
		t.Logf("PID not reused (%s); the holder's exit alone was refused", skip)
	}
}

// The descriptors holdsAt tries after its hints (which it leaves out), in order.
func TestOrderCandidates(t *testing.T) {
	for _, c := range []struct {
		name       string
		fds, hints []int
		want       []int
	}{
		{"no hint: highest first", []int{0, 1, 2, 7, 30, 31}, nil, []int{31, 30, 7, 2, 1, 0}},
		// A client that closes and reopens: the new socket took a number near the last one.
		{"nearest to the newest hint", []int{0, 1, 2, 3, 9, 11, 12, 41}, []int{10, 40}, []int{11, 9, 12, 3, 2, 1, 0, 41}},
		// A client that keeps its connections: the new one is just above the newest.
		{"just above the newest", []int{3, 4, 8}, []int{7, 6, 5}, []int{8, 4, 3}},
	} {
		t.Run(c.name, func(t *testing.T) {
			fds := append([]int(nil), c.fds...)
			orderCandidates(fds, c.hints)
			assert.Equal(t, c.want, fds)
		})
	}
}
