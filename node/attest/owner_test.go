package attest

import (
	"bufio"
	"bytes"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/ute-project/ute/identity"
)

// startHelper runs exe as the helper process: it connects to ln and holds the connection. It
// returns the helper's pid and its client address.
func startHelper(t *testing.T, exe string, ln net.Listener) (int, netip.AddrPort) {
	t.Helper()
	cmd := exec.Command(exe, "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"="+ln.Addr().String())
	stdin, err := cmd.StdinPipe()
	require.NoError(t, err)
	out, err := cmd.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	t.Cleanup(func() { _ = stdin.Close(); _ = cmd.Wait() })
	line, err := bufio.NewReader(out).ReadString('\n')
	require.NoError(t, err)
	s, err := ln.Accept()
	require.NoError(t, err)
	t.Cleanup(func() { _ = s.Close() })
	return cmd.Process.Pid, netip.MustParseAddrPort(line[:len(line)-1])
}

// Attacker side: the agent's hints name this process and the descriptor it held its last socket
// on. Another executable then connects: the hinted process is checked first, does not hold the
// new socket (whatever its hinted descriptor holds now), and the search goes on to the process
// that does, which is refused as the mismatch it is. A hint orders the search; it never
// attributes a socket.
func TestStaleHintNeverAttributes(t *testing.T) {
	want := selfExpected(t)
	a := New(Options{})
	c, srv := loopbackPair(t)
	p, err := a.Verify(addrOf(c), srv, want)
	require.NoError(t, err)
	require.Equal(t, os.Getpid(), p.PID)
	hs := a.hintsFor(string(want.Digest))
	require.Len(t, hs, 1)
	assert.Equal(t, os.Getpid(), hs[0].pid)
	require.NotEmpty(t, hs[0].fds)
	require.Positive(t, hs[0].fds[0])

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { _ = ln.Close() })
	pid, client := startHelper(t, modifiedCopy(t), ln)
	scans := a.Stats().Scans
	p, err = a.Verify(client, netip.MustParseAddrPort(ln.Addr().String()), want)
	require.ErrorIs(t, err, ErrMismatch)
	assert.Equal(t, pid, p.PID)
	assert.Equal(t, scans+1, a.Stats().Scans, "the hinted process did not hold it: a scan found the holder")
}

// A socket that a search read while looking for another one is found on that descriptor first,
// with neither hints nor a listing; and attacker side, a stale entry (another process, a
// descriptor that holds something else) never attributes: the search goes on to the holder.
func TestSeenSocketIsTriedFirstAndNeverAttributes(t *testing.T) {
	want := selfExpected(t)
	a := New(Options{})
	first, srv1 := loopbackPair(t)
	second, srv2 := loopbackPair(t) // a higher descriptor: the scan (highest first) reads it first
	_, err := a.Verify(addrOf(first), srv1, want)
	require.NoError(t, err)
	s2, err := a.socket(addrOf(second), srv2)
	require.NoError(t, err)
	e, ok := a.seen[s2.inode]
	require.True(t, ok, "the search for the first socket read the second")
	assert.Equal(t, os.Getpid(), e.pid)
	p, err := a.Verify(addrOf(second), srv2, want)
	require.NoError(t, err)
	assert.Equal(t, os.Getpid(), p.PID)
	assert.Equal(t, uint64(1), a.seenHits.Load())
	_, again := a.seen[s2.inode]
	assert.False(t, again, "an entry is tried once")

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { _ = ln.Close() })
	pid, client := startHelper(t, modifiedCopy(t), ln)
	server := netip.MustParseAddrPort(ln.Addr().String())
	hs, err := a.socket(client, server)
	require.NoError(t, err)
	rc, err := first.(*net.TCPConn).SyscallConn()
	require.NoError(t, err)
	var ourFD int
	require.NoError(t, rc.Control(func(fd uintptr) { ourFD = int(fd) }))
	a.mu.Lock()
	a.seen[hs.inode] = seenSocket{pid: os.Getpid(), fd: ourFD} // names this process, the enrolled one
	a.mu.Unlock()
	p, err = a.Verify(client, server, want)
	require.ErrorIs(t, err, ErrMismatch)
	assert.Equal(t, pid, p.PID)
	assert.Equal(t, uint64(1), a.seenHits.Load())
}

// The socket's uid orders the scan and never refuses: a socket whose recorded uid differs from
// its holder's (created before a setuid, or a process whose /proc directory is root's) is still
// found, after the processes of that uid.
func TestSocketUIDOrdersTheScanOnly(t *testing.T) {
	c, srv := loopbackPair(t)
	a := New(Options{})
	s, err := a.socket(addrOf(c), srv)
	require.NoError(t, err)
	require.True(t, s.hasUID, "sock_diag reports the uid")
	assert.Equal(t, uint32(os.Geteuid()), s.uid)
	for _, uid := range []uint32{s.uid, s.uid + 1} {
		p, err := New(Options{}).owner(sockInfo{inode: s.inode, uid: uid, hasUID: true}, nil)
		require.NoError(t, err, "uid %d", uid)
		assert.Equal(t, os.Getpid(), p.PID)
	}
}

