package wireguard

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/netip"
)

// Control channels of the WireGuard transport on a zone tunnel (docs/protocol.md, "WireGuard
// transport"). The gossip channels are 1 to 3, TrustFlow presence challenges 8.
const (
	// ChannelBinding carries one binding exchange: the opener's hello, then the accepter's.
	ChannelBinding byte = 16
	// ChannelAdmit carries flow admissions: requests from the opener, verdicts back.
	ChannelAdmit byte = 17
	// ChannelCut carries cut notices: the opener tells the accepter it cut these tuples, and
	// the accepter cuts its end of each one it admitted with the opener. Nothing comes back.
	ChannelCut byte = 18
)

// ErrFrame is a malformed hello, admission request or verdict.
var ErrFrame = errors.New("wireguard: malformed control frame")

// MaxRecord bounds the DTL record in an admission request (dtl.MaxRecordSize).
const MaxRecord = 8 << 10

// maxReject bounds a verdict's reject body.
const maxReject = 1024

// WriteHello writes a binding hello; an empty binding says "no WireGuard transport here".
func WriteHello(w io.Writer, binding []byte) error {
	if len(binding) > MaxBindingSize {
		return fmt.Errorf("%w: binding of %d bytes", ErrFrame, len(binding))
	}
	b := make([]byte, 2, 2+len(binding))
	binary.BigEndian.PutUint16(b, uint16(len(binding)))
	_, err := w.Write(append(b, binding...))
	return err
}

// ReadHello reads a binding hello (empty: the peer runs no WireGuard transport).
func ReadHello(r io.Reader) ([]byte, error) {
	var h [2]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return nil, fmt.Errorf("%w: hello: %w", ErrFrame, err)
	}
	n := int(binary.BigEndian.Uint16(h[:]))
	if n > MaxBindingSize {
		return nil, fmt.Errorf("%w: hello of %d bytes, at most %d", ErrFrame, n, MaxBindingSize)
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(r, b); err != nil {
		return nil, fmt.Errorf("%w: hello: %w", ErrFrame, err)
	}
	return b, nil
}

// Request asks the receiving node to admit Tuple on the strength of Record, a DTL record signed
// by the tuple's source agent and bound to the tunnel's session.
type Request struct {
	ID     uint32
	Tuple  Tuple
	Record []byte
}

const requestHeader = 4 + 1 + 16 + 2 + 16 + 2 + 2

// AppendRequest appends r's wire form to b.
func AppendRequest(b []byte, r Request) ([]byte, error) {
	if len(r.Record) == 0 || len(r.Record) > MaxRecord {
		return nil, fmt.Errorf("%w: record of %d bytes", ErrFrame, len(r.Record))
	}
	if r.Tuple.Proto != ProtoTCP && r.Tuple.Proto != ProtoUDP {
		return nil, fmt.Errorf("%w: protocol %d", ErrFrame, r.Tuple.Proto)
	}
	b = binary.BigEndian.AppendUint32(b, r.ID)
	b = append(b, r.Tuple.Proto)
	s, d := r.Tuple.Src.As16(), r.Tuple.Dst.As16()
	b = append(b, s[:]...)
	b = binary.BigEndian.AppendUint16(b, r.Tuple.SrcPort)
	b = append(b, d[:]...)
	b = binary.BigEndian.AppendUint16(b, r.Tuple.DstPort)
	b = binary.BigEndian.AppendUint16(b, uint16(len(r.Record)))
	return append(b, r.Record...), nil
}

// ReadRequest reads one request.
func ReadRequest(r io.Reader) (Request, error) {
	var h [requestHeader]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		if errors.Is(err, io.EOF) {
			return Request{}, io.EOF
		}
		return Request{}, fmt.Errorf("%w: request: %w", ErrFrame, err)
	}
	req, n, err := parseRequestHeader(h[:])
	if err != nil {
		return Request{}, err
	}
	req.Record = make([]byte, n)
	if _, err := io.ReadFull(r, req.Record); err != nil {
		return Request{}, fmt.Errorf("%w: request record: %w", ErrFrame, err)
	}
	return req, nil
}

func parseRequestHeader(h []byte) (Request, int, error) {
	var req Request
	req.ID = binary.BigEndian.Uint32(h[0:4])
	req.Tuple.Proto = h[4]
	if req.Tuple.Proto != ProtoTCP && req.Tuple.Proto != ProtoUDP {
		return Request{}, 0, fmt.Errorf("%w: protocol %d is not tcp (6) or udp (17)", ErrFrame, req.Tuple.Proto)
	}
	req.Tuple.Src = netip.AddrFrom16([16]byte(h[5:21])).Unmap()
	req.Tuple.SrcPort = binary.BigEndian.Uint16(h[21:23])
	req.Tuple.Dst = netip.AddrFrom16([16]byte(h[23:39])).Unmap()
	req.Tuple.DstPort = binary.BigEndian.Uint16(h[39:41])
	n := int(binary.BigEndian.Uint16(h[41:43]))
	if n == 0 || n > MaxRecord {
		return Request{}, 0, fmt.Errorf("%w: record of %d bytes (1..%d)", ErrFrame, n, MaxRecord)
	}
	if req.Tuple.Src.Is4() != req.Tuple.Dst.Is4() {
		return Request{}, 0, fmt.Errorf("%w: mixed address families", ErrFrame)
	}
	return req, n, nil
}

