package zones

import (
	"fmt"
	"net/netip"
)

// Per-node slices. The authority gives every node, per zone CIDR, its own sub-prefix (its slice)
// and puts only that slice into the node certificate, so that a node can never mint an agent
// certificate for an overlay IP another node's agents use. The zone fixes how big a slice is.

// minSliceHostBits is the host part a default slice keeps: 4 bits is a /28 (IPv4: 14 usable
// addresses once the slice's first and last are skipped) or a /124 (IPv6: 15 usable).
const minSliceHostBits = 4

// defaultSliceBits is how many bits a default slice adds to the zone prefix: 256 nodes per zone
// CIDR unless that would leave slices smaller than minSliceHostBits.
const defaultSliceBits = 8

// DefaultNodePrefix is the slice length used for a zone CIDR whose zone sets no node_prefix
// (IPv4) or node_prefix6 (IPv6): the CIDR's length + 8, capped at /28 (IPv4) or /124 (IPv6), and
// always at least one bit longer than the CIDR (a /28 zone gets /29 slices). It returns 0 for a
// single-address CIDR (/32, /128), which cannot be sliced.
func DefaultNodePrefix(cidr netip.Prefix) int {
	total := cidr.Addr().BitLen()
	b := cidr.Bits()
	if b < 0 || b >= total {
		return 0
	}
	n := min(b+defaultSliceBits, total-minSliceHostBits)
	return max(n, b+1)
}

// NodePrefixFor is the length of a node's slice of cidr, one of the zone's CIDRs: the zone's
// node_prefix (IPv4) or node_prefix6 (IPv6) when set, else DefaultNodePrefix.
func (z *Zone) NodePrefixFor(cidr netip.Prefix) int {
	explicit := z.NodePrefix
	if cidr.Addr().Is6() {
		explicit = z.NodePrefix6
	}
	if explicit != 0 {
		return explicit
	}
	return DefaultNodePrefix(cidr)
}

// checkNodePrefixes validates a zone's node_prefix and node_prefix6 against its CIDRs. field is
// "node_prefix" or "node_prefix6", the one at fault; cidrIdx is the CIDR at fault when the CIDR
// itself is the problem (-1 otherwise).
func checkNodePrefixes(z *Zone) (field string, cidrIdx int, err error) {
	has4, has6 := false, false
	for _, p := range z.CIDRs {
		if p.Addr().Is4() {
			has4 = true
		} else {
			has6 = true
		}
	}
	for _, fam := range []struct {
		field string
		val   int
		bits  int
		has   bool
		is4   bool
	}{{"node_prefix", z.NodePrefix, 32, has4, true}, {"node_prefix6", z.NodePrefix6, 128, has6, false}} {
		if fam.val == 0 {
			continue
		}
		if !fam.has {
			family := "IPv4"
			if !fam.is4 {
				family = "IPv6"
			}
			return fam.field, -1, fmt.Errorf("%s %d sizes the %s slices, but zone %s has no %s CIDR; remove it", fam.field, fam.val, family, z.Name, family)
		}
		if fam.val < 1 || fam.val > fam.bits {
			return fam.field, -1, fmt.Errorf("%s %d is outside 1..%d", fam.field, fam.val, fam.bits)
		}
		for _, p := range z.CIDRs {
			if p.Addr().Is4() != fam.is4 {
				continue
			}
			if fam.val <= p.Bits() {
				return fam.field, -1, fmt.Errorf("%s /%d is not longer than zone CIDR %s; a node's slice must be smaller than the zone: use %d..%d (default %d)",
					fam.field, fam.val, p, p.Bits()+1, fam.bits, DefaultNodePrefix(p))
			}
		}
	}
	for j, p := range z.CIDRs {
		if p.IsValid() && p.Bits() >= p.Addr().BitLen() {
			return "", j, fmt.Errorf("%s is a single address and cannot give each node its own slice; widen it (at most /%d)", p, p.Addr().BitLen()-1)
		}
	}
	return "", -1, nil
}
