package wireguard

import (
	"encoding/binary"
	"net/netip"
	"sync/atomic"

	"golang.zx2c4.com/wireguard/device"
)

// A cut TCP flow is reset, not starved: when the filter forgets an admitted TCP tuple because it
// was cut (Remove, RemoveMatching), it writes a RST into the kernel device toward the local end,
// so the local program sees ECONNRESET at once instead of hanging until its own timeout. Linux
// (RFC 5961) accepts a RST in a synchronised state only when its sequence number is exactly the
// receiver's RCV.NXT (one merely in the window draws a challenge ACK), and in SYN-SENT only when
// it acknowledges the SYN, so the filter tracks, per admitted TCP tuple, the end of the newest
// segment each side sent. A packet the local side still sends on a tuple cut shortly before is
// answered by a RST built from that packet (sequence = its ACK field: exactly what the local
// side expects), which repairs a tracked value the kernel would not accept.

// TCP header flags.
const (
	tcpFIN = 0x01
	tcpSYN = 0x02
	tcpRST = 0x04
	tcpACK = 0x10
)

// rstHeadroom is the room left in front of an injected packet: the offset wireguard-go writes
// at, which leaves the kernel device room for its virtio-net header.
const rstHeadroom = device.MessageTransportHeaderSize

// tcpSegment reads the sequence fields of a TCP packet whose tuple parses: its sequence number,
// acknowledgement number, flags, and the sequence space it occupies (payload, plus one each for
// SYN and FIN). It reports false for a truncated or inconsistent header.
func tcpSegment(p []byte) (seq, ack uint32, flags uint8, span uint32, ok bool) {
	var l4 []byte
	var l4len int
	switch p[0] >> 4 {
	case 4:
		ihl := int(p[0]&0x0f) * 4
		total := int(binary.BigEndian.Uint16(p[2:4]))
		if total > len(p) || total < ihl {
			return 0, 0, 0, 0, false
		}
		l4, l4len = p[ihl:total], total-ihl
	case 6:
		total := 40 + int(binary.BigEndian.Uint16(p[4:6]))
		if total > len(p) {
			return 0, 0, 0, 0, false
		}
		l4, l4len = p[40:total], total-40
	default:
		return 0, 0, 0, 0, false
	}
	if len(l4) < 20 {
		return 0, 0, 0, 0, false
	}
	doff := int(l4[12]>>4) * 4
	if doff < 20 || doff > l4len {
		return 0, 0, 0, 0, false
	}
	seq = binary.BigEndian.Uint32(l4[4:8])
	ack = binary.BigEndian.Uint32(l4[8:12])
	flags = l4[13]
	span = uint32(l4len - doff)
	if flags&tcpSYN != 0 {
		span++
	}
	if flags&tcpFIN != 0 {
		span++
	}
	return seq, ack, flags, span, true
}

// seqState is one tracked sequence number: the value in the low 32 bits, bit 32 set once known.
type seqState struct{ v atomic.Uint64 }

const seqKnown = 1 << 32

// advance records s if it is newer (in sequence-space order) than the value held. Packets of one
// tuple and direction come from one goroutine (wireguard-go's per-peer receiver, or the filter's
// reader), so a load and a store suffice; a lost race only keeps an older value, which the reset
// of the next packet repairs.
func (q *seqState) advance(s uint32) {
	cur := q.v.Load()
	if cur&seqKnown == 0 || int32(s-uint32(cur)) > 0 {
		q.v.Store(seqKnown | uint64(s))
	}
}

func (q *seqState) get() (uint32, bool) {
	v := q.v.Load()
	return uint32(v), v&seqKnown != 0
}

// tcpTrack is what the filter knows of an admitted TCP tuple's sequence spaces.
type tcpTrack struct {
	localNext  seqState // the end of the newest segment the local side sent (its SND.NXT)
	localAck   seqState // the newest ACK the local side sent
	remoteNext seqState // the end of the newest segment the remote side sent (the local RCV.NXT)
}

