package attest

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/ute-project/ute/identity"
)

// Sentinels. Every error of Verify wraps exactly one of them.
var (
	// ErrNoOwner: no socket or no process matching the connection was found (the client closed
	// it, it lives in another network namespace, or /proc is not readable).
	ErrNoOwner = errors.New("attest: no process owns the connection")
	// ErrPIDReused: the process changed while it was being attested.
	ErrPIDReused = identity.ErrPIDReused
	// ErrMismatch: the owning process is not the enrolled workload.
	ErrMismatch = errors.New("attest: workload does not match the enrolled fingerprint")
	// ErrUnreadable: the process exists but its executable or status could not be read.
	ErrUnreadable = errors.New("attest: process could not be read")
)

// maxNetFile bounds a read of /proc/net/tcp{,6}: 150 bytes a socket, so about 400k sockets.
const maxNetFile = 64 << 20

// DefaultCacheSize is the number of executables whose digests the cache keeps.
const DefaultCacheSize = 256

// Options configure an Attester.
type Options struct {
	// Proc is the proc file system root; "" means /proc. Tests point it at a directory shaped
	// like /proc.
	Proc string
	// CacheSize bounds the digest cache; 0 means DefaultCacheSize.
	CacheSize int

	// between runs after the first start-time read and before the second (tests of the
	// PID-reuse guard).
	between func(pid int)
}

// Attester maps loopback connections to processes and fingerprints them. It is safe for
// concurrent use.
type Attester struct {
	proc  string
	cache *digestCache
	// netlink: look sockets up with sock_diag (the real /proc only; a test root is read as files).
	netlink bool
	opts    Options

	mu    sync.Mutex
	hints []int // PIDs that owned recent connections, checked before a full /proc scan

	scans atomic.Uint64
}

// New returns an Attester.
func New(opts Options) *Attester {
	netlink := opts.Proc == ""
	if opts.Proc == "" {
		opts.Proc = "/proc"
	}
	if opts.CacheSize <= 0 {
		opts.CacheSize = DefaultCacheSize
	}
	return &Attester{proc: opts.Proc, cache: newDigestCache(opts.CacheSize), opts: opts, netlink: netlink}
}

// Stats count the cache's work.
type Stats struct {
	Hits, Misses uint64 // executable digests found in / added to the cache
	Scans        uint64 // full /proc scans (no hinted PID held the socket)
}

// Stats returns the counters.
func (a *Attester) Stats() Stats {
	h, m := a.cache.stats()
	return Stats{Hits: h, Misses: m, Scans: a.scans.Load()}
}

// Expected is an agent's enrolled workload: the fingerprint digest of its certificate, with the
// uid and gid it was enrolled with (to say what differs on a mismatch).
type Expected struct {
	Digest   []byte
	UID, GID uint32
	Exe      string // the path it was enrolled from, for messages only
}

// Process is an attested process.
type Process struct {
	PID       int
	StartTime uint64 // clock ticks since boot, field 22 of /proc/<pid>/stat
	Exe       string // where /proc/<pid>/exe points (informational: a path can be swapped)
	Workload  identity.Workload
	Cached    bool // the executable digest came from the cache
}

// Matches reports whether p is the workload whose digest is want: the exact digest, or, for an
// agent enrolled by executable path (no cgroup), the digest with the cgroup left out, as
// identity.Workload.Matches does.
func (p Process) Matches(want []byte) bool {
	d := p.Workload.Digest()
	if bytes.Equal(d[:], want) {
		return true
	}
	w := p.Workload
	w.Cgroup = ""
	d = w.Digest()
	return bytes.Equal(d[:], want)
}

// Verify finds the process owning the client end of a loopback connection (client is its local
// address, server the address it is connected to: the proxy's listener) and checks it against
// want. The error wraps ErrNoOwner, ErrPIDReused, ErrUnreadable or ErrMismatch.
func (a *Attester) Verify(client, server netip.AddrPort, want Expected) (Process, error) {
	inode, err := a.SocketInode(client, server)
	if err != nil {
		return Process{}, err
	}
	p, err := a.OwnerProcess(inode)
	if err != nil {
		return Process{}, err
	}
	if !p.Matches(want.Digest) {
		return p, fmt.Errorf("%w: %s", ErrMismatch, mismatchReason(p, want))
	}
	return p, nil
}

