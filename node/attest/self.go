package attest

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/ute-project/ute/identity"
)

// VerifySelf checks that this process is the workload whose digest is want: the SDK's check
// before an in-process agent opens a flow (node.Agent.Dial). The executable is what
// /proc/self/exe opens (the file this process runs, even if its path was replaced since), hashed
// through the same cache as Verify, so a flow pays an open and an fstat, and the digest once per
// executable version. The ids are this process's effective uid and gid. The cgroup is read only
// when the fingerprint without it does not match (an agent enrolled with a cgroup).
//
// There is no PID-reuse guard: a process cannot outlive itself, so the executable and ids read
// here are this process's. The error wraps ErrUnreadable or ErrMismatch.
func (a *Attester) VerifySelf(want Expected) (Process, error) {
	dir := filepath.Join(a.proc, "self")
	digest, cached, err := a.cache.digestAt(unix.AT_FDCWD, filepath.Join(dir, "exe"))
	if err != nil {
		return Process{}, fmt.Errorf("%w: this process's executable: %w", ErrUnreadable, err)
	}
	p := Process{PID: os.Getpid(), Cached: cached,
		Workload: identity.Workload{ExeDigest: digest, UID: uint32(os.Geteuid()), GID: uint32(os.Getegid())}}
	if d := p.Workload.Digest(); bytes.Equal(d[:], want.Digest) {
		return p, nil
	}
	// Not the fingerprint without a cgroup: read what the interfaces' attestation would read
	// (status ids and cgroup) and compare as Process.Matches does.
	p.Exe, _ = os.Readlink(filepath.Join(dir, "exe"))
	pidfd, err := openDir(unix.AT_FDCWD, dir)
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
