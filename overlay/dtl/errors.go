package dtl

import (
	"errors"
	"fmt"
)

// Sentinel errors, one per refusal, so callers and tests can match with errors.Is.
var (
	// ErrTooLarge: a record or frame is larger than its cap.
	ErrTooLarge = errors.New("dtl: too large")
	// ErrMalformed: bytes are not a well-formed record/frame of this profile.
	ErrMalformed = errors.New("dtl: malformed")
	// ErrUnknownClaim: the claims map holds a key this version does not define.
	ErrUnknownClaim = errors.New("dtl: unknown claim")
	// ErrDuplicateKey: a CBOR map repeats a key.
	ErrDuplicateKey = errors.New("dtl: duplicate map key")
	// ErrIndefinite: indefinite-length CBOR items are forbidden.
	ErrIndefinite = errors.New("dtl: indefinite-length item")
	// ErrMissingClaim: a required claim is absent or empty.
	ErrMissingClaim = errors.New("dtl: missing claim")
	// ErrVersion: the claims version is not one this code understands.
	ErrVersion = errors.New("dtl: unsupported version")
	// ErrSignature: the signature does not verify with the agent key and the session AAD. A record
	// captured on another session fails with this error because the AAD differs.
	ErrSignature = errors.New("dtl: bad signature")
	// ErrAAD: the caller supplied no usable session binding (programming error on our side).
	ErrAAD = errors.New("dtl: session binding (AAD) must be the 32-byte TLS exporter value")
	// ErrChain: the certificate chain in the record does not verify.
	ErrChain = errors.New("dtl: certificate chain rejected")
	// ErrChainUnknown: the record names its chain by hash but this session has not cached it; the
	// sender should retry with the full chain.
	ErrChainUnknown = errors.New("dtl: chain hash not cached on this session")
	// ErrPeer: the record's node is not this tunnel's peer node.
	ErrPeer = errors.New("dtl: node is not the tunnel peer")
	// ErrZone: the record's zone is not this tunnel's zone, or not the agent certificate's zone.
	ErrZone = errors.New("dtl: zone mismatch")
	// ErrClaimMismatch: a claim contradicts the verified certificate without the drift flag that
	// would declare it (agent ID, node ID, fingerprint, region).
	ErrClaimMismatch = errors.New("dtl: claim contradicts certificate")
	// ErrRevoked: the agent or its node is revoked.
	ErrRevoked = errors.New("dtl: revoked")
	// ErrPolicy: the zone policy denies the flow.
	ErrPolicy = errors.New("dtl: denied by policy")
	// ErrTrust: the trust score is below the zone's minimum.
	ErrTrust = errors.New("dtl: trust score below zone minimum")
	// ErrReplay: this sequence number was already admitted on this session.
	ErrReplay = errors.New("dtl: replayed sequence number")
	// ErrTooOld: the sequence number is behind the replay window; it cannot be proven fresh.
	ErrTooOld = fmt.Errorf("%w (older than the replay window)", ErrReplay)
	// ErrStale: issued-at is older than the allowed skew.
	ErrStale = errors.New("dtl: record is stale")
	// ErrFuture: issued-at is further in the future than the allowed skew.
	ErrFuture = errors.New("dtl: record is from the future")
	// ErrConfig: a Verifier or Session lacks a required piece; admission fails closed.
	ErrConfig = errors.New("dtl: verifier not fully configured")
	// ErrTruncated: a frame or datagram ended before its declared length.
	ErrTruncated = errors.New("dtl: truncated")
	// ErrFrameType: a frame type this version does not define.
	ErrFrameType = errors.New("dtl: unknown frame type")
	// ErrRejected: the remote node refused the flow; use errors.As with *RejectError for the code.
	ErrRejected = errors.New("dtl: flow rejected by peer")
)
