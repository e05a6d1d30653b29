package record

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"fmt"

	"github.com/fxamacker/cbor/v2"
	"github.com/veraison/go-cose"
)

// Domain separation: each record kind is signed with its own COSE external AAD (never sent), so a
// signature made for one kind can never verify as another, nor as a DTL record (whose AAD is a
// 32-byte session exporter value).
const (
	aadRevocation = "ute/1 revocation record"
	aadPolicy     = "ute/1 policy release"
)

// protectedEdDSA is the only protected header accepted: the bstr wrapping {1: -8} (alg EdDSA).
// Fixing its bytes removes algorithm negotiation from the attack surface.
const protectedEdDSA = "\x43\xa1\x01\x27"

// emptyUnprotected is the only unprotected header accepted: the empty map.
const emptyUnprotected = "\xa0"

// Encoding and decoding modes are immutable after construction and safe for concurrent use.
var (
	encMode = mustEncMode()
	decMode = mustDecMode()
)

func mustEncMode() cbor.EncMode {
	m, err := cbor.CoreDetEncOptions().EncMode()
	if err != nil {
		panic(fmt.Sprintf("record: cbor encoder options: %v", err)) // static options; cannot fail at run time
	}
	return m
}

func mustDecMode() cbor.DecMode {
	m, err := cbor.DecOptions{
		DupMapKey:         cbor.DupMapKeyEnforcedAPF,
		IndefLength:       cbor.IndefLengthForbidden,
		TagsMd:            cbor.TagsForbidden,
		ExtraReturnErrors: cbor.ExtraDecErrorUnknownField,
		MaxNestedLevels:   4,
		MaxArrayElements:  16,
		MaxMapPairs:       16,
		UTF8:              cbor.UTF8RejectInvalid,
	}.DecMode()
	if err != nil {
		panic(fmt.Sprintf("record: cbor decoder options: %v", err))
	}
	return m
}

// sign wraps payload in a tagged COSE_Sign1 signed with key under the kind's AAD.
func sign(payload []byte, key ed25519.PrivateKey, aad string) ([]byte, error) {
	if len(key) != ed25519.PrivateKeySize {
		return nil, fmt.Errorf("record: sign: key is %d bytes, want an Ed25519 private key", len(key))
	}
	signer, err := cose.NewSigner(cose.AlgorithmEdDSA, key)
	if err != nil {
		return nil, fmt.Errorf("record: sign: %w", err)
	}
	msg := cose.Sign1Message{
		Headers: cose.Headers{Protected: cose.ProtectedHeader{cose.HeaderLabelAlgorithm: cose.AlgorithmEdDSA}},
		Payload: payload,
	}
	if err := msg.Sign(rand.Reader, []byte(aad), signer); err != nil {
		return nil, fmt.Errorf("record: sign: %w", err)
	}
	b, err := msg.MarshalCBOR()
	if err != nil {
		return nil, fmt.Errorf("record: sign: encode: %w", err)
	}
	return b, nil
}

// parseCOSE decodes a tagged COSE_Sign1 of this profile from raw (already size-capped and owned
// by the caller). It checks structure only, not the signature.
func parseCOSE(raw []byte) (*cose.Sign1Message, error) {
	if len(raw) < 2 || raw[0] != 0xd2 || raw[1] != 0x84 {
		return nil, fmt.Errorf("%w: not a tagged COSE_Sign1 (want prefix d284)", ErrMalformed)
	}
	var msg cose.Sign1Message
	if err := msg.UnmarshalCBOR(raw); err != nil {
		return nil, classifyCBOR("COSE_Sign1", err)
	}
	if string(msg.Headers.RawProtected) != protectedEdDSA {
		return nil, fmt.Errorf("%w: protected header must be exactly {1: -8} (alg EdDSA), got %x", ErrHeader, truncateBytes(msg.Headers.RawProtected))
	}
	if string(msg.Headers.RawUnprotected) != emptyUnprotected {
		return nil, fmt.Errorf("%w: unprotected header must be empty", ErrHeader)
	}
	if msg.Payload == nil {
		return nil, fmt.Errorf("%w: detached payload is not allowed", ErrMalformed)
	}
	if len(msg.Signature) != ed25519.SignatureSize {
		return nil, fmt.Errorf("%w: signature is %d bytes, want %d", ErrMalformed, len(msg.Signature), ed25519.SignatureSize)
	}
	return &msg, nil
}

