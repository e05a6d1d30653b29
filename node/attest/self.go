package attest

import (
	"bytes"
	"fmt"
	"os"

	"golang.org/x/sys/unix"

	"github.com/ute-project/ute/identity"
)

// VerifySelf checks that this process is the workload whose digest is want: the SDK's check
// before an in-process agent opens a flow (node.Agent.Dial). The executable is what
// /proc/self/exe opens (the file this process runs, even if its path was replaced since), hashed
// through the same cache as Verify, so a flow pays one fstat (selfDigest), and the digest once
// per executable version. The ids are this process's effective uid and gid. The cgroup is read
// only when the fingerprint without it does not match (an agent enrolled with a cgroup).
//
// There is no PID-reuse guard: a process cannot outlive itself, so the executable and ids read
// here are this process's. The PID, which cannot change, was taken once by New; the executable's
// key and the ids, which can, are read on every call. The error wraps ErrUnreadable or
// ErrMismatch.
func (a *Attester) VerifySelf(want Expected) (Process, error) {
	digest, cached, err := a.selfDigest()
	if err != nil {
		return Process{}, fmt.Errorf("%w: this process's executable: %w", ErrUnreadable, err)
	}
	p := Process{PID: a.selfPID, Cached: cached,
		Workload: identity.Workload{ExeDigest: digest, UID: uint32(os.Geteuid()), GID: uint32(os.Getegid())}}
	if d := p.Workload.Digest(); bytes.Equal(d[:], want.Digest) {
		return p, nil
	}
	// Not the fingerprint without a cgroup: read what the interfaces' attestation would read
	// (status ids and cgroup) and compare as Process.Matches does.
	p.Exe, _ = os.Readlink(a.selfExe)
	pidfd, err := openDir(unix.AT_FDCWD, a.selfDir)
	if err != nil {
		return p, fmt.Errorf("%w: this process: %w", ErrUnreadable, err)
	}
	defer func() { _ = unix.Close(pidfd) }()
	w, err := workloadAt(pidfd, digest)
	if err != nil {
		return p, fmt.Errorf("%w: this process: %w", ErrUnreadable, err)
	}
	p.Workload = w
	if p.Matches(want.Digest) {
		return p, nil
	}
	return p, fmt.Errorf("%w: %s", ErrMismatch, mismatchReason(p, want))
}

// selfDigest is the digest of the file this process runs, as cache.digestAt(/proc/self/exe)
// returns it. On the real /proc a hit takes the key from an fstat of a descriptor of that file,
// opened once, instead of a walk through /proc to it (1.9 µs against 5.5 µs on this project's
// VM, on every Dial): what /proc/self/exe names cannot change while a Go process runs, since the
// kernel refuses to relink it while the old file is mapped, and this process's code is mapped
// from it. A write to the file changes its key like any stat would show, and the digest is then
// taken again through the path.
func (a *Attester) selfDigest() ([32]byte, bool, error) {
	a.selfOnce.Do(func() {
		if a.pinned { // a proc file system, not a test root
			// O_PATH: the descriptor only names the file, for fstat; it cannot read or run it.
			a.selfFile, _ = os.OpenFile(a.selfExe, unix.O_PATH|unix.O_CLOEXEC, 0)
		}
	})
	if a.selfFile != nil {
		var st unix.Stat_t
		if unix.Fstat(int(a.selfFile.Fd()), &st) == nil {
			if d, ok := a.cache.hit(&st); ok {
				return d, true, nil
			}
		}
	}
	return a.cache.digestAt(unix.AT_FDCWD, a.selfExe)
}
