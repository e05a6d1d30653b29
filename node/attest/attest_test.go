package attest

import (
	"bufio"
	"crypto/sha256"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/ute-project/ute/identity"
)

// helperEnv makes the test binary (or a copy of it) connect to the address it names and hold the
// connection until its stdin closes: the "other process" of the attestation tests.
const helperEnv = "UTE_ATTEST_HELPER_CONNECT"

// helperNoDumpEnv makes the helper process non-dumpable before it connects: the state in which
// the files of its /proc directory turn to root.
const helperNoDumpEnv = "UTE_ATTEST_HELPER_NODUMP"

func TestMain(m *testing.M) {
	if addr := os.Getenv(helperEnv); addr != "" {
		if os.Getenv(helperNoDumpEnv) != "" {
			if err := unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0); err != nil {
				fmt.Fprintln(os.Stderr, err)
				os.Exit(2)
			}
		}
		c, err := net.Dial("tcp", addr)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		fmt.Println(c.LocalAddr().String())
		_, _ = io.Copy(io.Discard, os.Stdin)
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// selfExpected is the enrolled workload of this test binary, as `ute agent add --exe` makes it.
func selfExpected(t testing.TB) Expected {
	t.Helper()
	exe, err := os.Executable()
	require.NoError(t, err)
	w, err := identity.WorkloadOfExe(exe, uint32(os.Geteuid()), uint32(os.Getegid()))
	require.NoError(t, err)
	d := w.Digest()
	return Expected{Digest: d[:], UID: w.UID, GID: w.GID, Exe: exe}
}

// loopbackPair connects to a fresh listener from this process.
func loopbackPair(t testing.TB) (client net.Conn, server netip.AddrPort) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { _ = ln.Close() })
	c, err := net.Dial("tcp", ln.Addr().String())
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Close() })
	s, err := ln.Accept()
	require.NoError(t, err)
	t.Cleanup(func() { _ = s.Close() })
	return c, netip.MustParseAddrPort(ln.Addr().String())
}

func addrOf(c net.Conn) netip.AddrPort { return netip.MustParseAddrPort(c.LocalAddr().String()) }

func TestVerifyFindsThisProcess(t *testing.T) {
	c, srv := loopbackPair(t)
	a := New(Options{})
	p, err := a.Verify(addrOf(c), srv, selfExpected(t))
	require.NoError(t, err)
	assert.Equal(t, os.Getpid(), p.PID)
	assert.False(t, p.Cached)

	// Second connection: digest from the cache, PID from the hint list (no scan).
	c2, srv2 := loopbackPair(t)
	p, err = a.Verify(addrOf(c2), srv2, selfExpected(t))
	require.NoError(t, err)
	assert.True(t, p.Cached)
	st := a.Stats()
	assert.Equal(t, uint64(1), st.Hits)
	assert.Equal(t, uint64(1), st.Misses)
	assert.Equal(t, uint64(1), st.Scans)
}

// The digest this package computes for a process is identity's, cgroup included.
func TestWorkloadAgreesWithIdentity(t *testing.T) {
	want, err := identity.WorkloadOfPID(os.Getpid())
	require.NoError(t, err)
	p, err := New(Options{}).Process(os.Getpid())
	require.NoError(t, err)
	assert.Equal(t, want, p.Workload)
	d := want.Digest()
	assert.True(t, p.Matches(d[:]))
}

// Attacker side: a process running another executable (a copy of the enrolled binary with one
// byte added, so same behaviour, other digest) is refused as a mismatch naming its executable.
func TestVerifyRefusesOtherExecutable(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer func() { _ = ln.Close() }()
	exe := modifiedCopy(t)
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
	client := netip.MustParseAddrPort(line[:len(line)-1])
	s, err := ln.Accept()
	require.NoError(t, err)
	defer func() { _ = s.Close() }()

	p, err := New(Options{}).Verify(client, netip.MustParseAddrPort(ln.Addr().String()), selfExpected(t))
	require.ErrorIs(t, err, ErrMismatch)
	assert.Equal(t, cmd.Process.Pid, p.PID)
	assert.Contains(t, err.Error(), "not the enrolled executable")

	// The same process passes when its own executable is the enrolled one.
	w, err := identity.WorkloadOfExe(exe, uint32(os.Geteuid()), uint32(os.Getegid()))
	require.NoError(t, err)
	d := w.Digest()
	_, err = New(Options{}).Verify(client, netip.MustParseAddrPort(ln.Addr().String()), Expected{Digest: d[:], UID: w.UID, GID: w.GID})
	require.NoError(t, err)
}

