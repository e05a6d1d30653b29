// Package authority is the UTE authority daemon: the durable bbolt store (trust domain, policy,
// join tokens, serial counter, issued certificates, revoked serials, audit trail), the QUIC join and
// renewal service, the local admin socket, and the client side of join and renewal used by nodes.
//
// It owns the single-use token consumption (one durable transaction that checks and consumes the
// token and allocates the serial and the node's per-zone slices before anything is signed), the
// per-node slices of zone CIDRs that node certificates grant, the renewal check (mutual TLS
// proof of possession of the current node key, one successor per certificate, resent only to a
// retry for the same new key), revocation by serial or node SPIFFE ID (durable before it
// returns), and the limits on what unauthenticated peers can cost it (per-source and global audit
// budgets with suppressed-refusal summaries, connection and in-flight request caps). It must
// never let an unauthenticated peer write audit records (an fsync each) without bound, never fold a refusal of an authenticated request (a second use of a token above all) into a
// summary, never store a token secret (only its hash), never reuse a serial, never give
// an address of one node's slice to another node, never send a token secret to a server whose key
// does not match the token's pin, never sign a certificate whose claims were not derived from the
// stored policy, and never hand a renewed certificate to a request that did not prove possession of
// its key.
package authority
