package wireguard

import (
	"bytes"
	"crypto/ecdh"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"github.com/fxamacker/cbor/v2"
	"github.com/veraison/go-cose"

	"github.com/ute-project/ute/identity"
)

// Key is a WireGuard (Curve25519) public or private key.
type Key [32]byte

// String is the key in base64, as wg(8) prints it.
func (k Key) String() string { return base64.StdEncoding.EncodeToString(k[:]) }

// hex is the key as wireguard-go's configuration protocol wants it.
func (k Key) hex() string { return hex.EncodeToString(k[:]) }

// IsZero reports whether k is all zeros.
func (k Key) IsZero() bool { return k == Key{} }

// KeyPair is a WireGuard private key with its public key.
type KeyPair struct {
	Private, Public Key
}

// GenerateKeyPair returns a fresh key pair. A node makes one at every start: the key lives only
// in memory and in the signed binding, so there is nothing on disk to steal or rotate.
func GenerateKeyPair() (KeyPair, error) {
	sk, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		return KeyPair{}, fmt.Errorf("wireguard: generate key: %w", err)
	}
	var kp KeyPair
	copy(kp.Private[:], sk.Bytes())
	copy(kp.Public[:], sk.PublicKey().Bytes())
	return kp, nil
}

// Sentinels of VerifyBinding; every refusal wraps exactly one.
var (
	// ErrBindingMalformed: not a binding of this profile (COSE structure, CBOR, a claim's form).
	ErrBindingMalformed = errors.New("wireguard: malformed key binding")
	// ErrBindingSignature: the signature does not verify with the presenting node's certificate
	// key (signed by someone else, or altered, e.g. another WireGuard key substituted).
	ErrBindingSignature = errors.New("wireguard: key binding signature does not verify with the node certificate")
	// ErrBindingNode: the binding names another node than the one whose tunnel carried it (a
	// binding replayed for another node).
	ErrBindingNode = errors.New("wireguard: key binding names another node")
	// ErrBindingZone: the binding does not name the tunnel's zone, or names a zone the node
	// certificate does not grant.
	ErrBindingZone = errors.New("wireguard: key binding zone not granted")
	// ErrBindingExpired: the binding is past its expiry, or issued in the future beyond the skew.
	ErrBindingExpired = errors.New("wireguard: key binding expired or not yet valid")
	// ErrBindingKey: the WireGuard key is unusable (all zeros) or already bound to another node.
	ErrBindingKey = errors.New("wireguard: key binding key refused")
)

// aadBinding separates binding signatures from every other signature a node key makes: DTL
// records (32-byte exporter AAD), revocations and policy releases have their own.
const aadBinding = "ute/1 wireguard key binding"

// MaxBindingSize caps a binding on the wire before it is decoded.
const MaxBindingSize = 2048

// BindingLifetime is how long a binding is valid when the node certificate lasts longer.
const BindingLifetime = 24 * time.Hour

// BindingSkew is the tolerance for a binding issued in the future.
const BindingSkew = 5 * time.Minute

// Binding is the statement "node Node, in Zones, holds WireGuard key Key and receives
// WireGuard packets at Endpoint", signed with the node key.
type Binding struct {
	Node     string // node SPIFFE ID
	Zones    []string
	Key      Key
	Endpoint netip.AddrPort
	IssuedAt time.Time
	Expires  time.Time

	raw []byte
}

// Raw is the signed binding as received or signed.
func (b *Binding) Raw() []byte { return b.raw }

type wireBinding struct {
	Version  uint64   `cbor:"1,keyasint"`
	Node     string   `cbor:"2,keyasint"`
	Zones    []string `cbor:"3,keyasint"`
	Key      []byte   `cbor:"4,keyasint"`
	Endpoint string   `cbor:"5,keyasint"`
	IssuedAt uint64   `cbor:"6,keyasint"`
	Expires  uint64   `cbor:"7,keyasint"`
}

var (
	encMode = mustEncMode()
	decMode = mustDecMode()
)

