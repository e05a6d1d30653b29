// Package node is the UTE node: it wires a node directory (node/state) to the overlay. Open loads
// the node's identity, policy and agents, starts its QUIC tunnel endpoint and becomes the
// endpoint's PeerVerifier and Admitter; Agent gives in-process SDK agents that Listen and Dial like
// package net, with WhoIs returning the verified DTL provenance of a caller.
//
// Owns: the node lifecycle, the in-memory revocation set and the cutting of a revoked subject's
// tunnels and live flows, the per-session admission state (replay window, chain cache), the
// zone directory (name.zone → overlay IP and node, learned from verified agent certificates), the
// node's audit log, the agent SDK, and the credential scheduler: one loop that renews the node
// certificate at half-life (Config.Authority) and reissues every agent certificate at its
// half-life (always), swapping them in place and announcing agents to the zone's peers.
// docs/sdk.md records its design decisions.
//
// It must never implement cryptographic checks or policy decisions itself (it calls identity,
// zones and overlay/dtl for those), never hand a byte of a flow to an agent before admission, and
// never install a directory entry whose certificate does not verify up to the trust anchor through
// the tunnel's own peer node, and never reissue an agent it has revoked.
package node
