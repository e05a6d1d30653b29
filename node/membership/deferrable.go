package membership

// memberlist's message types (unexported in memberlist's net.go, stable on its wire since
// protocol version 2): the ones this file tells apart.
const (
	mlSuspect  byte = 3
	mlAlive    byte = 4
	mlDead     byte = 5
	mlCompound byte = 7
	mlHasCRC   byte = 12
	mlHasLabel byte = 244
)

// memberState reports whether a packet memberlist sends is gossip of member state only: one
// suspect, alive or dead message, or a compound of nothing else, as memberlist's gossip round
// sends them (a label and a CRC prefix allowed). A ping, an indirect ping, an ack or a nack,
// alone or with member state piggybacked on it, is not, nor is a record, nor anything it cannot
// read. The gossip transport marks the dial of such a packet deferrable
// (gossip.TransportConfig.Deferrable): memberlist sends each of them to other random members
// too, while a probe that misses its member makes it suspected (docs/simulator.md).
func memberState(b []byte) bool {
	b = message(b)
	if len(b) == 0 {
		return false
	}
	if b[0] != mlCompound {
		return isMemberState(b[0])
	}
	// compound: type, count, count big-endian uint16 lengths, then the parts in order
	if len(b) < 2 {
		return false
	}
	n := int(b[1])
	lens, parts := b[2:], b[2:]
	if n == 0 || len(lens) < 2*n {
		return false
	}
	parts = parts[2*n:]
	for i := range n {
		l := int(lens[2*i])<<8 | int(lens[2*i+1])
		if l == 0 || l > len(parts) || !isMemberState(parts[0]) {
			return false
		}
		parts = parts[l:]
	}
	return true
}

// deferrable is gossip.TransportConfig.Deferrable for the pools: a packet of member state
// (memberState), or a record message of a gossip round (a record's packet: pool.gossipRound,
// and the sends over tunnels, which need no dial). A round's packet that gets no handshake slot
// is not lost: it does not count against the record's retransmissions (recordQueue counts only
// what reached a tunnel), so the record stays queued for the next round, while the flood over
// open tunnels carries it meanwhile. Queued instead, under overload, such dials took the slots
// of probes and waited by the thousand (a 1,000-node spread: 5,500 waiting, 10,500 given up).
func deferrable(b []byte) bool {
	return memberState(b) || (len(b) >= 2 && b[0] == userMsg && b[1] == msgRecord)
}

// message is b without memberlist's label and CRC prefixes: the message itself, from its type
// byte; nil when a label runs past the end.
func message(b []byte) []byte {
	if len(b) >= 2 && b[0] == mlHasLabel {
		n := int(b[1])
		if len(b) < 2+n {
			return nil
		}
		b = b[2+n:]
	}
	if len(b) >= 5 && b[0] == mlHasCRC {
		b = b[5:]
	}
	return b
}

func isMemberState(t byte) bool { return t == mlSuspect || t == mlAlive || t == mlDead }
