package dtl

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"unicode/utf8"

	"github.com/quic-go/quic-go/quicvarint"
)

// FrameType is the first byte of a stream frame.
type FrameType uint8

// Stream frame types (docs/protocol.md, "Stream frames").
const (
	// FrameRecord carries a DTL record; it is the first frame the dialing node sends on a flow stream.
	FrameRecord FrameType = 1
	// FrameAccept admits the flow; its body is empty. Payload follows only after it.
	FrameAccept FrameType = 2
	// FrameReject refuses the flow; its body is the CBOR reject map. The stream is closed after it.
	FrameReject FrameType = 3
	// FrameControl opens a node-level control stream instead of a flow; its body is exactly one
	// byte, the control channel. It carries no DTL record: the tunnel's mutual TLS authenticates
	// the peer node, and such a stream never reaches an agent.
	FrameControl FrameType = 4
)

func (t FrameType) String() string {
	switch t {
	case FrameRecord:
		return "record"
	case FrameAccept:
		return "accept"
	case FrameReject:
		return "reject"
	case FrameControl:
		return "control"
	}
	return fmt.Sprintf("frame(%d)", uint8(t))
}

// Frame layout: [type u8][length u16 big-endian][body]. A fixed header keeps the reader to two
// exact reads and makes the largest possible frame (64 KiB) bounded before any cap applies.
const (
	FrameHeaderLen = 3
	MaxFrameBody   = 0xffff
)

// WriteFrame writes one frame in a single Write call, so a frame is never interleaved with payload.
func WriteFrame(w io.Writer, t FrameType, body []byte) error {
	if !t.known() {
		return fmt.Errorf("%w: %d", ErrFrameType, t)
	}
	if len(body) > MaxFrameBody {
		return fmt.Errorf("%w: frame body is %d bytes, limit %d", ErrTooLarge, len(body), MaxFrameBody)
	}
	buf := make([]byte, FrameHeaderLen+len(body))
	buf[0] = byte(t)
	binary.BigEndian.PutUint16(buf[1:3], uint16(len(body)))
	copy(buf[3:], body)
	if _, err := w.Write(buf); err != nil {
		return fmt.Errorf("dtl: write %s frame: %w", t, err)
	}
	return nil
}

func (t FrameType) known() bool { return t >= FrameRecord && t <= FrameControl }

// ReadFrame reads exactly one frame and nothing past it. Bodies longer than max are refused before
// they are read (ErrTooLarge); an unknown type is ErrFrameType; a stream that ends inside a frame is
// ErrTruncated; a stream that ends cleanly before a frame returns io.EOF.
func ReadFrame(r io.Reader, max int) (FrameType, []byte, error) {
	var hdr [FrameHeaderLen]byte
	if n, err := io.ReadFull(r, hdr[:]); err != nil {
		if errors.Is(err, io.EOF) && n == 0 {
			return 0, nil, io.EOF
		}
		if errors.Is(err, io.ErrUnexpectedEOF) {
			return 0, nil, fmt.Errorf("%w: frame header cut after %d of %d bytes", ErrTruncated, n, FrameHeaderLen)
		}
		return 0, nil, fmt.Errorf("dtl: read frame header: %w", err)
	}
	t := FrameType(hdr[0])
	if !t.known() {
		return 0, nil, fmt.Errorf("%w: 0x%02x is not record, accept, reject or control", ErrFrameType, hdr[0])
	}
	n := int(binary.BigEndian.Uint16(hdr[1:3]))
	if n > max {
		return 0, nil, fmt.Errorf("%w: %s frame declares %d bytes, limit %d", ErrTooLarge, t, n, max)
	}
	if t == FrameControl && n != 1 {
		// Refused before the body is read, so a control frame never consumes more than 4 bytes.
		return 0, nil, fmt.Errorf("%w: control frame must have a 1-byte body, declares %d bytes", ErrMalformed, n)
	}
	body := make([]byte, n)
	if got, err := io.ReadFull(r, body); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return 0, nil, fmt.Errorf("%w: %s frame body cut after %d of %d bytes", ErrTruncated, t, got, n)
		}
		return 0, nil, fmt.Errorf("dtl: read %s frame body: %w", t, err)
	}
	if t == FrameAccept && n != 0 {
		return 0, nil, fmt.Errorf("%w: accept frame must have an empty body, has %d bytes", ErrMalformed, n)
	}
	return t, body, nil
}

