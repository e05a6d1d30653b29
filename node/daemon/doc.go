// Package daemon is `ute node run`: the one place where a node's parts are wired together. It
// opens the durable revocation store (node/revstore) first and seeds the node with every accepted
// revocation before the tunnel endpoint takes its first handshake, starts the node (package node),
// one gossip pool per zone over the node's own tunnels (overlay/gossip, node/membership), the
// authority watch (identity/authority), the local API (node/localapi) and the metrics endpoint
// (node/metrics), and stops them in reverse order.
//
// Every signed record — from the authority's watch, from gossip, or signed here for the local
// API's revoke — goes through one path: verified and written durably by the store, then acted on
// (the subject's tunnels and flows cut, or the new policy's reload plan applied), then spread.
//
// It must never act on a record before the store holds it, never decide policy or verify a
// signature itself (identity/record, zones and node do), and never trust gossiped membership:
// every address a member names is checked by the tunnel handshake before use.
package daemon
