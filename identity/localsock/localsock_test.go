package localsock

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestListenModeAndCleanup(t *testing.T) {
	path := filepath.Join(t.TempDir(), "x.sock")
	ln, err := Listen(path)
	require.NoError(t, err)
	fi, err := os.Lstat(path)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm())
	assert.NotZero(t, fi.Mode()&os.ModeSocket)
	assert.True(t, Alive(path))
	require.NoError(t, ln.Close())
	require.NoError(t, ln.Close(), "Close is idempotent")
	_, err = os.Lstat(path)
	assert.True(t, errors.Is(err, os.ErrNotExist), "Close removes the socket file: %v", err)
	assert.False(t, Alive(path))
}

func TestListenRefusesSecondListener(t *testing.T) {
	path := filepath.Join(t.TempDir(), "x.sock")
	ln, err := Listen(path)
	require.NoError(t, err)
	t.Cleanup(func() { _ = ln.Close() })
	_, err = Listen(path)
	require.ErrorIs(t, err, ErrInUse)
	assert.True(t, Alive(path), "the live listener's socket was left alone")
}

// A daemon that takes no lock (an older version) still answers on the path: Listen must not
// steal its socket.
func TestListenRefusesLiveUnlockedSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "x.sock")
	other, err := net.Listen("unix", path)
	require.NoError(t, err)
	t.Cleanup(func() { _ = other.Close() })
	_, err = Listen(path)
	require.ErrorIs(t, err, ErrInUse)
	assert.True(t, Alive(path))
}

func TestListenRemovesStaleSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "x.sock")
	// A socket file nobody serves: what a daemon killed with SIGKILL leaves behind.
	fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	require.NoError(t, err)
	require.NoError(t, syscall.Bind(fd, &syscall.SockaddrUnix{Name: path}))
	require.NoError(t, syscall.Close(fd))
	require.False(t, Alive(path))
	ln, err := Listen(path)
	require.NoError(t, err)
	t.Cleanup(func() { _ = ln.Close() })
	assert.True(t, Alive(path))
}

func TestListenRefusesNonSocket(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "x.sock")
	require.NoError(t, os.WriteFile(path, []byte("precious"), 0o600))
	_, err := Listen(path)
	require.ErrorIs(t, err, ErrNotSocket)
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	assert.Equal(t, "precious", string(b), "a regular file is never removed")

	// A symlink planted at the socket path is not followed or removed either.
	target := filepath.Join(dir, "target")
	require.NoError(t, os.WriteFile(target, []byte("t"), 0o600))
	link := filepath.Join(dir, "l.sock")
	require.NoError(t, os.Symlink(target, link))
	_, err = Listen(link)
	require.ErrorIs(t, err, ErrNotSocket)
	_, err = os.Stat(target)
	require.NoError(t, err)
}

func TestPolicy(t *testing.T) {
	p := AllowRootAnd(1000, 1001)
	for uid, want := range map[uint32]bool{0: true, 1000: true, 1001: true, 65534: false, 999: false} {
		assert.Equal(t, want, p.Allows(uid), "uid %d", uid)
	}
	assert.False(t, AllowRootAnd().Allows(1000))
}

func TestPeerCredOfOwnConnection(t *testing.T) {
	path := filepath.Join(t.TempDir(), "x.sock")
	ln, err := Listen(path)
	require.NoError(t, err)
	t.Cleanup(func() { _ = ln.Close() })
	got := make(chan Cred, 1)
	errc := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			errc <- err
			return
		}
		defer func() { _ = c.Close() }()
		cred, err := PeerCred(c)
		if err != nil {
			errc <- err
			return
		}
		got <- cred
	}()
	c, err := net.Dial("unix", path)
	require.NoError(t, err)
	defer func() { _ = c.Close() }()
	select {
	case cred := <-got:
		assert.Equal(t, uint32(os.Getuid()), cred.UID)
		assert.Equal(t, uint32(os.Getgid()), cred.GID)
		assert.Equal(t, int32(os.Getpid()), cred.PID)
	case err := <-errc:
		t.Fatal(err)
	}

	tcp, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer func() { _ = tcp.Close() }()
	tc, err := net.Dial("tcp", tcp.Addr().String())
	require.NoError(t, err)
	defer func() { _ = tc.Close() }()
	_, err = PeerCred(tc)
	require.ErrorIs(t, err, ErrNotUnix)
}

// The attacker's side: a process running as another uid connects to a socket whose mode and
// directory were loosened by mistake. The checked listener must never hand that connection out;
// it reports the refusal with the caller's real uid, and a later allowed caller still gets through.
func TestCheckedListenerRefusesOtherUID(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: connects as uid 65534 from a child process (CI runs as root)")
	}
	dir := looseDir(t)
	path := filepath.Join(dir, "x.sock")
	raw, err := Listen(path)
	require.NoError(t, err)
	t.Cleanup(func() { _ = raw.Close() })
	require.NoError(t, os.Chmod(path, 0o666))

	refused := make(chan Cred, 1)
	ln := AllowRootAnd(uint32(os.Getuid())).CheckedListener(raw, func(c Cred, err error) {
		if errors.Is(err, ErrPeerRefused) {
			refused <- c
		}
	})
	accepted := make(chan net.Conn, 2)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				close(accepted)
				return
			}
			accepted <- c
		}
	}()

	out := runAs(t, nobody, "connect", path)
	assert.Contains(t, out, "connected", "the kernel let the child connect; the refusal is the listener's")
	select {
	case c := <-refused:
		assert.Equal(t, uint32(nobody), c.UID)
	case c := <-accepted:
		t.Fatalf("the listener handed out the attacker's connection %v", c.RemoteAddr())
	case <-time.After(5 * time.Second):
		t.Fatal("no refusal reported")
	}

	// Root (this process) is allowed, and the first connection handed out is root's: the
	// attacker's was never returned by Accept.
	conn, err := net.Dial("unix", path)
	require.NoError(t, err)
	defer func() { _ = conn.Close() }()
	got := <-accepted
	cred, err := PeerCred(got)
	require.NoError(t, err)
	assert.Equal(t, uint32(os.Getuid()), cred.UID)
	_ = got.Close()
	require.NoError(t, raw.Close())
	for c := range accepted {
		t.Errorf("unexpected connection handed out: %v", c.RemoteAddr())
	}
}