// A process's recent descriptors are kept newest first, each once, at most maxHintFDs of them,
// and a later hint never changes the descriptors a reader already copied.
func TestHintDescriptorsNewestFirst(t *testing.T) {
	a := New(Options{})
	for fd := 3; fd <= 14; fd++ {
		a.hint("k", 42, fd)
	}
	a.hint("k", 7, 5)
	before := a.hintsFor("k")
	a.hint("k", 42, 9) // already held: moves to the front
	hs := a.hintsFor("k")
	require.Len(t, hs, 2)
	assert.Equal(t, 42, hs[0].pid)
	require.Equal(t, 8, maxHintFDs, "the descriptors below are written for 8")
	assert.Equal(t, []int{9, 14, 13, 12, 11, 10, 8, 7}, hs[0].fds)
	assert.Equal(t, hint{pid: 7, fds: []int{5}}, hs[1])
	assert.Equal(t, 7, before[0].pid, "the copy taken before is unchanged")
	assert.Equal(t, []int{14, 13, 12, 11, 10, 9, 8, 7}, before[1].fds)
}

// Connections that a process keeps open side by side are each confirmed through the hinted
// descriptors, with no /proc scan once the process is hinted.
func TestSeveralOpenConnectionsUseHints(t *testing.T) {
	want := selfExpected(t)
	a := New(Options{})
	var conns []net.Conn
	var fds []int
	for range 4 {
		c, _ := loopbackPair(t)
		conns = append(conns, c)
		rc, err := c.(*net.TCPConn).SyscallConn()
		require.NoError(t, err)
		require.NoError(t, rc.Control(func(fd uintptr) { fds = append(fds, int(fd)) }))
	}
	peer := func(c net.Conn) netip.AddrPort { return netip.MustParseAddrPort(c.RemoteAddr().String()) }
	_, err := a.Verify(addrOf(conns[0]), peer(conns[0]), want)
	require.NoError(t, err)
	scans := a.Stats().Scans
	for round := range 2 {
		for i, c := range conns {
			p, err := a.Verify(addrOf(c), peer(c), want)
			require.NoError(t, err, "round %d conn %d", round, i)
			assert.Equal(t, os.Getpid(), p.PID)
		}
	}
	assert.Equal(t, scans, a.Stats().Scans, "the hinted process held every socket: no scan")
	hs := a.hintsFor(string(want.Digest))
	require.Len(t, hs, 1)
	assert.ElementsMatch(t, fds, hs[0].fds, "each connection's descriptor is hinted")
}

// The hints are bounded per agent and in agents.
func TestHintsAreBounded(t *testing.T) {
	a := New(Options{})
	for i := range maxHintAgents + 10 {
		for pid := range maxHints + 3 {
			a.hint(fmt.Sprint(i), pid+1, 3)
		}
	}
	assert.Len(t, a.hints, maxHintAgents)
	assert.Len(t, a.hintKeys, maxHintAgents)
	assert.Len(t, a.hintsFor(fmt.Sprint(maxHintAgents+9)), maxHints)
	assert.Empty(t, a.hintsFor("0"), "the oldest agent's hints were dropped")
}

// procCase is a /proc/<pid> directory's stat, status and cgroup.
type procCase struct{ stat, status, cgroup string }

var procCases = []procCase{
	{"1 (agent) S 1 1 1 0 -1 4194304 0 0 0 0 0 0 0 0 20 0 1 0 777 0 0\n", "Name:\tagent\nUid:\t1000\t1001\t1000\t1000\nGid:\t50\t51\t50\t50\n", "0::/user.slice/app.service\n"},
	{"1 (we) ird) S 1 1 1 0 -1 4194304 0 0 0 0 0 0 0 0 20 0 1 0 12 0 0", "Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0", "12:pids:/a\n3:cpu,cpuacct:/b\n1:name=systemd:/c\n"},
	{"1 (x) S 1 2", "Uid:\t0\n", ""},
	{"no parenthesis", "Gid:\t1\t2\nUid:\tx\ty\n", "garbage"},
	{"1 (x) S 1 1 1 0 -1 4194304 0 0 0 0 0 0 0 0 20 0 1 0 -5 0 0", "Uid:\t1\t2\r\nGid:\t3\t4\r\nUid:\t9\t9\n", "\n\n0::/\n"},
	// Gid before Uid, and a second Gid line: the first of each counts.
	{"1 (x) S", "Name:\tx\nGid:\t5\t6\t5\t5\nUid:\t1\t2\t1\t1\nGid:\t7\t7\n", "0::/\n"},
}

// writeProcCase writes c as dir's stat, status and cgroup.
func writeProcCase(t testing.TB, dir string, c procCase) {
	t.Helper()
	for name, body := range map[string]string{"stat": c.stat, "status": c.status, "cgroup": c.cgroup} {
		require.NoError(t, os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644))
	}
}

