package dtl

import (
	"encoding/binary"
	"fmt"
)

// The record's CBOR is encoded and decoded by hand rather than through reflection: docs/protocol.md
// §3–4 fix its shapes completely, so a decoder that accepts exactly those shapes, in deterministic
// encoding only, is both stricter and cheaper. Measured on the admission path (BenchmarkParseVerify,
// docs/benchmarks.md): the reflection codec plus the re-encoding that checked determinism cost about
// 59 allocations and a tenth of the CPU of every admitted flow. The reflection codec stays the
// oracle of the tests (reference_test.go), which must agree with this one byte for byte.

// CBOR major types (RFC 8949 §3.1).
const (
	majorUint   = 0
	majorNeg    = 1
	majorBytes  = 2
	majorText   = 3
	majorArray  = 4
	majorMap    = 5
	majorTag    = 6
	majorSimple = 7
)

var majorNames = [8]string{"unsigned integer", "negative integer", "byte string", "text string", "array", "map", "tag", "simple value or float"}

// appendHead appends a data item head in its shortest form, as deterministic encoding requires.
func appendHead(b []byte, major byte, n uint64) []byte {
	m := major << 5
	switch {
	case n < 24:
		return append(b, m|byte(n))
	case n <= 0xff:
		return append(b, m|24, byte(n))
	case n <= 0xffff:
		return append(b, m|25, byte(n>>8), byte(n))
	case n <= 0xffffffff:
		return binary.BigEndian.AppendUint32(append(b, m|26), uint32(n))
	}
	return binary.BigEndian.AppendUint64(append(b, m|27), n)
}

// headLen is the length of the head appendHead writes for n.
func headLen(n uint64) int {
	switch {
	case n < 24:
		return 1
	case n <= 0xff:
		return 2
	case n <= 0xffff:
		return 3
	case n <= 0xffffffff:
		return 5
	}
	return 9
}

func appendBytes(b []byte, v []byte) []byte {
	return append(appendHead(b, majorBytes, uint64(len(v))), v...)
}

func appendText(b []byte, s string) []byte {
	return append(appendHead(b, majorText, uint64(len(s))), s...)
}

// minArg is the smallest argument each of the additional-information values 24..27 may carry in
// deterministic encoding; anything smaller had a shorter form.
var minArg = [4]uint64{24, 1 << 8, 1 << 16, 1 << 32}

// reader walks one CBOR item sequence, accepting only definite lengths in their shortest form and
// no tags, floats or simple values: no claim of this profile has any use for them.
type reader struct {
	b []byte
	i int
}

func (r *reader) done() bool { return r.i == len(r.b) }

// head reads the next data item head. what names the item in errors.
func (r *reader) head(what string) (major byte, arg uint64, err error) {
	if r.i >= len(r.b) {
		return 0, 0, fmt.Errorf("%w: %s: unexpected end of data", ErrMalformed, what)
	}
	ib := r.b[r.i]
	r.i++
	major, ai := ib>>5, ib&0x1f
	switch {
	case major == majorTag:
		return 0, 0, fmt.Errorf("%w: %s: CBOR tags are not allowed", ErrMalformed, what)
	case major == majorSimple:
		return 0, 0, fmt.Errorf("%w: %s: floats and simple values are not allowed", ErrMalformed, what)
	case ai < 24:
		return major, uint64(ai), nil
	case ai == 31:
		return 0, 0, fmt.Errorf("%w in %s: indefinite-length %s", ErrIndefinite, what, majorNames[major])
	case ai > 27:
		return 0, 0, fmt.Errorf("%w: %s: reserved additional information %d", ErrMalformed, what, ai)
	}
	n := 1 << (ai - 24)
	if len(r.b)-r.i < n {
		return 0, 0, fmt.Errorf("%w: %s: unexpected end of data", ErrMalformed, what)
	}
	switch n {
	case 1:
		arg = uint64(r.b[r.i])
	case 2:
		arg = uint64(binary.BigEndian.Uint16(r.b[r.i:]))
	case 4:
		arg = uint64(binary.BigEndian.Uint32(r.b[r.i:]))
	default:
		arg = binary.BigEndian.Uint64(r.b[r.i:])
	}
	r.i += n
	if arg < minArg[ai-24] {
		return 0, 0, fmt.Errorf("%w: %s: not in deterministic CBOR encoding (integer or length not in its shortest form)", ErrMalformed, what)
	}
	return major, arg, nil
}

// expect reads a head and requires its major type.
func (r *reader) expect(what string, major byte) (uint64, error) {
	m, arg, err := r.head(what)
	if err != nil {
		return 0, err
	}
	if m != major {
		return 0, fmt.Errorf("%w: %s is a CBOR %s, want %s", ErrMalformed, what, majorNames[m], majorNames[major])
	}
	return arg, nil
}

func (r *reader) uint(what string) (uint64, error) { return r.expect(what, majorUint) }

// str reads a byte or text string (major) and returns its offsets in r.b; the content is not
// copied.
func (r *reader) str(what string, major byte) (start, end int, err error) {
	n, err := r.expect(what, major)
	if err != nil {
		return 0, 0, err
	}
	if n > uint64(len(r.b)-r.i) {
		return 0, 0, fmt.Errorf("%w: %s: %d bytes declared, %d left", ErrMalformed, what, n, len(r.b)-r.i)
	}
	start = r.i
	r.i += int(n)
	return start, r.i, nil
}

func (r *reader) bytes(what string) ([]byte, error) {
	s, e, err := r.str(what, majorBytes)
	if err != nil {
		return nil, err
	}
	return r.b[s:e:e], nil
}

// count reads an array or map head; a count that cannot fit the remaining bytes (every element
// takes at least one) is refused before any loop runs over it.
func (r *reader) count(what string, major byte) (int, error) {
	n, err := r.expect(what, major)
	if err != nil {
		return 0, err
	}
	per := uint64(1)
	if major == majorMap {
		per = 2
	}
	if n > uint64(len(r.b)-r.i)/per {
		return 0, fmt.Errorf("%w: %s: %d entries declared, data is shorter", ErrMalformed, what, n)
	}
	return int(n), nil
}

// key reads a key (named what in errors) of a map whose defined keys are 1..max: unknown keys (any other integer, or
// any other type) are ErrUnknownClaim, a repeated key ErrDuplicateKey, and keys out of ascending
// order are not the deterministic encoding. seen and last carry the state between calls.
func (r *reader) key(what string, max uint64, seen *uint32, last *uint64) (uint64, error) {
	m, k, err := r.head(what)
	if err != nil {
		return 0, err
	}
	if m != majorUint || k == 0 || k > max {
		return 0, fmt.Errorf("%w: %s %s", ErrUnknownClaim, what, keyString(m, k))
	}
	if *seen&(1<<k) != 0 {
		return 0, fmt.Errorf("%w: %s %d", ErrDuplicateKey, what, k)
	}
	if k < *last {
		return 0, fmt.Errorf("%w: %s %d after %d; not in deterministic CBOR encoding", ErrMalformed, what, k, *last)
	}
	*seen |= 1 << k
	*last = k
	return k, nil
}

func keyString(major byte, arg uint64) string {
	switch major {
	case majorUint:
		return fmt.Sprint(arg)
	case majorNeg:
		return fmt.Sprintf("-%d", arg+1)
	}
	return "of type " + majorNames[major]
}
