// Package record owns the signed records that travel between UTE members outside a tunnel's
// flows: revocation records (signed by the authority, or by a node for itself and the agent
// certificates it issued), policy releases (signed by the authority), TrustFlow's trust events
// (signed by the node that observed them, about subjects of its own zones) and presence proofs
// (a node process answering a peer's challenge; two overlapping ones are duplicate-identity
// evidence, CheckDuplicate). It defines their wire
// format (COSE_Sign1 over deterministic CBOR with integer keys, specified in docs/protocol.md),
// signs them, verifies them against the trust anchor, decides who may revoke what, and derives the
// canonical keys a revocation covers, which the node matches against peers and flows.
//
// It performs no I/O and holds no state: storage belongs to node/revstore, distribution to the
// node. It must never accept a record whose signature it has not checked over the exact received
// bytes, never let a node revoke anything but itself and the certificates it issued, and never key
// a revocation by its signature bytes (the same revocation signed twice is one revocation).
package record
