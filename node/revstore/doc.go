// Package revstore is a node's durable, grow-only set of verified revocation records and its
// current policy release, in one bbolt file in the node directory (FileName, mode 0600).
//
// It owns: verifying every record before it is stored (through identity/record and the injected
// trust anchor), writing it durably (bbolt commit with fsync) before reporting it new, dedupe by
// canonical key, dropping a record only after its expiry, re-verifying everything on Open so a
// tampered file can neither inject a revocation nor silently lose one, the in-memory index the node
// consults on every handshake and flow, and refusing a policy release that is not newer.
//
// It must never apply a record it has not verified, never drop one before its expiry, never report
// a record new before it is on disk, and never block a lookup on disk I/O. It does no networking:
// distribution (gossip, push over tunnels, the authority watch) belongs to the node.
package revstore
