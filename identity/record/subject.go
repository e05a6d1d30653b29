package record

import (
	"fmt"
	"math/big"
	"strings"

	"github.com/ute-project/ute/identity"
)

// SerialPrefix introduces a subject or key given by certificate serial, as in "serial:7".
const SerialPrefix = "serial:"

// maxSerialDigits bounds a serial's decimal form: RFC 5280 serials are at most 20 octets, i.e.
// below 2^159, which has 48 decimal digits.
const maxSerialDigits = 48

// CanonicalSubject checks a revocation subject and returns its one canonical spelling: a node
// SPIFFE ID, an agent SPIFFE ID, or "serial:<N>" with N a positive decimal without leading zeros
// (the syntax `ute revoke` and the node already use). The authority ID is not a subject. Errors wrap
// ErrMalformed.
func CanonicalSubject(s string) (string, error) {
	if num, ok := strings.CutPrefix(s, SerialPrefix); ok {
		if !validSerialDigits(num) {
			return "", fmt.Errorf("%w: subject %q: a serial is a decimal number from 1, without leading zeros, e.g. serial:7", ErrMalformed, truncate(s))
		}
		return s, nil
	}
	id, err := identity.ParseID(s)
	if err != nil {
		return "", fmt.Errorf("%w: subject: %w", ErrMalformed, err)
	}
	if id.Kind != identity.KindNode && id.Kind != identity.KindAgent {
		return "", fmt.Errorf("%w: subject %s is the authority, which cannot be revoked", ErrMalformed, id)
	}
	return id.String(), nil
}

func validSerialDigits(num string) bool {
	if num == "" || len(num) > maxSerialDigits || num[0] == '0' {
		return false
	}
	for i := 0; i < len(num); i++ {
		if num[i] < '0' || num[i] > '9' {
			return false
		}
	}
	return true
}

// SerialKey is the canonical key of a certificate serial, "serial:<N>". A revocation by the
// authority of "serial:N" covers every certificate with that serial.
func SerialKey(serial *big.Int) string {
	if serial == nil {
		return SerialPrefix + "0"
	}
	return SerialPrefix + serial.String()
}

// IssuedSerialKey is the canonical key of one certificate serial as issued by one node:
// "serial:<N>@<node SPIFFE ID>". A node-signed revocation of one of its agent certificates covers
// this key only, never the bare serial or the agent's name: a node chooses the serials of the
// certificates it issues and may mint any agent name of its zones, so an unscoped key would let a
// compromised node revoke certificates other nodes (or the authority) issued.
func IssuedSerialKey(issuer identity.ID, serial *big.Int) string {
	return SerialKey(serial) + "@" + issuer.String()
}

// ChainKeys lists every canonical key a revocation may name for a certificate chain: the node's
// SPIFFE ID and serial, and with an agent its SPIFFE ID, its serial and its serial as issued by
// this node. A chain is revoked when any of them is (revoking a node revokes its agents). agent
// may be nil for a node on its own (a tunnel peer). node may be the node certificate or the
// node's issuing certificate: both give the node's ID and its node certificate's serial.
func ChainKeys(node, agent *identity.Certificate) []string {
	keys := make([]string, 0, 5)
	if node != nil {
		keys = append(keys, node.ID.String(), SerialKey(node.NodeSerial()))
	}
	if agent != nil {
		keys = append(keys, agent.ID.String(), SerialKey(agent.Serial()))
		if node != nil {
			keys = append(keys, IssuedSerialKey(node.ID, agent.Serial()))
		}
	}
	return keys
}

// truncate keeps hostile input short in error messages.
func truncate(s string) string {
	if len(s) > 80 {
		return s[:80] + "..."
	}
	return s
}
