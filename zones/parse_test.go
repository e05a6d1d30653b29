package zones

import (
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const examplePath = "../docs/examples/policy.yaml"

func TestLoadExample(t *testing.T) {
	p, err := Load(examplePath)
	require.NoError(t, err)
	require.Len(t, p.Zones, 2)

	pay, ok := p.Zone("payments")
	require.True(t, ok)
	assert.Equal(t, []netip.Prefix{netip.MustParsePrefix("100.100.1.0/24")}, pay.CIDRs)
	assert.Equal(t, []string{"eu-west-1"}, pay.Regions)
	assert.Equal(t, 50, pay.MinTrust)
	assert.Equal(t, 20, pay.IsolateBelow)
	assert.Equal(t, time.Hour, pay.MaxCertLifetime)
	require.Len(t, pay.Rules, 3)
	assert.Equal(t, Selector{Glob: "billing-*"}, pay.Rules[0].From)
	assert.Equal(t, Selector{Name: "ledger"}, pay.Rules[0].To)
	assert.Equal(t, []PortRange{{ProtoTCP, 443, 443}}, pay.Rules[0].Ports)
	assert.Equal(t, Selector{Labels: map[string]string{"team": "risk"}}, pay.Rules[1].From)
	assert.Equal(t, []PortRange{{ProtoTCP, 443, 443}, {ProtoTCP, 8000, 8100}}, pay.Rules[1].Ports)
	assert.Equal(t, 11, pay.Rules[0].Line)

	sup, ok := p.Zone("support")
	require.True(t, ok)
	assert.Equal(t, []string{"eu-west-1", "us-east-1"}, sup.Regions)
	assert.Equal(t, time.Duration(0), sup.MaxCertLifetime)
	assert.Equal(t, Selector{Glob: "*"}, sup.Rules[1].From)
	assert.Equal(t, []PortRange{{ProtoTCP, 80, 80}, {ProtoICMP, 0, 0}}, sup.Rules[1].Ports)

	_, ok = p.Zone("other")
	assert.False(t, ok)
	z, ok := p.ZoneForAddr(netip.MustParseAddr("100.100.2.7"))
	require.True(t, ok)
	assert.Equal(t, "support", z.Name)
	_, ok = p.ZoneForAddr(netip.MustParseAddr("100.100.3.7"))
	assert.False(t, ok)
}

func TestParseIPv6AndLists(t *testing.T) {
	src := `zones:
  - name: dual
    cidr: [100.64.0.0/16, "fd00:1::/64"]
    regions: [r1]
    min_trust: 0
    isolate_below: 0
    rules: []
`
	p, err := Parse("dual.yaml", []byte(src))
	require.NoError(t, err)
	z, ok := p.ZoneForAddr(netip.MustParseAddr("fd00:1::5"))
	require.True(t, ok)
	assert.Equal(t, "dual", z.Name)
	assert.Empty(t, z.Rules)
}

// zoneYAML renders one zone with overridable lines so that each bad case changes one thing.
func zoneYAML(name, cidr, extra string) string {
	return "  - name: " + name + "\n    cidr: " + cidr + "\n    regions: [eu-west-1]\n    min_trust: 50\n    isolate_below: 20\n" + extra
}

func ruleYAML(from, to, ports string) string {
	return "    rules:\n      - from: " + from + "\n        to: " + to + "\n        ports: " + ports + "\n"
}

func TestParseErrors(t *testing.T) {
	okZone := zoneYAML("payments", "100.100.1.0/24", "")
	tests := []struct {
		name  string
		src   string
		err   error
		line  int
		field string
		text  string // must appear in the message
	}{
		{"empty file", "", ErrNoZones, 1, "zones", "empty"},
		{"no zones key", "other: 1\n", ErrUnknownField, 1, "other", "allowed: zones"},
		{"zones empty", "zones: []\n", ErrNoZones, 1, "zones", "at least one"},
		{"zones not a list", "zones: payments\n", ErrBadValue, 1, "zones", "expected a list"},
		{"syntax", "zones: [\n", ErrSyntax, 1, "", "not found"},
		{"duplicate key", "zones: []\nzones: []\n", ErrSyntax, 2, "", "already defined"},
		{"unknown zone key", "zones:\n" + zoneYAML("payments", "100.100.1.0/24", "    colour: red\n"), ErrUnknownField, 7, "zones[0].colour", `"colour"`},
		{"unknown rule key", "zones:\n" + zoneYAML("payments", "100.100.1.0/24", "    rules:\n      - from: a\n        to: b\n        ports: [tcp/1]\n        action: allow\n"), ErrUnknownField, 11, "zones[0].rules[0].action", "allowed: from, to, ports"},
		{"missing name", "zones:\n  - cidr: 100.100.1.0/24\n    regions: [a]\n    min_trust: 1\n    isolate_below: 0\n", ErrMissingField, 2, "zones[0].name", "name"},
		{"missing regions", "zones:\n  - name: a\n    cidr: 100.100.1.0/24\n    min_trust: 1\n    isolate_below: 0\n", ErrMissingField, 2, "zones[0].regions", "regions"},
		{"bad zone name", "zones:\n" + zoneYAML("Pay_ments", "100.100.1.0/24", ""), ErrBadName, 2, "zones[0].name", "lowercase"},
		{"duplicate zone", "zones:\n" + okZone + zoneYAML("payments", "100.100.2.0/24", ""), ErrDuplicateZone, 7, "zones[1].name", "line 2"},
		{"bad cidr", "zones:\n" + zoneYAML("payments", "100.100.1.0/33", ""), ErrBadCIDR, 3, "zones[0].cidr[0]", "not a CIDR"},
		{"host bits", "zones:\n" + zoneYAML("payments", "100.100.1.5/24", ""), ErrBadCIDR, 3, "zones[0].cidr[0]", "write 100.100.1.0/24"},
		{"4in6", "zones:\n" + zoneYAML("payments", `"::ffff:100.100.1.0/120"`, ""), ErrBadCIDR, 3, "zones[0].cidr[0]", "IPv4-mapped"},
		{"overlap v4", "zones:\n" + okZone + zoneYAML("support", "100.100.0.0/16", ""), ErrOverlappingCIDR, 8, "zones[1].cidr[0]", "overlaps 100.100.1.0/24 of zone payments (line 3)"},
		{"overlap v6", "zones:\n" + zoneYAML("a", `"fd00::/48"`, "") + zoneYAML("b", `"fd00:0:0:1::/64"`, ""), ErrOverlappingCIDR, 8, "zones[1].cidr[0]", "overlaps fd00::/48"},
		{"overlap same zone", "zones:\n" + zoneYAML("a", "[10.0.0.0/8, 10.1.0.0/16]", ""), ErrOverlappingCIDR, 3, "zones[0].cidr[1]", "overlaps 10.0.0.0/8"},
		{"cidr number", "zones:\n" + zoneYAML("payments", "42", ""), ErrBadValue, 3, "zones[0].cidr[0]", "expected a string"},
		{"regions scalar", "zones:\n  - name: a\n    cidr: 10.0.0.0/8\n    regions: eu-west-1\n    min_trust: 1\n    isolate_below: 0\n", ErrBadValue, 4, "zones[0].regions", "expected a list"},
		{"region empty list", "zones:\n  - name: a\n    cidr: 10.0.0.0/8\n    regions: []\n    min_trust: 1\n    isolate_below: 0\n", ErrMissingField, 4, "zones[0].regions", "placement"},
		{"region bad", "zones:\n  - name: a\n    cidr: 10.0.0.0/8\n    regions: [EU West]\n    min_trust: 1\n    isolate_below: 0\n", ErrBadRegion, 4, "zones[0].regions[0]", "lowercase"},
		{"region twice", "zones:\n  - name: a\n    cidr: 10.0.0.0/8\n    regions: [r1, r1]\n    min_trust: 1\n    isolate_below: 0\n", ErrBadRegion, 4, "zones[0].regions[1]", "twice"},
		{"min_trust high", "zones:\n  - name: a\n    cidr: 10.0.0.0/8\n    regions: [r]\n    min_trust: 101\n    isolate_below: 0\n", ErrThreshold, 5, "zones[0].min_trust", "outside 0..100"},
		{"min_trust huge", "zones:\n  - name: a\n    cidr: 10.0.0.0/8\n    regions: [r]\n    min_trust: 99999999999999999999\n    isolate_below: 0\n", ErrBadValue, 5, "zones[0].min_trust", "expected an integer"},
		{"isolate negative", "zones:\n  - name: a\n    cidr: 10.0.0.0/8\n    regions: [r]\n    min_trust: 10\n    isolate_below: -1\n", ErrThreshold, 6, "zones[0].isolate_below", "outside 0..100"},
		{"isolate above min", "zones:\n  - name: a\n    cidr: 10.0.0.0/8\n    regions: [r]\n    min_trust: 10\n    isolate_below: 30\n", ErrThreshold, 6, "zones[0].isolate_below", "above min_trust 10"},
		{"min_trust string", "zones:\n  - name: a\n    cidr: 10.0.0.0/8\n    regions: [r]\n    min_trust: \"50\"\n    isolate_below: 0\n", ErrBadValue, 5, "zones[0].min_trust", "expected an integer"},
		{"min_trust float", "zones:\n  - name: a\n    cidr: 10.0.0.0/8\n    regions: [r]\n    min_trust: 50.5\n    isolate_below: 0\n", ErrBadValue, 5, "zones[0].min_trust", "expected an integer"},
		{"lifetime bad", "zones:\n" + zoneYAML("a", "10.0.0.0/8", "    max_cert_lifetime: forever\n"), ErrBadValue, 7, "zones[0].max_cert_lifetime", "positive duration"},
		{"lifetime negative", "zones:\n" + zoneYAML("a", "10.0.0.0/8", "    max_cert_lifetime: -1h\n"), ErrBadValue, 7, "zones[0].max_cert_lifetime", "positive duration"},
		{"cross zone to", "zones:\n" + zoneYAML("payments", "100.100.1.0/24", ruleYAML("billing", "support/desk", "[tcp/443]")) + zoneYAML("support", "100.100.2.0/24", ""), ErrCrossZone, 9, "zones[0].rules[0].to", "nothing crosses zones"},
		{"cross zone unknown", "zones:\n" + zoneYAML("payments", "100.100.1.0/24", ruleYAML("billing", "other-zone/ledger", "[tcp/443]")), ErrUnknownZone, 9, "zones[0].rules[0].to", `zone "other-zone", which does not exist`},
		{"own zone prefix", "zones:\n" + zoneYAML("payments", "100.100.1.0/24", ruleYAML("payments/billing", "ledger", "[tcp/443]")), ErrBadSelector, 8, "zones[0].rules[0].from", "without the zone prefix"},
		{"bad agent name", "zones:\n" + zoneYAML("a", "10.0.0.0/8", ruleYAML("Bad Name", "b", "[tcp/1]")), ErrBadSelector, 8, "zones[0].rules[0].from", "agent name"},
		{"bad glob", "zones:\n" + zoneYAML("a", "10.0.0.0/8", ruleYAML("\"bill[\"", "b", "[tcp/1]")), ErrBadSelector, 8, "zones[0].rules[0].from", "malformed"},
		{"selector number", "zones:\n" + zoneYAML("a", "10.0.0.0/8", ruleYAML("42", "b", "[tcp/1]")), ErrBadSelector, 8, "zones[0].rules[0].from", "got an integer"},
		{"selector list", "zones:\n" + zoneYAML("a", "10.0.0.0/8", ruleYAML("[a, b]", "b", "[tcp/1]")), ErrBadSelector, 8, "zones[0].rules[0].from", "got a list"},
		{"labels unknown key", "zones:\n" + zoneYAML("a", "10.0.0.0/8", ruleYAML("{tags: {team: x}}", "b", "[tcp/1]")), ErrUnknownField, 8, "zones[0].rules[0].from.tags", "allowed: labels"},
		{"labels empty", "zones:\n" + zoneYAML("a", "10.0.0.0/8", ruleYAML("{labels: {}}", "b", "[tcp/1]")), ErrBadSelector, 8, "zones[0].rules[0].from.labels", "at least one"},
		{"labels number value", "zones:\n" + zoneYAML("a", "10.0.0.0/8", ruleYAML("{labels: {tier: 1}}", "b", "[tcp/1]")), ErrBadValue, 8, "zones[0].rules[0].from.labels.tier", `quote label values`},
		{"labels bad chars", "zones:\n" + zoneYAML("a", "10.0.0.0/8", ruleYAML("{labels: {team: \"a b\"}}", "b", "[tcp/1]")), ErrBadSelector, 8, "zones[0].rules[0].from", "keys and values"},
		{"missing ports", "zones:\n" + zoneYAML("a", "10.0.0.0/8", "    rules:\n      - from: a\n        to: b\n"), ErrMissingField, 8, "zones[0].rules[0].ports", "from, to and ports"},
		{"ports empty", "zones:\n" + zoneYAML("a", "10.0.0.0/8", ruleYAML("a", "b", "[]")), ErrMissingField, 10, "zones[0].rules[0].ports", "at least one port"},
		{"port bare number", "zones:\n" + zoneYAML("a", "10.0.0.0/8", ruleYAML("a", "b", "[443]")), ErrBadPort, 10, "zones[0].rules[0].ports[0]", "write tcp/443 or udp/443"},
		{"port out of range", "zones:\n" + zoneYAML("a", "10.0.0.0/8", ruleYAML("a", "b", "[tcp/65536]")), ErrBadPort, 10, "zones[0].rules[0].ports[0]", "outside 1..65535"},
		{"port zero", "zones:\n" + zoneYAML("a", "10.0.0.0/8", ruleYAML("a", "b", "[udp/0]")), ErrBadPort, 10, "zones[0].rules[0].ports[0]", "outside 1..65535"},
		{"port reversed", "zones:\n" + zoneYAML("a", "10.0.0.0/8", ruleYAML("a", "b", "[tcp/8100-8000]")), ErrBadPort, 10, "zones[0].rules[0].ports[0]", "write tcp/8000-8100"},
		{"port proto", "zones:\n" + zoneYAML("a", "10.0.0.0/8", ruleYAML("a", "b", "[sctp/1]")), ErrBadPort, 10, "zones[0].rules[0].ports[0]", "tcp or udp"},
		{"port junk", "zones:\n" + zoneYAML("a", "10.0.0.0/8", ruleYAML("a", "b", "[tcp/44x]")), ErrBadPort, 10, "zones[0].rules[0].ports[0]", "not a number"},
		{"port leading zero", "zones:\n" + zoneYAML("a", "10.0.0.0/8", ruleYAML("a", "b", "[tcp/0443]")), ErrBadPort, 10, "zones[0].rules[0].ports[0]", "not a number"},
		{"port word", "zones:\n" + zoneYAML("a", "10.0.0.0/8", ruleYAML("a", "b", "[https]")), ErrBadPort, 10, "zones[0].rules[0].ports[0]", "tcp/443"},
		{"ports scalar", "zones:\n" + zoneYAML("a", "10.0.0.0/8", ruleYAML("a", "b", "any")), ErrBadValue, 10, "zones[0].rules[0].ports", "ports: [any]"},
		{"anchor", "zones:\n" + zoneYAML("a", "&c 10.0.0.0/8", ""), ErrUnsupported, 3, "zones[0].cidr", "anchors"},
		{"tag", "zones:\n" + zoneYAML("a", "!!str 10.0.0.0/8", ""), ErrUnsupported, 3, "zones[0].cidr", "tags"},
		{"two documents", "zones: []\n---\nzones: []\n", ErrUnsupported, 3, "", "2 YAML documents"},
		{"rules null", "zones:\n" + zoneYAML("a", "10.0.0.0/8", "    rules:\n"), ErrBadValue, 7, "zones[0].rules", "expected a list"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := Parse("policy.yaml", []byte(tt.src))
			require.Error(t, err)
			assert.Nil(t, p)
			require.ErrorIs(t, err, tt.err, "got %v", err)
			var pe *ParseError
			require.ErrorAs(t, err, &pe)
			assert.Equal(t, "policy.yaml", pe.File)
			assert.Equal(t, tt.line, pe.Line, "line in %q", err)
			assert.Equal(t, tt.field, pe.Field)
			assert.Contains(t, err.Error(), tt.text)
			assert.NotContains(t, err.Error(), "\n", "errors must be one line")
			assert.True(t, strings.HasPrefix(err.Error(), "policy.yaml:"), "error names the file: %q", err)
		})
	}
}

