package config

import (
	"errors"
	"fmt"
	"strconv"

	"github.com/ute-project/ute/zones/strictyaml"
)

// Sentinels; every error of Parse, Load and Apply wraps exactly one.
var (
	ErrTooLarge     = errors.New("config file too large")
	ErrTooDeep      = errors.New("config file nested too deeply")
	ErrSyntax       = strictyaml.ErrSyntax
	ErrUnsupported  = strictyaml.ErrUnsupported
	ErrUnknownField = strictyaml.ErrUnknownField
	ErrBadValue     = strictyaml.ErrBadValue
	// ErrNotLoopback: metrics would be served on an address other hosts can reach.
	ErrNotLoopback = errors.New("metrics address is not loopback")
	// ErrRestartRequired: a reload changes a field the running daemon cannot change.
	ErrRestartRequired = errors.New("change needs a restart")
)

// ParseError locates an error in a config file: file, line and column when known, and the
// field as a path such as peers[1].addr. Err wraps one of the sentinels.
type ParseError struct {
	File   string
	Line   int
	Column int
	Field  string
	Err    error
}

func (e *ParseError) Error() string {
	b := []byte(e.File)
	if e.Line > 0 {
		b = append(b, ':')
		b = strconv.AppendInt(b, int64(e.Line), 10)
		if e.Column > 0 {
			b = append(b, ':')
			b = strconv.AppendInt(b, int64(e.Column), 10)
		}
	}
	if len(b) > 0 {
		b = append(b, ": "...)
	}
	if e.Field != "" {
		b = append(b, e.Field...)
		b = append(b, ": "...)
	}
	return string(append(b, e.Err.Error()...))
}

func (e *ParseError) Unwrap() error { return e.Err }

// pos is a place in the file; the zero pos means unknown.
type pos struct{ line, col int }

func errAt(file string, at pos, field string, err error) error {
	return &ParseError{File: file, Line: at.line, Column: at.col, Field: field, Err: err}
}

// valueError is a bad value independent of where it came from (file or flag).
func valueError(sentinel error, format string, args ...any) error {
	return fmt.Errorf("%w: %s", sentinel, fmt.Sprintf(format, args...))
}
