package identity

import (
	"bytes"
	"encoding/hex"
	"errors"
	"math/big"
	"net/netip"
	"strings"
	"testing"

	"github.com/fxamacker/cbor/v2"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestClaimsRoundTrip(t *testing.T) {
	for name, c := range map[string]Claims{
		"node":  nodeClaims(),
		"agent": agentClaims("payments", "100.100.1.7"),
		"agent v6": func() Claims {
			c := agentClaims("ml", "fd00:7e::5")
			c.Zones[0].Prefixes = []netip.Prefix{netip.MustParsePrefix("fd00:7e::/120")}
			return c
		}(),
	} {
		t.Run(name, func(t *testing.T) {
			b, err := MarshalClaims(c)
			require.NoError(t, err)
			got, err := ParseClaims(b)
			require.NoError(t, err)
			assert.Equal(t, c, got)
			again, err := MarshalClaims(got)
			require.NoError(t, err)
			assert.Equal(t, b, again, "encoding is deterministic")
		})
	}
}

func TestClaimsDeterministicLabels(t *testing.T) {
	// Map iteration order is random; the encoding must not be.
	c := agentClaims("payments", "100.100.1.7")
	for i := range 20 {
		c.Labels[string(rune('a'+i))] = "v"
	}
	first, err := MarshalClaims(c)
	require.NoError(t, err)
	for range 20 {
		b, err := MarshalClaims(c)
		require.NoError(t, err)
		require.Equal(t, first, b)
	}
}

func mustHex(s string) []byte {
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	if err != nil {
		panic(err)
	}
	return b
}

func TestParseClaimsStrict(t *testing.T) {
	fp := "5820" + strings.Repeat("11", 32)
	cases := []struct {
		name string
		in   []byte
		msg  string
	}{
		{"empty", nil, "empty"},
		{"oversize", bytes.Repeat([]byte{0}, MaxClaimsSize+1), "limit"},
		// {3: ["a"], 3: ["b"]}
		{"duplicate key", mustHex("a2 03 81 61 61 03 81 61 62"), "duplicate"},
		// {_ 3: ["a"]}
		{"indefinite map", mustHex("bf 03 81 61 61 ff"), "indefinite"},
		// {3: [_ "a"]}
		{"indefinite array", mustHex("a1 03 9f 61 61 ff"), "indefinite"},
		// {7: 1}
		{"unknown field", mustHex("a1 09 01"), "unknown field"},
		// {"regions": ["a"]}: text keys are not the wire form
		{"text key", mustHex("a1 67 72 65 67 69 6f 6e 73 81 61 61"), ""},
		// {4: fp, 3: ["a"]}: keys out of order
		{"unsorted keys", mustHex("a2 04" + fp + " 03 81 61 61"), "deterministic"},
		// {3: ["a"]} with the key as a 1-byte uint (non-shortest form)
		{"non-shortest int", mustHex("a1 18 03 81 61 61"), "deterministic"},
		// tag 1 around the regions array
		{"tag", mustHex("a1 03 c1 81 61 61"), "tag"},
		{"array top level", mustHex("81 61 61"), ""},
		{"trailing bytes", mustHex("a1 03 81 61 61 00"), "extraneous"},
		{"truncated", mustHex("a1 03 81 61"), ""},
		{"fingerprint wrong size", mustHex("a1 04 43 01 02 03"), "fingerprint"},
		{"region uppercase", mustHex("a1 03 81 61 41"), "uppercase"},
		// {2: ["100.100.1.007"]}
		{"non-canonical IP", append(mustHex("a1 02 81 6d"), "100.100.1.007"...), "overlay IP"},
		// {1: [{1: "z", 2: ["10.0.0.1/8"]}]}: host bits set
		{"prefix host bits", append(mustHex("a1 01 81 a2 01 61 7a 02 81 6a"), "10.0.0.1/8"...), "host bits"},
		// {2: ["::ffff:1.2.3.4"]}
		{"4in6 address", append(mustHex("a1 02 81 6e"), "::ffff:1.2.3.4"...), "overlay IP"},
		// {2: ["fe80::1%eth0"]}
		{"zoned address", append(mustHex("a1 02 81 6c"), "fe80::1%eth0"...), "overlay IP"},
		// {3: [h'ff']}: wrong type
		{"wrong type", mustHex("a1 03 81 41 ff"), ""},
		// {3: ["\xff"]}: invalid UTF-8
		{"invalid utf8", mustHex("a1 03 81 61 ff"), ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := ParseClaims(c.in)
			require.ErrorIs(t, err, ErrClaims)
			assert.Contains(t, err.Error(), c.msg)
		})
	}
}

