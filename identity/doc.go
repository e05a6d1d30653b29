// Package identity owns UTE's cryptographic identities: Ed25519 keys on disk, SPIFFE IDs, X.509
// certificates carrying the UTE claims extension, chain verification authority → node → agent with
// the node's zone and CIDR constraints, certificate requests, join tokens, and host and workload
// fingerprints. docs/identity.md specifies the profile and formats this package implements.
//
// It imports nothing of UTE's own and must never perform network I/O, consult revocation state or
// hold durable state beyond the key and certificate files it is asked to read or write; the
// authority daemon lives in identity/authority. It must never sign a certificate that its own
// Verifier would refuse, and never accept one without checking every link up to the trust anchor.
package identity