// mismatchReason says what differs; only the digest is enrolled, so when uid and gid agree the
// executable (or the cgroup) is what changed.
func mismatchReason(p Process, want Expected) string {
	w := p.Workload
	switch {
	case w.UID != want.UID:
		return fmt.Sprintf("pid %d (%s) runs as uid %d, the agent was enrolled for uid %d", p.PID, p.Exe, w.UID, want.UID)
	case w.GID != want.GID:
		return fmt.Sprintf("pid %d (%s) runs as gid %d, the agent was enrolled for gid %d", p.PID, p.Exe, w.GID, want.GID)
	}
	return fmt.Sprintf("pid %d runs %s (sha256 %s), not the enrolled executable %s", p.PID, p.Exe, hex.EncodeToString(w.ExeDigest[:8]), want.Exe)
}

// SocketInode returns the inode of the TCP socket whose local address is local and whose peer is
// remote, from /proc/net/tcp and /proc/net/tcp6.
func (a *Attester) SocketInode(local, remote netip.AddrPort) (uint64, error) {
	local = netip.AddrPortFrom(local.Addr().Unmap(), local.Port())
	remote = netip.AddrPortFrom(remote.Addr().Unmap(), remote.Port())
	if a.netlink {
		ino, err := diagInode(local, remote)
		switch {
		case err == nil && ino != 0:
			return ino, nil
		case err == nil:
			return 0, fmt.Errorf("%w: socket %s -> %s has no inode (closing)", ErrNoOwner, local, remote)
		case errors.Is(err, errDiagNotFound):
			return 0, fmt.Errorf("%w: no socket %s -> %s in this network namespace", ErrNoOwner, local, remote)
		}
		// sock_diag unavailable (an old kernel, a seccomp filter): read the tables instead.
	}
	for _, f := range []string{"tcp", "tcp6"} {
		b, err := readLimited(filepath.Join(a.proc, "net", f), maxNetFile)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return 0, fmt.Errorf("%w: %w", ErrNoOwner, err)
		}
		ino, found, err := FindSocket(b, local, remote)
		if err != nil {
			return 0, fmt.Errorf("%w: /proc/net/%s: %w", ErrNoOwner, f, err)
		}
		if found {
			if ino == 0 {
				return 0, fmt.Errorf("%w: socket %s -> %s has no inode (closing)", ErrNoOwner, local, remote)
			}
			return ino, nil
		}
	}
	return 0, fmt.Errorf("%w: no socket %s -> %s in this network namespace", ErrNoOwner, local, remote)
}

// FindSocket scans the text of /proc/net/tcp or /proc/net/tcp6 for the socket local -> remote
// and returns its inode. Addresses are compared unmapped (an IPv6 socket talking to 127.0.0.1
// shows ::ffff:127.0.0.1).
func FindSocket(table []byte, local, remote netip.AddrPort) (uint64, bool, error) {
	lines := bytes.Split(table, []byte{'\n'})
	for i, line := range lines {
		f := strings.Fields(string(line))
		if len(f) == 0 || (i == 0 && f[0] == "sl") {
			continue
		}
		if len(f) < 10 {
			return 0, false, fmt.Errorf("line %d: %d fields, want at least 10", i+1, len(f))
		}
		l, err := parseHexAddrPort(f[1])
		if err != nil {
			return 0, false, fmt.Errorf("line %d: local address: %w", i+1, err)
		}
		r, err := parseHexAddrPort(f[2])
		if err != nil {
			return 0, false, fmt.Errorf("line %d: remote address: %w", i+1, err)
		}
		if l != local || r != remote {
			continue
		}
		ino, err := strconv.ParseUint(f[9], 10, 64)
		if err != nil {
			return 0, false, fmt.Errorf("line %d: inode %q: %w", i+1, f[9], err)
		}
		return ino, true, nil
	}
	return 0, false, nil
}

// parseHexAddrPort reads the kernel's "ADDR:PORT" form: the address as 32-bit words in host byte
// order, printed %08X each (one word for IPv4, four for IPv6), the port %04X.
func parseHexAddrPort(s string) (netip.AddrPort, error) {
	as, ps, ok := strings.Cut(s, ":")
	if !ok || len(ps) != 4 || (len(as) != 8 && len(as) != 32) {
		return netip.AddrPort{}, fmt.Errorf("%q is not ADDR:PORT in hex", s)
	}
	port, err := strconv.ParseUint(ps, 16, 16)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("port %q: %w", ps, err)
	}
	raw := make([]byte, 0, 16)
	for w := 0; w < len(as); w += 8 {
		v, err := strconv.ParseUint(as[w:w+8], 16, 32)
		if err != nil {
			return netip.AddrPort{}, fmt.Errorf("address %q: %w", as, err)
		}
		raw = binary.NativeEndian.AppendUint32(raw, uint32(v))
	}
	addr, _ := netip.AddrFromSlice(raw)
	return netip.AddrPortFrom(addr.Unmap(), uint16(port)), nil
}