func mustEncMode() cbor.EncMode {
	m, err := cbor.CoreDetEncOptions().EncMode()
	if err != nil {
		panic(fmt.Sprintf("wireguard: cbor encoder options: %v", err)) // static options
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
		MaxArrayElements:  64,
		MaxMapPairs:       16,
		UTF8:              cbor.UTF8RejectInvalid,
	}.DecMode()
	if err != nil {
		panic(fmt.Sprintf("wireguard: cbor decoder options: %v", err))
	}
	return m
}

// protectedEdDSA is the only protected header accepted: bstr-wrapped {1: -8}.
const protectedEdDSA = "\x43\xa1\x01\x27"

func millis(t time.Time) uint64 {
	if t.Before(time.Unix(0, 0)) {
		return 0
	}
	return uint64(t.UnixMilli())
}

// SignBinding signs b with the node key. The caller fills every field; the expiry must not
// pass the node certificate's (the verifier also checks the certificate, but a binding that
// outlives it would only be refused later).
func SignBinding(b Binding, key ed25519.PrivateKey) ([]byte, error) {
	if len(key) != ed25519.PrivateKeySize {
		return nil, fmt.Errorf("wireguard: sign binding: key is %d bytes, want Ed25519", len(key))
	}
	w := wireBinding{Version: 1, Node: b.Node, Zones: b.Zones, Key: b.Key[:], Endpoint: b.Endpoint.String(),
		IssuedAt: millis(b.IssuedAt), Expires: millis(b.Expires)}
	if err := w.check(); err != nil {
		return nil, err
	}
	payload, err := encMode.Marshal(w)
	if err != nil {
		return nil, fmt.Errorf("wireguard: sign binding: %w", err)
	}
	signer, err := cose.NewSigner(cose.AlgorithmEdDSA, key)
	if err != nil {
		return nil, fmt.Errorf("wireguard: sign binding: %w", err)
	}
	msg := cose.Sign1Message{
		Headers: cose.Headers{Protected: cose.ProtectedHeader{cose.HeaderLabelAlgorithm: cose.AlgorithmEdDSA}},
		Payload: payload,
	}
	if err := msg.Sign(rand.Reader, []byte(aadBinding), signer); err != nil {
		return nil, fmt.Errorf("wireguard: sign binding: %w", err)
	}
	out, err := msg.MarshalCBOR()
	if err != nil {
		return nil, fmt.Errorf("wireguard: sign binding: %w", err)
	}
	return out, nil
}

// check validates the claims' form (shared by signer and verifier).
func (w *wireBinding) check() error {
	if w.Version != 1 {
		return fmt.Errorf("%w: version %d, want 1", ErrBindingMalformed, w.Version)
	}
	id, err := identity.ParseID(w.Node)
	if err != nil || id.Kind != identity.KindNode {
		return fmt.Errorf("%w: node %q is not a node SPIFFE ID", ErrBindingMalformed, w.Node)
	}
	if len(w.Zones) == 0 {
		return fmt.Errorf("%w: no zone", ErrBindingMalformed)
	}
	for _, z := range w.Zones {
		if identity.ValidateName("zone name", z) != nil {
			return fmt.Errorf("%w: zone %q", ErrBindingMalformed, z)
		}
	}
	if len(w.Key) != 32 {
		return fmt.Errorf("%w: key is %d bytes, want 32", ErrBindingMalformed, len(w.Key))
	}
	ap, err := netip.ParseAddrPort(w.Endpoint)
	if err != nil || ap.Port() == 0 || !ap.Addr().IsValid() || ap.Addr().IsUnspecified() || ap.Addr().Zone() != "" {
		return fmt.Errorf("%w: endpoint %q is not a dialable ip:port", ErrBindingMalformed, w.Endpoint)
	}
	if w.Expires <= w.IssuedAt {
		return fmt.Errorf("%w: expires %d not after issued-at %d", ErrBindingMalformed, w.Expires, w.IssuedAt)
	}
	return nil
}

