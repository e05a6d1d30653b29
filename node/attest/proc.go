package attest

import (
	"bytes"
	"fmt"
	"strconv"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/ute-project/ute/identity"
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

// idsAt returns the effective uid and gid of the process whose /proc directory is open as pidfd,
// as identity.ParseProcWorkload reads them from its status file.
//
// On a proc file system (pinned) they are the owner of the directory itself: the kernel gives
// /proc/<pid> the effective uid and gid of the process whatever its dumpable state (fs/proc/base.c,
// task_dump_owner: "the only way to read the effective uid of a process was to stat /proc/pid",
// kept for every world-readable process directory; the files inside, status among them, turn to
// root for a process that is not dumpable, the directory does not). One fstat of the open
// directory instead of an open, a read and a close of status, which the kernel formats in full
// (about 1.4 KB) for the two numbers. TestProcDirectoryOwnerIsEffectiveIDs checks that on the
// running kernel, a non-dumpable process of another user included.
//
// The directory of a process that has exited says root (the kernel cannot ask the task any more)
// instead of failing: the caller reads the executable after the ids, which fails for an exited
// (or zombie) process, so ids read from an exited process are never used.
func (a *Attester) idsAt(pidfd int) (uid, gid uint32, err error) {
	if a.pinned {
		var st unix.Stat_t
		if err := unix.Fstat(pidfd, &st); err != nil {
			return 0, 0, fmt.Errorf("stat: %w", err)
		}
		return st.Uid, st.Gid, nil
	}
	status, err := readAt(pidfd, "status", maxProcFile)
	if err != nil {
		return 0, 0, err
	}
	w, err := identity.ParseProcWorkload(status, nil, [32]byte{})
	if err != nil {
		return 0, 0, err
	}
	return w.UID, w.GID, nil
}

// linkIs reads the link name (descriptor fd) relative to dirfd into sc.link and reports
// whether it is want; no allocation, one system call. Another socket's link is noted in sc.seen.
func (sc *scratch) linkIs(dirfd int, name string, fd int, want string) bool {
	for {
		n, err := unix.Readlinkat(dirfd, name, sc.link[:])
		if err == unix.EINTR {
			continue
		}
		if err != nil || n >= len(sc.link) {
			return false
		}
		if string(sc.link[:n]) == want {
			return true
		}
		if ino, ok := socketInode(sc.link[:n]); ok {
			sc.seen = append(sc.seen, seenFD{ino: ino, fd: fd})
		}
		return false
	}
}

// socketInode parses a descriptor's link "socket:[N]".
func socketInode(b []byte) (uint64, bool) {
	rest, ok := bytes.CutPrefix(b, []byte("socket:["))
	if !ok {
		return 0, false
	}
	digits, ok := bytes.CutSuffix(rest, []byte("]"))
	if !ok || len(digits) == 0 {
		return 0, false
	}
	v, err := strconv.ParseUint(string(digits), 10, 64)
	return v, err == nil
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

// startTimeAt reads the start time of the process whose /proc directory is open as dirfd.
func startTimeAt(dirfd int) (uint64, error) {
	b, err := readAt(dirfd, "stat", maxProcFile)
	if err != nil {
		return 0, err
	}
	return identity.ParseProcStartTime(b)
}

// isProcFS reports whether root is a proc file system: a node's /proc, or a host's /proc
// mounted into the node's container. A directory shaped like /proc (tests) is not.
func isProcFS(root string) bool {
	var st unix.Statfs_t
	return unix.Statfs(root, &st) == nil && st.Type == unix.PROC_SUPER_MAGIC
}
