package identity

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// Fingerprint errors.
var (
	ErrNoMachineID = errors.New("no machine-id")
	ErrPIDReused   = errors.New("process changed while it was being fingerprinted")
)

// machineIDPaths are tried in order: systemd's file, then the D-Bus copy older systems keep.
var machineIDPaths = []string{"/etc/machine-id", "/var/lib/dbus/machine-id"}

// maxProcFile bounds reads of /proc text files and the machine-id.
const maxProcFile = 64 << 10

// HostFingerprint identifies the host a node runs on. Its Digest goes into the node certificate.
type HostFingerprint struct {
	MachineID    string
	Region       string
	BinaryDigest [32]byte // SHA-256 of the ute binary
}

// ReadHostFingerprint reads the machine-id and hashes the node binary. binaryPath "" means the
// running executable. region may be empty (unknown) but must otherwise be a lowercase label.
func ReadHostFingerprint(region, binaryPath string) (HostFingerprint, error) {
	return readHostFingerprint(machineIDPaths, region, binaryPath)
}

func readHostFingerprint(idPaths []string, region, binaryPath string) (HostFingerprint, error) {
	if region != "" {
		if err := checkLabel(region); err != nil {
			return HostFingerprint{}, fmt.Errorf("host fingerprint: region %q %s", region, err.Error())
		}
	}
	id, err := readMachineID(idPaths)
	if err != nil {
		return HostFingerprint{}, err
	}
	if binaryPath == "" {
		if binaryPath, err = os.Executable(); err != nil {
			return HostFingerprint{}, fmt.Errorf("host fingerprint: locate own binary: %w", err)
		}
	}
	d, err := FileDigest(binaryPath)
	if err != nil {
		return HostFingerprint{}, fmt.Errorf("host fingerprint: %w", err)
	}
	return HostFingerprint{MachineID: id, Region: region, BinaryDigest: d}, nil
}

func readMachineID(paths []string) (string, error) {
	for _, p := range paths {
		b, err := readSmall(p)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return "", fmt.Errorf("host fingerprint: %w", err)
		}
		id := strings.TrimSpace(string(b))
		if len(id) != 32 || strings.Trim(id, "0123456789abcdef") != "" {
			return "", fmt.Errorf("host fingerprint: %s does not hold a 32-digit lowercase hex machine-id; regenerate it with systemd-machine-id-setup", p)
		}
		return id, nil
	}
	return "", fmt.Errorf("host fingerprint: %w: none of %s exists; create one with systemd-machine-id-setup (or dbus-uuidgen --ensure)",
		ErrNoMachineID, strings.Join(paths, ", "))
}

// Digest is SHA-256 over a domain-separated, length-prefixed encoding of the fields (see
// docs/identity.md), so that no two different fingerprints share an encoding.
func (h HostFingerprint) Digest() [32]byte {
	d := sha256.New()
	d.Write([]byte("ute host fingerprint v1\x00"))
	writeLP(d, h.MachineID)
	writeLP(d, h.Region)
	d.Write(h.BinaryDigest[:])
	var out [32]byte
	d.Sum(out[:0])
	return out
}

func writeLP(w io.Writer, s string) {
	var n [4]byte
	binary.BigEndian.PutUint32(n[:], uint32(len(s)))
	_, _ = w.Write(n[:])
	_, _ = io.WriteString(w, s)
}

// Workload identifies the process behind an agent. Its Digest goes into the agent certificate.
type Workload struct {
	ExeDigest [32]byte // SHA-256 of the executable
	UID, GID  uint32   // effective IDs
	Cgroup    string   // cgroup identity (container), "" when not known
}

// Digest is SHA-256 over a domain-separated, length-prefixed encoding of the fields.
func (w Workload) Digest() [32]byte {
	d := sha256.New()
	d.Write([]byte("ute workload fingerprint v1\x00"))
	d.Write(w.ExeDigest[:])
	var ids [8]byte
	binary.BigEndian.PutUint32(ids[:4], w.UID)
	binary.BigEndian.PutUint32(ids[4:], w.GID)
	d.Write(ids[:])
	writeLP(d, w.Cgroup)
	var out [32]byte
	d.Sum(out[:0])
	return out
}

