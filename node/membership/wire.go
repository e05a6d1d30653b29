package membership

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// Wire formats (docs/protocol.md, "Control streams and gossip"):
//
//	gossip message  = [kind u8 = 1][record]                    one memberlist user message
//	push/pull state = [version u8 = 1][count u32 BE]([len u32 BE][record])*count
//	record push     = ([len u32 BE][record])* until end of stream   (control channel 3)

// ErrMalformed means gossip bytes (a message, a push/pull state, a record push) did not parse.
var ErrMalformed = errors.New("membership: malformed gossip")

const (
	msgRecord    byte = 1
	stateVersion byte = 1
)

// encodeMessage builds the gossip message carrying raw.
func encodeMessage(raw []byte) []byte {
	return append([]byte{msgRecord}, raw...)
}

// parseMessage returns the record a gossip message carries. The result aliases b.
func parseMessage(b []byte, maxRecord int) ([]byte, error) {
	if len(b) < 2 {
		return nil, fmt.Errorf("%w: message of %d bytes", ErrMalformed, len(b))
	}
	if b[0] != msgRecord {
		return nil, fmt.Errorf("%w: message kind %d", ErrMalformed, b[0])
	}
	if len(b)-1 > maxRecord {
		return nil, fmt.Errorf("%w: record of %d bytes, limit %d", ErrMalformed, len(b)-1, maxRecord)
	}
	return b[1:], nil
}

// encodeState packs records into at most maxBytes, starting at index start and wrapping, so
// that successive push/pulls of a set larger than the cap carry different parts of it. It
// returns the state and how many records did not fit.
func encodeState(records [][]byte, start, maxBytes int) ([]byte, int) {
	out := make([]byte, 5, 5+min(maxBytes, 64<<10))
	out[0] = stateVersion
	n, skipped := 0, 0
	for i := range records {
		r := records[(start+i)%len(records)]
		if len(out)+4+len(r) > maxBytes {
			skipped++
			continue
		}
		out = binary.BigEndian.AppendUint32(out, uint32(len(r)))
		out = append(out, r...)
		n++
	}
	binary.BigEndian.PutUint32(out[1:5], uint32(n))
	return out, skipped
}

// parseState unpacks a push/pull state. Records alias b.
func parseState(b []byte, maxBytes, maxRecord int) ([][]byte, error) {
	if len(b) > maxBytes {
		return nil, fmt.Errorf("%w: state of %d bytes, limit %d", ErrMalformed, len(b), maxBytes)
	}
	if len(b) < 5 {
		return nil, fmt.Errorf("%w: state of %d bytes", ErrMalformed, len(b))
	}
	if b[0] != stateVersion {
		return nil, fmt.Errorf("%w: state version %d", ErrMalformed, b[0])
	}
	count := binary.BigEndian.Uint32(b[1:5])
	rest := b[5:]
	if uint64(count)*4 > uint64(len(rest)) {
		return nil, fmt.Errorf("%w: state claims %d records in %d bytes", ErrMalformed, count, len(rest))
	}
	out := make([][]byte, 0, count)
	for i := range count {
		if len(rest) < 4 {
			return nil, fmt.Errorf("%w: state record %d: length cut", ErrMalformed, i)
		}
		n := binary.BigEndian.Uint32(rest)
		rest = rest[4:]
		if n == 0 || int64(n) > int64(maxRecord) || int64(n) > int64(len(rest)) {
			return nil, fmt.Errorf("%w: state record %d: length %d (limit %d, %d bytes left)", ErrMalformed, i, n, maxRecord, len(rest))
		}
		out = append(out, rest[:n:n])
		rest = rest[n:]
	}
	if len(rest) != 0 {
		return nil, fmt.Errorf("%w: %d bytes after the last state record", ErrMalformed, len(rest))
	}
	return out, nil
}

// writePushRecord writes one record of a record push.
func writePushRecord(w io.Writer, raw []byte) error {
	b := binary.BigEndian.AppendUint32(make([]byte, 0, 4+len(raw)), uint32(len(raw)))
	_, err := w.Write(append(b, raw...))
	return err
}

// readPushRecord reads the next record of a record push; io.EOF at a clean end.
func readPushRecord(r io.Reader, maxRecord int) ([]byte, error) {
	var hdr [4]byte
	if n, err := io.ReadFull(r, hdr[:]); err != nil {
		if errors.Is(err, io.EOF) && n == 0 {
			return nil, io.EOF
		}
		return nil, fmt.Errorf("%w: record push length: %w", ErrMalformed, err)
	}
	n := binary.BigEndian.Uint32(hdr[:])
	if n == 0 || int64(n) > int64(maxRecord) {
		return nil, fmt.Errorf("%w: pushed record of %d bytes, limit %d", ErrMalformed, n, maxRecord)
	}
	raw := make([]byte, n)
	if _, err := io.ReadFull(r, raw); err != nil {
		return nil, fmt.Errorf("%w: pushed record cut: %w", ErrMalformed, err)
	}
	return raw, nil
}
