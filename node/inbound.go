package node

import (
	"fmt"
	"net"
	"net/netip"

	"github.com/ute-project/ute/overlay/dtl"
)

// anyPort is the listenKey port of a catch-all listener. Listen and ListenPacket refuse port 0,
// so it never names a real port.
const anyPort = 0

// ListenAll accepts admitted TCP flows to this agent on every port that no port-specific
// Listen holds: the kernel TUN interface hands each one to the kernel, where the agent's program
// may or may not listen. Each accepted conn's LocalAddr is the agent's overlay IP and the port
// the flow names, and WhoIs returns its provenance. Admission is unchanged; only the "is the
// destination listening" check is answered by this listener.
func (a *Agent) ListenAll() (net.Listener, error) {
	k := listenKey{a.id.Zone, a.id.Name, anyPort}
	l := &listener{n: a.n, key: k, addr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(a.ip, anyPort)),
		ch: make(chan net.Conn, listenBacklog), done: make(chan struct{})}
	a.n.mu.Lock()
	defer a.n.mu.Unlock()
	if a.n.closed {
		return nil, ErrClosed
	}
	if _, dup := a.n.listeners[k]; dup {
		return nil, fmt.Errorf("%w: %s.%s tcp/any", ErrAddrInUse, a.id.Name, a.id.Zone)
	}
	a.n.listeners[k] = l
	return l, nil
}

// ListenPacketAll receives admitted UDP flows to this agent on every port that no
// port-specific ListenPacket holds. ReadFrom and WriteTo work as for ListenPacket;
// WhoIsPacket(pc, addr).Destination.Port is the port a flow was admitted to.
func (a *Agent) ListenPacketAll() (net.PacketConn, error) {
	k := listenKey{a.id.Zone, a.id.Name, anyPort}
	l := &packetListener{n: a.n, key: k, addr: net.UDPAddrFromAddrPort(netip.AddrPortFrom(a.ip, anyPort)),
		in: make(chan datagram, udpQueue), done: make(chan struct{}), flows: map[string]*packetFlow{}, rd: newDeadline()}
	a.n.mu.Lock()
	defer a.n.mu.Unlock()
	if a.n.closed {
		return nil, ErrClosed
	}
	if _, dup := a.n.plisten[k]; dup {
		return nil, fmt.Errorf("%w: %s.%s udp/any", ErrAddrInUse, a.id.Name, a.id.Zone)
	}
	a.n.plisten[k] = l
	return l, nil
}

// streamListenerLocked is the listener for a TCP flow to agent:port: the port's own, else the
// agent's catch-all. n.mu is held.
func (n *Node) streamListenerLocked(zone, agent string, port uint16) *listener {
	if l := n.listeners[listenKey{zone, agent, port}]; l != nil {
		return l
	}
	return n.listeners[listenKey{zone, agent, anyPort}]
}

// packetListenerLocked is streamListenerLocked for UDP. n.mu is held.
func (n *Node) packetListenerLocked(zone, agent string, port uint16) *packetListener {
	if l := n.plisten[listenKey{zone, agent, port}]; l != nil {
		return l
	}
	return n.plisten[listenKey{zone, agent, anyPort}]
}

// listeningLocked answers admission's "does the destination listen" for either protocol.
// n.mu is held.
func (n *Node) listeningLocked(zone, agent string, port uint16, proto dtl.Proto) bool {
	if proto == dtl.ProtoUDP {
		return n.packetListenerLocked(zone, agent, port) != nil
	}
	return n.streamListenerLocked(zone, agent, port) != nil
}