// MaxRejectMessage bounds the human-readable text in a reject frame.
const MaxRejectMessage = 256

// wireReject is the reject frame body: {1: reason code, 2: message}.
type wireReject struct {
	Code    *uint64 `cbor:"1,keyasint,omitempty"`
	Message string  `cbor:"2,keyasint,omitempty"`
}

// EncodeReject builds a reject frame body. Messages are truncated to MaxRejectMessage bytes (on a
// rune boundary) rather than refused, since a refusal must always be sendable.
func EncodeReject(code ReasonCode, msg string) ([]byte, error) {
	if len(msg) > MaxRejectMessage {
		msg = msg[:MaxRejectMessage]
		for !utf8.ValidString(msg) {
			msg = msg[:len(msg)-1]
		}
	}
	b, err := encMode.Marshal(wireReject{Code: u64(uint64(code)), Message: msg})
	if err != nil {
		return nil, fmt.Errorf("dtl: encode reject: %w", err)
	}
	return b, nil
}

// DecodeReject parses a reject frame body strictly. Unknown reason codes are kept (as ReasonUnknown
// would lose information) and surface through ReasonCode.String as "code(N)".
func DecodeReject(b []byte) (*RejectError, error) {
	var w wireReject
	if err := decMode.Unmarshal(b, &w); err != nil {
		return nil, classifyCBOR("reject", err)
	}
	if w.Code == nil {
		return nil, fmt.Errorf("%w: reject reason code (key 1)", ErrMissingClaim)
	}
	if *w.Code > 0xff {
		return nil, fmt.Errorf("%w: reject reason code %d out of range", ErrMalformed, *w.Code)
	}
	if len(w.Message) > MaxRejectMessage {
		return nil, fmt.Errorf("%w: reject message is %d bytes, limit %d", ErrTooLarge, len(w.Message), MaxRejectMessage)
	}
	return &RejectError{Code: ReasonCode(*w.Code), Message: w.Message}, nil
}

// RejectError is what the dialing side gets when the remote node refused its flow. It matches
// ErrRejected and the sentinel of its reason (errors.Is(err, ErrReplay) etc.).
type RejectError struct {
	Code    ReasonCode
	Message string
}

func (e *RejectError) Error() string {
	return fmt.Sprintf("dtl: flow rejected by peer (%s): %s", e.Code, e.Message)
}

// Is lets callers match the remote reason with this package's sentinels.
func (e *RejectError) Is(target error) bool {
	if target == ErrRejected {
		return true
	}
	s := e.Code.Sentinel()
	return s != nil && target == s
}

// Datagram flow header: a QUIC datagram on a tunnel is [flow id as a QUIC variable-length integer
// (RFC 9000 §16)][packet]. The flow id is the one a DTL record admitted on a stream first.
const maxVarint = 1<<62 - 1

// AppendDatagramHeader appends the flow-id header to b. The encoding is quic-go's quicvarint (the
// library QUIC itself uses); only the range check is ours, because quicvarint panics past 2^62-1.
func AppendDatagramHeader(b []byte, flowID uint64) ([]byte, error) {
	if flowID > maxVarint {
		return nil, fmt.Errorf("%w: flow id %d does not fit a QUIC varint (max 2^62-1)", ErrMalformed, flowID)
	}
	return quicvarint.Append(b, flowID), nil
}

// ParseDatagram splits a datagram into its flow id and packet. Non-minimal varints are refused so a
// flow id has one encoding.
func ParseDatagram(b []byte) (flowID uint64, packet []byte, err error) {
	if len(b) == 0 {
		return 0, nil, fmt.Errorf("%w: empty datagram", ErrTruncated)
	}
	v, n, err := quicvarint.Parse(b)
	if err != nil {
		return 0, nil, fmt.Errorf("%w: datagram flow id needs %d bytes, have %d", ErrTruncated, 1<<(b[0]>>6), len(b))
	}
	if quicvarint.Len(v) != n {
		return 0, nil, fmt.Errorf("%w: datagram flow id %d is not minimally encoded", ErrMalformed, v)
	}
	return v, b[n:], nil
}
