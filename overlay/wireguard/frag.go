package wireguard

import (
	"encoding/binary"
	"net/netip"
	"sync"
	"time"
)

// Fragments of UDP datagrams, IPv4 and IPv6. A datagram larger than the interface's MTU leaves
// the kernel as fragments, and only the first carries the UDP ports: the filter would drop the
// others and every large datagram with them (a DNS answer over 1,420 bytes, say). The first
// fragment is decided like any packet of its tuple; the filter then remembers which tuple that
// datagram belongs to, and the later fragments follow the tuple's state: they pass while it is
// admitted, are held with it while it is being admitted, and are dropped otherwise. A datagram
// is named by what the receiving kernel reassembles it by, plus the protocol: for IPv4 its
// source, destination, protocol and 16-bit identification (RFC 791); for IPv6 its source,
// destination, the Fragment header's next header and its 32-bit identification (RFC 8200 §4.5).
//
// Only the shape a kernel gives an ordinary UDP socket's datagram is followed. IPv4: any header
// options, then the UDP header at the start of the first fragment. IPv6: the Fragment header
// straight after the fixed header, and the UDP header straight after it in the first fragment.
// Every other IPv6 fragment is dropped, as are IPv6 packets with any other extension header,
// fragmented or not: a Hop-by-Hop or Destination Options header needs CAP_NET_RAW to set on a
// socket, a Routing header makes the header's destination not the packet's, and walking chains
// of attacker-chosen lengths on every packet buys nothing an agent needs. The first fragment
// must hold the whole UDP header within the length its IP header declares (RFC 7112: the first
// fragment carries the upper-layer header), else it is dropped and its datagram not followed;
// since later fragments start at 8 bytes or more into the datagram, none can overlap a UDP
// header the first one held. An IPv6 atomic fragment (offset 0, no more fragments: RFC 6946) is
// a whole datagram: decided by its tuple, never followed. TCP is not followed (its segments are
// sent with don't-fragment and sized by path MTU discovery): IPv4 fragments of a TCP segment
// after the first are dropped, IPv6 fragments of TCP all are.
//
// A fragment claims its datagram by identification alone, so a process that can write raw IP
// packets with an agent's source address could append to an admitted flow's datagram; such a
// process can already write whole packets of any admitted tuple, which the filter passes by
// tuple just the same.

// fragKey names the fragments of one datagram.
type fragKey struct {
	src, dst [16]byte // IPv4 as IPv4-mapped IPv6, as in key
	id       uint32   // IPv4's 16-bit identification, or IPv6's 32-bit one
	proto    uint8    // IPv4's protocol, or the IPv6 Fragment header's next header
	v6       bool     // the family, so that an IPv4 datagram and an IPv6 one never share a key
}

// fragState is the tuple a datagram's first fragment named, and until when later fragments may
// still follow it (coarse unix nanos).
type fragState struct {
	k     key
	until int64
}

const (
	// fragFollow is how long after the first fragment the others may follow: Linux gives up
	// reassembling after 30 s (ipfrag_time, and ip6frag_time for IPv6).
	fragFollow = 30 * time.Second
	// maxFrags bounds the datagrams followed per direction, IPv4 and IPv6 together; over it,
	// new datagrams are not followed (their later fragments are dropped and counted) until
	// entries expire.
	maxFrags = 4096

	// udpHeaderLen is the upper-layer header a first fragment must hold whole.
	udpHeaderLen = 8
	// ipv6FragmentHeader is the Fragment header's protocol number, and its length.
	ipv6FragmentHeader, ipv6FragmentHeaderLen = 44, 8
)

// fragKind is what a packet is to the fragment follower.
type fragKind uint8

const (
	fragNone  fragKind = iota // not a fragment the filter follows: decided as a whole packet (or not at all)
	fragFirst                 // the first fragment of a UDP datagram: decided by its tuple, its datagram followed
	fragLater                 // a later fragment of a UDP datagram: follows its first, if that was seen
	fragWhole                 // an IPv6 atomic fragment of a UDP datagram: decided by its tuple, not followed
	fragBad                   // a fragment the filter drops: too short a first, or a shape it does not follow
)

