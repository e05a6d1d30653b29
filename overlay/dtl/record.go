package dtl

import (
	"bytes"
	"crypto/ed25519"
	"crypto/tls"
	"fmt"
	"sync"

	voi "github.com/oasisprotocol/curve25519-voi/primitives/ed25519"
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

// Fixed parts of a record and of its Sig_structure (RFC 9052 §4.4): tag 18 and an array of four,
// the protected header, the empty unprotected header; ["Signature1", protected header, external AAD,
// payload], with the 32-byte AAD's head.
const (
	recordPrefix   = "\xd2\x84" + protectedHeaderBstr + emptyUnprotected
	sigStructStart = "\x84\x6aSignature1" + protectedHeaderBstr + "\x58\x20"
	sigHead        = "\x58\x40" // bstr of 64 bytes
)

// appendSigStructure appends the bytes an Ed25519 signature of a record covers.
func appendSigStructure(b, aad, payload []byte) []byte {
	b = append(append(b, sigStructStart...), aad...)
	return appendBytes(b, payload)
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
	if err := cc.checkEncodable(); err != nil {
		return nil, err
	}
	// A hash-only record's claims (about 230 bytes) and Sig_structure fit these stack buffers; a
	// full chain spills to the heap once per session.
	var pbuf [384]byte
	payload := cc.appendTo(pbuf[:0])
	size := len(recordPrefix) + headLen(uint64(len(payload))) + len(payload) + len(sigHead) + ed25519.SignatureSize
	if size > MaxRecordSize {
		return nil, fmt.Errorf("%w: record is %d bytes, limit %d; send the chain hash instead of the chain", ErrTooLarge, size, MaxRecordSize)
	}
	var sbuf [448]byte
	sig := voi.Sign(voi.PrivateKey(key), appendSigStructure(sbuf[:0], aad, payload))
	out := make([]byte, 0, size)
	out = appendBytes(append(out, recordPrefix...), payload)
	return append(append(out, sigHead...), sig...), nil
}

// Record is a parsed, not yet verified, DTL record. Its Claims must not be trusted before Verify
// (or Verifier.Admit) succeeds.
type Record struct {
	Claims  Claims
	raw     []byte
	payload []byte // the claims bytes inside raw, as signed
	sig     []byte // the signature inside raw
}

// Raw returns the record bytes exactly as received. The byte-string claims share its memory:
// callers must not modify it.
func (r *Record) Raw() []byte { return r.raw }

// Parse decodes a record strictly: size cap, tagged COSE_Sign1 with exactly this profile's headers,
// a 64-byte signature, definite lengths in their shortest form, and claims decoded with duplicate
// keys, indefinite lengths, unknown claims and non-deterministic encodings refused. It does not
// verify the signature.
func Parse(b []byte) (*Record, error) {
	if len(b) > MaxRecordSize {
		return nil, fmt.Errorf("%w: record is %d bytes, limit %d", ErrTooLarge, len(b), MaxRecordSize)
	}
	if len(b) < 2 || b[0] != 0xd2 || b[1] != 0x84 {
		return nil, fmt.Errorf("%w: not a tagged COSE_Sign1 (want prefix d284)", ErrMalformed)
	}
	// The headers are fixed bytes: their content must be exactly {1: -8} and {}.
	if len(b) < len(recordPrefix) || string(b[2:2+len(protectedHeaderBstr)]) != protectedHeaderBstr {
		return nil, fmt.Errorf("%w: protected header must be exactly {1: -8} (alg EdDSA)", ErrMalformed)
	}
	if b[len(recordPrefix)-1] != emptyUnprotected[0] {
		return nil, fmt.Errorf("%w: unprotected header must be empty", ErrMalformed)
	}
	rec := &Record{raw: bytes.Clone(b)}
	r := reader{b: rec.raw, i: len(recordPrefix)}
	if r.i < len(r.b) && r.b[r.i] == 0xf6 {
		return nil, fmt.Errorf("%w: detached payload is not allowed", ErrMalformed)
	}
	payload, err := r.bytes("COSE_Sign1 payload")
	if err != nil {
		return nil, err
	}
	sig, err := r.bytes("COSE_Sign1 signature")
	if err != nil {
		return nil, err
	}
	if len(sig) != ed25519.SignatureSize {
		return nil, fmt.Errorf("%w: signature is %d bytes, want %d", ErrMalformed, len(sig), ed25519.SignatureSize)
	}
	if !r.done() {
		return nil, fmt.Errorf("%w: COSE_Sign1: %d bytes after the record", ErrMalformed, len(r.b)-r.i)
	}
	if err := unmarshalClaims(payload, &rec.Claims); err != nil {
		return nil, err
	}
	rec.payload, rec.sig = payload, sig
	return rec, nil
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
	return r.verify(pub, nil, aad)
}

// verify is Verify once the key and AAD sizes are known to be right (Admit checks them first),
// with pub's expanded form when the caller holds one (a session's cached chain). Its frame sits
// right above Ed25519 verification, the deepest point of admission (see Verifier.Admit), so it
// keeps the Sig_structure in a pooled buffer rather than on the stack, and its refusals are
// built elsewhere.
func (r *Record) verify(pub ed25519.PublicKey, x *voi.ExpandedPublicKey, aad []byte) error {
	if len(r.sig) != ed25519.SignatureSize || len(pub) != ed25519.PublicKeySize {
		return errNotVerifiable
	}
	bp := sigBufs.Get().(*[]byte)
	tbs := appendSigStructure((*bp)[:0], aad, r.payload)
	var ok bool
	if x != nil {
		ok = voi.VerifyExpandedWithOptions(x, tbs, r.sig, asStdlib)
	} else {
		ok = voi.VerifyWithOptions(voi.PublicKey(pub), tbs, r.sig, asStdlib)
	}
	if cap(tbs) <= maxPooledSigBuf {
		*bp = tbs
		sigBufs.Put(bp)
	}
	if !ok {
		return errBadSignature
	}
	return nil
}

// asStdlib makes curve25519-voi accept exactly the signatures crypto/ed25519 accepts: the
// cofactorless equation compared byte for byte with R, S below the group order, and any A that
// decodes (small-order and non-canonical encodings included, as crypto/ed25519 allows). Records
// are signed and verified with curve25519-voi because it does both in about half the time of
// crypto/ed25519 here (sign 21 against 42 µs, verify with a session's expanded key 45 against
// 95 µs; docs/benchmarks.md), and one signature and one verification per flow are the floor of
// admission's CPU. TestEd25519MatchesStdlib and FuzzEd25519MatchesStdlib hold the two
// libraries to the same verdicts and the same signature bytes. It is never modified.
var asStdlib = &voi.Options{Verify: voi.VerifyOptionsStdLib}

var (
	errNotVerifiable = fmt.Errorf("%w: record was not parsed, or the agent key is not an Ed25519 public key", ErrSignature)
	errBadSignature  = fmt.Errorf("%w: does not verify with the agent key on this session", ErrSignature)
)

// sigBufs holds Sig_structure buffers for Verify; a full-chain record's (up to MaxRecordSize)
// is not kept.
var sigBufs = sync.Pool{New: func() any { b := make([]byte, 0, 512); return &b }}

const maxPooledSigBuf = 2 << 10
