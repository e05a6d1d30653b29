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

	"golang.org/x/sys/unix"

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
	// Diag, when set, is the sock_diag sockets socket lookups use (see Diag: they answer for
	// the namespace they were opened in). Nil: one socket per lookup, in the namespace of the
	// thread the lookup runs on. The Attester does not close it.
	Diag *Diag

	// between runs once the process is known to hold the socket (Process: once its directory
	// is open), before anything else of it is read: tests of the PID-reuse guard end or replace
	// the process there.
	between func(pid int)
	// afterIDs runs when fingerprintAt has read the ids and not yet the executable: tests of the
	// guard against ids read from a process that exited in between.
	afterIDs func(pid int)
}

// Attester maps loopback connections to processes and fingerprints them. It is safe for
// concurrent use.
type Attester struct {
	proc  string
	cache *digestCache
	// netlink: look sockets up with sock_diag (the real /proc only; a test root is read as files).
	netlink bool
	// pinned: proc is a proc file system, whose /proc/<pid> directories, once open, refer to
	// that one process for as long as they stay open: after it exits every lookup in them fails,
	// and a process that later gets the same PID is not reachable through them (the kernel keeps
	// the process's struct pid in the directory's inode; a reused number is another struct pid).
	// Everything attestation reads goes through the open directory, so a PID reused in between
	// cannot be read in place of the holder, and the start-time reads that guard against it on
	// any other root are not needed: they were six of a new flow's syscalls.
	// TestProcDirectoryPinsItsProcess checks the kernel's side of this.
	pinned bool
	opts   Options

	mu sync.Mutex
	// hints are, per agent (its enrolled digest; "" for OwnerProcess), the processes that owned
	// its recent sockets, checked before a /proc scan; hintKeys bounds them, oldest first.
	hints    map[string][]hint
	hintKeys []string
	// seen remembers, per socket inode, the process and descriptor a search saw it on while
	// looking for another socket (bounded by maxSeen): see owner.
	seen     map[uint64]seenSocket
	scratch  sync.Pool     // *scratch
	seenHits atomic.Uint64 // sockets found where seen said (tests)

	scans atomic.Uint64

	// What VerifySelf reads of this process that cannot change while it runs, taken once: its
	// PID (a Go process cannot fork without exec), the paths of its proc directory, and (real
	// /proc only) a descriptor of the file /proc/self/exe names (self.go). Every SDK Dial
	// verifies itself, and on a VM a getpid costs 1.2-1.5 µs, a stat of /proc/self/exe 5.5 µs.
	selfPID          int
	selfDir, selfExe string
	selfOnce         sync.Once
	// selfFile is nil for a test root, or when it could not be opened. It lives as long as the
	// Attester; the os.File's own cleanup closes it when the Attester is collected.
	selfFile *os.File
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
	self := filepath.Join(opts.Proc, "self")
	return &Attester{proc: opts.Proc, cache: newDigestCache(opts.CacheSize), opts: opts, netlink: netlink, pinned: isProcFS(opts.Proc),
		hints: map[string][]hint{}, seen: map[uint64]seenSocket{}, scratch: sync.Pool{New: func() any { return &scratch{dents: make([]byte, 16<<10)} }},
		selfPID: os.Getpid(), selfDir: self, selfExe: filepath.Join(self, "exe")}
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
//
// What a successful Verify or VerifyUDP returns holds only what the decision read: when the
// executable and the ids alone give the enrolled digest (an agent enrolled without a cgroup: any
// cgroup matches, as in Matches), Exe and Workload.Cgroup are left empty, since reading them
// would change nothing; they are filled whenever the process was refused, and by Process.
type Process struct {
	PID      int
	Exe      string // where /proc/<pid>/exe points (informational: a path can be swapped)
	Workload identity.Workload
	Cached   bool // the executable digest came from the cache
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
	s, err := a.socket(client, server)
	if err != nil {
		return Process{}, err
	}
	return a.verifyOwner(s, want)
}

// verifyOwner finds the process holding s and checks it against want.
func (a *Attester) verifyOwner(s sockInfo, want Expected) (Process, error) {
	p, err := a.owner(s, want.Digest)
	if err != nil {
		return Process{}, err
	}
	if !p.Matches(want.Digest) {
		return p, fmt.Errorf("%w: %s", ErrMismatch, mismatchReason(p, want))
	}
	return p, nil
}

// VerifyUDP is Verify for the UDP socket a program sent a datagram from: bound to local (the
// datagram's source) and, connected or not, able to receive from remote (its destination). Only
// sock_diag finds it (the /proc/net/udp tables cannot tell which of several sockets bound to one
// port would answer).
func (a *Attester) VerifyUDP(local, remote netip.AddrPort, want Expected) (Process, error) {
	local = netip.AddrPortFrom(local.Addr().Unmap(), local.Port())
	remote = netip.AddrPortFrom(remote.Addr().Unmap(), remote.Port())
	// The kernel's UDP lookup takes the sockid's source as the datagram's source, so the
	// remote end goes first ("swapped for historical reasons", net/ipv4/udp_diag.c); the
	// other order is tried as well.
	s, err := a.opts.Diag.lookup(unix.IPPROTO_UDP, remote, local)
	if err != nil {
		if s2, err2 := a.opts.Diag.lookup(unix.IPPROTO_UDP, local, remote); err2 == nil {
			s, err = s2, nil
		}
	}
	switch {
	case errors.Is(err, errDiagNotFound):
		return Process{}, fmt.Errorf("%w: no UDP socket %s -> %s in this network namespace", ErrNoOwner, local, remote)
	case err != nil:
		return Process{}, fmt.Errorf("%w: UDP socket %s -> %s: %w", ErrNoOwner, local, remote, err)
	case s.inode == 0:
		return Process{}, fmt.Errorf("%w: UDP socket %s -> %s has no inode (closing)", ErrNoOwner, local, remote)
	}
	return a.verifyOwner(s, want)
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
// remote: a sock_diag lookup, or /proc/net/tcp and /proc/net/tcp6.
func (a *Attester) SocketInode(local, remote netip.AddrPort) (uint64, error) {
	s, err := a.socket(local, remote)
	return s.inode, err
}

// socket is SocketInode with the uid that created the socket.
func (a *Attester) socket(local, remote netip.AddrPort) (sockInfo, error) {
	local = netip.AddrPortFrom(local.Addr().Unmap(), local.Port())
	remote = netip.AddrPortFrom(remote.Addr().Unmap(), remote.Port())
	if a.netlink {
		s, err := a.opts.Diag.lookup(unix.IPPROTO_TCP, local, remote)
		switch {
		case err == nil && s.inode != 0:
			return s, nil
		case err == nil:
			return sockInfo{}, fmt.Errorf("%w: socket %s -> %s has no inode (closing)", ErrNoOwner, local, remote)
		case errors.Is(err, errDiagNotFound):
			return sockInfo{}, fmt.Errorf("%w: no socket %s -> %s in this network namespace", ErrNoOwner, local, remote)
		}
		// sock_diag unavailable (an old kernel, a seccomp filter): read the tables instead.
		// They show the namespace of the process, which is the namespace of its sockets
		// unless an embedder moved a thread elsewhere (the daemon opens a Diag there).
	}
	for _, f := range []string{"tcp", "tcp6"} {
		b, err := readAt(unix.AT_FDCWD, filepath.Join(a.proc, "net", f), maxNetFile)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return sockInfo{}, fmt.Errorf("%w: %w", ErrNoOwner, err)
		}
		s, found, err := findSocket(b, local, remote)
		if err != nil {
			return sockInfo{}, fmt.Errorf("%w: /proc/net/%s: %w", ErrNoOwner, f, err)
		}
		if found {
			if s.inode == 0 {
				return sockInfo{}, fmt.Errorf("%w: socket %s -> %s has no inode (closing)", ErrNoOwner, local, remote)
			}
			return s, nil
		}
	}
	return sockInfo{}, fmt.Errorf("%w: no socket %s -> %s in this network namespace", ErrNoOwner, local, remote)
}

// FindSocket scans the text of /proc/net/tcp or /proc/net/tcp6 for the socket local -> remote
// and returns its inode. Addresses are compared unmapped (an IPv6 socket talking to 127.0.0.1
// shows ::ffff:127.0.0.1).
func FindSocket(table []byte, local, remote netip.AddrPort) (uint64, bool, error) {
	s, found, err := findSocket(table, local, remote)
	return s.inode, found, err
}

// findSocket is FindSocket with the socket's uid (field 8).
func findSocket(table []byte, local, remote netip.AddrPort) (sockInfo, bool, error) {
	lines := bytes.Split(table, []byte{'\n'})
	for i, line := range lines {
		f := strings.Fields(string(line))
		if len(f) == 0 || (i == 0 && f[0] == "sl") {
			continue
		}
		if len(f) < 10 {
			return sockInfo{}, false, fmt.Errorf("line %d: %d fields, want at least 10", i+1, len(f))
		}
		l, err := parseHexAddrPort(f[1])
		if err != nil {
			return sockInfo{}, false, fmt.Errorf("line %d: local address: %w", i+1, err)
		}
		r, err := parseHexAddrPort(f[2])
		if err != nil {
			return sockInfo{}, false, fmt.Errorf("line %d: remote address: %w", i+1, err)
		}
		if l != local || r != remote {
			continue
		}
		ino, err := strconv.ParseUint(f[9], 10, 64)
		if err != nil {
			return sockInfo{}, false, fmt.Errorf("line %d: inode %q: %w", i+1, f[9], err)
		}
		s := sockInfo{inode: ino}
		// The uid only orders the owner search; an unreadable one leaves it unordered.
		if uid, err := strconv.ParseUint(f[7], 10, 32); err == nil {
			s.uid, s.hasUID = uint32(uid), true
		}
		return s, true, nil
	}
	return sockInfo{}, false, nil
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
	return a.owner(sockInfo{inode: inode}, nil)
}

// sockInfo is what the kernel says about a socket: its inode and, from sock_diag or
// /proc/net/tcp, the uid that created it.
type sockInfo struct {
	inode  uint64
	uid    uint32
	hasUID bool
}

// hint is a process that owned some of an agent's recent sockets, and the descriptors it held
// them on, newest first: a client that closes each connection before opening the next gets the
// same descriptor number again, and one that keeps a few connections going cycles through a few
// numbers, so a readlink or a few usually confirm the new socket without listing every
// descriptor the process holds.
type hint struct {
	pid int
	fds []int // never modified once stored: hintsFor's copies share them
}

// maxHints bounds the PIDs tried per agent before a scan: a handful of processes per agent.
// maxHintAgents bounds the agents whose hints are kept.
// maxHintFDs bounds the descriptors tried per hinted process before its descriptors are listed.
const (
	maxHints      = 8
	maxHintAgents = 256
	maxHintFDs    = 8
)

// seenSocket is where a search saw a socket: the process and the descriptor.
type seenSocket struct{ pid, fd int }

// maxSeen bounds Attester.seen; when full it is emptied (an entry is only worth a readlink
// saved, and a busy client's sockets live milliseconds).
const maxSeen = 4096

// scratch is the buffers one owner search reuses.
type scratch struct {
	link  [64]byte // a readlink of an fd: "socket:[N]" fits, anything longer is not it
	dents []byte
	names []string
	fds   []int
	// seen collects the other sockets (inode, descriptor) holdsAt read on its way.
	seen []seenFD
}

// seenFD is a descriptor holdsAt found holding another socket than the one it looked for.
type seenFD struct {
	ino uint64
	fd  int
}

// owner finds the process holding s and fingerprints it. want is the agent's enrolled digest
// (nil when the caller names none): its hints are tried first, and a process whose executable
// and ids already give it is not read further (fingerprintAt).
//
// Cost, in order: the process and descriptor an earlier search saw the socket on, that one
// descriptor only; the agent's hinted processes, each checked on its hinted descriptors first,
// then its other descriptors, newest first; then the processes running as the socket's uid
// (its creator); then every other process. The last pass keeps a socket created before its
// process changed uid, or held by a process whose /proc directory is root's (not dumpable),
// attributable: a uid is only an ordering, never a reason to refuse.
func (a *Attester) owner(s sockInfo, want []byte) (Process, error) {
	key := string(want)
	link := "socket:[" + strconv.FormatUint(s.inode, 10) + "]"
	sc := a.scratch.Get().(*scratch)
	defer a.scratch.Put(sc)
	// A socket an earlier search saw (one of several a client opened at once, read while
	// looking for a sibling) is tried on that descriptor alone first: one readlink where the
	// hints and the listing cost a dozen when a client keeps many sockets coming and going. Like
	// a hint, it only orders the search: the process must hold the socket now.
	if e, ok := a.seenSocket(s.inode); ok {
		if p, fd, held, err := a.attestHolder(e.pid, link, []int{e.fd}, true, want, sc); held {
			if err == nil {
				a.seenHits.Add(1)
				a.hint(key, p.PID, fd)
			}
			return p, err
		}
	}
	hints := a.hintsFor(key)
	for _, h := range hints {
		if p, fd, held, err := a.attestHolder(h.pid, link, h.fds, false, want, sc); held {
			if err == nil {
				a.hint(key, p.PID, fd)
			}
			return p, err
		}
	}
	a.scans.Add(1)
	procfd, err := openDir(unix.AT_FDCWD, a.proc)
	if err != nil {
		return Process{}, fmt.Errorf("%w: open %s: %w", ErrNoOwner, a.proc, err)
	}
	defer func() { _ = unix.Close(procfd) }()
	names, err := listDir(procfd, sc.dents, nil)
	if err != nil {
		return Process{}, fmt.Errorf("%w: list %s: %w", ErrNoOwner, a.proc, err)
	}
	try := func(name string, pid int) (Process, bool, error) {
		pidfd, err := openDir(procfd, name)
		if err != nil {
			return Process{}, false, nil // gone
		}
		defer func() { _ = unix.Close(pidfd) }()
		fd, ok := a.holds(pidfd, pid, link, nil, false, sc)
		if !ok {
			return Process{}, false, nil
		}
		p, fd, held, err := a.attestAt(pidfd, pid, link, []int{fd}, false, want, sc)
		if !held && err == nil {
			err = fmt.Errorf("%w: pid %d let go of %s while being attested", ErrPIDReused, pid, link)
		}
		if err == nil {
			a.hint(key, pid, fd)
		}
		return p, true, err
	}
	// Newest first: PIDs are handed out increasing until they wrap at pid_max, and a client
	// that runs one process per connection (curl, a shell script) is the newest process there
	// is when its first connection is attested. In /proc's own order (ascending) every older
	// process of the same user had all its descriptors read first.
	pids := make([]int, 0, len(names))
	for _, name := range names {
		if pid, err := strconv.Atoi(name); err == nil && pid > 0 && !slices.ContainsFunc(hints, func(h hint) bool { return h.pid == pid }) {
			pids = append(pids, pid)
		}
	}
	slices.Sort(pids)
	slices.Reverse(pids)
	var later []string
	for _, pid := range pids {
		name := strconv.Itoa(pid)
		if s.hasUID {
			var st unix.Stat_t
			if unix.Fstatat(procfd, name, &st, 0) != nil {
				continue
			}
			if st.Uid != s.uid {
				later = append(later, name)
				continue
			}
		}
		if p, held, err := try(name, pid); held {
			return p, err
		}
	}
	for _, name := range later {
		pid, _ := strconv.Atoi(name)
		if p, held, err := try(name, pid); held {
			return p, err
		}
	}
	return Process{}, fmt.Errorf("%w: no process holds %s (it may run as another user whose /proc/<pid>/fd this node cannot read)", ErrNoOwner, link)
}

// seenSocket returns where a search saw socket inode, if one did.
func (a *Attester) seenSocket(inode uint64) (seenSocket, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	e, ok := a.seen[inode]
	if ok {
		delete(a.seen, inode) // tried once: whatever the outcome, the search below is authoritative
	}
	return e, ok
}

// holds is holdsAt for process pid, noting the other sockets it read on the way in a.seen.
func (a *Attester) holds(pidfd, pid int, link string, hintFDs []int, exact bool, sc *scratch) (int, bool) {
	sc.seen = sc.seen[:0]
	fd, ok := holdsAt(pidfd, link, hintFDs, exact, sc)
	if len(sc.seen) > 0 {
		a.mu.Lock()
		if len(a.seen)+len(sc.seen) > maxSeen {
			clear(a.seen)
		}
		for _, s := range sc.seen {
			a.seen[s.ino] = seenSocket{pid: pid, fd: s.fd}
		}
		a.mu.Unlock()
	}
	return fd, ok
}

// hintsFor returns a copy of key's hints.
func (a *Attester) hintsFor(key string) []hint {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Clone(a.hints[key])
}

// hint puts (pid, fd) first among key's hints, and fd first among pid's descriptors.
func (a *Attester) hint(key string, pid, fd int) {
	a.mu.Lock()
	defer a.mu.Unlock()
	hs, known := a.hints[key]
	if !known {
		if len(a.hintKeys) >= maxHintAgents {
			delete(a.hints, a.hintKeys[0])
			a.hintKeys = a.hintKeys[1:]
		}
		a.hintKeys = append(a.hintKeys, key)
	}
	fds := make([]int, 1, maxHintFDs)
	fds[0] = fd
	if i := slices.IndexFunc(hs, func(h hint) bool { return h.pid == pid }); i >= 0 {
		for _, f := range hs[i].fds {
			if f != fd && len(fds) < maxHintFDs {
				fds = append(fds, f)
			}
		}
		hs = slices.Delete(hs, i, i+1)
	}
	hs = slices.Insert(hs, 0, hint{pid: pid, fds: fds})
	if len(hs) > maxHints {
		hs = hs[:maxHints]
	}
	a.hints[key] = hs
}

// holdsAt reports whether the process whose /proc directory is open as pidfd has a descriptor
// on link ("socket:[N]"), and which: the hinted descriptors first, then the others nearest to
// the newest hint first, or from the highest down without hints. One readlinkat per descriptor
// tried, relative to the open fd directory.
//
// Why nearest first: the kernel gives a new socket the lowest free descriptor, so a client that
// opens and closes connections reuses a few numbers near the ones it used last, and a client
// that keeps its connections open gets a number just above its newest. Either way the new
// socket is close to the last one found, while the process's other descriptors (listeners,
// files, pipes, the accepted ends of its own servers) may be many: scanning from the highest
// down cost 11 readlinks per new connection from a process holding a few dozen (the netns
// benchmark's client, docs/benchmarks.md).
//
// With exact, only hintFDs are tried. Every other socket read on the way is appended to sc.seen.
func holdsAt(pidfd int, link string, hintFDs []int, exact bool, sc *scratch) (int, bool) {
	for _, fd := range hintFDs {
		if fd >= 0 && sc.linkIs(pidfd, "fd/"+strconv.Itoa(fd), fd, link) {
			return fd, true
		}
	}
	if exact {
		return -1, false
	}
	dir, err := openDir(pidfd, "fd")
	if err != nil {
		return -1, false
	}
	defer func() { _ = unix.Close(dir) }()
	sc.names, err = listDir(dir, sc.dents, sc.names[:0])
	if err != nil {
		return -1, false
	}
	sc.fds = sc.fds[:0]
	for _, name := range sc.names {
		if fd, err := strconv.Atoi(name); err == nil && fd >= 0 && !slices.Contains(hintFDs, fd) {
			sc.fds = append(sc.fds, fd)
		}
	}
	orderCandidates(sc.fds, hintFDs)
	for _, fd := range sc.fds {
		if sc.linkIs(dir, strconv.Itoa(fd), fd, link) {
			return fd, true
		}
	}
	return -1, false
}

// orderCandidates sorts a process's descriptors into the order holdsAt tries them: nearest to
// the newest hint first (the higher of two at the same distance), or from the highest down when
// there is no hint.
func orderCandidates(fds, hintFDs []int) {
	ref := -1
	if len(hintFDs) > 0 {
		ref = hintFDs[0]
	}
	slices.SortFunc(fds, func(x, y int) int {
		if ref >= 0 {
			if dx, dy := abs(x-ref), abs(y-ref); dx != dy {
				return dx - dy
			}
		}
		return y - x
	})
}

func abs(x int) int {
	if x < 0 {
		return -x
	}
	return x
}

// attestHolder fingerprints pid if it holds link (held reports whether it does), trying the
// descriptors hintFDs first (only them with exact); fd is the descriptor it holds link on. want
// is as for owner.
func (a *Attester) attestHolder(pid int, link string, hintFDs []int, exact bool, want []byte, sc *scratch) (p Process, fd int, held bool, err error) {
	pidfd, err := openDir(unix.AT_FDCWD, filepath.Join(a.proc, strconv.Itoa(pid)))
	if err != nil {
		return Process{}, -1, false, nil // gone: not the holder
	}
	defer func() { _ = unix.Close(pidfd) }()
	return a.attestAt(pidfd, pid, link, hintFDs, exact, want, sc)
}

// attestAt is attestHolder on an open /proc/<pid> directory: the socket is confirmed held, then
// the executable and ids (and, unless they give want, the executable's path and the cgroup) are
// read, all through the directory. On a proc file system the directory pins the process
// (Attester.pinned), so what was read is the holder's. On any other root the start time is read
// first and last: if both agree, the process that holds the socket is the one that was read.
func (a *Attester) attestAt(pidfd, pid int, link string, hintFDs []int, exact bool, want []byte, sc *scratch) (p Process, fd int, held bool, err error) {
	var start uint64
	if !a.pinned {
		if start, err = startTimeAt(pidfd); err != nil {
			return Process{}, -1, false, nil // gone: not the holder
		}
	}
	fd, ok := a.holds(pidfd, pid, link, hintFDs, exact, sc)
	if !ok {
		return Process{}, -1, false, nil
	}
	if a.opts.between != nil {
		a.opts.between(pid)
	}
	if p, err = a.fingerprintAt(pidfd, pid, want); err != nil {
		return Process{}, fd, true, err
	}
	if err := a.sameProcess(pidfd, pid, start); err != nil {
		return Process{}, fd, true, err
	}
	return p, fd, true, nil
}

// sameProcess is the second half of the PID-reuse guard on a root that does not pin processes:
// the start time read again must be start. On a proc file system it has nothing to do.
func (a *Attester) sameProcess(pidfd, pid int, start uint64) error {
	if a.pinned {
		return nil
	}
	again, err := startTimeAt(pidfd)
	if err != nil {
		return fmt.Errorf("%w: pid %d exited while being attested: %w", ErrPIDReused, pid, err)
	}
	if again != start {
		return fmt.Errorf("%w: pid %d start time %d, now %d", ErrPIDReused, pid, start, again)
	}
	return nil
}

// Process fingerprints pid (guarded against PID reuse like Verify), without a socket.
func (a *Attester) Process(pid int) (Process, error) {
	if pid <= 0 {
		return Process{}, fmt.Errorf("%w: pid %d is not a process id", ErrNoOwner, pid)
	}
	pidfd, err := openDir(unix.AT_FDCWD, filepath.Join(a.proc, strconv.Itoa(pid)))
	if err != nil {
		return Process{}, fmt.Errorf("%w: pid %d: %w", ErrNoOwner, pid, err)
	}
	defer func() { _ = unix.Close(pidfd) }()
	var start uint64
	if !a.pinned {
		if start, err = startTimeAt(pidfd); err != nil {
			return Process{}, fmt.Errorf("%w: pid %d: %w", ErrNoOwner, pid, err)
		}
	}
	if a.opts.between != nil {
		a.opts.between(pid)
	}
	p, err := a.fingerprintAt(pidfd, pid, nil)
	if err != nil {
		return Process{}, err
	}
	if err := a.sameProcess(pidfd, pid, start); err != nil {
		return Process{}, err
	}
	return p, nil
}

// fingerprintAt reads the workload of the process whose /proc directory is open as pidfd: what
// identity.ProcWorkload reads (status ids, cgroup), with the executable's digest from the cache.
//
// With want (an enrolled digest) the ids and the executable come first (idsAt: on a proc file
// system one fstat of the directory), and if they alone give want the process matches whatever
// its cgroup (Process.Matches accepts the fingerprint with the cgroup left out), so neither the
// cgroup nor the executable's path is read: on a cache hit a new flow's fingerprint is two
// system calls where it was ten (a readlink and a stat of exe; an open, two reads and a close of
// status, and the same of cgroup), for nothing the decision uses. The ids are read before the
// executable, whose read fails for a process that has exited: ids read from an exited process
// (which idsAt cannot tell) are never used (TestExitAfterIDsIsNotRoot). An agent enrolled with a cgroup has a digest that includes it,
// never equal to the one without, so its processes always have their cgroup read and compared
// below; so has every refused process, whose path and cgroup the audit and the reason name.
func (a *Attester) fingerprintAt(pidfd, pid int, want []byte) (Process, error) {
	if want != nil {
		uid, gid, err := a.idsAt(pidfd)
		if err != nil {
			return Process{}, fmt.Errorf("%w: pid %d: %w", ErrUnreadable, pid, err)
		}
		if a.opts.afterIDs != nil {
			a.opts.afterIDs(pid)
		}
		digest, cached, err := a.cache.digestAt(pidfd, "exe")
		if err != nil {
			return Process{}, fmt.Errorf("%w: pid %d executable: %w", ErrUnreadable, pid, err)
		}
		w := identity.Workload{ExeDigest: digest, UID: uid, GID: gid}
		if d := w.Digest(); bytes.Equal(d[:], want) {
			return Process{PID: pid, Cached: cached, Workload: w}, nil
		}
	}
	var buf [4096]byte
	exe := ""
	if n, err := unix.Readlinkat(pidfd, "exe", buf[:]); err == nil {
		exe = string(buf[:n])
	}
	digest, cached, err := a.cache.digestAt(pidfd, "exe")
	if err != nil {
		return Process{}, fmt.Errorf("%w: pid %d executable: %w", ErrUnreadable, pid, err)
	}
	w, err := workloadAt(pidfd, digest)
	if err != nil {
		return Process{}, fmt.Errorf("%w: pid %d: %w", ErrUnreadable, pid, err)
	}
	return Process{PID: pid, Exe: exe, Cached: cached, Workload: w}, nil
}

// workloadAt is identity.ProcWorkload on an open /proc/<pid> directory.
func workloadAt(pidfd int, digest [32]byte) (identity.Workload, error) {
	status, err := readAt(pidfd, "status", maxProcFile)
	if err != nil {
		return identity.Workload{}, err
	}
	cg, err := readAt(pidfd, "cgroup", maxProcFile)
	if err != nil {
		return identity.Workload{}, err
	}
	return identity.ParseProcWorkload(status, cg, digest)
}

// fileKey identifies the content of a file without reading it: a replaced file has another
// inode (or ctime, if the inode number is recycled), a file rewritten in place another size,
// mtime or ctime. ctime is in the key because mtime can be set back by the file's owner
// (touch -d) and ctime cannot.
type fileKey struct {
	dev, ino     uint64
	size         int64
	mtime, ctime unix.Timespec
}

func keyOf(st *unix.Stat_t) fileKey {
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

// digestAt returns the SHA-256 of name relative to dirfd (for /proc/<pid>/exe, the file the
// process runs), from the cache when the file's key is known: a hit costs one fstatat. On a miss
// the file is opened and the key taken again from fstat of the very file that is hashed, so a
// swap between stat and read cannot mix two files.
func (c *digestCache) digestAt(dirfd int, name string) ([32]byte, bool, error) {
	// A hit needs only the key: one fstatat (which follows /proc/<pid>/exe to the very file the
	// process runs, as open does). The key names the content a digest was computed from.
	var pre unix.Stat_t
	if unix.Fstatat(dirfd, name, &pre, 0) == nil {
		if d, ok := c.hit(&pre); ok {
			return d, true, nil
		}
	}
	return c.digestMiss(dirfd, name)
}

// hit returns the digest cached for the regular file st describes.
func (c *digestCache) hit(st *unix.Stat_t) ([32]byte, bool) {
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return [32]byte{}, false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	d, ok := c.m[keyOf(st)]
	if ok {
		c.hits++
	}
	return d, ok
}

// digestMiss is digestAt after the cache had no digest for the key fstatat saw.
func (c *digestCache) digestMiss(dirfd int, name string) ([32]byte, bool, error) {
	var fd int
	var err error
	for {
		if fd, err = unix.Openat(dirfd, name, unix.O_RDONLY|unix.O_CLOEXEC, 0); err != unix.EINTR {
			break
		}
	}
	if err != nil {
		return [32]byte{}, false, &os.PathError{Op: "open", Path: name, Err: err}
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		_ = unix.Close(fd)
		return [32]byte{}, false, fmt.Errorf("stat %s: %w", name, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		_ = unix.Close(fd)
		return [32]byte{}, false, fmt.Errorf("%s is not a regular file", name)
	}
	k := keyOf(&st)
	c.mu.Lock()
	d, ok := c.m[k]
	if ok {
		c.hits++
	}
	c.mu.Unlock()
	if ok {
		_ = unix.Close(fd)
		return d, true, nil
	}
	f := os.NewFile(uintptr(fd), name) // owns fd from here
	defer func() { _ = f.Close() }()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return [32]byte{}, false, fmt.Errorf("hash %s: %w", name, err)
	}
	h.Sum(d[:0])
	// A write during hashing changes mtime/ctime: key the digest by the state after, and only
	// if it did not change, so a half-old half-new read is never cached under either key.
	var after unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &after); err != nil || keyOf(&after) != k {
		return [32]byte{}, false, fmt.Errorf("%s changed while it was hashed", name)
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
