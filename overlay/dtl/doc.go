// Package dtl owns UTE's provenance layer on the wire: the DTL record (a COSE_Sign1 over a
// deterministic CBOR claims map, signed with the agent's Ed25519 key and bound to its tunnel session
// by a TLS exporter value used as external AAD), the length-prefixed stream frames that carry it, the
// QUIC datagram flow header, the per-session replay window, and the admission check that applies
// every verification step in one documented order (see Verifier.Admit and docs/protocol.md).
//
// It must never trust a record it has not verified over the exact bytes received (never over a
// re-encoding), never admit a record when any required piece of data or any injected check is
// missing (fail closed), never panic on bytes from the network, and never make policy, identity or
// revocation decisions itself: those are injected (ChainVerifier, RevocationChecker, PolicyChecker)
// so that this package imports neither identity nor zones.
package dtl
