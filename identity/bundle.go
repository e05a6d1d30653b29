package identity

import (
	"crypto/ed25519"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"time"
)

// SPIFFEBundle is a trust bundle in the SPIFFE bundle format (SPIFFE Trust Domain and Bundle
// specification §4): a JWK Set whose x509-svid entries each carry one CA certificate in x5c.
type SPIFFEBundle struct {
	Keys        []SPIFFEJWK `json:"keys"`
	Sequence    *uint64     `json:"spiffe_sequence,omitempty"`
	RefreshHint *int64      `json:"spiffe_refresh_hint,omitempty"`
}

// SPIFFEJWK is one bundle entry: an Ed25519 public key (RFC 8037 OKP) with its certificate.
type SPIFFEJWK struct {
	Use string   `json:"use"`
	Kty string   `json:"kty"`
	Crv string   `json:"crv"`
	X   string   `json:"x"`
	X5C []string `json:"x5c"`
}

// MarshalSPIFFEBundle encodes the authority certificates (the trust anchors of one trust domain)
// as a SPIFFE bundle. Only the authority's self-signed roots belong in it: node issuing
// certificates are intermediates, sent by whoever presents an agent certificate. refresh, when
// positive, becomes spiffe_refresh_hint in whole seconds; sequence, when non-zero,
// spiffe_sequence.
func MarshalSPIFFEBundle(anchors []*Certificate, sequence uint64, refresh time.Duration) ([]byte, error) {
	if len(anchors) == 0 {
		return nil, fmt.Errorf("spiffe bundle: %w: no authority certificate", ErrNoTrustAnchor)
	}
	b := SPIFFEBundle{Keys: make([]SPIFFEJWK, 0, len(anchors))}
	td := anchors[0].ID.TrustDomain
	for _, a := range anchors {
		if a.ID.Kind != KindAuthority || a.Issuing || !a.X509.IsCA {
			return nil, fmt.Errorf("spiffe bundle: %w: %s is not an authority certificate", ErrNoTrustAnchor, a.ID)
		}
		if a.ID.TrustDomain != td {
			return nil, fmt.Errorf("spiffe bundle: %w: %s and %s are different trust domains", ErrTrustDomain, a.ID, anchors[0].ID)
		}
		pub, ok := a.X509.PublicKey.(ed25519.PublicKey)
		if !ok {
			return nil, fmt.Errorf("spiffe bundle: %w", ErrKeyAlgorithm)
		}
		b.Keys = append(b.Keys, SPIFFEJWK{
			Use: "x509-svid", Kty: "OKP", Crv: "Ed25519",
			X:   base64.RawURLEncoding.EncodeToString(pub),
			X5C: []string{base64.StdEncoding.EncodeToString(a.Raw())},
		})
	}
	if sequence != 0 {
		b.Sequence = &sequence
	}
	if refresh > 0 {
		secs := int64(refresh / time.Second)
		b.RefreshHint = &secs
	}
	out, err := json.MarshalIndent(b, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("spiffe bundle: %w", err)
	}
	return append(out, '\n'), nil
}
