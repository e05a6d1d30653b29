// Package localsock binds the Unix sockets through which local tools reach a running UTE daemon
// (the authority's admin socket, the node's local API) and checks who is calling on each
// connection with SO_PEERCRED.
//
// It lives under identity/ because both identity/authority and node/localapi need it and the
// dependency direction (cmd → node → overlay → zones, identity) allows only identity/... to be
// shared by both; it imports nothing of UTE's, like the identity core.
//
// Owns: binding a socket file safely (a lock file held for the listener's life, refusing to take
// over a socket a live process answers on, removing a stale one, mode 0600) and reading the
// kernel-attested credentials of the peer process.
//
// It must never trust anything the peer says about itself (only the kernel's SO_PEERCRED
// answer), never remove a socket file it does not hold the lock for, and never follow a path
// that is not a socket when it cleans up.
package localsock