// Matches reports whether an observed workload is the registered one: same executable, uid and
// gid, and the same cgroup when a cgroup was registered (an agent added by executable path has
// none, and then any cgroup matches).
func (w Workload) Matches(registered Workload) bool {
	return w.ExeDigest == registered.ExeDigest && w.UID == registered.UID && w.GID == registered.GID &&
		(registered.Cgroup == "" || w.Cgroup == registered.Cgroup)
}

// WorkloadOfExe fingerprints an executable that will run as uid:gid (used by `ute agent add`).
func WorkloadOfExe(path string, uid, gid uint32) (Workload, error) {
	d, err := FileDigest(path)
	if err != nil {
		return Workload{}, fmt.Errorf("workload fingerprint: %w", err)
	}
	return Workload{ExeDigest: d, UID: uid, GID: gid}, nil
}

// WorkloadOfPID fingerprints a running process from /proc: its executable (through /proc/<pid>/exe,
// which reaches the file the process runs even if the path was replaced), effective uid and gid,
// and cgroup. It reads the process start time before and after and fails with ErrPIDReused if it
// changed, so a PID that was recycled mid-way is never attributed to the new process.
func WorkloadOfPID(pid int) (Workload, error) {
	return workloadOfPID("/proc", pid, nil)
}

// workloadOfPID takes the proc root and a hook run between the reads so tests can exercise the
// PID-reuse guard on real files.
func workloadOfPID(proc string, pid int, between func()) (Workload, error) {
	if pid <= 0 {
		return Workload{}, fmt.Errorf("workload fingerprint: pid %d is not a process id", pid)
	}
	dir := filepath.Join(proc, strconv.Itoa(pid))
	start, err := procStartTime(dir)
	if err != nil {
		return Workload{}, fmt.Errorf("workload fingerprint of pid %d: %w", pid, err)
	}
	exe, err := FileDigest(filepath.Join(dir, "exe"))
	if err != nil {
		return Workload{}, fmt.Errorf("workload fingerprint of pid %d: %w", pid, err)
	}
	w, err := ProcWorkload(dir, exe)
	if err != nil {
		return Workload{}, fmt.Errorf("workload fingerprint of pid %d: %w", pid, err)
	}
	if between != nil {
		between()
	}
	again, err := procStartTime(dir)
	if err != nil {
		return Workload{}, fmt.Errorf("workload fingerprint of pid %d: %w: %w", pid, ErrPIDReused, err)
	}
	if again != start {
		return Workload{}, fmt.Errorf("workload fingerprint of pid %d: %w (start time %d, now %d)", pid, ErrPIDReused, start, again)
	}
	return w, nil
}

// ProcWorkload is the workload of the process whose /proc directory is dir, given the digest of
// its executable: its effective uid and gid and its canonical cgroup. Node-side attestation
// (node/attest) computes the digest through its own cache and must reach the same fingerprint
// as enrollment, so both go through this function.
func ProcWorkload(dir string, exeDigest [32]byte) (Workload, error) {
	status, err := readSmall(filepath.Join(dir, "status"))
	if err != nil {
		return Workload{}, err
	}
	cg, err := readSmall(filepath.Join(dir, "cgroup"))
	if err != nil {
		return Workload{}, err
	}
	return ParseProcWorkload(status, cg, exeDigest)
}

// ParseProcWorkload is ProcWorkload on the contents of /proc/<pid>/status and /proc/<pid>/cgroup,
// for readers that open /proc themselves (node/attest reads through an open directory).
func ParseProcWorkload(status, cgroup []byte, exeDigest [32]byte) (Workload, error) {
	uid, err := statusID(status, "Uid:")
	if err != nil {
		return Workload{}, err
	}
	gid, err := statusID(status, "Gid:")
	if err != nil {
		return Workload{}, err
	}
	return Workload{ExeDigest: exeDigest, UID: uid, GID: gid, Cgroup: canonicalCgroup(cgroup)}, nil
}