func TestClaimsValidateRefusals(t *testing.T) {
	cases := map[string]func(*Claims){
		"duplicate zone":   func(c *Claims) { c.Zones = append(c.Zones, c.Zones[0]) },
		"bad zone name":    func(c *Claims) { c.Zones[0].Name = "Pay" },
		"duplicate prefix": func(c *Claims) { c.Zones[0].Prefixes = append(c.Zones[0].Prefixes, c.Zones[0].Prefixes[0]) },
		"invalid prefix":   func(c *Claims) { c.Zones[0].Prefixes = []netip.Prefix{{}} },
		"too many zones": func(c *Claims) {
			for i := range maxZones {
				c.Zones = append(c.Zones, ZoneGrant{Name: "z" + strings.Repeat("a", i%60) + string(rune('a'+i%26))})
			}
		},
		"wireguard key size": func(c *Claims) { c.WireGuardKey = []byte{1} },
		"duplicate region":   func(c *Claims) { c.Regions = []string{"a", "a"} },
		"bad label key":      func(c *Claims) { c.Labels = map[string]string{"App": "x"} },
		"long label value":   func(c *Claims) { c.Labels = map[string]string{"app": strings.Repeat("x", 256)} },
		"control in label":   func(c *Claims) { c.Labels = map[string]string{"app": "a\nb"} },
		"unspecified IP":     func(c *Claims) { c.OverlayIPs = []netip.Addr{netip.IPv4Unspecified()} },
		"duplicate IP": func(c *Claims) {
			a := netip.MustParseAddr("10.0.0.1")
			c.OverlayIPs = []netip.Addr{a, a}
		},
	}
	for name, edit := range cases {
		t.Run(name, func(t *testing.T) {
			c := nodeClaims()
			edit(&c)
			_, err := MarshalClaims(c)
			require.ErrorIs(t, err, ErrClaims)
		})
	}
}

func TestClaimsValidateFor(t *testing.T) {
	node := NodeID(testTD, "n1")
	agent := AgentID(testTD, "payments", "a")
	require.NoError(t, nodeClaims().ValidateFor(node))
	require.NoError(t, agentClaims("payments", "100.100.1.1").ValidateFor(agent))
	require.NoError(t, Claims{}.ValidateFor(AuthorityID(testTD)))

	bad := []struct {
		name string
		id   ID
		c    Claims
	}{
		{"node without zones", node, Claims{Fingerprint: digest("h")}},
		{"node zone without CIDR", node, Claims{Zones: []ZoneGrant{{Name: "z"}}, Fingerprint: digest("h")}},
		{"node with overlay IP", node, func() Claims {
			c := nodeClaims()
			c.OverlayIPs = []netip.Addr{netip.MustParseAddr("1.2.3.4")}
			return c
		}()},
		{"node without fingerprint", node, func() Claims { c := nodeClaims(); c.Fingerprint = nil; return c }()},
		{"agent with two zones", agent, func() Claims {
			c := agentClaims("payments", "100.100.1.1")
			c.Zones = append(c.Zones, ZoneGrant{Name: "ml"})
			return c
		}()},
		{"agent without IP", agent, func() Claims { c := agentClaims("payments", "100.100.1.1"); c.OverlayIPs = nil; return c }()},
		{"agent with WireGuard key", agent, func() Claims { c := agentClaims("payments", "100.100.1.1"); c.WireGuardKey = digest("k"); return c }()},
		{"authority with claims", AuthorityID(testTD), Claims{Regions: []string{"x"}}},
	}
	for _, b := range bad {
		t.Run(b.name, func(t *testing.T) {
			require.ErrorIs(t, b.c.ValidateFor(b.id), ErrClaims)
		})
	}
}

func FuzzParseClaims(f *testing.F) {
	issuer := Claims{Zones: nodeClaims().Zones, Regions: []string{"eu-west-1"}, Node: "n1", NodeSerial: big.NewInt(1 << 40)}
	for _, c := range []Claims{nodeClaims(), agentClaims("payments", "100.100.1.7"), issuer, {}} {
		b, err := MarshalClaims(c)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add(mustHex("a2 03 81 61 61 03 81 61 62"))
	f.Add(mustHex("bf 03 81 61 61 ff"))
	f.Add(mustHex("a1 07 01"))
	f.Add(mustHex("a1 03 c1 81 61 61"))
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := ParseClaims(b)
		if err != nil {
			if !errors.Is(err, ErrClaims) {
				t.Fatalf("error does not wrap ErrClaims: %v", err)
			}
			return
		}
		// Whatever parses is valid and re-encodes to exactly the input.
		require.NoError(t, c.Validate())
		again, err := MarshalClaims(c)
		require.NoError(t, err)
		require.Equal(t, b, again)
		var generic any
		require.NoError(t, cbor.Unmarshal(b, &generic))
	})
}

// Keys 7 and 8 belong to issuing CAs only; their encoding has one form.
func TestIssuerClaims(t *testing.T) {
	c := Claims{Zones: nodeClaims().Zones, Regions: []string{"eu-west-1"}, Node: "n1", NodeSerial: big.NewInt(258)}
	require.NoError(t, c.ValidateIssuer(NodeID(testTD, "n1")))
	require.ErrorIs(t, c.ValidateIssuer(NodeID(testTD, "n2")), ErrClaims, "names another node")
	require.ErrorIs(t, c.ValidateFor(NodeID(testTD, "n1")), ErrClaims, "a node certificate carries no issuing claims")
	b, err := MarshalClaims(c)
	require.NoError(t, err)
	back, err := ParseClaims(b)
	require.NoError(t, err)
	assert.Equal(t, c, back)

	// {8: h'0102'} is minimal; {8: h'000102'} spells the same serial with a leading zero.
	_, err = ParseClaims(mustHex("a1 08 42 01 02"))
	require.NoError(t, err)
	_, err = ParseClaims(mustHex("a1 08 43 00 01 02"))
	require.ErrorIs(t, err, ErrClaims)
	noSerial := c
	noSerial.NodeSerial = nil
	require.ErrorIs(t, noSerial.ValidateIssuer(NodeID(testTD, "n1")), ErrClaims)
	withFP := c
	withFP.Fingerprint = digest("host")
	require.ErrorIs(t, withFP.ValidateIssuer(NodeID(testTD, "n1")), ErrClaims)
}
