// Package attest finds the local process behind a TCP connection and checks it against an agent's
// enrolled workload fingerprint (identity.Workload digest: executable SHA-256, uid, gid, cgroup).
// The daemon's proxy and TUN interfaces run it on every new outgoing connection before a DTL
// record is signed; an SDK agent's Dial checks its own process with VerifySelf.
//
// Owns: the sock_diag lookup (or /proc/net/tcp and /proc/net/tcp6) that maps a connection to its
// socket inode and creator uid, the search of /proc/<pid>/fd for the process holding that socket
// (per-agent hints with the descriptor last seen, then the socket's uid, then everyone), the
// PID-reuse guard (process start time read before and after every other read, through one open
// /proc/<pid> directory), the readers of /proc/<pid>/{stat,status,cgroup} (which must agree with
// identity's), and the executable digest cache keyed by device, inode, size, mtime and ctime of
// the file the process runs, so a swapped or rewritten binary is hashed again.
//
// It must never attribute a connection to a process it could not confirm (no owner, a recycled
// PID, an unreadable executable are all refusals, never a pass; a hint or a uid only orders the
// search), never trust a path name for the executable (it hashes what /proc/<pid>/exe opens), and
// never sign, dial or decide policy.
package attest