func TestParseTooLarge(t *testing.T) {
	big := make([]byte, MaxPolicySize+1)
	_, err := Parse("big.yaml", big)
	require.ErrorIs(t, err, ErrTooLarge)

	path := filepath.Join(t.TempDir(), "big.yaml")
	require.NoError(t, os.WriteFile(path, big, 0o600))
	_, err = Load(path)
	require.ErrorIs(t, err, ErrTooLarge)
}

func TestLoadMissingFile(t *testing.T) {
	_, err := Load(filepath.Join(t.TempDir(), "absent.yaml"))
	require.ErrorIs(t, err, os.ErrNotExist)
}

func TestNewValidates(t *testing.T) {
	good := Zone{Name: "a", CIDRs: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}, Regions: []string{"r"}, MinTrust: 50, IsolateBelow: 10,
		Rules: []Rule{{From: Selector{Name: "x"}, To: Selector{Glob: "y-*"}, Ports: []PortRange{{ProtoTCP, 1, 2}}}}}
	p, err := New([]Zone{good})
	require.NoError(t, err)
	// New copies: changing the caller's slice afterwards changes nothing in the policy.
	good.Rules[0].From.Name = "changed"
	assert.Equal(t, "x", p.Zones[0].Rules[0].From.Name)

	mut := func(f func(z *Zone)) []Zone {
		z := good
		z.Rules = []Rule{{From: Selector{Name: "x"}, To: Selector{Name: "y"}, Ports: []PortRange{{ProtoTCP, 1, 2}}}}
		f(&z)
		return []Zone{z}
	}
	tests := []struct {
		name  string
		zones []Zone
		err   error
	}{
		{"none", nil, ErrNoZones},
		{"two selectors", mut(func(z *Zone) { z.Rules[0].From.Glob = "x*" }), ErrBadSelector},
		{"empty selector", mut(func(z *Zone) { z.Rules[0].To = Selector{} }), ErrMissingField},
		{"glob in name", mut(func(z *Zone) { z.Rules[0].To = Selector{Name: "y*"} }), ErrBadSelector},
		{"glob without wildcard", mut(func(z *Zone) { z.Rules[0].To = Selector{Glob: "y"} }), ErrBadSelector},
		{"any with range", mut(func(z *Zone) { z.Rules[0].Ports = []PortRange{{ProtoAny, 1, 2}} }), ErrBadPort},
		{"icmp with port", mut(func(z *Zone) { z.Rules[0].Ports = []PortRange{{ProtoICMP, 1, 1}} }), ErrBadPort},
		{"unknown proto", mut(func(z *Zone) { z.Rules[0].Ports = []PortRange{{Proto(9), 1, 1}} }), ErrBadPort},
		{"invalid prefix", mut(func(z *Zone) { z.CIDRs = []netip.Prefix{{}} }), ErrBadCIDR},
		{"negative lifetime", mut(func(z *Zone) { z.MaxCertLifetime = -time.Second }), ErrBadValue},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := New(tt.zones)
			require.ErrorIs(t, err, tt.err)
			var pe *ParseError
			require.True(t, errors.As(err, &pe))
			assert.Zero(t, pe.Line, "New has no source lines")
		})
	}
}