// verifySig checks msg's signature with pub under the kind's AAD, over the exact received
// protected header and payload bytes.
func verifySig(msg *cose.Sign1Message, pub ed25519.PublicKey, aad, whose string) error {
	if len(pub) != ed25519.PublicKeySize {
		return fmt.Errorf("%w: %s key is %d bytes", ErrSignature, whose, len(pub))
	}
	v, err := cose.NewVerifier(cose.AlgorithmEdDSA, pub)
	if err != nil {
		return fmt.Errorf("%w: %v", ErrSignature, err)
	}
	if err := msg.Verify([]byte(aad), v); err != nil {
		if errors.Is(err, cose.ErrVerification) {
			return fmt.Errorf("%w: does not verify with the %s key", ErrSignature, whose)
		}
		return fmt.Errorf("%w: %v", ErrSignature, err)
	}
	return nil
}

// decodeStrict decodes a claims map into w and refuses any encoding but the deterministic one:
// signatures are checked over the received bytes anyway, but one encoding per claim set keeps
// hashes, logs and dedupe unambiguous.
func decodeStrict(what string, b []byte, w any) error {
	if len(b) == 0 || b[0]>>5 != 5 {
		return fmt.Errorf("%w: %s are not a CBOR map", ErrMalformed, what)
	}
	if err := decMode.Unmarshal(b, w); err != nil {
		return classifyCBOR(what, err)
	}
	re, err := encMode.Marshal(w)
	if err != nil || !bytes.Equal(re, b) {
		return fmt.Errorf("%w: %s are not in deterministic CBOR encoding", ErrMalformed, what)
	}
	return nil
}

// classifyCBOR maps a decoder error to this package's sentinels.
func classifyCBOR(what string, err error) error {
	var unknown *cbor.UnknownFieldError
	if errors.As(err, &unknown) {
		return fmt.Errorf("%w: %s: %v", ErrUnknownField, what, err)
	}
	return fmt.Errorf("%w: %s: %v", ErrMalformed, what, err)
}

func truncateBytes(b []byte) []byte {
	if len(b) > 16 {
		return b[:16]
	}
	return b
}

func u64(v uint64) *uint64 { return &v }

// seal encodes a record's wire claims, signs them for aad and refuses a result over limit bytes;
// what names the record kind in errors ("revocation", "trust event", ...).
func seal(what string, wire any, key ed25519.PrivateKey, aad string, limit int) ([]byte, error) {
	payload, err := encMode.Marshal(wire)
	if err != nil {
		return nil, fmt.Errorf("record: encode %s: %w", what, err)
	}
	b, err := sign(payload, key, aad)
	if err != nil {
		return nil, err
	}
	if len(b) > limit {
		return nil, fmt.Errorf("%w: %s is %d bytes, limit %d", ErrTooLarge, what, len(b), limit)
	}
	return b, nil
}

// open is the first step of verifying every record kind: the size cap (before any parsing), the
// COSE_Sign1 profile, and the strict decoding of its claims into w. It returns a private copy of
// b (what the record keeps) and its envelope, whose signature the caller checks once it knows
// the signer.
func open(what string, b []byte, limit int, w any) ([]byte, *cose.Sign1Message, error) {
	if len(b) > limit {
		return nil, nil, fmt.Errorf("%w: %s is %d bytes, limit %d", ErrTooLarge, what, len(b), limit)
	}
	raw := bytes.Clone(b)
	msg, err := parseCOSE(raw)
	if err != nil {
		return nil, nil, err
	}
	if err := decodeStrict(what+" claims", msg.Payload, w); err != nil {
		return nil, nil, err
	}
	return raw, msg, nil
}

// missingClaim is the error for a required claim absent from a record.
func missingClaim(name string, key int) error {
	return fmt.Errorf("%w: missing claim %s (key %d)", ErrMalformed, name, key)
}

// checkWireVersion checks a record's version claim (under key): present, and the one this node
// speaks.
func checkWireVersion(v *uint64, key int) error {
	switch {
	case v == nil:
		return missingClaim("version", key)
	case *v != Version1:
		return fmt.Errorf("%w: %d (this node speaks %d)", ErrVersion, *v, Version1)
	}
	return nil
}
