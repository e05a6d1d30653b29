package dtl

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"fmt"

	"github.com/veraison/go-cose"
)

// MaxRecordSize caps an encoded record. A record with a full chain of two Ed25519 certificates is
// about 1.5 KiB; 8 KiB leaves room for larger certificates while keeping a hostile peer from making
// us buffer more than that per flow.
const MaxRecordSize = 8 << 10

// Session binding: the record's COSE external AAD is the TLS exporter value of the tunnel connection
// (RFC 8446 §7.5) with this label and context, ExporterLen bytes long. It is never sent; a record
// verified on any other connection sees a different AAD and fails with ErrSignature.
const (
	ExporterLabel = "EXPORTER-ute-dtl-v1"
	ExporterLen   = 32
)

// ExporterContext is the exporter's context value; fixed, since the label already names the use.
const ExporterContext = "ute dtl record v1"

// protectedHeaderBstr is the only protected header this profile accepts: the map {1: -8} (alg:
// EdDSA) serialized, wrapped in a 3-byte bstr. Fixing its bytes removes any header negotiation from
// the attack surface.
const protectedHeaderBstr = "\x43\xa1\x01\x27"

// emptyUnprotected is the only unprotected header accepted: the empty map.
const emptyUnprotected = "\xa0"

// Exporter derives the session binding for a tunnel connection from its TLS state.
func Exporter(cs tls.ConnectionState) ([]byte, error) {
	if !cs.HandshakeComplete {
		return nil, fmt.Errorf("dtl: TLS exporter: handshake not complete")
	}
	if cs.Version != tls.VersionTLS13 {
		return nil, fmt.Errorf("dtl: TLS exporter: need TLS 1.3, connection uses 0x%04x", cs.Version)
	}
	v, err := cs.ExportKeyingMaterial(ExporterLabel, []byte(ExporterContext), ExporterLen)
	if err != nil {
		return nil, fmt.Errorf("dtl: TLS exporter: %w", err)
	}
	return v, nil
}

func checkAAD(aad []byte) error {
	if len(aad) != ExporterLen {
		return fmt.Errorf("%w (got %d bytes)", ErrAAD, len(aad))
	}
	return nil
}

// Sign encodes the claims, signs them as a tagged COSE_Sign1 with the agent's key, binds the
// signature to the session through aad (the Exporter value), and returns the record bytes.
// A zero Version is set to Version1.
func Sign(c *Claims, key ed25519.PrivateKey, aad []byte) ([]byte, error) {
	if len(key) != ed25519.PrivateKeySize {
		return nil, fmt.Errorf("dtl: sign: agent key is %d bytes, want an Ed25519 private key", len(key))
	}
	if err := checkAAD(aad); err != nil {
		return nil, err
	}
	cc := *c
	if cc.Version == 0 {
		cc.Version = Version1
	}
	payload, err := cc.Marshal()
	if err != nil {
		return nil, err
	}
	signer, err := cose.NewSigner(cose.AlgorithmEdDSA, key)
	if err != nil {
		return nil, fmt.Errorf("dtl: sign: %w", err)
	}
	msg := cose.Sign1Message{
		Headers: cose.Headers{Protected: cose.ProtectedHeader{cose.HeaderLabelAlgorithm: cose.AlgorithmEdDSA}},
		Payload: payload,
	}
	if err := msg.Sign(rand.Reader, aad, signer); err != nil {
		return nil, fmt.Errorf("dtl: sign: %w", err)
	}
	b, err := msg.MarshalCBOR()
	if err != nil {
		return nil, fmt.Errorf("dtl: sign: encode: %w", err)
	}
	if len(b) > MaxRecordSize {
		return nil, fmt.Errorf("%w: record is %d bytes, limit %d; send the chain hash instead of the chain", ErrTooLarge, len(b), MaxRecordSize)
	}
	return b, nil
}

// Record is a parsed, not yet verified, DTL record. Its Claims must not be trusted before Verify
// (or Verifier.Admit) succeeds.
type Record struct {
	Claims Claims
	raw    []byte
	msg    cose.Sign1Message
}

// Raw returns the record bytes exactly as received.
func (r *Record) Raw() []byte { return r.raw }

// Parse decodes a record strictly: size cap, tagged COSE_Sign1 with exactly this profile's headers,
// a 64-byte signature, and claims decoded with duplicate keys, indefinite lengths, unknown claims and
// non-deterministic encodings refused. It does not verify the signature.
func Parse(b []byte) (*Record, error) {
	if len(b) > MaxRecordSize {
		return nil, fmt.Errorf("%w: record is %d bytes, limit %d", ErrTooLarge, len(b), MaxRecordSize)
	}
	if len(b) < 2 || b[0] != 0xd2 || b[1] != 0x84 {
		return nil, fmt.Errorf("%w: not a tagged COSE_Sign1 (want prefix d284)", ErrMalformed)
	}
	raw := bytes.Clone(b)
	var msg cose.Sign1Message
	if err := msg.UnmarshalCBOR(raw); err != nil {
		return nil, classifyCBOR("COSE_Sign1", err)
	}
	// RawProtected is the bstr item; its content must be exactly {1: -8}.
	if string(msg.Headers.RawProtected) != protectedHeaderBstr {
		return nil, fmt.Errorf("%w: protected header must be exactly {1: -8} (alg EdDSA)", ErrMalformed)
	}
	if string(msg.Headers.RawUnprotected) != emptyUnprotected {
		return nil, fmt.Errorf("%w: unprotected header must be empty", ErrMalformed)
	}
	if msg.Payload == nil {
		return nil, fmt.Errorf("%w: detached payload is not allowed", ErrMalformed)
	}
	if len(msg.Signature) != ed25519.SignatureSize {
		return nil, fmt.Errorf("%w: signature is %d bytes, want %d", ErrMalformed, len(msg.Signature), ed25519.SignatureSize)
	}
	c, err := unmarshalClaims(msg.Payload)
	if err != nil {
		return nil, err
	}
	return &Record{Claims: *c, raw: raw, msg: msg}, nil
}

// Verify checks the signature with pub over the exact received protected header and payload bytes and
// the session binding aad. Any mismatch (other key, other session, altered byte) is ErrSignature.
func (r *Record) Verify(pub ed25519.PublicKey, aad []byte) error {
	if err := checkAAD(aad); err != nil {
		return err
	}
	if len(pub) != ed25519.PublicKeySize {
		return fmt.Errorf("%w: agent public key is %d bytes", ErrSignature, len(pub))
	}
	v, err := cose.NewVerifier(cose.AlgorithmEdDSA, pub)
	if err != nil {
		return fmt.Errorf("%w: %v", ErrSignature, err)
	}
	if err := r.msg.Verify(aad, v); err != nil {
		if errors.Is(err, cose.ErrVerification) {
			return fmt.Errorf("%w: does not verify with the agent key on this session", ErrSignature)
		}
		return fmt.Errorf("%w: %v", ErrSignature, err)
	}
	return nil
}
