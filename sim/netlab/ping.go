package netlab

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"
)

// ErrBadICMP is returned by ParseEchoReply for bytes that are not an ICMP echo reply.
var ErrBadICMP = errors.New("netlab: not an ICMP echo reply")

// echoRequest builds an ICMPv4 echo request with id, seq and payload.
func echoRequest(id, seq uint16, payload []byte) []byte {
	b := make([]byte, 8+len(payload))
	b[0] = 8 // echo request
	binary.BigEndian.PutUint16(b[4:], id)
	binary.BigEndian.PutUint16(b[6:], seq)
	copy(b[8:], payload)
	binary.BigEndian.PutUint16(b[2:], checksum(b))
	return b
}

// ParseEchoReply returns id and seq of an ICMPv4 echo reply (the ICMP message, without the IP
// header, as an "ip4:icmp" socket returns it), or ErrBadICMP.
func ParseEchoReply(b []byte) (id, seq uint16, err error) {
	if len(b) < 8 {
		return 0, 0, fmt.Errorf("%w: %d bytes", ErrBadICMP, len(b))
	}
	if b[0] != 0 || b[1] != 0 {
		return 0, 0, fmt.Errorf("%w: type %d code %d", ErrBadICMP, b[0], b[1])
	}
	if checksum(b) != 0 {
		return 0, 0, fmt.Errorf("%w: bad checksum", ErrBadICMP)
	}
	return binary.BigEndian.Uint16(b[4:]), binary.BigEndian.Uint16(b[6:]), nil
}

// checksum is the Internet checksum (RFC 1071); over a message that carries its checksum it is 0.
func checksum(b []byte) uint16 {
	var s uint32
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	for s>>16 != 0 {
		s = s&0xffff + s>>16
	}
	return ^uint16(s)
}

// ping sends echo requests every 200 ms on pc (an "ip4:icmp" socket) until a matching reply
// arrives or ctx ends.
func ping(ctx context.Context, pc net.PacketConn, dst netip.Addr) (time.Duration, error) {
	var idb [2]byte
	_, _ = rand.Read(idb[:])
	id := binary.BigEndian.Uint16(idb[:])
	to := &net.IPAddr{IP: dst.AsSlice()}
	buf := make([]byte, 1500)
	for seq := uint16(1); ; seq++ {
		if err := ctx.Err(); err != nil {
			return 0, fmt.Errorf("netlab: no echo reply from %s: %w", dst, err)
		}
		start := time.Now()
		if _, err := pc.WriteTo(echoRequest(id, seq, []byte("netlab")), to); err != nil {
			// An unreachable network (a cut link) is an answer too: wait and try again.
			select {
			case <-ctx.Done():
				return 0, fmt.Errorf("netlab: no echo reply from %s: %w (last send: %v)", dst, ctx.Err(), err)
			case <-time.After(200 * time.Millisecond):
			}
			continue
		}
		deadline := start.Add(200 * time.Millisecond)
		if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
			deadline = d
		}
		_ = pc.SetReadDeadline(deadline)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				break // timeout: next request
			}
			rid, rseq, perr := ParseEchoReply(buf[:n])
			if perr == nil && rid == id && rseq == seq && from.String() == dst.String() {
				return time.Since(start), nil
			}
		}
	}
}
