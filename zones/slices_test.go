package zones

import (
	"errors"
	"net/netip"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestDefaultNodePrefix(t *testing.T) {
	tests := []struct {
		cidr string
		want int
	}{
		{"100.100.1.0/24", 28},
		{"100.64.0.0/16", 24},
		{"10.0.0.0/8", 16},
		{"10.0.0.0/20", 28},
		{"10.0.0.0/28", 29}, // always at least one bit longer than the zone
		{"10.0.0.0/31", 32},
		{"10.0.0.1/32", 0}, // a single address cannot be sliced
		{"fd00:1::/64", 72},
		{"fd00:1::/48", 56},
		{"fd00:1::/120", 124},
		{"fd00:1::/127", 128},
		{"fd00::1/128", 0},
	}
	for _, tc := range tests {
		t.Run(tc.cidr, func(t *testing.T) {
			assert.Equal(t, tc.want, DefaultNodePrefix(netip.MustParsePrefix(tc.cidr)))
		})
	}
}

func TestParseNodePrefix(t *testing.T) {
	src := "zones:\n" + zoneYAML("dual", `[100.64.0.0/16, "fd00:1::/64"]`, "    node_prefix: 26\n    node_prefix6: \"/80\"\n") +
		zoneYAML("plain", "100.100.1.0/24", "")
	p, err := Parse("p.yaml", []byte(src))
	require.NoError(t, err)
	dual, ok := p.Zone("dual")
	require.True(t, ok)
	assert.Equal(t, 26, dual.NodePrefix)
	assert.Equal(t, 80, dual.NodePrefix6)
	assert.Equal(t, 26, dual.NodePrefixFor(dual.CIDRs[0]))
	assert.Equal(t, 80, dual.NodePrefixFor(dual.CIDRs[1]))
	plain, ok := p.Zone("plain")
	require.True(t, ok)
	assert.Zero(t, plain.NodePrefix, "absent means the default")
	assert.Equal(t, 28, plain.NodePrefixFor(plain.CIDRs[0]))
}

func TestParseNodePrefixErrors(t *testing.T) {
	tests := []struct {
		name  string
		src   string
		err   error
		line  int
		field string
		text  string
	}{
		{"not longer than zone", zoneYAML("a", "100.100.1.0/24", "    node_prefix: 24\n"), ErrNodePrefix, 7, "zones[0].node_prefix", "not longer than zone CIDR 100.100.1.0/24"},
		{"shorter than zone", zoneYAML("a", "100.100.1.0/24", "    node_prefix: 16\n"), ErrNodePrefix, 7, "zones[0].node_prefix", "use 25..32 (default 28)"},
		{"beyond IPv4", zoneYAML("a", "100.100.1.0/24", "    node_prefix: 33\n"), ErrNodePrefix, 7, "zones[0].node_prefix", "outside 1..32"},
		{"zero", zoneYAML("a", "100.100.1.0/24", "    node_prefix: 0\n"), ErrNodePrefix, 7, "zones[0].node_prefix", "outside 1..32"},
		{"negative", zoneYAML("a", "100.100.1.0/24", "    node_prefix: -4\n"), ErrNodePrefix, 7, "zones[0].node_prefix", "not a prefix length"},
		{"not a number", zoneYAML("a", "100.100.1.0/24", "    node_prefix: big\n"), ErrNodePrefix, 7, "zones[0].node_prefix", "not a prefix length"},
		{"a list", zoneYAML("a", "100.100.1.0/24", "    node_prefix: [28]\n"), ErrNodePrefix, 7, "zones[0].node_prefix", "got a list"},
		{"v4 length without v4 CIDR", zoneYAML("a", `"fd00:1::/64"`, "    node_prefix: 28\n"), ErrNodePrefix, 7, "zones[0].node_prefix", "has no IPv4 CIDR"},
		{"v6 not longer", zoneYAML("a", `[10.0.0.0/16, "fd00:1::/64"]`, "    node_prefix6: 64\n"), ErrNodePrefix, 7, "zones[0].node_prefix6", "not longer than zone CIDR fd00:1::/64"},
		{"v6 beyond family", zoneYAML("a", `"fd00:1::/64"`, "    node_prefix6: 129\n"), ErrNodePrefix, 7, "zones[0].node_prefix6", "outside 1..128"},
		{"second CIDR too wide for the length", zoneYAML("a", "[10.0.0.0/24, 10.1.0.0/30]", "    node_prefix: 29\n"), ErrNodePrefix, 7, "zones[0].node_prefix", "10.1.0.0/30"},
		{"single-address zone", zoneYAML("a", "10.0.0.1/32", ""), ErrBadCIDR, 3, "zones[0].cidr[0]", "cannot give each node its own slice"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse("policy.yaml", []byte("zones:\n"+tc.src))
			require.ErrorIs(t, err, tc.err)
			var pe *ParseError
			require.True(t, errors.As(err, &pe))
			assert.Equal(t, tc.line, pe.Line, err.Error())
			assert.Equal(t, tc.field, pe.Field)
			assert.Contains(t, err.Error(), tc.text)
			assert.Contains(t, err.Error(), "policy.yaml:")
		})
	}
}

func TestNewValidatesNodePrefix(t *testing.T) {
	z := Zone{Name: "a", CIDRs: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/16")}, Regions: []string{"r"}, NodePrefix: 20}
	p, err := New([]Zone{z})
	require.NoError(t, err)
	assert.Equal(t, 20, p.Zones[0].NodePrefixFor(z.CIDRs[0]))
	z.NodePrefix = 8
	_, err = New([]Zone{z})
	require.ErrorIs(t, err, ErrNodePrefix)
	z.NodePrefix = -1
	_, err = New([]Zone{z})
	require.ErrorIs(t, err, ErrNodePrefix)
	z.NodePrefix, z.NodePrefix6 = 0, 72
	_, err = New([]Zone{z})
	require.ErrorIs(t, err, ErrNodePrefix)
}