// ParseRequest parses one request from b, which must hold exactly one.
func ParseRequest(b []byte) (Request, error) {
	if len(b) < requestHeader {
		return Request{}, fmt.Errorf("%w: request of %d bytes", ErrFrame, len(b))
	}
	req, n, err := parseRequestHeader(b[:requestHeader])
	if err != nil {
		return Request{}, err
	}
	if len(b) != requestHeader+n {
		return Request{}, fmt.Errorf("%w: request of %d bytes, header says %d", ErrFrame, len(b), requestHeader+n)
	}
	req.Record = append([]byte(nil), b[requestHeader:]...)
	return req, nil
}

// Verdict answers a Request: Reject is empty for an admission, else a DTL reject body
// (dtl.EncodeReject: reason code and message).
type Verdict struct {
	ID     uint32
	Reject []byte
}

// AppendVerdict appends v's wire form to b.
func AppendVerdict(b []byte, v Verdict) ([]byte, error) {
	if len(v.Reject) > maxReject {
		return nil, fmt.Errorf("%w: reject of %d bytes", ErrFrame, len(v.Reject))
	}
	b = binary.BigEndian.AppendUint32(b, v.ID)
	if len(v.Reject) == 0 {
		return append(b, 0, 0, 0), nil
	}
	b = append(b, 1)
	b = binary.BigEndian.AppendUint16(b, uint16(len(v.Reject)))
	return append(b, v.Reject...), nil
}

// ReadVerdict reads one verdict.
func ReadVerdict(r io.Reader) (Verdict, error) {
	var h [7]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		if errors.Is(err, io.EOF) {
			return Verdict{}, io.EOF
		}
		return Verdict{}, fmt.Errorf("%w: verdict: %w", ErrFrame, err)
	}
	v := Verdict{ID: binary.BigEndian.Uint32(h[0:4])}
	n := int(binary.BigEndian.Uint16(h[5:7]))
	switch {
	case h[4] == 0 && n == 0:
		return v, nil
	case h[4] == 1 && n > 0 && n <= maxReject:
	default:
		return Verdict{}, fmt.Errorf("%w: verdict %d with %d reject bytes", ErrFrame, h[4], n)
	}
	v.Reject = make([]byte, n)
	if _, err := io.ReadFull(r, v.Reject); err != nil {
		return Verdict{}, fmt.Errorf("%w: verdict: %w", ErrFrame, err)
	}
	return v, nil
}

// CutNoticeSize is the wire size of one cut notice: protocol, source address and port,
// destination address and port, as the tuple was admitted (source = the agent that opened it).
const CutNoticeSize = 1 + 16 + 2 + 16 + 2

// MaxCutNotices bounds the notices one cut stream carries; the receiver stops reading there.
const MaxCutNotices = 4096

// AppendCut appends the cut notice of t to b.
func AppendCut(b []byte, t Tuple) ([]byte, error) {
	if t.Proto != ProtoTCP && t.Proto != ProtoUDP {
		return nil, fmt.Errorf("%w: protocol %d", ErrFrame, t.Proto)
	}
	if !t.Src.IsValid() || !t.Dst.IsValid() || t.Src.Unmap().Is4() != t.Dst.Unmap().Is4() {
		return nil, fmt.Errorf("%w: addresses %s and %s", ErrFrame, t.Src, t.Dst)
	}
	b = append(b, t.Proto)
	s, d := t.Src.As16(), t.Dst.As16()
	b = append(b, s[:]...)
	b = binary.BigEndian.AppendUint16(b, t.SrcPort)
	b = append(b, d[:]...)
	return binary.BigEndian.AppendUint16(b, t.DstPort), nil
}

// ParseCut parses one cut notice; b must hold exactly one.
func ParseCut(b []byte) (Tuple, error) {
	if len(b) != CutNoticeSize {
		return Tuple{}, fmt.Errorf("%w: cut notice of %d bytes, want %d", ErrFrame, len(b), CutNoticeSize)
	}
	t := Tuple{Proto: b[0]}
	if t.Proto != ProtoTCP && t.Proto != ProtoUDP {
		return Tuple{}, fmt.Errorf("%w: protocol %d is not tcp (6) or udp (17)", ErrFrame, t.Proto)
	}
	t.Src = netip.AddrFrom16([16]byte(b[1:17])).Unmap()
	t.SrcPort = binary.BigEndian.Uint16(b[17:19])
	t.Dst = netip.AddrFrom16([16]byte(b[19:35])).Unmap()
	t.DstPort = binary.BigEndian.Uint16(b[35:37])
	if t.Src.Is4() != t.Dst.Is4() {
		return Tuple{}, fmt.Errorf("%w: mixed address families", ErrFrame)
	}
	return t, nil
}

// ReadCut reads one cut notice; io.EOF at a clean end of the stream.
func ReadCut(r io.Reader) (Tuple, error) {
	var b [CutNoticeSize]byte
	if _, err := io.ReadFull(r, b[:]); err != nil {
		if errors.Is(err, io.EOF) {
			return Tuple{}, io.EOF
		}
		return Tuple{}, fmt.Errorf("%w: cut notice: %w", ErrFrame, err)
	}
	return ParseCut(b[:])
}