// Attacker side: the right executable under another uid is refused, and the reason says so.
func TestVerifyRefusesOtherUID(t *testing.T) {
	c, srv := loopbackPair(t)
	want := selfExpected(t)
	exe, _ := os.Executable()
	w, err := identity.WorkloadOfExe(exe, want.UID+1, want.GID)
	require.NoError(t, err)
	d := w.Digest()
	_, err = New(Options{}).Verify(addrOf(c), srv, Expected{Digest: d[:], UID: want.UID + 1, GID: want.GID})
	require.ErrorIs(t, err, ErrMismatch)
	assert.Contains(t, err.Error(), "uid")
}

// Attacker side: the enrolled executable run with something else that the fingerprint names (the
// enrolment's cgroup, uid or gid) is refused, also once the process is hinted and its digest
// cached by an accepted flow, and never by the quick path that skips the cgroup for an agent
// enrolled without one. Each refusal must come from reading and comparing that field: a success
// path that skipped one would accept its case here.
func TestVerifyChecksEveryEnrolledField(t *testing.T) {
	own, err := identity.WorkloadOfPID(os.Getpid())
	require.NoError(t, err)
	c, srv := loopbackPair(t)
	client := addrOf(c)
	a := New(Options{})
	expect := func(w identity.Workload) Expected {
		d := w.Digest()
		return Expected{Digest: d[:], UID: w.UID, GID: w.GID, Exe: "enrolled"}
	}
	noCgroup := own
	noCgroup.Cgroup = ""
	p, err := a.Verify(client, srv, expect(noCgroup))
	require.NoError(t, err, "enrolled by executable, any cgroup")
	assert.Empty(t, p.Workload.Cgroup, "the cgroup decides nothing for this agent: not read")
	p, err = a.Verify(client, srv, expect(own))
	require.NoError(t, err, "enrolled with its own cgroup")
	assert.Equal(t, own.Cgroup, p.Workload.Cgroup)
	require.Positive(t, a.Stats().Hits, "the cases below run on a cached digest")

	otherCgroup, otherUID, otherGID := own, noCgroup, noCgroup
	otherCgroup.Cgroup = own.Cgroup + "/elsewhere"
	otherUID.UID++
	otherGID.GID++
	for name, w := range map[string]identity.Workload{"cgroup": otherCgroup, "uid": otherUID, "gid": otherGID} {
		p, err := a.Verify(client, srv, expect(w))
		require.ErrorIs(t, err, ErrMismatch, "enrolled with another %s", name)
		assert.Equal(t, os.Getpid(), p.PID)
		assert.Equal(t, own, p.Workload, "a refused process is read whole")
		assert.NotEmpty(t, p.Exe, "the audit names the refused process's executable")
	}
	_, err = a.Verify(client, srv, expect(noCgroup))
	require.NoError(t, err, "and the enrolled workload still passes")
}

func TestVerifyClosedConnectionHasNoOwner(t *testing.T) {
	c, srv := loopbackPair(t)
	local := addrOf(c)
	require.NoError(t, c.Close())
	// The closed socket lingers in FIN_WAIT/TIME_WAIT with inode 0, or is gone.
	_, err := New(Options{}).Verify(local, srv, selfExpected(t))
	require.ErrorIs(t, err, ErrNoOwner)
	_, err = New(Options{}).Verify(netip.MustParseAddrPort("127.0.0.1:1"), srv, selfExpected(t))
	require.ErrorIs(t, err, ErrNoOwner)
}

// modifiedCopy is the test binary with one byte appended: it runs the same, hashes differently.
func modifiedCopy(t testing.TB) string {
	t.Helper()
	exe, err := os.Executable()
	require.NoError(t, err)
	b, err := os.ReadFile(exe)
	require.NoError(t, err)
	p := filepath.Join(t.TempDir(), "impostor")
	require.NoError(t, os.WriteFile(p, append(b, 0), 0o755))
	return p
}