func TestParsePortRange(t *testing.T) {
	tests := []struct {
		in   string
		want PortRange
		ok   bool
	}{
		{"tcp/443", PortRange{ProtoTCP, 443, 443}, true},
		{"udp/53", PortRange{ProtoUDP, 53, 53}, true},
		{"tcp/8000-8100", PortRange{ProtoTCP, 8000, 8100}, true},
		{"tcp/1-65535", PortRange{ProtoTCP, 1, 65535}, true},
		{"any", PortRange{ProtoAny, 0, 65535}, true},
		{"icmp", PortRange{ProtoICMP, 0, 0}, true},
		{"tcp/", PortRange{}, false},
		{"tcp/-5", PortRange{}, false},
		{"tcp/5-", PortRange{}, false},
		{"tcp/1-2-3", PortRange{}, false},
		{"TCP/443", PortRange{}, false},
		{"icmp/1", PortRange{}, false},
		{"tcp/+1", PortRange{}, false},
		{"tcp/ 1", PortRange{}, false},
	}
	for _, tt := range tests {
		got, err := ParsePortRange(tt.in)
		if !tt.ok {
			assert.ErrorIs(t, err, ErrBadPort, tt.in)
			continue
		}
		require.NoError(t, err, tt.in)
		assert.Equal(t, tt.want, got)
		assert.Equal(t, tt.in, got.String(), "round trip")
	}
}

