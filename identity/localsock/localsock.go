package localsock

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"sync"
	"syscall"
	"time"
)

// Errors of Listen and PeerCred.
var (
	// ErrInUse: another live process holds the socket (its lock file is locked or it answers).
	ErrInUse = errors.New("another process is serving on the socket")
	// ErrNotSocket: the path exists and is not a socket, so it is left alone.
	ErrNotSocket = errors.New("path exists and is not a socket")
	// ErrNotUnix: the connection is not a Unix-domain connection, so it has no peer credentials.
	ErrNotUnix = errors.New("not a unix socket connection")
	// ErrPeerRefused: the peer's uid is not allowed (Listener.Accept never returns such a
	// connection; CheckConn reports it).
	ErrPeerRefused = errors.New("caller is not allowed on this socket")
)

// SuffixLock is appended to the socket path to name its lock file.
const SuffixLock = ".lock"

// probeTimeout bounds the liveness probe of an existing socket file: a live daemon accepts at
// once (the kernel completes the connect before accept), so only a wedged one is slower.
const probeTimeout = time.Second

// Cred is what the kernel reports about the process at the other end of a connection.
type Cred struct {
	PID int32
	UID uint32
	GID uint32
}

// Listener is a bound socket whose lock file is held until Close. Close also removes the
// socket file, so the next daemon finds the path free.
type Listener struct {
	*net.UnixListener
	path string
	lock *os.File
	once sync.Once
	err  error
}

// Listen binds a Unix stream socket at path with mode 0600. It takes an exclusive lock on
// path+SuffixLock first (never blocking): when another process holds it, or a process answers on
// an existing socket at path, it returns ErrInUse; a socket file nobody answers on (left by a
// daemon killed with SIGKILL) is removed; any other kind of file at path is refused with
// ErrNotSocket.
func Listen(path string) (*Listener, error) {
	lock, err := os.OpenFile(path+SuffixLock, os.O_CREATE|os.O_RDWR|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, fmt.Errorf("socket %s: lock: %w", path, err)
	}
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		_ = lock.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("socket %s: %w (its lock %s is held); stop that process first", path, ErrInUse, path+SuffixLock)
		}
		return nil, fmt.Errorf("socket %s: lock: %w", path, err)
	}
	ln, err := bind(path)
	if err != nil {
		_ = lock.Close()
		return nil, err
	}
	return &Listener{UnixListener: ln, path: path, lock: lock}, nil
}

func bind(path string) (*net.UnixListener, error) {
	fi, err := os.Lstat(path)
	switch {
	case err == nil && fi.Mode()&fs.ModeSocket == 0:
		return nil, fmt.Errorf("socket %s: %w (%s); remove it or choose another directory", path, ErrNotSocket, fi.Mode().Type())
	case err == nil:
		if Alive(path) {
			// A daemon of an older version, which took no lock, still serves here.
			return nil, fmt.Errorf("socket %s: %w; stop that process first", path, ErrInUse)
		}
		if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("socket %s: remove stale socket: %w", path, err)
		}
	case !errors.Is(err, fs.ErrNotExist):
		return nil, fmt.Errorf("socket %s: %w", path, err)
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("socket %s: %w", path, err)
	}
	// Close must not unlink the path on its own: Listener.Close removes it only while it still
	// holds the lock, which is what makes the removal safe.
	ln.SetUnlinkOnClose(false)
	// Between bind and chmod the socket has the umask's mode; the directory (0700 for both
	// daemons) and the peer check cover that window.
	if err := os.Chmod(path, 0o600); err != nil {
		_ = ln.Close()
		_ = os.Remove(path)
		return nil, fmt.Errorf("socket %s: %w", path, err)
	}
	return ln, nil
}

// Alive reports whether a process accepts connections on the socket at path.
func Alive(path string) bool {
	ctx, cancel := context.WithTimeout(context.Background(), probeTimeout)
	defer cancel()
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return false
	}
	_ = c.Close()
	return true
}

// Path is the socket's path.
func (l *Listener) Path() string { return l.path }

// Close stops listening, removes the socket file and releases the lock. It is idempotent.
func (l *Listener) Close() error {
	l.once.Do(func() {
		l.err = l.UnixListener.Close()
		if err := os.Remove(l.path); err != nil && !errors.Is(err, fs.ErrNotExist) && l.err == nil {
			l.err = err
		}
		_ = syscall.Flock(int(l.lock.Fd()), syscall.LOCK_UN)
		_ = l.lock.Close()
	})
	return l.err
}

// PeerCred returns the kernel's SO_PEERCRED answer for a Unix connection: the credentials the
// peer process had when it connected.
func PeerCred(c net.Conn) (Cred, error) {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return Cred{}, ErrNotUnix
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return Cred{}, err
	}
	var (
		cred *syscall.Ucred
		cerr error
	)
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = syscall.GetsockoptUcred(int(fd), syscall.SOL_SOCKET, syscall.SO_PEERCRED)
	}); err != nil {
		return Cred{}, err
	}
	if cerr != nil {
		return Cred{}, fmt.Errorf("SO_PEERCRED: %w", cerr)
	}
	return Cred{PID: cred.Pid, UID: cred.Uid, GID: cred.Gid}, nil
}

// Policy decides which callers may use a socket: root always, plus the listed uids.
type Policy struct {
	UIDs []uint32
}

// AllowRootAnd allows root and the given uids (typically the daemon's own uid and the owner of
// its directory).
func AllowRootAnd(uids ...uint32) Policy { return Policy{UIDs: append([]uint32(nil), uids...)} }

// Allows reports whether uid may use the socket.
func (p Policy) Allows(uid uint32) bool {
	if uid == 0 {
		return true
	}
	for _, u := range p.UIDs {
		if u == uid {
			return true
		}
	}
	return false
}

// Check returns the peer's credentials, or an error wrapping ErrPeerRefused (or ErrNotUnix, or
// the getsockopt failure) when the caller is not allowed.
func (p Policy) Check(c net.Conn) (Cred, error) {
	cred, err := PeerCred(c)
	if err != nil {
		return Cred{}, err
	}
	if !p.Allows(cred.UID) {
		return cred, fmt.Errorf("%w: uid %d (pid %d); use root or the daemon's user", ErrPeerRefused, cred.UID, cred.PID)
	}
	return cred, nil
}

// CheckedListener returns only connections whose caller p allows; the others are closed at once
// and reported to refused (which may be nil).
func (p Policy) CheckedListener(ln net.Listener, refused func(Cred, error)) net.Listener {
	return &checkedListener{Listener: ln, p: p, refused: refused}
}

type checkedListener struct {
	net.Listener
	p       Policy
	refused func(Cred, error)
}

func (l *checkedListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		cred, err := l.p.Check(c)
		if err == nil {
			return c, nil
		}
		if l.refused != nil {
			l.refused(cred, err)
		}
		_ = c.Close()
	}
}
