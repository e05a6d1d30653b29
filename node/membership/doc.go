// Package membership owns the node's gossip: one hashicorp/memberlist pool per zone over the
// zone's tunnels (overlay/gossip), and the spread of signed records (revocations, policy
// releases) through those pools: broadcast, re-broadcast on first receipt, direct push over
// control streams for records too large to gossip, and reconciliation in push/pull.
//
// It treats records as opaque bytes: the node's Records implementation verifies, persists and
// acts on each one before Add returns, and decides which records each zone reconciles. This
// package must never re-broadcast or reconcile a record Add refused, never carry one zone's
// records into another zone's pool by itself, never trust member metadata (names are checked
// against the trust domain and the revocation set; every address is verified by the tunnel
// handshake before a byte is sent), and never block memberlist's goroutines.
package membership
