// Package wireguard is UTE's WireGuard transport: wireguard-go carries the packets of admitted
// flows between nodes, and this package decides what the device may carry.
//
// Owns: the signed key binding that ties a node's WireGuard public key to its UTE node identity
// (Binding, SignBinding, VerifyBinding), the computation of the device's peer set from verified
// bindings and verified agent addresses (ComputePeers), the wireguard-go device and its
// configuration (Device), the per-flow admission filter that sits between the kernel TUN and
// the device (Filter), and the bytes of the two control channels that carry bindings and flow
// admissions over a zone's QUIC tunnel (wire.go).
//
// It must never configure a peer whose key is not bound by a signature of a verified node
// certificate, never give a peer an allowed IP that is not one of its verified agents'
// addresses, never pass a packet of a 5-tuple that was not admitted (outbound by the receiving
// node, inbound by this node), and never sign, verify DTL records or decide policy itself: the
// node does that through the hooks it is given.
package wireguard
