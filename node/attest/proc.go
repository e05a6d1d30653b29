package attest

import (
	"bytes"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// Reading /proc with as few system calls as a flow allows. Every per-process read goes through
// an open /proc/<pid> directory (openat, readlinkat, fstatat relative to it): one path walk per
// process instead of one per file, and — like a pidfd — a directory opened before its process
// exits never reaches a later process that reuses the PID (lookups in it fail), on top of the
// start-time guard.

// maxProcFile bounds a read of a /proc/<pid> file (stat, status, cgroup), as identity does.
const maxProcFile = 64 << 10

// openDir opens a directory for *at calls.
func openDir(dirfd int, path string) (int, error) {
	for {
		fd, err := unix.Openat(dirfd, path, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err == unix.EINTR {
			continue
		}
		return fd, err
	}
}

// readAt reads a small file relative to dirfd with plain system calls: os.Open's extra fcntl
// and poller registration cost as much as the read itself on these tiny files.
func readAt(dirfd int, name string, limit int64) ([]byte, error) {
	var fd int
	var err error
	for {
		if fd, err = unix.Openat(dirfd, name, unix.O_RDONLY|unix.O_CLOEXEC, 0); err != unix.EINTR {
			break
		}
	}
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", name, err)
	}
	defer func() { _ = unix.Close(fd) }()
	b := make([]byte, 0, min(limit+1, 4096))
	for {
		if len(b) == cap(b) {
			b = append(b, 0)[:len(b)]
		}
		n, err := unix.Read(fd, b[len(b):cap(b)])
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("read %s: %w", name, err)
		}
		if n == 0 {
			return b, nil
		}
		b = b[:len(b)+n]
		if int64(len(b)) > limit {
			return nil, fmt.Errorf("read %s: larger than %d bytes", name, limit)
		}
	}
}

// linkIs reads the link name relative to dirfd into buf and reports whether it is want;
// no allocation, one system call.
func linkIs(dirfd int, name string, buf []byte, want string) bool {
	for {
		n, err := unix.Readlinkat(dirfd, name, buf)
		if err == unix.EINTR {
			continue
		}
		return err == nil && n < len(buf) && string(buf[:n]) == want
	}
}

// listDir returns the names in the directory open as fd (rewound first), reusing buf.
func listDir(fd int, buf []byte, names []string) ([]string, error) {
	if _, err := unix.Seek(fd, 0, 0); err != nil {
		return nil, err
	}
	for {
		n, err := unix.ReadDirent(fd, buf)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return names, err
		}
		if n <= 0 {
			return names, nil
		}
		_, _, names = syscall.ParseDirent(buf[:n], -1, names)
	}
}

// parseStartTime returns field 22 (starttime) of /proc/<pid>/stat. The command name (field 2) is
// in parentheses and may itself hold spaces and parentheses, so parsing starts after the last
// ')'. identity.ProcStartTime reads the same field.
func parseStartTime(b []byte) (uint64, error) {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, errors.New("stat: no command name")
	}
	fields := strings.Fields(string(b[i+1:]))
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

// startTimeAt reads the start time of the process whose /proc directory is open as dirfd.
func startTimeAt(dirfd int) (uint64, error) {
	b, err := readAt(dirfd, "stat", maxProcFile)
	if err != nil {
		return 0, err
	}
	return parseStartTime(b)
}

// parseStatusIDs returns the effective uid and gid (second field of the Uid: and Gid: lines) of
// /proc/<pid>/status, as identity.ProcWorkload reads them.
func parseStatusIDs(status []byte) (uid, gid uint32, err error) {
	var haveUID, haveGID bool
	for line := range bytes.SplitSeq(status, []byte{'\n'}) {
		var dst *uint32
		var have *bool
		var rest []byte
		switch {
		case bytes.HasPrefix(line, []byte("Uid:")):
			dst, have, rest = &uid, &haveUID, line[4:]
		case bytes.HasPrefix(line, []byte("Gid:")):
			dst, have, rest = &gid, &haveGID, line[4:]
		default:
			continue
		}
		if *have {
			continue // the first line of each counts, as in identity
		}
		f := strings.Fields(string(rest))
		if len(f) < 2 {
			return 0, 0, fmt.Errorf("status has no usable %s line", line[:4])
		}
		v, err := strconv.ParseUint(f[1], 10, 32)
		if err != nil {
			return 0, 0, fmt.Errorf("status %s %q: %w", line[:4], f[1], err)
		}
		*dst, *have = uint32(v), true
	}
	switch {
	case !haveUID:
		return 0, 0, errors.New("status has no usable Uid: line")
	case !haveGID:
		return 0, 0, errors.New("status has no usable Gid: line")
	}
	return uid, gid, nil
}

// canonicalCgroup reduces /proc/<pid>/cgroup to one string: the path alone on a pure cgroup v2
// host, otherwise every "controllers:path" entry, sorted and joined with ';'. It must agree with
// identity's (TestProcReadersAgreeWithIdentity, FuzzProcReaders): the digest of a workload is
// compared with the one identity computed at enrolment.
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
