package wireguard

import (
	"encoding/binary"
	"net/netip"
	"sync"
	"time"
)

// IPv4 fragments of UDP datagrams. A datagram larger than the interface's MTU leaves the kernel
// as fragments, and only the first carries the UDP ports: the filter would drop the others and
// every large datagram with them (a DNS answer over 1,420 bytes, say). The first fragment is
// decided like any packet of its tuple; the filter then remembers which tuple that datagram (its
// source, destination, protocol and IP identification: what RFC 791 reassembles by) belongs to,
// and the later fragments follow the tuple's state: they pass while it is admitted, are held with
// it while it is being admitted, and are dropped otherwise. TCP is not followed (its segments
// are sent with don't-fragment), nor IPv6, whose fragments the filter still drops (an extension
// header).
//
// A fragment claims its datagram by IP identification alone, so a process that can write raw IP
// packets with an agent's source address could append to an admitted flow's datagram; such a
// process can already write whole packets of any admitted tuple, which the filter passes by
// tuple just the same.

// fragKey names the fragments of one IPv4 datagram.
type fragKey struct {
	src, dst [4]byte
	id       uint16
	proto    uint8
}

// fragState is the tuple a datagram's first fragment named, and until when later fragments may
// still follow it (coarse unix nanos).
type fragState struct {
	k     key
	until int64
}

const (
	// fragFollow is how long after the first fragment the others may follow: Linux gives up
	// reassembling after 30 s (ipfrag_time).
	fragFollow = 30 * time.Second
	// maxFrags bounds the datagrams followed per direction; over it, new datagrams are not
	// followed (their later fragments are dropped and counted) until entries expire.
	maxFrags = 4096
)

// fragTable follows the fragmented datagrams of one direction.
type fragTable struct {
	mu sync.Mutex
	m  map[fragKey]fragState
}

// ipv4Fragment reports whether p is an IPv4 fragment of a UDP datagram, whether it is the first
// (offset 0: it carries the ports), and the datagram it belongs to.
func ipv4Fragment(p []byte) (fk fragKey, first, ok bool) {
	if len(p) < 20 || p[0]>>4 != 4 || p[9] != ProtoUDP {
		return fragKey{}, false, false
	}
	fo := binary.BigEndian.Uint16(p[6:8])
	const moreFragments, offsetMask = 0x2000, 0x1fff
	if fo&(moreFragments|offsetMask) == 0 {
		return fragKey{}, false, false // a whole datagram
	}
	fk = fragKey{id: binary.BigEndian.Uint16(p[4:6]), proto: p[9]}
	copy(fk.src[:], p[12:16])
	copy(fk.dst[:], p[16:20])
	return fk, fo&offsetMask == 0, true
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
