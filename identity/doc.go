// Package identity owns UTE's cryptographic identities: Ed25519 keys on disk, SPIFFE IDs, X.509
// certificates carrying the UTE claims extension, chain verification authority → node → agent with
// the node's zone and CIDR constraints, join tokens, and host and workload fingerprints.
//
// It imports nothing of UTE's own and must never perform network I/O or hold durable state beyond
// the key and certificate files it is asked to read or write; the authority daemon lives in
// identity/authority.
package identity
