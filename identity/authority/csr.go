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
