package state

import (
	"net/netip"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestNextFreeSkipsNetworkBroadcastAndAllocated(t *testing.T) {
	tests := []struct {
		name     string
		prefixes []string
		taken    []string
		want     string
		wantErr  bool
	}{
		{"first host of /24", []string{"100.100.1.0/24"}, nil, "100.100.1.1", false},
		{"skips taken", []string{"100.100.1.0/24"}, []string{"100.100.1.1", "100.100.1.2"}, "100.100.1.3", false},
		{"never broadcast", []string{"10.0.0.0/30"}, []string{"10.0.0.1", "10.0.0.2"}, "", true},
		{"unmasked prefix", []string{"10.0.0.77/30"}, nil, "10.0.0.77", false},
		{"spills to second prefix", []string{"10.0.0.0/30", "10.0.1.0/29"}, []string{"10.0.0.1", "10.0.0.2"}, "10.0.1.1", false},
		{"slash 32", []string{"10.9.9.9/32"}, nil, "10.9.9.9", false},
		{"ipv6", []string{"fd00:1::/64"}, nil, "fd00:1::1", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var ps []netip.Prefix
			for _, s := range tc.prefixes {
				ps = append(ps, netip.MustParsePrefix(s))
			}
			a := allocations{}
			for _, s := range tc.taken {
				a.allocate("z", "x"+s, netip.MustParseAddr(s))
			}
			got, err := a.nextFree("z", ps)
			if tc.wantErr {
				require.ErrorIs(t, err, ErrNoFreeIP)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.want, got.String())
			for _, p := range ps {
				if p.Contains(got) {
					return
				}
			}
			t.Fatalf("%s outside %v", got, ps)
		})
	}
}

func TestReleaseFreesAddress(t *testing.T) {
	a := allocations{}
	p := []netip.Prefix{netip.MustParsePrefix("10.1.0.0/29")}
	ip1, err := a.nextFree("z", p)
	require.NoError(t, err)
	a.allocate("z", "a1", ip1)
	ip2, err := a.nextFree("z", p)
	require.NoError(t, err)
	assert.NotEqual(t, ip1, ip2)
	a.release("z", ip1)
	ip3, err := a.nextFree("z", p)
	require.NoError(t, err)
	assert.Equal(t, ip1, ip3)
	assert.Empty(t, a.names("z"))
}

// Inside a node's slice the allocator skips the slice's first and last address, like a subnet's
// network and broadcast: it costs two addresses per slice, and it means the zone's own network
// and broadcast addresses (the first address of the first slice, the last of the last) are never
// handed out.
func TestNextFreeInsideSlices(t *testing.T) {
	tests := []struct {
		name        string
		slice       string
		first, last string
		usable      int
	}{
		{"first /28 of a /24 (holds the zone's network address)", "100.100.1.0/28", "100.100.1.1", "100.100.1.14", 14},
		{"middle /28", "100.100.1.16/28", "100.100.1.17", "100.100.1.30", 14},
		{"last /28 (holds the zone's broadcast address)", "100.100.1.240/28", "100.100.1.241", "100.100.1.254", 14},
		{"/29 slice of a tiny zone", "10.9.0.8/29", "10.9.0.9", "10.9.0.14", 6},
		{"/124 IPv6 slice", "fd00:1::10/124", "fd00:1::11", "fd00:1::1f", 15},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := []netip.Prefix{netip.MustParsePrefix(tc.slice)}
			a := allocations{}
			var got []netip.Addr
			for {
				ip, err := a.nextFree("z", p)
				if err != nil {
					require.ErrorIs(t, err, ErrNoFreeIP)
					break
				}
				require.True(t, p[0].Contains(ip))
				a.allocate("z", ip.String(), ip)
				got = append(got, ip)
			}
			require.Len(t, got, tc.usable)
			assert.Equal(t, tc.first, got[0].String())
			assert.Equal(t, tc.last, got[len(got)-1].String())
		})
	}
}