// OwnerProcess finds the process holding socket inode and fingerprints it. PIDs that owned
// recent connections are tried first; a full scan of /proc follows.
func (a *Attester) OwnerProcess(inode uint64) (Process, error) {
	link := "socket:[" + strconv.FormatUint(inode, 10) + "]"
	a.mu.Lock()
	hints := slices.Clone(a.hints)
	a.mu.Unlock()
	for _, pid := range hints {
		if p, held, err := a.attestHolder(pid, link); held {
			return p, err
		}
	}
	a.scans.Add(1)
	d, err := os.Open(a.proc)
	if err != nil {
		return Process{}, fmt.Errorf("%w: %w", ErrNoOwner, err)
	}
	names, err := d.Readdirnames(-1)
	_ = d.Close()
	if err != nil {
		return Process{}, fmt.Errorf("%w: %w", ErrNoOwner, err)
	}
	for _, name := range names {
		pid, err := strconv.Atoi(name)
		if err != nil || pid <= 0 || slices.Contains(hints, pid) {
			continue
		}
		if a.holds(pid, link) {
			a.hint(pid)
			p, held, err := a.attestHolder(pid, link)
			if !held && err == nil {
				err = fmt.Errorf("%w: pid %d let go of %s while being attested", ErrPIDReused, pid, link)
			}
			return p, err
		}
	}
	return Process{}, fmt.Errorf("%w: no process holds %s (it may run as another user whose /proc/<pid>/fd this node cannot read)", ErrNoOwner, link)
}

// maxHints bounds the PIDs tried before a scan: a handful of agent processes per proxy.
const maxHints = 8

func (a *Attester) hint(pid int) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.hints = slices.DeleteFunc(a.hints, func(p int) bool { return p == pid })
	a.hints = slices.Insert(a.hints, 0, pid)
	if len(a.hints) > maxHints {
		a.hints = a.hints[:maxHints]
	}
}

// holds reports whether pid has an open file descriptor on link ("socket:[N]").
func (a *Attester) holds(pid int, link string) bool {
	fdDir := filepath.Join(a.proc, strconv.Itoa(pid), "fd")
	d, err := os.Open(fdDir)
	if err != nil {
		return false
	}
	defer func() { _ = d.Close() }()
	for {
		names, err := d.Readdirnames(256)
		for _, fd := range names {
			if t, err := os.Readlink(filepath.Join(fdDir, fd)); err == nil && t == link {
				return true
			}
		}
		if err != nil {
			return false
		}
	}
}

// attestHolder fingerprints pid if it holds link (held reports whether it does). The start time
// is read first and last, and the socket is confirmed held in between: if both start times
// agree, the process that holds the socket is the one whose executable, ids and cgroup were read.
func (a *Attester) attestHolder(pid int, link string) (p Process, held bool, err error) {
	dir := filepath.Join(a.proc, strconv.Itoa(pid))
	start, err := identity.ProcStartTime(dir)
	if err != nil {
		return Process{}, false, nil // gone: not the holder
	}
	if !a.holds(pid, link) {
		return Process{}, false, nil
	}
	if p, err = a.fingerprint(pid, dir); err != nil {
		return Process{}, true, err
	}
	if a.opts.between != nil {
		a.opts.between(pid)
	}
	again, err := identity.ProcStartTime(dir)
	if err != nil {
		return Process{}, true, fmt.Errorf("%w: pid %d exited while being attested: %w", ErrPIDReused, pid, err)
	}
	if again != start {
		return Process{}, true, fmt.Errorf("%w: pid %d start time %d, now %d", ErrPIDReused, pid, start, again)
	}
	p.StartTime = start
	return p, true, nil
}

// Process fingerprints pid (guarded against PID reuse like Verify), without a socket.
func (a *Attester) Process(pid int) (Process, error) {
	if pid <= 0 {
		return Process{}, fmt.Errorf("%w: pid %d is not a process id", ErrNoOwner, pid)
	}
	dir := filepath.Join(a.proc, strconv.Itoa(pid))
	start, err := identity.ProcStartTime(dir)
	if err != nil {
		return Process{}, fmt.Errorf("%w: pid %d: %w", ErrNoOwner, pid, err)
	}
	p, err := a.fingerprint(pid, dir)
	if err != nil {
		return Process{}, err
	}
	if a.opts.between != nil {
		a.opts.between(pid)
	}
	again, err := identity.ProcStartTime(dir)
	if err != nil || again != start {
		return Process{}, fmt.Errorf("%w: pid %d changed while being attested", ErrPIDReused, pid)
	}
	p.StartTime = start
	return p, nil
}

