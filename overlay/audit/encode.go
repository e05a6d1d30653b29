package audit

import (
	"crypto/sha256"
	"encoding/hex"
	"slices"
	"strconv"
	"unicode/utf8"
)

// A line is encoded by hand instead of through encoding/json: one entry is written per admitted
// flow, and json.Marshal of a Record (reflection, a sorted copy of the map, several buffers) cost
// more than the rest of Append together. The bytes are exactly json.Marshal's, which decodeLine
// still uses to check the canonical form on every verification, so a difference would fail every
// log; TestEncodeMatchesJSON and FuzzEncodeMatchesJSON hold the two together. One deliberate
// difference: a field value that is not valid UTF-8 has each bad byte written as U+FFFD itself,
// where json.Marshal writes the escape `\ufffd` — which no decoder can give back, so such a line
// could never verify. Both mean the same string.

// maxKeptBuf bounds the line buffer a Log keeps between appends.
const maxKeptBuf = 16 << 10

// appendRecord appends the Record made of these members as canonical JSON: in the Record's order,
// fields sorted by key and left out when empty. Time and prev may be bytes or a string, so that
// Append formats them without a conversion.
func appendRecord[T, P string | []byte](b []byte, seq uint64, tm T, event string, fields map[string]string, prev P) []byte {
	b = append(b, `{"seq":`...)
	b = strconv.AppendUint(b, seq, 10)
	b = append(b, `,"time":`...)
	b = appendJSONString(b, tm)
	b = append(b, `,"event":`...)
	b = appendJSONString(b, event)
	if len(fields) > 0 {
		b = append(b, `,"fields":{`...)
		var arr [16]string
		keys := arr[:0]
		for k := range fields {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		for i, k := range keys {
			if i > 0 {
				b = append(b, ',')
			}
			b = append(appendJSONString(b, k), ':')
			b = appendJSONString(b, fields[k])
		}
		b = append(b, '}')
	}
	b = append(b, `,"prev":`...)
	b = appendJSONString(b, prev)
	return append(b, '}')
}

// appendLine appends the stored line of the Record made of these members (with its hash member
// and newline) and writes the entry's hash, hex-encoded, to hash. prev may share hash's memory.
func appendLine[T, P string | []byte](b []byte, seq uint64, tm T, event string, fields map[string]string, prev P, hash *[2 * sha256.Size]byte) []byte {
	start := len(b)
	b = appendRecord(b, seq, tm, event, fields, prev)
	sum := sha256.Sum256(b[start:])
	hex.Encode(hash[:], sum[:])
	b = append(b[:len(b)-1], `,"hash":"`...)
	b = append(b, hash[:]...)
	return append(b, "\"}\n"...)
}

const hexDigits = "0123456789abcdef"

// jsonSafe marks the ASCII bytes encoding/json writes as they are (with HTML escaping on, as
// json.Marshal has it): printable, and none of " \ < > &.
var jsonSafe = func() (t [utf8.RuneSelf]bool) {
	for c := 0x20; c < utf8.RuneSelf; c++ {
		t[c] = c != '"' && c != '\\' && c != '<' && c != '>' && c != '&' && c != 0x7f
	}
	t[0x7f] = true
	return t
}()

// appendJSONString appends s as encoding/json does (see the file comment for invalid UTF-8).
func appendJSONString[S string | []byte](b []byte, s S) []byte {
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if jsonSafe[c] {
				i++
				continue
			}
			b = append(b, s[start:i]...)
			switch c {
			case '\\', '"':
				b = append(b, '\\', c)
			case '\b':
				b = append(b, '\\', 'b')
			case '\f':
				b = append(b, '\\', 'f')
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			default:
				b = append(b, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := decodeRune(s[i:])
		switch {
		case r == utf8.RuneError && size == 1:
			b = append(b, s[start:i]...)
			b = utf8.AppendRune(b, utf8.RuneError)
		case r == '\u2028' || r == '\u2029':
			b = append(b, s[start:i]...)
			b = append(b, '\\', 'u', '2', '0', '2', hexDigits[r&0xf])
		default:
			i += size
			continue
		}
		i += size
		start = i
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}

func decodeRune[S string | []byte](s S) (rune, int) {
	// A conversion of at most utf8.UTFMax bytes, which the compiler keeps on the stack.
	return utf8.DecodeRuneInString(string(s[:min(len(s), utf8.UTFMax)]))
}
