package record

import (
	"errors"
	"fmt"
)

// Refusals. Every failed parse or verification wraps exactly one of these, so callers and counters
// can classify with errors.Is; the message says what precisely was wrong.
var (
	// ErrTooLarge: the record, or one of its fields, exceeds its cap. Checked before decoding.
	ErrTooLarge = errors.New("record: too large")
	// ErrMalformed: the bytes are not a record of this profile (COSE structure, CBOR encoding,
	// missing or out-of-range claim, claim combination this signer kind may not carry).
	ErrMalformed = errors.New("record: malformed")
	// ErrUnknownField: the claims map holds a key this version does not define (fail closed, I7).
	// It also matches ErrMalformed.
	ErrUnknownField = fmt.Errorf("%w: unknown field", ErrMalformed)
	// ErrHeader: the COSE headers are not exactly the profile's ({1: -8} protected, empty
	// unprotected), e.g. another algorithm. It also matches ErrMalformed.
	ErrHeader = fmt.Errorf("%w: COSE header not of this profile", ErrMalformed)
	// ErrVersion: the claims format version is not one this code understands.
	ErrVersion = errors.New("record: unsupported version")
	// ErrTrustDomain: the record, its subject or its signer belongs to another trust domain than
	// the verifier's anchor.
	ErrTrustDomain = errors.New("record: foreign trust domain")
	// ErrSigner: the signer is not acceptable: no trust anchor, a signer that is neither the
	// authority nor a node, a signer certificate that does not verify up to the anchor at the
	// record's issued-at, or one that names another identity than the signer claim.
	ErrSigner = errors.New("record: signer not trusted")
	// ErrSignature: the signature does not verify with the signer's key over the received bytes.
	ErrSignature = errors.New("record: bad signature")
	// ErrNotAllowed: the signer is authentic but may not sign this record: a node revoking another
	// node, a serial, an agent name, or an agent certificate it did not issue; an expiry other than
	// the covered certificate's; a policy release signed by anyone but the authority.
	ErrNotAllowed = errors.New("record: signer may not sign this")
	// ErrExpired: every certificate the revocation covers has expired; the record is void.
	ErrExpired = errors.New("record: expired")
	// ErrFuture: issued-at lies further in the future than the allowed clock skew.
	ErrFuture = errors.New("record: issued in the future")
)
