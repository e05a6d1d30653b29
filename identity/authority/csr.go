package authority

import (
	"crypto/ed25519"
	"fmt"

	"github.com/ute-project/ute/identity"
)

// csrInfo is what the authority takes from a CSR: the key it proves possession of, the requested
// node name and region, and the host fingerprint digest.
type csrInfo struct {
	PublicKey   ed25519.PublicKey
	Name        string
	Region      string
	Fingerprint []byte
}

const fingerprintLen = 32

// createCSR builds the node's request with identity.CreateCSR.
func createCSR(key ed25519.PrivateKey, name, region string, fingerprint []byte) ([]byte, error) {
	if len(fingerprint) != fingerprintLen {
		return nil, fmt.Errorf("host fingerprint is %d bytes; want %d", len(fingerprint), fingerprintLen)
	}
	info := identity.CSRInfo{Name: name, Region: region}
	copy(info.Fingerprint[:], fingerprint)
	return identity.CreateCSR(key, info)
}

// createIssuerCSR builds the request for the node's issuing certificate, signed by the issuing
// key derived from the node key.
func createIssuerCSR(nodeKey ed25519.PrivateKey, name, region string, fingerprint []byte) ([]byte, error) {
	ikey, err := identity.IssuerKey(nodeKey)
	if err != nil {
		return nil, err
	}
	return createCSR(ikey, name, region, fingerprint)
}

// parseCSR checks a CSR from the network with identity.ParseCSR (Ed25519, valid self-signature as
// proof of possession, strict extension) and requires a node name. Every refusal wraps ErrCSR.
func parseCSR(der []byte) (csrInfo, error) {
	if len(der) == 0 || len(der) > maxCSR {
		return csrInfo{}, fmt.Errorf("%w: %d bytes; want 1 to %d", ErrCSR, len(der), maxCSR)
	}
	c, err := identity.ParseCSR(der)
	if err != nil {
		return csrInfo{}, fmt.Errorf("%w: %w", ErrCSR, err)
	}
	if c.Info.Name == "" {
		return csrInfo{}, fmt.Errorf("%w: the request names no node; pass --name", ErrCSR)
	}
	return csrInfo{PublicKey: c.PublicKey, Name: c.Info.Name, Region: c.Info.Region, Fingerprint: c.Info.Fingerprint[:]}, nil
}

// parseIssuerCSR checks the CSR for a node's issuing certificate: the same checks as parseCSR,
// the same node name as the node's own CSR, and a key other than the node key, so that the key a
// node proves in TLS handshakes never signs certificates.
func parseIssuerCSR(der []byte, node csrInfo) (csrInfo, error) {
	c, err := parseCSR(der)
	if err != nil {
		return csrInfo{}, fmt.Errorf("issuing-key CSR: %w", err)
	}
	if c.Name != node.Name {
		return csrInfo{}, fmt.Errorf("%w: the issuing-key CSR names %q, the node's CSR %q", ErrCSR, c.Name, node.Name)
	}
	if c.PublicKey.Equal(node.PublicKey) {
		return csrInfo{}, fmt.Errorf("%w: the issuing key must differ from the node key", ErrCSR)
	}
	return c, nil
}