func TestCacheRehashesSwappedBinary(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "agent")
	require.NoError(t, os.WriteFile(bin, []byte("version one"), 0o755))
	c := newDigestCache(4)
	d1, cached, err := c.digestAt(unix.AT_FDCWD, bin)
	require.NoError(t, err)
	assert.False(t, cached)
	assert.Equal(t, sha256.Sum256([]byte("version one")), d1)
	_, cached, err = c.digestAt(unix.AT_FDCWD, bin)
	require.NoError(t, err)
	assert.True(t, cached, "unchanged file comes from the cache")

	// Replaced by rename (how package managers and deploys swap binaries): another inode.
	tmp := filepath.Join(dir, "agent.new")
	require.NoError(t, os.WriteFile(tmp, []byte("version two"), 0o755))
	require.NoError(t, os.Rename(tmp, bin))
	d2, cached, err := c.digestAt(unix.AT_FDCWD, bin)
	require.NoError(t, err)
	assert.False(t, cached)
	assert.Equal(t, sha256.Sum256([]byte("version two")), d2)

	// Attacker side: rewritten in place with the same size, mtime set back to what it was.
	st, err := os.Stat(bin)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(bin, []byte("version 666"), 0o755))
	require.NoError(t, os.Chtimes(bin, st.ModTime(), st.ModTime()))
	d3, cached, err := c.digestAt(unix.AT_FDCWD, bin)
	require.NoError(t, err)
	assert.False(t, cached, "ctime changed, so the file is hashed again")
	assert.Equal(t, sha256.Sum256([]byte("version 666")), d3)
}

func TestCacheIsBounded(t *testing.T) {
	dir := t.TempDir()
	c := newDigestCache(2)
	for i := range 5 {
		p := filepath.Join(dir, strconv.Itoa(i))
		require.NoError(t, os.WriteFile(p, []byte{byte(i)}, 0o644))
		_, _, err := c.digestAt(unix.AT_FDCWD, p)
		require.NoError(t, err)
	}
	assert.Len(t, c.m, 2)
	assert.Len(t, c.order, 2)
}

// fakeProc builds a directory shaped like /proc holding one process (pid) that owns socket
// inode 4242, connected 127.0.0.1:40000 -> 127.0.0.1:1080, running exe.
func fakeProc(t testing.TB, pid int, start uint64, exe string) string {
	t.Helper()
	root := t.TempDir()
	pd := filepath.Join(root, strconv.Itoa(pid))
	require.NoError(t, os.MkdirAll(filepath.Join(pd, "fd"), 0o755))
	writeStat(t, pd, start)
	require.NoError(t, os.WriteFile(filepath.Join(pd, "status"), []byte("Name:\tagent\nUid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\n"), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(pd, "cgroup"), []byte("0::/user.slice\n"), 0o644))
	require.NoError(t, os.Symlink(exe, filepath.Join(pd, "exe")))
	require.NoError(t, os.Symlink("socket:[4242]", filepath.Join(pd, "fd", "3")))
	require.NoError(t, os.MkdirAll(filepath.Join(root, "net"), 0o755))
	tcp := "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n" +
		"   0: " + hexAddr(netip.MustParseAddrPort("127.0.0.1:40000")) + " " + hexAddr(netip.MustParseAddrPort("127.0.0.1:1080")) +
		" 01 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 20 4 30 10 -1\n"
	require.NoError(t, os.WriteFile(filepath.Join(root, "net", "tcp"), []byte(tcp), 0o644))
	return root
}

func writeStat(t testing.TB, pd string, start uint64) {
	t.Helper()
	// Fields 3..21, then starttime (22); the command name holds a ')' to test the parser.
	stat := fmt.Sprintf("%s (we) ird) S 1 1 1 0 -1 4194304 0 0 0 0 0 0 0 0 20 0 1 0 %d 0 0\n", filepath.Base(pd), start)
	require.NoError(t, os.WriteFile(filepath.Join(pd, "stat"), []byte(stat), 0o644))
}