// rstToLocal is the RST that ends the local side's connection of a cut tuple, from the remote
// end to the local end, or nil when nothing usable was seen.
func (tr *tcpTrack) rstToLocal(local, remote netip.AddrPort) []byte {
	snd, sndOK := tr.localNext.get()
	rcv, rcvOK := tr.remoteNext.get()
	if !rcvOK {
		rcv, rcvOK = tr.localAck.get()
	}
	switch {
	case rcvOK:
		// Synchronised (or SYN-RECEIVED): the sequence number must be the local RCV.NXT.
		return buildRST(remote, local, rcv, snd, sndOK)
	case sndOK:
		// SYN-SENT: only the local SYN was seen; the RST must acknowledge it.
		return buildRST(remote, local, 0, snd, true)
	}
	return nil
}

// rstReply is the RST answering pkt, a TCP segment the local side sent on a cut tuple (RFC 9293
// §3.10.7.1): with its ACK as our sequence number when it carries one, else acknowledging it. A
// RST is never answered, nor a SYN without ACK (a new connection: the caller admits it).
func rstReply(pkt []byte, t Tuple) []byte {
	seq, ack, flags, span, ok := tcpSegment(pkt)
	if !ok || flags&tcpRST != 0 || flags&(tcpSYN|tcpACK) == tcpSYN {
		return nil
	}
	if flags&tcpACK != 0 {
		return buildRST(t.Destination(), t.Source(), ack, 0, false)
	}
	return buildRST(t.Destination(), t.Source(), 0, seq+span, true)
}

// buildRST returns an IPv4 or IPv6 TCP RST from src to dst with sequence number seq (and the ACK
// flag with ack when withAck), checksummed, preceded by rstHeadroom spare bytes.
func buildRST(src, dst netip.AddrPort, seq, ack uint32, withAck bool) []byte {
	s, d := src.Addr().Unmap(), dst.Addr().Unmap()
	v4 := s.Is4() && d.Is4() // an IPv6 packet may carry an IPv4-mapped address: it stays IPv6
	ipLen := 20
	if !v4 {
		ipLen = 40
	}
	buf := make([]byte, rstHeadroom+ipLen+20)
	p := buf[rstHeadroom:]
	var sum uint32
	if v4 {
		p[0] = 0x45
		binary.BigEndian.PutUint16(p[2:4], uint16(len(p)))
		binary.BigEndian.PutUint16(p[6:8], 0x4000) // don't fragment
		p[8] = 64
		p[9] = ProtoTCP
		sa, da := s.As4(), d.As4()
		copy(p[12:16], sa[:])
		copy(p[16:20], da[:])
		binary.BigEndian.PutUint16(p[10:12], ^fold(sumBytes(0, p[:20])))
		sum = sumBytes(0, p[12:20])
	} else {
		p[0] = 0x60
		binary.BigEndian.PutUint16(p[4:6], 20)
		p[6] = ProtoTCP
		p[7] = 64
		sa, da := s.As16(), d.As16()
		copy(p[8:24], sa[:])
		copy(p[24:40], da[:])
		sum = sumBytes(0, p[8:40])
	}
	sum += uint32(ProtoTCP) + 20 // pseudo-header: protocol and TCP length
	h := p[ipLen:]
	binary.BigEndian.PutUint16(h[0:2], src.Port())
	binary.BigEndian.PutUint16(h[2:4], dst.Port())
	binary.BigEndian.PutUint32(h[4:8], seq)
	h[12] = 5 << 4
	h[13] = tcpRST
	if withAck {
		binary.BigEndian.PutUint32(h[8:12], ack)
		h[13] |= tcpACK
	}
	binary.BigEndian.PutUint16(h[16:18], ^fold(sumBytes(sum, h)))
	return buf
}

// sumBytes adds b to the one's-complement sum as big-endian 16-bit words.
func sumBytes(sum uint32, b []byte) uint32 {
	for len(b) >= 2 {
		sum += uint32(binary.BigEndian.Uint16(b))
		b = b[2:]
	}
	if len(b) == 1 {
		sum += uint32(b[0]) << 8
	}
	return sum
}

func fold(sum uint32) uint16 {
	for sum > 0xffff {
		sum = sum&0xffff + sum>>16
	}
	return uint16(sum)
}
