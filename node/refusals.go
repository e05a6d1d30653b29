package node

import (
	"errors"
	"net"
	"net/netip"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/overlay/dtl"
)

// What makes two refusals identical for the audit log's flood control (audit.Flood): a denied
// flow by its peer node, reason and destination (and zone); a refused handshake by its source
// prefix and reason (and the zone asked for). The agent, flow id and error text of the refusals a
// summary stands for are not kept: the first refusal of each kind is written in full.
var (
	denyKey          = []string{"zone", "peer", "reason", "dst"}
	tunnelRefusalKey = []string{"zone", "source", "reason"}
)

// refusalSource is the source prefix a refused handshake is aggregated under: the IPv4 address,
// or the IPv6 /64 (one host routinely owns a whole /64), as the authority counts sources.
func refusalSource(addr net.Addr) string {
	var ip netip.Addr
	switch a := addr.(type) {
	case *net.UDPAddr:
		ip, _ = netip.AddrFromSlice(a.IP)
	case *net.TCPAddr:
		ip, _ = netip.AddrFromSlice(a.IP)
	}
	if !ip.IsValid() {
		return "unknown"
	}
	ip = ip.Unmap().WithZone("")
	if ip.Is4() {
		return ip.String()
	}
	p, err := ip.Prefix(64)
	if err != nil {
		return "unknown"
	}
	return p.String()
}

// handshakeReason names why the node's peer verifier refused a handshake, coarsely enough that a
// repeated attempt maps to the same reason whatever certificate it presents.
func handshakeReason(err error) string {
	var pe *PolicyError
	switch {
	case errors.As(err, &pe):
		return "policy"
	case errors.Is(err, dtl.ErrRevoked):
		return "revoked"
	case errors.Is(err, identity.ErrExpired):
		return "expired"
	case errors.Is(err, identity.ErrNotYetValid):
		return "not-yet-valid"
	case errors.Is(err, identity.ErrTrustDomain), errors.Is(err, identity.ErrSignature),
		errors.Is(err, identity.ErrNoTrustAnchor), errors.Is(err, identity.ErrMalformedCertificate),
		errors.Is(err, identity.ErrKeyAlgorithm), errors.Is(err, identity.ErrKeyUsage),
		errors.Is(err, identity.ErrNotCA), errors.Is(err, identity.ErrLeafIsCA),
		errors.Is(err, identity.ErrZoneConstraint), errors.Is(err, identity.ErrLifetime):
		return "chain"
	default:
		return "refused"
	}
}