func hexAddr(ap netip.AddrPort) string {
	a := ap.Addr().As4()
	v := uint32(a[0]) | uint32(a[1])<<8 | uint32(a[2])<<16 | uint32(a[3])<<24 // little-endian host
	return fmt.Sprintf("%08X:%04X", v, ap.Port())
}

func TestOwnerFromFakeProc(t *testing.T) {
	exe, err := os.Executable()
	require.NoError(t, err)
	root := fakeProc(t, 321, 777, exe)
	a := New(Options{Proc: root})
	want := selfExpected(t)
	want.UID, want.GID = 0, 0
	w, err := identity.WorkloadOfExe(exe, 0, 0)
	require.NoError(t, err)
	d := w.Digest()
	want.Digest = d[:]
	client, server := netip.MustParseAddrPort("127.0.0.1:40000"), netip.MustParseAddrPort("127.0.0.1:1080")
	p, err := a.Verify(client, server, want)
	require.NoError(t, err)
	assert.Equal(t, 321, p.PID)
	// Enrolled without a cgroup: the executable and ids decided, the cgroup and the path were
	// not read.
	assert.Empty(t, p.Workload.Cgroup)
	assert.Empty(t, p.Exe)

	// Enrolled with the process's cgroup: read, and the match is the exact digest.
	w.Cgroup = "/user.slice"
	d = w.Digest()
	want.Digest = d[:]
	p, err = a.Verify(client, server, want)
	require.NoError(t, err)
	assert.Equal(t, "/user.slice", p.Workload.Cgroup)
}

// Attacker side: the PID is recycled while it is being attested (the agent exits, another
// process gets its PID): the start time differs and the connection is never attributed.
func TestPIDReuseIsDetected(t *testing.T) {
	exe, err := os.Executable()
	require.NoError(t, err)
	root := fakeProc(t, 321, 777, exe)
	a := New(Options{Proc: root, between: func(pid int) {
		writeStat(t, filepath.Join(root, strconv.Itoa(pid)), 778)
	}})
	_, err = a.Verify(netip.MustParseAddrPort("127.0.0.1:40000"), netip.MustParseAddrPort("127.0.0.1:1080"), selfExpected(t))
	require.ErrorIs(t, err, ErrPIDReused)
	require.ErrorIs(t, err, identity.ErrPIDReused)

	// And when the process is gone by the second read.
	root = fakeProc(t, 322, 777, exe)
	a = New(Options{Proc: root, between: func(pid int) {
		require.NoError(t, os.Remove(filepath.Join(root, strconv.Itoa(pid), "stat")))
	}})
	_, err = a.Process(322)
	require.ErrorIs(t, err, ErrPIDReused)
}

func TestFindSocketRejectsGarbage(t *testing.T) {
	for _, table := range []string{
		"sl\n 0: zz:0001 00000000:0000 01 0 0 0 0 0 1\n",
		" 0: 0100007F:1F90 0100007F:04D2 01 0 0 0 0 0 notanumber\n",
		" 0: 0100007F 0100007F:04D2\n",
	} {
		_, _, err := FindSocket([]byte(table), netip.MustParseAddrPort("127.0.0.1:8080"), netip.MustParseAddrPort("127.0.0.1:1234"))
		assert.Error(t, err, "%q", table)
	}
	ino, ok, err := FindSocket([]byte(" 0: 0100007F:1F90 0100007F:04D2 01 0 0 0 0 0 99\n"),
		netip.MustParseAddrPort("127.0.0.1:8080"), netip.MustParseAddrPort("127.0.0.1:1234"))
	require.NoError(t, err)
	assert.True(t, ok)
	assert.Equal(t, uint64(99), ino)
	// IPv6 table: ::ffff:127.0.0.1 as four host-order words.
	ino, ok, err = FindSocket([]byte(" 0: 0000000000000000FFFF00000100007F:1F90 0000000000000000FFFF00000100007F:04D2 01 0 0 0 0 0 7\n"),
		netip.MustParseAddrPort("127.0.0.1:8080"), netip.MustParseAddrPort("127.0.0.1:1234"))
	require.NoError(t, err)
	assert.True(t, ok)
	assert.Equal(t, uint64(7), ino)
}

