// Package attest finds the local process behind a loopback TCP connection and checks it against
// an agent's enrolled workload fingerprint (identity.Workload digest: executable SHA-256, uid,
// gid, cgroup). The proxy interface (node/proxy) runs it on every new outgoing connection before
// a DTL record is signed.
//
// Owns: parsing /proc/net/tcp and /proc/net/tcp6 to map a connection to its socket inode, the
// scan of /proc/<pid>/fd for the process holding that socket, the PID-reuse guard (process start
// time read before and after every other read), and the executable digest cache keyed by device,
// inode, size, mtime and ctime of the file the process runs, so a swapped or rewritten binary is
// hashed again.
//
// It must never attribute a connection to a process it could not confirm (no owner, a recycled
// PID, an unreadable executable are all refusals, never a pass), never trust a path name for the
// executable (it hashes what /proc/<pid>/exe opens), and never sign, dial or decide policy.
package attest