// checkProcAgreement compares this package's /proc readers with identity's on dir: the digest
// this package computes must be the one identity computed at enrolment.
func checkProcAgreement(t testing.TB, dir string) {
	t.Helper()
	fd, err := openDir(unix.AT_FDCWD, dir)
	require.NoError(t, err)
	defer func() { _ = unix.Close(fd) }()
	digest := [32]byte{1, 2, 3}
	want, werr := identity.ProcWorkload(dir, digest)
	got, gerr := workloadAt(fd, digest)
	require.Equal(t, werr == nil, gerr == nil, "identity: %v; attest: %v", werr, gerr)
	assert.Equal(t, want, got)
	// The ids of the quick path: from status on a test root, from the directory's owner on a
	// proc file system.
	uid, gid, ierr := (&Attester{pinned: isProcFS(dir)}).idsAt(fd)
	require.Equal(t, werr == nil, ierr == nil, "identity: %v; idsAt: %v", werr, ierr)
	if werr == nil {
		assert.Equal(t, [2]uint32{want.UID, want.GID}, [2]uint32{uid, gid}, "idsAt")
	}
	wantStart, werr := identity.ProcStartTime(dir)
	gotStart, gerr := startTimeAt(fd)
	require.Equal(t, werr == nil, gerr == nil, "identity: %v; attest: %v", werr, gerr)
	assert.Equal(t, wantStart, gotStart)
}

func TestProcReadersAgreeWithIdentity(t *testing.T) {
	for i, c := range procCases {
		t.Run(fmt.Sprint(i), func(t *testing.T) {
			dir := t.TempDir()
			writeProcCase(t, dir, c)
			checkProcAgreement(t, dir)
		})
	}
	checkProcAgreement(t, "/proc/self")
}

func FuzzProcReaders(f *testing.F) {
	for _, c := range procCases {
		f.Add(c.stat, c.status, c.cgroup)
	}
	f.Fuzz(func(t *testing.T, stat, status, cgroup string) {
		dir := t.TempDir()
		writeProcCase(t, dir, procCase{stat, status, cgroup})
		checkProcAgreement(t, dir)
	})
}

// Attacker side for the SDK's own-process check: this process checked against the fingerprint
// of another executable, or of its own for another uid, is a mismatch; against its own, a match
// whose digest comes from the cache the second time.
func TestVerifySelf(t *testing.T) {
	a := New(Options{})
	want := selfExpected(t)
	p, err := a.VerifySelf(want)
	require.NoError(t, err)
	assert.Equal(t, os.Getpid(), p.PID)
	assert.False(t, p.Cached)
	p, err = a.VerifySelf(want)
	require.NoError(t, err)
	assert.True(t, p.Cached)
	// The hit was keyed through the descriptor held since the first call: it must name the
	// file this process runs, not whatever a path names later.
	require.NotNil(t, a.selfFile)
	held, err := a.selfFile.Stat()
	require.NoError(t, err)
	self, err := os.Stat("/proc/self/exe")
	require.NoError(t, err)
	assert.True(t, os.SameFile(held, self), "held descriptor is not /proc/self/exe")

	other := filepath.Join(t.TempDir(), "true")
	require.NoError(t, os.WriteFile(other, []byte("#!/bin/sh\nexit 0\n"), 0o755))
	w, err := identity.WorkloadOfExe(other, want.UID, want.GID)
	require.NoError(t, err)
	d := w.Digest()
	_, err = a.VerifySelf(Expected{Digest: d[:], UID: w.UID, GID: w.GID, Exe: other})
	require.ErrorIs(t, err, ErrMismatch)
	assert.Contains(t, err.Error(), "not the enrolled executable "+other)

	exe, err := os.Executable()
	require.NoError(t, err)
	w, err = identity.WorkloadOfExe(exe, want.UID+1, want.GID)
	require.NoError(t, err)
	d = w.Digest()
	_, err = a.VerifySelf(Expected{Digest: d[:], UID: w.UID, GID: w.GID, Exe: exe})
	require.ErrorIs(t, err, ErrMismatch)
	assert.Contains(t, err.Error(), "enrolled for uid")
}

// socketInode reads what a descriptor's link says; only "socket:[N]" with N a decimal inode is a
// socket (a file's path is absolute, other kinds are "pipe:[N]", "anon_inode:...").
func FuzzSocketInode(f *testing.F) {
	for _, s := range []string{"socket:[4191601]", "socket:[]", "socket:[12", "pipe:[5]", "/tmp/socket:[5]", "socket:[18446744073709551616]", "net:[4026531833]"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		ino, ok := socketInode(b)
		if !ok {
			return
		}
		require.True(t, bytes.HasPrefix(b, []byte("socket:[")) && bytes.HasSuffix(b, []byte("]")), "%q", b)
		got, err := strconv.ParseUint(string(b[len("socket:["):len(b)-1]), 10, 64)
		require.NoError(t, err)
		require.Equal(t, got, ino)
	})
}

func TestSocketInode(t *testing.T) {
	ino, ok := socketInode([]byte("socket:[4191601]"))
	require.True(t, ok)
	assert.Equal(t, uint64(4191601), ino)
	for _, s := range []string{"socket:[]", "socket:[12", "pipe:[5]", "/tmp/socket:[5]", "socket:[18446744073709551616]", "socket:[-1]"} {
		_, ok := socketInode([]byte(s))
		assert.False(t, ok, s)
	}
}
