package zones

import (
	"errors"
	"fmt"
	"strconv"

	"github.com/ute-project/ute/zones/strictyaml"
)

// Sentinels for policy validation errors; every error of Parse, Load and New wraps exactly one.
var (
	ErrTooLarge        = errors.New("policy too large")
	ErrSyntax          = strictyaml.ErrSyntax
	ErrUnsupported     = strictyaml.ErrUnsupported
	ErrUnknownField    = strictyaml.ErrUnknownField
	ErrMissingField    = errors.New("missing field")
	ErrBadValue        = strictyaml.ErrBadValue
	ErrNoZones         = errors.New("no zones")
	ErrBadName         = errors.New("bad name")
	ErrDuplicateZone   = errors.New("duplicate zone")
	ErrBadCIDR         = errors.New("bad CIDR")
	ErrOverlappingCIDR = errors.New("overlapping CIDR")
	ErrBadRegion       = errors.New("bad region")
	ErrThreshold       = errors.New("bad threshold")
	ErrBadSelector     = errors.New("bad selector")
	ErrCrossZone       = errors.New("cross-zone rule refused")
	ErrUnknownZone     = errors.New("unknown zone")
	ErrBadPort         = errors.New("bad port")
	ErrNodePrefix      = errors.New("bad node slice prefix")
	ErrTooDeep         = errors.New("policy nested too deeply")
)

// ParseError locates a policy error: the file, the line and column when known, and the field as a
// path such as zones[0].rules[2].ports[1]. Err wraps one of the sentinels above.
type ParseError struct {
	File   string
	Line   int // 1-based; 0 when unknown (policies built with New)
	Column int
	Field  string
	Err    error
}

func (e *ParseError) Error() string {
	var b []byte
	if e.File != "" {
		b = append(b, e.File...)
		if e.Line > 0 {
			b = append(b, ':')
			b = strconv.AppendInt(b, int64(e.Line), 10)
			if e.Column > 0 {
				b = append(b, ':')
				b = strconv.AppendInt(b, int64(e.Column), 10)
			}
		}
		b = append(b, ": "...)
	} else if e.Line > 0 {
		b = fmt.Appendf(b, "line %d: ", e.Line)
	}
	if e.Field != "" {
		b = append(b, e.Field...)
		b = append(b, ": "...)
	}
	b = append(b, e.Err.Error()...)
	return string(b)
}

func (e *ParseError) Unwrap() error { return e.Err }

// pos is a place in the source file; the zero pos means unknown.
type pos struct{ line, col int }

// errf builds a located error wrapping sentinel, with a detail sentence that says what to do.
func errf(file string, at pos, field string, sentinel error, format string, args ...any) error {
	return &ParseError{
		File:   file,
		Line:   at.line,
		Column: at.col,
		Field:  field,
		Err:    fmt.Errorf("%w: %s", sentinel, fmt.Sprintf(format, args...)),
	}
}
