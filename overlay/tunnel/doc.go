// Package tunnel owns UTE's zone-scoped QUIC tunnels and flow admission: one quic.Transport per
// node over an injected net.PacketConn, one QUIC connection per (peer node, zone) with the zone named
// by ALPN and both node certificates checked by an injected PeerVerifier, flows carried as QUIC
// streams whose first frame is a DTL record, UDP flows carried as QUIC datagrams tagged with a flow id
// admitted on a control stream (and on that stream, framed, when too large for a QUIC datagram),
// the inbound flow table (limits, idle expiry, counters), and
// node-level control traffic beside the flows (control streams and control datagrams, handed to
// the node's ControlHandler and ControlDatagram hooks; gossip rides on them).
//
// It must never hand a byte of a flow to a handler before the injected Admitter accepted the flow's
// record, never read a byte of an unadmitted flow past its record, never enable 0-RTT or session
// resumption, never hand a control stream or control datagram to an agent, and never decide
// identity or policy itself: the node injects both.
package tunnel
