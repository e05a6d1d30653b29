package wireguard

import (
	"encoding/binary"
	"fmt"
	"net/netip"
)

// IP protocol numbers the filter carries.
const (
	ProtoTCP uint8 = 6
	ProtoUDP uint8 = 17
)

// Tuple is the 5-tuple of a TCP or UDP packet, as it appears in the packet.
type Tuple struct {
	Src, Dst         netip.Addr
	SrcPort, DstPort uint16
	Proto            uint8
}

// Reverse is the tuple of the packets flowing the other way.
func (t Tuple) Reverse() Tuple {
	return Tuple{Src: t.Dst, Dst: t.Src, SrcPort: t.DstPort, DstPort: t.SrcPort, Proto: t.Proto}
}

func (t Tuple) String() string {
	p := "tcp"
	if t.Proto == ProtoUDP {
		p = "udp"
	}
	return fmt.Sprintf("%s %s -> %s", p, netip.AddrPortFrom(t.Src, t.SrcPort), netip.AddrPortFrom(t.Dst, t.DstPort))
}

// Source and Destination are the tuple's ends.
func (t Tuple) Source() netip.AddrPort      { return netip.AddrPortFrom(t.Src, t.SrcPort) }
func (t Tuple) Destination() netip.AddrPort { return netip.AddrPortFrom(t.Dst, t.DstPort) }

// ParseTuple reads the 5-tuple of an IPv4 or IPv6 packet carrying TCP or UDP. It reports false
// for anything else: other protocols, IPv6 extension headers, IPv4 fragments after the first
// (no ports), and truncated headers. It does not allocate.
func ParseTuple(p []byte) (Tuple, bool) {
	if len(p) < 1 {
		return Tuple{}, false
	}
	var t Tuple
	var l4 []byte
	switch p[0] >> 4 {
	case 4:
		if len(p) < 20 {
			return Tuple{}, false
		}
		ihl := int(p[0]&0x0f) * 4
		if ihl < 20 || len(p) < ihl {
			return Tuple{}, false
		}
		// A non-first fragment carries no ports: it cannot be matched to a flow.
		if binary.BigEndian.Uint16(p[6:8])&0x1fff != 0 {
			return Tuple{}, false
		}
		t.Proto = p[9]
		t.Src = netip.AddrFrom4([4]byte(p[12:16]))
		t.Dst = netip.AddrFrom4([4]byte(p[16:20]))
		l4 = p[ihl:]
	case 6:
		if len(p) < 40 {
			return Tuple{}, false
		}
		t.Proto = p[6]
		t.Src = netip.AddrFrom16([16]byte(p[8:24]))
		t.Dst = netip.AddrFrom16([16]byte(p[24:40]))
		l4 = p[40:]
	default:
		return Tuple{}, false
	}
	if t.Proto != ProtoTCP && t.Proto != ProtoUDP {
		return Tuple{}, false
	}
	if len(l4) < 4 {
		return Tuple{}, false
	}
	t.SrcPort = binary.BigEndian.Uint16(l4[0:2])
	t.DstPort = binary.BigEndian.Uint16(l4[2:4])
	return t, true
}

// key is a Tuple as the filter's maps hold it: fixed-size arrays only, so that hashing it is one
// pass over its bytes (netip.Addr carries a pointer, which makes map hashing field by field).
type key struct {
	src, dst     [16]byte // IPv4 as IPv4-mapped IPv6
	sport, dport uint16
	proto        uint8
}

func keyOf(t Tuple) key {
	return key{src: t.Src.As16(), dst: t.Dst.As16(), sport: t.SrcPort, dport: t.DstPort, proto: t.Proto}
}

func (k key) reverse() key {
	return key{src: k.dst, dst: k.src, sport: k.dport, dport: k.sport, proto: k.proto}
}

// parseKey is ParseTuple straight into a key, for the per-packet path.
func parseKey(p []byte) (key, bool) {
	if len(p) < 1 {
		return key{}, false
	}
	var k key
	var l4 []byte
	switch p[0] >> 4 {
	case 4:
		if len(p) < 20 {
			return key{}, false
		}
		ihl := int(p[0]&0x0f) * 4
		if ihl < 20 || len(p) < ihl || binary.BigEndian.Uint16(p[6:8])&0x1fff != 0 {
			return key{}, false
		}
		k.proto = p[9]
		k.src[10], k.src[11], k.dst[10], k.dst[11] = 0xff, 0xff, 0xff, 0xff
		copy(k.src[12:], p[12:16])
		copy(k.dst[12:], p[16:20])
		l4 = p[ihl:]
	case 6:
		if len(p) < 40 {
			return key{}, false
		}
		k.proto = p[6]
		copy(k.src[:], p[8:24])
		copy(k.dst[:], p[24:40])
		l4 = p[40:]
	default:
		return key{}, false
	}
	if (k.proto != ProtoTCP && k.proto != ProtoUDP) || len(l4) < 4 {
		return key{}, false
	}
	k.sport = binary.BigEndian.Uint16(l4[0:2])
	k.dport = binary.BigEndian.Uint16(l4[2:4])
	return k, true
}
