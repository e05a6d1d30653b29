// Package node is the UTE node daemon: configuration, lifecycle, the local API, gossip, the
// revocation store and TrustFlow, wiring the overlay to a node's identity and policy.
//
// It must never implement cryptographic checks or policy decisions itself; it calls identity,
// zones and overlay for those.
package node
