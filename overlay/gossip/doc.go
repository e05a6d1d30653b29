// Package gossip carries hashicorp/memberlist over UTE's zone tunnels: a NodeAwareTransport per
// zone whose packets are control datagrams (or, when too large, control streams) and whose
// streams are control streams of the zone's tunnel to the named peer, and a Mux that dispatches
// the endpoint's control traffic to the transport of the tunnel's zone.
//
// Every byte it sends goes over a tunnel whose peer proved, inside the QUIC handshake, the node
// certificate of the member it addresses (Endpoint.Dial with the member's name as the expected
// node): there is no gossip key, and a foreign, revoked or other-zone node can neither receive nor
// inject gossip. It must never send to an address without that proof, never hand one zone's
// gossip to another zone's pool, and never block a tunnel's goroutines (it drops and counts).
// It does not interpret memberlist messages or decide membership: node/membership does.
package gossip
