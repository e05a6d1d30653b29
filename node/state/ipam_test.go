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