func FuzzFindSocket(f *testing.F) {
	f.Add([]byte("  sl  local_address rem_address   st\n   0: 0100007F:1F90 0100007F:04D2 01 00000000:00000000 00:00000000 00000000     0        0 4242 1\n"))
	f.Add([]byte(" 0: 0000000000000000FFFF00000100007F:1F90 0000000000000000FFFF00000100007F:04D2 01 0 0 0 0 0 7\n"))
	f.Add([]byte("\n\n)"))
	f.Fuzz(func(t *testing.T, b []byte) {
		_, _, _ = FindSocket(b, netip.MustParseAddrPort("127.0.0.1:8080"), netip.MustParseAddrPort("127.0.0.1:1234"))
	})
}

func TestVerifyIsQuickOnCacheHit(t *testing.T) {
	// Not a benchmark: a guard that the hinted path never scans /proc.
	a := New(Options{})
	for range 3 {
		c, srv := loopbackPair(t)
		_, err := a.Verify(addrOf(c), srv, selfExpected(t))
		require.NoError(t, err)
	}
	assert.Equal(t, uint64(1), a.Stats().Scans)
}

// The sock_diag lookup and the /proc/net/tcp fallback find the same socket.
func TestSockDiagAgreesWithProcNet(t *testing.T) {
	c, srv := loopbackPair(t)
	viaDiag, err := New(Options{}).SocketInode(addrOf(c), srv)
	require.NoError(t, err)
	viaFile, err := New(Options{Proc: "/proc"}).SocketInode(addrOf(c), srv)
	require.NoError(t, err)
	assert.Equal(t, viaFile, viaDiag)
	assert.NotZero(t, viaDiag)

	// IPv6 loopback as well.
	ln, err := net.Listen("tcp6", "[::1]:0")
	if err != nil {
		t.Skip("no IPv6 loopback")
	}
	defer func() { _ = ln.Close() }()
	c6, err := net.Dial("tcp6", ln.Addr().String())
	require.NoError(t, err)
	defer func() { _ = c6.Close() }()
	s6 := netip.MustParseAddrPort(ln.Addr().String())
	a, err := New(Options{}).SocketInode(addrOf(c6), s6)
	require.NoError(t, err)
	b, err := New(Options{Proc: "/proc"}).SocketInode(addrOf(c6), s6)
	require.NoError(t, err)
	assert.Equal(t, b, a)
}

func TestParseDiagReplyRejectsGarbage(t *testing.T) {
	for _, b := range [][]byte{nil, make([]byte, 15), {200, 0, 0, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}, {16, 0, 0, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}} {
		_, err := parseDiagReply(b)
		assert.Error(t, err)
	}
}

func FuzzParseDiagReply(f *testing.F) {
	f.Add(make([]byte, 88))
	f.Add([]byte{20, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 254, 255, 255, 255})
	f.Fuzz(func(t *testing.T, b []byte) { _, _ = parseDiagReply(b) })
}

// startHelperAs runs a copy of the test binary (same bytes: same executable digest) as uid:gid,
// connected to a fresh listener and holding the connection, non-dumpable if noDump. It returns
// the helper's pid, its client address and the listener's address. Needs root.
func startHelperAs(t *testing.T, uid, gid uint32, noDump bool) (int, netip.AddrPort, netip.AddrPort) {
	t.Helper()
	exe, err := os.Executable()
	require.NoError(t, err)
	b, err := os.ReadFile(exe)
	require.NoError(t, err)
	dir, err := os.MkdirTemp("", "attest-uid-")
	require.NoError(t, err)
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	require.NoError(t, os.Chmod(dir, 0o755))
	same := filepath.Join(dir, "agent")
	require.NoError(t, os.WriteFile(same, b, 0o755))

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { _ = ln.Close() })
	cmd := exec.Command(same, "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"="+ln.Addr().String())
	if noDump {
		cmd.Env = append(cmd.Env, helperNoDumpEnv+"=1")
	}
	cmd.Dir = dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: gid}}
	stdin, err := cmd.StdinPipe()
	require.NoError(t, err)
	out, err := cmd.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	t.Cleanup(func() { _ = stdin.Close(); _ = cmd.Wait() })
	line, err := bufio.NewReader(out).ReadString('\n')
	require.NoError(t, err, "helper running as %d:%d did not connect", uid, gid)
	s, err := ln.Accept()
	require.NoError(t, err)
	t.Cleanup(func() { _ = s.Close() })
	return cmd.Process.Pid, netip.MustParseAddrPort(strings.TrimSpace(line)), netip.MustParseAddrPort(ln.Addr().String())
}

