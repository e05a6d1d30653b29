package tunnel

import (
	"errors"
	"fmt"

	"github.com/ute-project/ute/overlay/dtl"
)

// Sentinel errors. Callers inspect them with errors.Is.
var (
	// ErrClosed is returned by every operation on a closed Endpoint or Tunnel.
	ErrClosed = errors.New("tunnel: endpoint or tunnel closed")
	// ErrZoneNotServed means this node does not hold the zone it was asked to use.
	ErrZoneNotServed = errors.New("tunnel: zone not served by this node")
	// ErrZoneNotOffered means the peer does not hold the zone (ALPN negotiation failed).
	ErrZoneNotOffered = errors.New("tunnel: peer does not offer the zone")
	// ErrPeerRefused means our PeerVerifier refused the peer's certificate.
	ErrPeerRefused = errors.New("tunnel: peer certificate refused")
	// ErrRefusedByPeer means the peer aborted the handshake, usually because it refused our certificate.
	ErrRefusedByPeer = errors.New("tunnel: handshake refused by peer")
	// ErrPeerMismatch means the peer proved an identity other than the node we meant to reach.
	ErrPeerMismatch = errors.New("tunnel: peer is not the expected node")
	// Err0RTT means a connection reported 0-RTT use; it is closed (invariant I4).
	Err0RTT = errors.New("tunnel: connection used 0-RTT")
	// ErrFrame means a flow frame was malformed or truncated.
	ErrFrame = errors.New("tunnel: malformed flow frame")
	// ErrFrameTooLarge means a flow frame exceeded its size cap.
	ErrFrameTooLarge = errors.New("tunnel: flow frame too large")
	// ErrFlowLimit means a flow table limit refused the flow; it wraps dtl.ErrLimit so the peer
	// is told "limit".
	ErrFlowLimit = fmt.Errorf("tunnel: %w", dtl.ErrLimit)
	// ErrFlowIdle means the flow was closed by idle expiry.
	ErrFlowIdle = errors.New("tunnel: flow idle timeout")
	// ErrFlowAborted means this node reset the flow (Endpoint.CloseFlows, FlowConn.Abort), e.g.
	// because its agent was revoked.
	ErrFlowAborted = errors.New("tunnel: flow aborted by the node")
	// ErrDatagramTooLarge means a datagram does not fit in one QUIC datagram frame.
	ErrDatagramTooLarge = errors.New("tunnel: datagram too large")
	// errPeerBusy and errSourceBusy refuse an inbound connection over a connection cap
	// (budget.go); only the log and StallReport see them.
	errPeerBusy   = errors.New("tunnel: too many connections from this peer node")
	errSourceBusy = errors.New("tunnel: too many connections from this source address")
	// ErrRejected is matched (errors.Is) by every *RejectedError.
	ErrRejected = errors.New("tunnel: flow rejected by peer")
)

// RejectedError is returned by OpenFlow and OpenPacketFlow when the receiving node refused the
// flow. Reason is the reason code's name ("replay", "policy", ...). It matches ErrRejected and,
// through Unwrap, dtl's sentinel for the code (errors.Is(err, dtl.ErrReplay)).
type RejectedError struct {
	Reason  string
	Code    dtl.ReasonCode
	Message string // the receiver's explanation, sanitized
}

func (e *RejectedError) Error() string {
	return fmt.Sprintf("tunnel: flow rejected by peer (%s): %s", e.Reason, e.Message)
}

// Is makes errors.Is(err, ErrRejected) true for any rejection.
func (e *RejectedError) Is(target error) bool { return target == ErrRejected }

// Unwrap exposes the dtl rejection so callers can match the reason's sentinel.
func (e *RejectedError) Unwrap() error { return &dtl.RejectError{Code: e.Code, Message: e.Message} }

// rejectBody encodes a refusal for the wire. An Admitter should refuse with a *dtl.Denial (or an
// error wrapping a dtl sentinel); anything else travels as reason "internal" (fail closed).
func rejectBody(cause error) (dtl.ReasonCode, []byte) {
	d := dtl.Deny(cause)
	body, err := d.RejectBody()
	if err != nil {
		body, _ = dtl.EncodeReject(dtl.ReasonInternal, "")
	}
	return d.Code, body
}
