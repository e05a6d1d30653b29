// Package localapi is the node daemon's local API: HTTP+JSON over the Unix socket <dir>/ute.sock
// (mode 0600), through which `ute status`, `ute whois`, `ute revoke` and `ute agent add` reach a
// running node, and through which a server written in any language can ask who is calling it.
//
// Owns: the wire types (stable snake_case JSON), the routes, the error codes and their mapping
// to sentinels on both sides (errors.Is works across the socket), request limits and timeouts,
// the caller check (SO_PEERCRED: root, the daemon's uid and the owner of the node directory),
// and the client used by the CLI. The daemon supplies a Backend; this package never decides
// anything about identities, revocations or policy itself.
//
// It must never call the Backend for a caller it has not checked, never read more than the
// request limit, never panic on a malformed request, and never serve on a socket another live
// daemon holds.
package localapi
