package authority

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"time"
)

// Refusals of a join or renewal. The server maps each to a distinct wire code and the client maps
// the code back, so errors.Is works identically on both sides of the connection.
var (
	// ErrTokenUnknown covers both an unknown token id and a wrong secret for a known id, so that a
	// guesser learns nothing about which token ids exist.
	ErrTokenUnknown   = errors.New("join token unknown (no such token, or its secret is wrong)")
	ErrTokenUsed      = errors.New("join token already used")
	ErrTokenExpired   = errors.New("join token expired")
	ErrTokenZone      = errors.New("join token zone not in the authority's policy")
	ErrTokenRegion    = errors.New("region not allowed by the join token or outside the zones' placement")
	ErrMalformedToken = errors.New("join token malformed")
	ErrPinMismatch    = errors.New("authority key does not match the token's pin")
	ErrCSR            = errors.New("certificate signing request refused")
	// ErrRenewalRefused means the certificate presented for renewal is not a valid, current node
	// certificate of this authority (wrong authority, expired, or not a node certificate).
	ErrRenewalRefused = errors.New("renewal refused: presented certificate is not a valid node certificate of this authority")
	ErrRevoked        = errors.New("certificate revoked")
	ErrProtocol       = errors.New("protocol error")
	ErrInternal       = errors.New("authority internal error")
	// ErrZoneFull means every node slice of a zone CIDR is allocated; the join is refused and its
	// token stays unused.
	ErrZoneFull = errors.New("zone has no free node slice")
	// ErrSuperseded means the certificate presented for renewal was already renewed once: only
	// the newest certificate of a lineage renews, so a copied key stops working once the node
	// rotates it, and a clone that renews first locks the real node out loudly instead of silently.
	ErrSuperseded = errors.New("renewal refused: certificate already renewed")
	// ErrNameTaken means a join asked for a node name that a live (unexpired, unrevoked)
	// certificate holds: one SPIFFE ID never names two nodes at once, so a token for one zone
	// cannot mint a second identity for a node of another zone.
	ErrNameTaken = errors.New("node name already held by a live certificate")
	// ErrNameRevoked means a join asked for a node name whose certificate lineage was revoked:
	// the name stays closed, whatever the expiry, until an operator releases it (ReleaseName),
	// so that a token holder cannot quietly take over an identity an operator cut off.
	ErrNameRevoked = errors.New("node name revoked: its certificate lineage was revoked")
	// ErrBusy means the authority refused to serve the request now: this source, or all sources
	// together, already have as many connections or requests in flight as the authority serves
	// at once. Nothing was read or stored; the request can be retried (Join and Renew do, briefly).
	ErrBusy = errors.New("authority busy: too many concurrent requests; retry shortly")
	// ErrAdvertise means the underlay address a node advertised is not a valid host:port.
	ErrAdvertise = errors.New("advertised address malformed")
	// ErrWatchRefused means the certificate presented to open a watch is not a valid, current
	// node certificate of this authority (none, another authority's, expired, not a node's).
	ErrWatchRefused = errors.New("watch refused: presented certificate is not a valid node certificate of this authority")

	ErrAlreadyInitialized = errors.New("authority directory already initialized")
	ErrNotInitialized     = errors.New("authority directory not initialized")
	ErrZoneUnknown        = errors.New("zone not in the authority's policy")
	ErrRegionUnknown      = errors.New("region not allowed in the requested zones")
	ErrDuplicateToken     = errors.New("token id already exists")
)

// Code is the refusal code carried on the wire in a response.
type Code uint8

// Wire codes. Never renumber: old clients map them back to sentinels.
const (
	CodeOK Code = iota
	CodeTokenUnknown
	CodeTokenUsed
	CodeTokenExpired
	CodeTokenZone
	CodeTokenRegion
	CodeMalformedToken
	CodeCSR
	CodeRenewalRefused
	CodeRevoked
	CodeProtocol
	CodeInternal
	CodeZoneFull
	CodeSuperseded
	CodeNameTaken
	CodeBusy
	CodeAdvertise
	CodeWatchRefused
	CodeNameRevoked
	CodeEvidence // evidence.go
)

// codeNames name the codes in audit summaries and logs; they never change either.
var codeNames = [...]string{
	CodeOK:             "ok",
	CodeTokenUnknown:   "token_unknown",
	CodeTokenUsed:      "token_used",
	CodeTokenExpired:   "token_expired",
	CodeTokenZone:      "token_zone",
	CodeTokenRegion:    "token_region",
	CodeMalformedToken: "malformed_token",
	CodeCSR:            "csr",
	CodeRenewalRefused: "renewal_refused",
	CodeRevoked:        "revoked",
	CodeProtocol:       "protocol",
	CodeInternal:       "internal",
	CodeZoneFull:       "zone_full",
	CodeSuperseded:     "superseded",
	CodeNameTaken:      "name_taken",
	CodeBusy:           "busy",
	CodeAdvertise:      "advertise",
	CodeWatchRefused:   "watch_refused",
	CodeNameRevoked:    "name_revoked",
	CodeEvidence:       "evidence",
}

func (c Code) String() string {
	if int(c) < len(codeNames) {
		return codeNames[c]
	}
	return fmt.Sprintf("code_%d", uint8(c))
}

