package localapi

import (
	"context"
	"errors"
	"net/http"
)

// Sentinels. A Backend wraps them; the client returns a *RemoteError that unwraps to the same
// sentinel, so errors.Is gives the same answer on both sides of the socket.
var (
	ErrBadRequest  = errors.New("bad request")
	ErrNotFound    = errors.New("not found")
	ErrConflict    = errors.New("conflict")
	ErrForbidden   = errors.New("forbidden")
	ErrUnavailable = errors.New("unavailable")
	ErrInternal    = errors.New("internal error")
	// ErrNotRunning: no daemon answers on the socket (client side only). The CLI may then act on
	// the node directory directly, as `ute agent add` does.
	ErrNotRunning = errors.New("no node daemon is running")
)

// Error codes on the wire: {"error": "...", "code": "..."}.
const (
	CodeBadRequest  = "bad_request"
	CodeNotFound    = "not_found"
	CodeConflict    = "conflict"
	CodeForbidden   = "forbidden"
	CodeUnavailable = "unavailable"
	CodeInternal    = "internal"
)

var codes = []struct {
	code   string
	err    error
	status int
}{
	{CodeBadRequest, ErrBadRequest, http.StatusBadRequest},
	{CodeNotFound, ErrNotFound, http.StatusNotFound},
	{CodeConflict, ErrConflict, http.StatusConflict},
	{CodeForbidden, ErrForbidden, http.StatusForbidden},
	{CodeUnavailable, ErrUnavailable, http.StatusServiceUnavailable},
	{CodeInternal, ErrInternal, http.StatusInternalServerError},
}

// wireError is the JSON body of every error response.
type wireError struct {
	Error string `json:"error"`
	Code  string `json:"code"`
}

// classify maps a Backend error to its code and HTTP status.
func classify(err error) (string, int) {
	for _, c := range codes {
		if errors.Is(err, c.err) {
			return c.code, c.status
		}
	}
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		return CodeUnavailable, http.StatusServiceUnavailable
	}
	return CodeInternal, http.StatusInternalServerError
}

// RemoteError is an error the daemon reported. Message is the daemon's one-line text.
type RemoteError struct {
	Code    string
	Message string
}

func (e *RemoteError) Error() string { return e.Message }

// Unwrap returns the sentinel of Code (ErrInternal for a code this client does not know).
func (e *RemoteError) Unwrap() error {
	for _, c := range codes {
		if c.code == e.Code {
			return c.err
		}
	}
	return ErrInternal
}

// codeForStatus is the code of an error response without a JSON body (a proxy or an older
// daemon); it keeps errors.Is meaningful.
func codeForStatus(status int) string {
	switch status {
	case http.StatusBadRequest, http.StatusMethodNotAllowed, http.StatusRequestEntityTooLarge, http.StatusUnsupportedMediaType:
		return CodeBadRequest
	}
	for _, c := range codes {
		if c.status == status {
			return c.code
		}
	}
	return CodeInternal
}
