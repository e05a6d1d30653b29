// Package authority is the UTE authority daemon: the durable bbolt store (trust domain, policy and
// its signed releases, join tokens, serial counter, issued certificates, revoked serials, signed
// revocation records, members' advertised addresses, audit trail), the QUIC join, renewal and
// watch service, the local admin socket, and the client side of join, renewal and watch used by
// nodes.
//
// It owns the single-use token consumption (one durable transaction that checks and consumes the
// token and allocates the serial and the node's per-zone slices before anything is signed), the
// per-node slices of zone CIDRs that node certificates grant, the renewal check (mutual TLS
// proof of possession of the current node key, one successor per certificate, resent only to a
// retry for the same new key), revocation by serial, node or agent SPIFFE ID (durable, with
// its signed and sequenced revocation record, before it returns), the watch stream that pushes
// records and policy releases to nodes as they commit, the bootstrap member lists, and the limits on what unauthenticated peers can cost it (per-source and global audit
// budgets with suppressed-refusal summaries, connection, in-flight request and watcher caps). It must
// never let an unauthenticated peer write audit records (an fsync each) without bound, never fold a refusal of an authenticated request (a second use of a token above all) into a
// summary, never store a token secret (only its hash), never reuse a serial, never give
// an address of one node's slice to another node, never send a token secret to a server whose key
// does not match the token's pin, never sign a certificate whose claims were not derived from the
// stored policy, never hand a renewed certificate to a request that did not prove possession of
// its key, never reuse or reorder a revocation sequence number or a policy version, never return
// from a revocation before its record is durable, and never stream records to a watcher whose
// certificate is revoked, superseded or not its own. It revokes a duplicated node identity on a
// member's evidence (evidence.go) only after verifying the two presence proofs itself, never on
// the member's word.
package authority
