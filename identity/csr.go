package identity

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"errors"
	"fmt"
)

// OIDCSRInfo is the extension a UTE CSR carries its request in; same provisional arc as OIDClaims.
var OIDCSRInfo = asn1.ObjectIdentifier{1, 3, 6, 1, 4, 1, 32473, 7, 2}

// CSR errors.
var (
	ErrMalformedCSR = errors.New("malformed certificate request")
	ErrCSRSignature = errors.New("certificate request signature does not match its key")
)

// MaxCSRSize bounds what ParseCSR accepts; a UTE CSR is about 250 bytes.
const MaxCSRSize = 4 << 10

// CSRInfo is what a node asks for when it joins or renews. The authority decides the zones and the
// validity: the request carries only facts about the requester.
type CSRInfo struct {
	Name        string   // requested node name; empty lets the authority choose
	Region      string   // the region the node says it runs in; empty if unknown
	Fingerprint [32]byte // HostFingerprint.Digest() of the requesting host
}

// CSR is a parsed, self-signature-checked certificate request.
type CSR struct {
	Raw       []byte
	PublicKey ed25519.PublicKey
	Info      CSRInfo
}

type csrInfoWire struct {
	Name        string `cbor:"1,keyasint,omitempty"`
	Region      string `cbor:"2,keyasint,omitempty"`
	Fingerprint []byte `cbor:"3,keyasint"`
}

func (i CSRInfo) validate() error {
	if i.Name != "" {
		if err := ValidateName("node name", i.Name); err != nil {
			return fmt.Errorf("%w: %w", ErrMalformedCSR, err)
		}
	}
	if i.Region != "" {
		if err := checkLabel(i.Region); err != nil {
			return fmt.Errorf("%w: region %q %s", ErrMalformedCSR, i.Region, err.Error())
		}
	}
	if i.Fingerprint == ([32]byte{}) {
		return fmt.Errorf("%w: host fingerprint is missing", ErrMalformedCSR)
	}
	return nil
}

func (i CSRInfo) marshal() ([]byte, error) {
	return claimsCodec.enc.Marshal(csrInfoWire{Name: i.Name, Region: i.Region, Fingerprint: i.Fingerprint[:]})
}

// CreateCSR makes a PKCS#10 request signed by key, carrying info in the OIDCSRInfo extension. The
// signature is the proof that the requester holds key.
func CreateCSR(key ed25519.PrivateKey, info CSRInfo) ([]byte, error) {
	if len(key) != ed25519.PrivateKeySize {
		return nil, fmt.Errorf("create CSR: %w: not an Ed25519 private key", ErrKeyAlgorithm)
	}
	if err := info.validate(); err != nil {
		return nil, fmt.Errorf("create CSR: %w", err)
	}
	ext, err := info.marshal()
	if err != nil {
		return nil, fmt.Errorf("create CSR: %w", err)
	}
	tmpl := &x509.CertificateRequest{
		Subject:         pkix.Name{CommonName: info.Name},
		ExtraExtensions: []pkix.Extension{{Id: OIDCSRInfo, Value: ext}},
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		return nil, fmt.Errorf("create CSR: %w", err)
	}
	return der, nil
}

// ParseCSR parses a request from an untrusted peer: at most MaxCSRSize bytes, an Ed25519 key, a
// self-signature that verifies (else ErrCSRSignature), exactly the one UTE extension and nothing
// else, decoded strictly.
func ParseCSR(der []byte) (*CSR, error) {
	if len(der) > MaxCSRSize {
		return nil, fmt.Errorf("%w: %d bytes; the limit is %d", ErrMalformedCSR, len(der), MaxCSRSize)
	}
	r, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrMalformedCSR, err)
	}
	pub, ok := r.PublicKey.(ed25519.PublicKey)
	if !ok || r.SignatureAlgorithm != x509.PureEd25519 {
		return nil, fmt.Errorf("%w: %w: key %T, signature %v", ErrMalformedCSR, ErrKeyAlgorithm, r.PublicKey, r.SignatureAlgorithm)
	}
	if err := r.CheckSignature(); err != nil {
		return nil, fmt.Errorf("%w: the requester did not prove possession of its key: %w", ErrCSRSignature, err)
	}
	if len(r.Extensions) != 1 || !r.Extensions[0].Id.Equal(OIDCSRInfo) || r.Extensions[0].Critical {
		return nil, fmt.Errorf("%w: want exactly the UTE request extension %s, found %d extensions", ErrMalformedCSR, OIDCSRInfo, len(r.Extensions))
	}
	raw := r.Extensions[0].Value
	var w csrInfoWire
	if err := claimsCodec.dec.Unmarshal(raw, &w); err != nil {
		return nil, fmt.Errorf("%w: request extension: %w", ErrMalformedCSR, err)
	}
	if len(w.Fingerprint) != digestLen {
		return nil, fmt.Errorf("%w: host fingerprint is %d bytes; want %d", ErrMalformedCSR, len(w.Fingerprint), digestLen)
	}
	info := CSRInfo{Name: w.Name, Region: w.Region}
	copy(info.Fingerprint[:], w.Fingerprint)
	if err := info.validate(); err != nil {
		return nil, err
	}
	again, err := info.marshal()
	if err != nil || !bytes.Equal(again, raw) {
		return nil, fmt.Errorf("%w: request extension is not in deterministic CBOR encoding", ErrMalformedCSR)
	}
	if r.Subject.CommonName != info.Name {
		return nil, fmt.Errorf("%w: subject name %q differs from requested name %q", ErrMalformedCSR, r.Subject.CommonName, info.Name)
	}
	return &CSR{Raw: r.Raw, PublicKey: pub, Info: info}, nil
}
