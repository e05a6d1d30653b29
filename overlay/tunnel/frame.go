package tunnel

import (
	"fmt"
	"io"

	"github.com/ute-project/ute/overlay/dtl"
)

// A flow stream starts with exactly one dtl record frame from the opener; the receiver answers
// with one accept or reject frame (dtl.WriteFrame/ReadFrame, docs/protocol.md). Payload follows
// only after an accept. Whether a flow is a stream (TCP) or a packet flow (UDP/ICMP over
// datagrams, the stream being its control stream) is decided by the verified record's protocol,
// reported by the Admitter, never by an unsigned byte.

// FlowKind says how a flow's payload travels.
type FlowKind uint8

const (
	// KindStream is a TCP flow carried on the stream itself.
	KindStream FlowKind = 1
	// KindPacket is a UDP/ICMP flow: the stream is its control stream, payload goes as datagrams.
	KindPacket FlowKind = 2
)

func (k FlowKind) String() string {
	switch k {
	case KindStream:
		return "stream"
	case KindPacket:
		return "packet"
	default:
		return fmt.Sprintf("kind(%d)", uint8(k))
	}
}

// readFlowOpen reads the opener's record frame and nothing past it.
func readFlowOpen(r io.Reader, maxRecord int) ([]byte, error) {
	open, err := readStreamOpen(r, maxRecord)
	if err != nil {
		return nil, err
	}
	if open.control {
		return nil, fmt.Errorf("%w: first frame is control, want record", ErrFrame)
	}
	return open.record, nil
}

// readVerdict reads the receiver's answer to a record frame.
func readVerdict(r io.Reader) error {
	typ, body, err := dtl.ReadFrame(r, dtl.MaxFrameBody)
	if err != nil {
		return fmt.Errorf("%w: verdict: %w", ErrFrame, err)
	}
	switch typ {
	case dtl.FrameAccept:
		return nil
	case dtl.FrameReject:
		rej, err := dtl.DecodeReject(body)
		if err != nil {
			return fmt.Errorf("%w: reject frame: %w", ErrFrame, err)
		}
		return &RejectedError{Reason: rej.Code.String(), Code: rej.Code, Message: sanitize(rej.Message)}
	default:
		return fmt.Errorf("%w: verdict frame is %s", ErrFrame, typ)
	}
}

// sanitize keeps a peer-supplied message printable so it is safe to log.
func sanitize(s string) string {
	out := []rune(s)
	for i, c := range out {
		if c < 0x20 || c == 0x7f {
			out[i] = '?'
		}
	}
	return string(out)
}