// VerifyBinding verifies raw as the binding of the node whose certificate cert the tunnel's
// mutual TLS proved (the caller passes the tunnel peer's verified certificate, never one taken
// from the message), for zone, at now. It checks, in order: size and COSE form, the signature
// with cert's key under the binding AAD, the claims' form, the node named is cert's, zone is
// named and every zone named is granted by cert, and the validity window.
func VerifyBinding(raw []byte, cert *identity.Certificate, zone string, now time.Time) (*Binding, error) {
	if cert == nil {
		return nil, fmt.Errorf("%w: no verified node certificate", ErrBindingSignature)
	}
	if len(raw) > MaxBindingSize {
		return nil, fmt.Errorf("%w: %d bytes, at most %d", ErrBindingMalformed, len(raw), MaxBindingSize)
	}
	if len(raw) < 2 || raw[0] != 0xd2 || raw[1] != 0x84 {
		return nil, fmt.Errorf("%w: not a tagged COSE_Sign1", ErrBindingMalformed)
	}
	var msg cose.Sign1Message
	if err := msg.UnmarshalCBOR(raw); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBindingMalformed, err)
	}
	if string(msg.Headers.RawProtected) != protectedEdDSA || len(msg.Headers.RawUnprotected) != 1 || msg.Headers.RawUnprotected[0] != 0xa0 {
		return nil, fmt.Errorf("%w: headers must be exactly {1: -8} and {}", ErrBindingMalformed)
	}
	if msg.Payload == nil || len(msg.Signature) != ed25519.SignatureSize {
		return nil, fmt.Errorf("%w: detached payload or bad signature length", ErrBindingMalformed)
	}
	pub := cert.PublicKey()
	if len(pub) != ed25519.PublicKeySize {
		return nil, fmt.Errorf("%w: certificate key is not Ed25519", ErrBindingSignature)
	}
	v, err := cose.NewVerifier(cose.AlgorithmEdDSA, pub)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBindingSignature, err)
	}
	if err := msg.Verify([]byte(aadBinding), v); err != nil {
		return nil, fmt.Errorf("%w: %s", ErrBindingSignature, cert.ID)
	}
	var w wireBinding
	if len(msg.Payload) == 0 || msg.Payload[0]>>5 != 5 {
		return nil, fmt.Errorf("%w: claims are not a CBOR map", ErrBindingMalformed)
	}
	if err := decMode.Unmarshal(msg.Payload, &w); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBindingMalformed, err)
	}
	if re, err := encMode.Marshal(w); err != nil || !bytes.Equal(re, msg.Payload) {
		return nil, fmt.Errorf("%w: claims are not in deterministic CBOR", ErrBindingMalformed)
	}
	if err := w.check(); err != nil {
		return nil, err
	}
	if w.Node != cert.ID.String() {
		return nil, fmt.Errorf("%w: binding for %s arrived from %s", ErrBindingNode, w.Node, cert.ID)
	}
	granted := cert.Claims.ZoneNames()
	if !slices.Contains(w.Zones, zone) {
		return nil, fmt.Errorf("%w: binding of %s does not name zone %s", ErrBindingZone, w.Node, zone)
	}
	for _, z := range w.Zones {
		if !slices.Contains(granted, z) {
			return nil, fmt.Errorf("%w: %s is not granted zone %s", ErrBindingZone, w.Node, z)
		}
	}
	issued, expires := time.UnixMilli(int64(w.IssuedAt)), time.UnixMilli(int64(w.Expires))
	if now.After(expires) || !now.Before(cert.X509.NotAfter) {
		return nil, fmt.Errorf("%w: expired at %s", ErrBindingExpired, expires.UTC().Format(time.RFC3339))
	}
	if issued.After(now.Add(BindingSkew)) {
		return nil, fmt.Errorf("%w: issued at %s, in the future", ErrBindingExpired, issued.UTC().Format(time.RFC3339))
	}
	var k Key
	copy(k[:], w.Key)
	if k.IsZero() {
		return nil, fmt.Errorf("%w: all-zero key", ErrBindingKey)
	}
	ep, _ := netip.ParseAddrPort(w.Endpoint)
	return &Binding{Node: w.Node, Zones: w.Zones, Key: k, Endpoint: ep, IssuedAt: issued, Expires: expires,
		raw: append([]byte(nil), raw...)}, nil
}