var codeErrors = [...]error{
	CodeTokenUnknown:   ErrTokenUnknown,
	CodeTokenUsed:      ErrTokenUsed,
	CodeTokenExpired:   ErrTokenExpired,
	CodeTokenZone:      ErrTokenZone,
	CodeTokenRegion:    ErrTokenRegion,
	CodeMalformedToken: ErrMalformedToken,
	CodeCSR:            ErrCSR,
	CodeRenewalRefused: ErrRenewalRefused,
	CodeRevoked:        ErrRevoked,
	CodeProtocol:       ErrProtocol,
	CodeInternal:       ErrInternal,
	CodeZoneFull:       ErrZoneFull,
	CodeSuperseded:     ErrSuperseded,
	CodeNameTaken:      ErrNameTaken,
	CodeBusy:           ErrBusy,
	CodeAdvertise:      ErrAdvertise,
	CodeWatchRefused:   ErrWatchRefused,
	CodeNameRevoked:    ErrNameRevoked,
	CodeEvidence:       ErrEvidence,
}

// codeOf returns the wire code for err; anything not a known refusal is internal, so that server
// internals never leak to an unauthenticated caller.
func codeOf(err error) Code {
	for c := CodeTokenUnknown; int(c) < len(codeErrors); c++ {
		if errors.Is(err, codeErrors[c]) {
			return c
		}
	}
	return CodeInternal
}

// errOf maps a wire code and the server's message back to an error wrapping the sentinel.
func errOf(c Code, msg string) error {
	if c == CodeOK {
		return nil
	}
	if int(c) >= len(codeErrors) || codeErrors[c] == nil {
		return fmt.Errorf("%w: unknown refusal code %d: %s", ErrProtocol, c, msg)
	}
	if msg == "" {
		return codeErrors[c]
	}
	return &RefusalError{Code: c, Message: msg}
}

// RefusalError is a refusal received from the authority: its code names the sentinel (errors.Is),
// its message is the authority's one-line explanation.
type RefusalError struct {
	Code    Code
	Message string
}

func (e *RefusalError) Error() string { return e.Message }
func (e *RefusalError) Unwrap() error { return codeErrors[e.Code] }

// JoinRefused reports whether err is the authority's final refusal of a join with a token whose
// secret it matched: this token issues no certificate for this key, now or on a retry. A join
// retried with the token and key of a join already committed gets the issued certificates instead
// (docs/identity.md, "Retrying a join whose answer was lost"), so after one of these refusals the
// key staged for the join can go. Anything else leaves open that an earlier attempt committed: no
// answer, a lost answer, busy, an internal error, a CSR or pin refusal (which say nothing about
// the token), and ErrTokenUnknown (a retry whose secret was mistyped says nothing about the
// attempt that had it right).
func JoinRefused(err error) bool {
	for _, final := range []error{ErrTokenUsed, ErrTokenExpired, ErrTokenZone, ErrTokenRegion, ErrNameTaken, ErrNameRevoked, ErrZoneFull} {
		if errors.Is(err, final) {
			return true
		}
	}
	return false
}

// Failures before the request left this host. A join that fails with either never showed its
// token to anyone, so retrying with the same token is safe; callers tell them apart with
// errors.Is instead of reading the message.
var (
	// ErrRequestNotSent means the request was never sent: the connection to the authority failed
	// (ErrNoAnswer among other causes) before the first byte of the request was written.
	ErrRequestNotSent = errors.New("request not sent to the authority")
	// ErrNoAnswer means nothing completed a handshake at the address in time: no authority runs
	// there, the address is wrong, or a firewall drops the UDP packets. It wraps ErrRequestNotSent.
	ErrNoAnswer = errors.New("no authority answered")
)

// noAnswerError says, for people, where nothing answered and for how long we waited; it still
// matches the underlying timeout (context.DeadlineExceeded or quic-go's idle timeout) with
// errors.Is/As, whose own text ("timeout: no recent network activity") explains nothing.
type noAnswerError struct {
	addr  string
	wait  time.Duration
	cause error
}

func (e *noAnswerError) Error() string {
	return fmt.Sprintf("%s at %s within %s: check the address and that `ute authority run` listens there (UDP) and is not blocked by a firewall",
		ErrNoAnswer, e.addr, humanSeconds(e.wait))
}

func (e *noAnswerError) Unwrap() []error { return []error{ErrNoAnswer, ErrRequestNotSent, e.cause} }

// notSentError marks a connection failure as happening before the request was sent, keeping the
// underlying error's text.
type notSentError struct{ err error }

func (e *notSentError) Error() string   { return e.err.Error() }
func (e *notSentError) Unwrap() []error { return []error{ErrRequestNotSent, e.err} }

// humanSeconds writes d as "5 s" or "1.5 s": the unit spelled for people, one decimal at most.
func humanSeconds(d time.Duration) string {
	s := strconv.FormatFloat(d.Round(100*time.Millisecond).Seconds(), 'f', -1, 64)
	return s + " s"
}

// isTimeout reports whether err is a deadline or a network timeout.
func isTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, context.DeadlineExceeded) || errors.Is(err, os.ErrDeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout())
}