func (a *Attester) fingerprint(pid int, dir string) (Process, error) {
	exe, _ := os.Readlink(filepath.Join(dir, "exe"))
	digest, cached, err := a.cache.digest(filepath.Join(dir, "exe"))
	if err != nil {
		return Process{}, fmt.Errorf("%w: pid %d executable: %w", ErrUnreadable, pid, err)
	}
	w, err := identity.ProcWorkload(dir, digest)
	if err != nil {
		return Process{}, fmt.Errorf("%w: pid %d: %w", ErrUnreadable, pid, err)
	}
	return Process{PID: pid, Exe: exe, Cached: cached, Workload: w}, nil
}

// readLimited reads a /proc file with plain system calls: os.Open's extra fcntl and poller
// registration cost as much as the read itself on these tiny files, and this runs on every flow.
func readLimited(path string, limit int64) ([]byte, error) {
	fd, err := syscall.Open(path, syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: path, Err: err}
	}
	defer func() { _ = syscall.Close(fd) }()
	b := make([]byte, 0, min(limit+1, 4096))
	for {
		if len(b) == cap(b) {
			b = append(b, 0)[:len(b)]
		}
		n, err := syscall.Read(fd, b[len(b):cap(b)])
		if err == syscall.EINTR {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("read %s: %w", path, err)
		}
		if n == 0 {
			return b, nil
		}
		b = b[:len(b)+n]
		if int64(len(b)) > limit {
			return nil, fmt.Errorf("read %s: larger than %d bytes", path, limit)
		}
	}
}

// fileKey identifies the content of a file without reading it: a replaced file has another
// inode (or ctime, if the inode number is recycled), a file rewritten in place another size,
// mtime or ctime. ctime is in the key because mtime can be set back by the file's owner
// (touch -d) and ctime cannot.
type fileKey struct {
	dev, ino     uint64
	size         int64
	mtime, ctime syscall.Timespec
}

func keyOf(st *syscall.Stat_t) fileKey {
	return fileKey{dev: uint64(st.Dev), ino: st.Ino, size: st.Size, mtime: st.Mtim, ctime: st.Ctim}
}

// digestCache maps fileKey to SHA-256, bounded, dropping the oldest entry when full.
type digestCache struct {
	mu     sync.Mutex
	max    int
	m      map[fileKey][32]byte
	order  []fileKey
	hits   uint64
	misses uint64
}

func newDigestCache(n int) *digestCache {
	return &digestCache{max: n, m: make(map[fileKey][32]byte, n)}
}

func (c *digestCache) stats() (uint64, uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.hits, c.misses
}

// digest opens path (for /proc/<pid>/exe, the file the process runs) and returns its SHA-256,
// from the cache when the open file's key is known. The key comes from fstat of the very file
// that is hashed, so a swap between stat and read cannot mix two files.
func (c *digestCache) digest(path string) ([32]byte, bool, error) {
	f, err := os.Open(path)
	if err != nil {
		return [32]byte{}, false, err
	}
	defer func() { _ = f.Close() }()
	var st syscall.Stat_t
	if err := syscall.Fstat(int(f.Fd()), &st); err != nil {
		return [32]byte{}, false, fmt.Errorf("stat %s: %w", path, err)
	}
	if st.Mode&syscall.S_IFMT != syscall.S_IFREG {
		return [32]byte{}, false, fmt.Errorf("%s is not a regular file", path)
	}
	k := keyOf(&st)
	c.mu.Lock()
	d, ok := c.m[k]
	if ok {
		c.hits++
	}
	c.mu.Unlock()
	if ok {
		return d, true, nil
	}
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return [32]byte{}, false, fmt.Errorf("hash %s: %w", path, err)
	}
	h.Sum(d[:0])
	// A write during hashing changes mtime/ctime: key the digest by the state after, and only
	// if it did not change, so a half-old half-new read is never cached under either key.
	var after syscall.Stat_t
	if err := syscall.Fstat(int(f.Fd()), &after); err != nil || keyOf(&after) != k {
		return [32]byte{}, false, fmt.Errorf("%s changed while it was hashed", path)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.misses++
	if _, dup := c.m[k]; !dup {
		if len(c.order) >= c.max {
			delete(c.m, c.order[0])
			c.order = c.order[1:]
		}
		c.m[k] = d
		c.order = append(c.order, k)
	}
	return d, false, nil
}
