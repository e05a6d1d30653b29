package identity

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestReadHostFingerprintRealSystem(t *testing.T) {
	raw, err := os.ReadFile("/etc/machine-id")
	if err != nil {
		raw, err = os.ReadFile("/var/lib/dbus/machine-id")
	}
	if err != nil {
		t.Skip("this machine has no machine-id")
	}
	exe, err := os.Executable()
	require.NoError(t, err)
	want, err := FileDigest(exe)
	require.NoError(t, err)

	h, err := ReadHostFingerprint("eu-west-1", "")
	require.NoError(t, err)
	assert.Equal(t, strings.TrimSpace(string(raw)), h.MachineID)
	assert.Equal(t, "eu-west-1", h.Region)
	assert.Equal(t, want, h.BinaryDigest)

	_, err = ReadHostFingerprint("EU", "")
	require.Error(t, err)
	_, err = ReadHostFingerprint("", filepath.Join(t.TempDir(), "missing"))
	require.ErrorIs(t, err, os.ErrNotExist)
}

func TestMachineIDFallbackAndErrors(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "ute")
	require.NoError(t, os.WriteFile(bin, []byte("binary"), 0o755))
	missing := filepath.Join(dir, "missing")
	dbus := filepath.Join(dir, "dbus-id")
	require.NoError(t, os.WriteFile(dbus, []byte("0123456789abcdef0123456789abcdef\n"), 0o644))

	h, err := readHostFingerprint([]string{missing, dbus}, "", bin)
	require.NoError(t, err)
	assert.Equal(t, "0123456789abcdef0123456789abcdef", h.MachineID)

	_, err = readHostFingerprint([]string{missing, filepath.Join(dir, "also-missing")}, "", bin)
	require.ErrorIs(t, err, ErrNoMachineID)
	assert.Contains(t, err.Error(), "systemd-machine-id-setup")

	bad := filepath.Join(dir, "bad-id")
	require.NoError(t, os.WriteFile(bad, []byte("not-an-id"), 0o644))
	_, err = readHostFingerprint([]string{bad}, "", bin)
	require.ErrorContains(t, err, "32-digit lowercase hex")
}

func TestFingerprintDigests(t *testing.T) {
	base := HostFingerprint{MachineID: "ab", Region: "c", BinaryDigest: [32]byte{1}}
	variants := []HostFingerprint{
		{MachineID: "a", Region: "bc", BinaryDigest: [32]byte{1}}, // same concatenation, other split
		{MachineID: "ab", Region: "d", BinaryDigest: [32]byte{1}},
		{MachineID: "ab", Region: "c", BinaryDigest: [32]byte{2}},
	}
	for _, v := range variants {
		assert.NotEqual(t, base.Digest(), v.Digest(), "%+v", v)
	}
	assert.Equal(t, base.Digest(), base.Digest())

	w := Workload{ExeDigest: [32]byte{1}, UID: 1000, GID: 1000, Cgroup: "/a"}
	for _, v := range []Workload{
		{ExeDigest: [32]byte{2}, UID: 1000, GID: 1000, Cgroup: "/a"},
		{ExeDigest: [32]byte{1}, UID: 1001, GID: 1000, Cgroup: "/a"},
		{ExeDigest: [32]byte{1}, UID: 1000, GID: 1001, Cgroup: "/a"},
		{ExeDigest: [32]byte{1}, UID: 1000, GID: 1000, Cgroup: "/b"},
	} {
		assert.NotEqual(t, w.Digest(), v.Digest(), "%+v", v)
		assert.False(t, v.Matches(w))
	}
	assert.True(t, w.Matches(Workload{ExeDigest: [32]byte{1}, UID: 1000, GID: 1000}), "no registered cgroup matches any")
	assert.NotEqual(t, base.Digest(), Workload{}.Digest())
}

func TestWorkloadOfPIDSelf(t *testing.T) {
	exe, err := os.Executable()
	require.NoError(t, err)
	want, err := FileDigest(exe)
	require.NoError(t, err)
	w, err := WorkloadOfPID(os.Getpid())
	require.NoError(t, err)
	assert.Equal(t, want, w.ExeDigest)
	assert.Equal(t, uint32(os.Geteuid()), w.UID)
	assert.Equal(t, uint32(os.Getegid()), w.GID)
	assert.NotEmpty(t, w.Cgroup)

	fromExe, err := WorkloadOfExe(exe, w.UID, w.GID)
	require.NoError(t, err)
	assert.True(t, w.Matches(fromExe))
}

