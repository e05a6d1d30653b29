package tunnel

import (
	"errors"
	"fmt"
	"io"

	"github.com/quic-go/quic-go/quicvarint"
)

// A packet flow's datagram that does not fit in one QUIC datagram travels on the flow's control
// stream instead, as one packet frame (docs/protocol.md section 2):
//
//	[length: QUIC varint, minimal encoding, <= MaxPacketPayload][payload: length bytes]
//
// Frames follow the verdict back to back, in both directions, for the life of the flow.

// MaxPacketPayload is the largest datagram a packet flow carries: the largest UDP payload IPv6
// allows without jumbograms is 65,527 bytes and IPv4's is 65,507, so 65,535 (the IP length
// field's range) bounds every real UDP datagram. A frame claiming more ends the flow.
const MaxPacketPayload = 0xffff

// maxQUICDatagram is the largest UDP packet quic-go ever sends (its MaxPacketBufferSize, even
// after path-MTU discovery): a payload longer than this never fits in a QUIC datagram, so Send
// takes the stream at once instead of building a datagram quic-go would refuse.
const maxQUICDatagram = 1452

// appendPacketFrame appends payload's packet frame to b. The payload must be at most
// MaxPacketPayload bytes (Send checks).
func appendPacketFrame(b, payload []byte) []byte {
	b = quicvarint.Append(b, uint64(len(payload)))
	return append(b, payload...)
}

// readPacketFrame reads one packet frame from r and returns its payload. It returns io.EOF when
// r ends cleanly before a frame starts; a frame cut short is ErrFrame, a non-minimal length is
// ErrFrame and a length over limit is ErrFrameTooLarge, refused after reading at most the 8
// length bytes and before any payload buffer is allocated. It never reads past its frame, and
// never allocates a buffer larger than the frame's length.
func readPacketFrame(r io.Reader, limit int) ([]byte, error) {
	var hdr [8]byte
	if _, err := io.ReadFull(r, hdr[:1]); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, io.EOF
		}
		return nil, err
	}
	n := 1 << (hdr[0] >> 6)
	if n > 1 {
		if _, err := io.ReadFull(r, hdr[1:n]); err != nil {
			return nil, frameCut(err, "packet frame length")
		}
	}
	v, _, err := quicvarint.Parse(hdr[:n])
	if err != nil {
		// Unreachable: hdr holds exactly the n bytes the first byte announces.
		return nil, fmt.Errorf("%w: packet frame length: %w", ErrFrame, err)
	}
	if quicvarint.Len(v) != n {
		return nil, fmt.Errorf("%w: packet frame length %d is not minimally encoded", ErrFrame, v)
	}
	if v > uint64(limit) {
		return nil, fmt.Errorf("%w: packet frame claims %d bytes, limit %d", ErrFrameTooLarge, v, limit)
	}
	return readPayload(r, int(v))
}

// firstChunk is the buffer a frame's payload starts in.
const firstChunk = 4 << 10

// readPayload reads exactly n bytes into a buffer that grows (doubling, never past n) as they
// arrive: a peer that claims 64 KiB and sends four bytes makes the node hold 4 KiB, not 64, per
// flow. Every buffer is at most n bytes, and all of them together less than 2n + firstChunk.
func readPayload(r io.Reader, n int) ([]byte, error) {
	b := make([]byte, 0, min(n, firstChunk))
	for len(b) < n {
		if len(b) == cap(b) {
			b = append(make([]byte, 0, min(2*cap(b), n)), b...)
		}
		k, err := r.Read(b[len(b):min(cap(b), n)])
		b = b[:len(b)+k]
		if err != nil && len(b) < n {
			return nil, frameCut(err, "packet frame payload")
		}
	}
	return b, nil
}

// frameCut names a stream that ended inside a frame as a malformed frame; other read errors
// (a reset, the connection's end) pass through.
func frameCut(err error, what string) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("%w: %s cut short", ErrFrame, what)
	}
	return err
}