// fragmentOf classifies p for the fragment follower. For fragFirst and fragLater, fk names the
// datagram; for fragFirst and fragWhole, k is the datagram's tuple, read from the UDP header the
// fragment holds. It does not allocate.
func fragmentOf(p []byte) (fk fragKey, k key, kind fragKind) {
	if len(p) < 1 {
		return fragKey{}, key{}, fragNone
	}
	switch p[0] >> 4 {
	case 4:
		if len(p) < 20 || p[9] != ProtoUDP {
			return fragKey{}, key{}, fragNone
		}
		fo := binary.BigEndian.Uint16(p[6:8])
		const moreFragments, offsetMask = 0x2000, 0x1fff
		if fo&(moreFragments|offsetMask) == 0 {
			return fragKey{}, key{}, fragNone // a whole datagram
		}
		fk = fragKey{id: uint32(binary.BigEndian.Uint16(p[4:6])), proto: ProtoUDP}
		fk.src[10], fk.src[11], fk.dst[10], fk.dst[11] = 0xff, 0xff, 0xff, 0xff
		copy(fk.src[12:], p[12:16])
		copy(fk.dst[12:], p[16:20])
		if fo&offsetMask != 0 {
			return fk, key{}, fragLater
		}
		ihl := int(p[0]&0x0f) * 4
		end := min(len(p), int(binary.BigEndian.Uint16(p[2:4])))
		if ihl < 20 || end < ihl+udpHeaderLen {
			return fragKey{}, key{}, fragBad
		}
		k = key{src: fk.src, dst: fk.dst, proto: ProtoUDP,
			sport: binary.BigEndian.Uint16(p[ihl:]), dport: binary.BigEndian.Uint16(p[ihl+2:])}
		return fk, k, fragFirst
	case 6:
		if len(p) < 40 || p[6] != ipv6FragmentHeader {
			return fragKey{}, key{}, fragNone
		}
		end := 40 + int(binary.BigEndian.Uint16(p[4:6]))
		if end > len(p) || end < 40+ipv6FragmentHeaderLen || p[40] != ProtoUDP ||
			v4Mapped(p[8:24]) || v4Mapped(p[24:40]) {
			// Truncated, a Fragment header cut short, TCP or another extension header after it,
			// or addresses the filter's keys would confuse with IPv4 ones.
			return fragKey{}, key{}, fragBad
		}
		fk = fragKey{id: binary.BigEndian.Uint32(p[44:48]), proto: ProtoUDP, v6: true}
		copy(fk.src[:], p[8:24])
		copy(fk.dst[:], p[24:40])
		om := binary.BigEndian.Uint16(p[42:44])
		if om>>3 != 0 {
			return fk, key{}, fragLater
		}
		const l4 = 40 + ipv6FragmentHeaderLen
		if end < l4+udpHeaderLen {
			return fragKey{}, key{}, fragBad // RFC 7112: the first fragment holds the whole UDP header
		}
		k = key{src: fk.src, dst: fk.dst, proto: ProtoUDP,
			sport: binary.BigEndian.Uint16(p[l4:]), dport: binary.BigEndian.Uint16(p[l4+2:])}
		if om&1 == 0 {
			return fragKey{}, k, fragWhole
		}
		return fk, k, fragFirst
	}
	return fragKey{}, key{}, fragNone
}

// v4Mapped reports whether the 16-byte address a is IPv4-mapped (::ffff:a.b.c.d).
func v4Mapped(a []byte) bool {
	return [12]byte(a[:12]) == [12]byte{10: 0xff, 11: 0xff}
}

// isFragment reports, cheaply enough for every packet, whether fragmentOf has a verdict on p
// (anything but fragNone): an IPv4 UDP packet with more-fragments or an offset, or an IPv6
// packet whose fixed header is followed by a Fragment header.
func isFragment(p []byte) bool {
	if len(p) < 20 {
		return false
	}
	switch p[0] >> 4 {
	case 4:
		return p[9] == ProtoUDP && binary.BigEndian.Uint16(p[6:8])&0x3fff != 0
	case 6:
		return len(p) >= 40 && p[6] == ipv6FragmentHeader
	}
	return false
}

// classify decides the tuple (k, ok) of a packet isFragment reported. A first fragment also
// returns its datagram (fk, first) for the caller to remember when its tuple may pass; a later
// fragment's tuple is its datagram's in ft (followed), if that is known, else it is dropped like
// any packet without a tuple.
func (ft *fragTable) classify(p []byte, now int64) (k key, ok bool, fk fragKey, first, followed bool) {
	fk, k, kind := fragmentOf(p)
	switch kind {
	case fragNone:
		k, ok = parseKey(p)
		return k, ok, fragKey{}, false, false
	case fragFirst:
		return k, true, fk, true, false
	case fragWhole:
		return k, true, fragKey{}, false, false
	case fragLater:
		k, ok = ft.lookup(fk, now)
		return k, ok, fragKey{}, false, ok
	}
	return key{}, false, fragKey{}, false, false // fragBad
}

// fragTable follows the fragmented datagrams of one direction.
type fragTable struct {
	mu sync.Mutex
	m  map[fragKey]fragState
}

// remember notes that the datagram fk belongs to tuple k, from now until now+fragFollow.
func (ft *fragTable) remember(fk fragKey, k key, now int64) {
	ft.mu.Lock()
	defer ft.mu.Unlock()
	if ft.m == nil {
		ft.m = map[fragKey]fragState{}
	}
	if _, known := ft.m[fk]; !known && len(ft.m) >= maxFrags {
		return
	}
	ft.m[fk] = fragState{k: k, until: now + int64(fragFollow)}
}

// lookup returns the tuple of the datagram fk, if its first fragment was seen lately.
func (ft *fragTable) lookup(fk fragKey, now int64) (key, bool) {
	ft.mu.Lock()
	defer ft.mu.Unlock()
	s, ok := ft.m[fk]
	if !ok || now > s.until {
		return key{}, false
	}
	return s.k, true
}

// sweep forgets the datagrams whose time is over.
func (ft *fragTable) sweep(now int64) {
	ft.mu.Lock()
	defer ft.mu.Unlock()
	for fk, s := range ft.m {
		if now > s.until {
			delete(ft.m, fk)
		}
	}
}

// tupleOf is the Tuple of a key.
func tupleOf(k key) Tuple {
	t := Tuple{SrcPort: k.sport, DstPort: k.dport, Proto: k.proto}
	// Keys hold IPv4 addresses mapped, as Tuple does not.
	t.Src = netip.AddrFrom16(k.src).Unmap()
	t.Dst = netip.AddrFrom16(k.dst).Unmap()
	return t
}