func TestWorkloadOfPIDChildAndExit(t *testing.T) {
	path, err := exec.LookPath("sleep")
	if err != nil {
		t.Skip("no sleep binary")
	}
	cmd := exec.Command(path, "30")
	require.NoError(t, cmd.Start())
	pid := cmd.Process.Pid
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })

	real, err := filepath.EvalSymlinks(path)
	require.NoError(t, err)
	want, err := FileDigest(real)
	require.NoError(t, err)
	w, err := WorkloadOfPID(pid)
	require.NoError(t, err)
	assert.Equal(t, want, w.ExeDigest)

	require.NoError(t, cmd.Process.Kill())
	_ = cmd.Wait()
	_, err = WorkloadOfPID(pid)
	require.ErrorIs(t, err, os.ErrNotExist)
	_, err = WorkloadOfPID(0)
	require.Error(t, err)
}

// fakeProc lays out the files WorkloadOfPID reads, for the PID-reuse guard test.
func fakeProc(t *testing.T, start string) (root string, statPath string) {
	root = t.TempDir()
	dir := filepath.Join(root, "4242")
	require.NoError(t, os.MkdirAll(dir, 0o755))
	stat := "4242 (my (odd) agent) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 " + start + " 1000 10\n"
	statPath = filepath.Join(dir, "stat")
	require.NoError(t, os.WriteFile(statPath, []byte(stat), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "exe"), []byte("exe bytes"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "status"), []byte("Name:\tx\nUid:\t1000\t1001\t1001\t1001\nGid:\t50\t51\t51\t51\n"), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "cgroup"), []byte("0::/system.slice/agent.service\n"), 0o644))
	return root, statPath
}

func TestWorkloadPIDReuseGuard(t *testing.T) {
	root, _ := fakeProc(t, "777")
	w, err := workloadOfPID(root, 4242, nil)
	require.NoError(t, err)
	assert.Equal(t, uint32(1001), w.UID, "effective uid")
	assert.Equal(t, uint32(51), w.GID, "effective gid")
	assert.Equal(t, "/system.slice/agent.service", w.Cgroup)

	root, stat := fakeProc(t, "777")
	_, err = workloadOfPID(root, 4242, func() {
		// The process exited and its PID went to a newer process.
		require.NoError(t, os.WriteFile(stat, []byte("4242 (other) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 999 1 1\n"), 0o644))
	})
	require.ErrorIs(t, err, ErrPIDReused)

	root, stat = fakeProc(t, "777")
	_, err = workloadOfPID(root, 4242, func() { require.NoError(t, os.Remove(stat)) })
	require.ErrorIs(t, err, ErrPIDReused)

	root, stat = fakeProc(t, "777")
	require.NoError(t, os.WriteFile(stat, []byte("4242 (x) S 1 2"), 0o644))
	_, err = workloadOfPID(root, 4242, nil)
	require.ErrorContains(t, err, "fields")
}

func TestCanonicalCgroup(t *testing.T) {
	cases := map[string]string{
		"0::/system.slice/a.service\n": "/system.slice/a.service",
		"0::/\n":                       "/",
		"4:memory:/docker/abc\n1:cpu:/docker/abc\n0::/\n": ":/;cpu:/docker/abc;memory:/docker/abc",
		"": "",
	}
	for in, want := range cases {
		assert.Equal(t, want, canonicalCgroup([]byte(in)), "%q", in)
	}
}

func TestWorkloadOfExe(t *testing.T) {
	dir := t.TempDir()
	_, err := WorkloadOfExe(dir, 0, 0)
	require.ErrorContains(t, err, "not a regular file")
	p := filepath.Join(dir, "agent")
	require.NoError(t, os.WriteFile(p, []byte("v1"), 0o755))
	w1, err := WorkloadOfExe(p, 1, 2)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(p, []byte("v2"), 0o755))
	w2, err := WorkloadOfExe(p, 1, 2)
	require.NoError(t, err)
	assert.NotEqual(t, w1.Digest(), w2.Digest(), "a changed binary is a changed workload")
}