// ProcStartTime is the start time (clock ticks since boot) of the process whose /proc directory
// is dir: what tells a process from a later one that reuses its PID.
func ProcStartTime(dir string) (uint64, error) { return procStartTime(dir) }

// procStartTime returns field 22 of /proc/<pid>/stat. The command name (field 2) is in
// parentheses and may itself contain spaces and parentheses, so parsing starts after the last ')'.
func procStartTime(dir string) (uint64, error) {
	b, err := readSmall(filepath.Join(dir, "stat"))
	if err != nil {
		return 0, err
	}
	v, err := ParseProcStartTime(b)
	if err != nil {
		return 0, fmt.Errorf("%s/%w", dir, err)
	}
	return v, nil
}

// ParseProcStartTime is ProcStartTime on the contents of /proc/<pid>/stat.
func ParseProcStartTime(stat []byte) (uint64, error) {
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, errors.New("stat: no command name")
	}
	fields := strings.Fields(string(stat[i+1:]))
	const startTimeIndex = 22 - 3 // fields after ')' start at field 3 (state)
	if len(fields) <= startTimeIndex {
		return 0, fmt.Errorf("stat: %d fields, want at least 22", len(fields)+2)
	}
	v, err := strconv.ParseUint(fields[startTimeIndex], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("stat: start time: %w", err)
	}
	return v, nil
}

// statusID returns the effective ID (second column) of the Uid: or Gid: line of /proc/<pid>/status.
func statusID(status []byte, key string) (uint32, error) {
	sc := bufio.NewScanner(bytes.NewReader(status))
	for sc.Scan() {
		rest, ok := strings.CutPrefix(sc.Text(), key)
		if !ok {
			continue
		}
		f := strings.Fields(rest)
		if len(f) < 2 {
			break
		}
		v, err := strconv.ParseUint(f[1], 10, 32)
		if err != nil {
			return 0, fmt.Errorf("status %s %q: %w", key, f[1], err)
		}
		return uint32(v), nil
	}
	return 0, fmt.Errorf("status has no usable %s line", key)
}

// canonicalCgroup reduces /proc/<pid>/cgroup to one string: the path alone on a pure cgroup v2
// host, otherwise every "controllers:path" entry, sorted and joined with ';'.
func canonicalCgroup(b []byte) string {
	var entries []string
	for line := range strings.SplitSeq(strings.TrimSpace(string(b)), "\n") {
		_, rest, ok := strings.Cut(strings.TrimSpace(line), ":")
		if !ok {
			continue
		}
		entries = append(entries, rest)
	}
	if len(entries) == 1 && strings.HasPrefix(entries[0], ":") {
		return entries[0][1:]
	}
	slices.Sort(entries)
	return strings.Join(entries, ";")
}

// FileDigest returns the SHA-256 of a regular file's content.
func FileDigest(path string) ([32]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return [32]byte{}, fmt.Errorf("hash %s: %w", path, err)
	}
	defer func() { _ = f.Close() }()
	st, err := f.Stat()
	if err != nil {
		return [32]byte{}, fmt.Errorf("hash %s: %w", path, err)
	}
	if !st.Mode().IsRegular() {
		return [32]byte{}, fmt.Errorf("hash %s: not a regular file", path)
	}
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return [32]byte{}, fmt.Errorf("hash %s: %w", path, err)
	}
	var out [32]byte
	h.Sum(out[:0])
	return out, nil
}

func readSmall(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer func() { _ = f.Close() }()
	b, err := io.ReadAll(io.LimitReader(f, maxProcFile+1))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	if len(b) > maxProcFile {
		return nil, fmt.Errorf("read %s: larger than %d bytes", path, maxProcFile)
	}
	return b, nil
}
