package identity

import (
	"crypto/ed25519"
	"crypto/hkdf"
	"crypto/sha256"
	"fmt"
)

// issuerKeyInfo separates the issuing key's derivation from any other use of the node key's seed.
const issuerKeyInfo = "ute node issuing key v1"

// IssuerKey derives the node's issuing key (the key of its issuing certificate, which signs its
// agents' certificates) from the node key: HKDF-SHA256 over the node key's seed with a fixed
// label. The two keys are distinct key pairs, so the key a node proves in TLS handshakes never
// signs a certificate and the issuing key never appears in a handshake, while the node directory
// keeps one secret: both keys would sit side by side with the same mode anyway, and deriving the
// second one means a renewal, a staged key and the key-binding checks cover both at once. The
// derivation is one-way: the issuing key does not reveal the node key.
func IssuerKey(nodeKey ed25519.PrivateKey) (ed25519.PrivateKey, error) {
	if len(nodeKey) != ed25519.PrivateKeySize {
		return nil, fmt.Errorf("issuing key: %w: node key is %d bytes", ErrKeyAlgorithm, len(nodeKey))
	}
	seed, err := hkdf.Key(sha256.New, nodeKey.Seed(), nil, issuerKeyInfo, ed25519.SeedSize)
	if err != nil {
		return nil, fmt.Errorf("issuing key: %w", err)
	}
	return ed25519.NewKeyFromSeed(seed), nil
}