func FuzzParse(f *testing.F) {
	example, err := os.ReadFile(examplePath)
	require.NoError(f, err)
	f.Add(example)
	for _, s := range []string{
		"", "zones: []", "zones: [\n", "zones:\n" + zoneYAML("a", "10.0.0.0/8", ruleYAML("{labels: {team: x}}", "b-*", "[tcp/1-2, any, icmp]")),
		"zones:\n" + zoneYAML("a", "&x 10.0.0.0/8", "") + zoneYAML("b", "*x", ""),
		"zones:\n" + zoneYAML("a", "10.0.0.0/8", ruleYAML("other/x", "b", "[tcp/443]")),
		"zones:\n" + zoneYAML("a", `[10.0.0.0/16, "fd00::/64"]`, "    node_prefix: 20\n    node_prefix6: \"/72\"\n"),
		"zones:\n" + zoneYAML("a", "10.0.0.0/24", "    node_prefix: 024\n"),
		"zones:\n  - <<: {name: a}\n", "zones: {a: 1}\n", "? [a]\n: b\n", "zones:\n- name: |\n    x\n",
	} {
		f.Add([]byte(s))
	}
	for _, deep := range deepDocs(100) { // nesting past MaxDepth in every shape
		f.Add([]byte(deep))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		p, err := Parse("fuzz.yaml", data)
		if err != nil {
			require.Nil(t, p)
			var pe *ParseError
			require.ErrorAs(t, err, &pe, "every error is a *ParseError")
			require.NotContains(t, err.Error(), "\n")
			return
		}
		// A policy that parses must evaluate without panicking and never allow across zones.
		for i := range p.Zones {
			z := &p.Zones[i]
			a := Agent{Name: "a", Zone: z.Name, Region: z.Regions[0], Trust: Score{100, true}}
			b := Agent{Name: "b", Zone: z.Name + "x", Region: z.Regions[0], Trust: Score{100, true}}
			require.False(t, p.Flow(a, b, 443, ProtoTCP).Allow)
			_ = p.Flow(a, a, 443, ProtoTCP)
		}
	})
}