// Attacker side: the enrolled executable, run by another user, is refused, and the reason names
// the uid. Needs root to start a process as another user.
func TestVerifyRefusesEnrolledExecutableAsOtherUser(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run a process as another user; TestVerifyRefusesOtherUID covers the comparison")
	}
	_, client, server := startHelperAs(t, 65534, 65534, false)
	p, err := New(Options{}).Verify(client, server, selfExpected(t))
	require.ErrorIs(t, err, ErrMismatch)
	assert.Equal(t, uint32(65534), p.Workload.UID)
	assert.Contains(t, err.Error(), "uid 65534")
}

// The quick path reads a process's ids from the owner of its /proc directory (idsAt). That must
// be its effective uid and gid, as status says, also for a process that is not dumpable (whose
// files in /proc turn to root): attacker side, such a process of another user running the
// enrolled executable is still refused for its uid, and the same process is accepted for the
// agent enrolled with its own ids. Needs root.
func TestProcDirectoryOwnerIsEffectiveIDs(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run a process as another user")
	}
	pid, client, server := startHelperAs(t, 65534, 65533, true)
	procDir := filepath.Join("/proc", strconv.Itoa(pid))
	st, err := os.Stat(filepath.Join(procDir, "status"))
	require.NoError(t, err)
	require.Equal(t, uint32(0), st.Sys().(*syscall.Stat_t).Uid, "the helper is not dumpable: its files are root's")
	want, err := identity.ProcWorkload(procDir, [32]byte{})
	require.NoError(t, err)
	require.Equal(t, [2]uint32{65534, 65533}, [2]uint32{want.UID, want.GID}, "status")

	a := New(Options{})
	require.True(t, a.pinned)
	fd, err := openDir(unix.AT_FDCWD, procDir)
	require.NoError(t, err)
	defer func() { _ = unix.Close(fd) }()
	uid, gid, err := a.idsAt(fd)
	require.NoError(t, err)
	assert.Equal(t, [2]uint32{65534, 65533}, [2]uint32{uid, gid}, "the directory's owner")

	_, err = a.Verify(client, server, selfExpected(t)) // the executable enrolled for root
	require.ErrorIs(t, err, ErrMismatch)
	exe, err := os.Executable()
	require.NoError(t, err)
	w, err := identity.WorkloadOfExe(exe, 65534, 65533)
	require.NoError(t, err)
	d := w.Digest()
	p, err := a.Verify(client, server, Expected{Digest: d[:], UID: 65534, GID: 65533})
	require.NoError(t, err)
	assert.Equal(t, pid, p.PID)
	assert.Empty(t, p.Workload.Cgroup, "decided by the executable and the ids")
}

// Attacker side: a process of another user, running the executable enrolled for root, exits
// after its ids were read from its /proc directory and before its executable was: the
// directory of an exited process says root, and read in the other order those ids would have
// matched the root enrolment. It must be refused as unreadable. Needs root.
func TestExitAfterIDsIsNotRoot(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run a process as another user")
	}
	pid, client, server := startHelperAs(t, 65534, 65534, false)
	proc, err := os.FindProcess(pid)
	require.NoError(t, err)
	exited := false
	a := New(Options{afterIDs: func(p int) {
		if p != pid {
			return
		}
		require.NoError(t, proc.Kill())
		// Reaped here (startHelperAs's cleanup then finds nothing to wait for): a zombie's
		// directory still says its ids; only a process gone for good says root.
		_, _ = proc.Wait()
		exited = true
	}})
	root := selfExpected(t) // this binary's bytes, enrolled for root (the test runs as root)
	require.Equal(t, uint32(0), root.UID)
	p, err := a.Verify(client, server, root)
	require.True(t, exited, "the hook ran")
	require.Error(t, err, "accepted as %+v", p.Workload)
	assert.ErrorIs(t, err, ErrUnreadable)
}
