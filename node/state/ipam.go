package state

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
)

// ErrNoFreeIP means every usable address of the zone's prefixes is allocated.
var ErrNoFreeIP = errors.New("no free overlay IP left in the zone")

// maxScan bounds the search for a free address so that a huge IPv6 prefix cannot make allocation
// walk forever; allocations are dense from the bottom, so the first maxScan candidates suffice.
const maxScan = 1 << 20

// allocations maps zone → address → agent name. It is the persisted form of ipam.json.
type allocations map[string]map[string]string

// nextFree returns the lowest address inside prefixes that is not allocated in zone. For IPv4
// prefixes wider than /31 the network and broadcast addresses are skipped; for IPv6 the
// subnet-router anycast (all-zero host part) address is skipped.
func (a allocations) nextFree(zone string, prefixes []netip.Prefix) (netip.Addr, error) {
	used := a[zone]
	for _, p := range prefixes {
		p = p.Masked()
		first, last := usableRange(p)
		if !first.IsValid() {
			continue
		}
		addr := first
		for range maxScan {
			if _, taken := used[addr.String()]; !taken {
				return addr, nil
			}
			if addr == last {
				break
			}
			addr = addr.Next()
		}
	}
	return netip.Addr{}, fmt.Errorf("%w %s (%v); remove an agent or widen the zone's CIDR", ErrNoFreeIP, zone, prefixes)
}

func (a allocations) allocate(zone, name string, addr netip.Addr) {
	if a[zone] == nil {
		a[zone] = map[string]string{}
	}
	a[zone][addr.String()] = name
}

func (a allocations) release(zone string, addr netip.Addr) {
	delete(a[zone], addr.String())
	if len(a[zone]) == 0 {
		delete(a, zone)
	}
}

// usableRange returns the first and last assignable address of p.
func usableRange(p netip.Prefix) (netip.Addr, netip.Addr) {
	first := p.Addr()
	last := lastAddr(p)
	hostBits := first.BitLen() - p.Bits()
	switch {
	case first.Is4() && hostBits >= 2:
		return first.Next(), last.Prev()
	case first.Is6() && hostBits >= 1:
		return first.Next(), last
	default:
		return first, last
	}
}

func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Addr().AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	addr, _ := netip.AddrFromSlice(b)
	return addr
}

// names returns the agent names allocated in zone, sorted (for error messages and tests).
func (a allocations) names(zone string) []string {
	var out []string
	for _, n := range a[zone] {
		out = append(out, n)
	}
	slices.Sort(out)
	return out
}
