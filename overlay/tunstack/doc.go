// Package tunstack is the carriage of the kernel TUN interface: a gVisor userspace TCP/IP stack
// attached to the interface's packets. Every new TCP connection and UDP flow that a local
// program opens through the interface is terminated in the stack and handed to a Handler, which
// returns the admitted overlay flow (a QUIC stream, or a datagram flow) to splice it to; inbound
// admitted flows are originated by DialFrom from the remote agent's overlay address, so the local
// program sees its true peer.
//
// It owns the stack, its goroutines, the packet filter and the splices. It must never admit,
// sign or attest anything itself (the Handler does, before a byte is carried), never let a packet
// whose source is not one of this node's agent addresses reach the stack (dropped and counted),
// and never originate a connection to an address that is not a local agent's.
package tunstack
