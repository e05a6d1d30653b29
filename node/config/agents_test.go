package config

import (
	"errors"
	"net/netip"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const proxyConfig = `interface: proxy
agents:
  - name: billing-api
    zone: payments
    socks: 127.0.0.1:1080
    http: 127.0.0.1:3128
  - name: ledger
    zone: payments
    attest: false
    proxy_protocol: true
    forward:
      8443: 127.0.0.1:18443
      8080: 127.0.0.1:18080
`

func TestParseProxyAgents(t *testing.T) {
	c, err := Parse("p.yaml", []byte(proxyConfig))
	require.NoError(t, err)
	assert.Equal(t, InterfaceProxy, c.Interface)
	assert.Equal(t, []AgentProxy{
		{Name: "billing-api", Zone: "payments", SOCKS: netip.MustParseAddrPort("127.0.0.1:1080"), HTTP: netip.MustParseAddrPort("127.0.0.1:3128"), Attest: true},
		{Name: "ledger", Zone: "payments", ProxyProtocol: true, Forward: []Forward{
			{Port: 8080, Target: netip.MustParseAddrPort("127.0.0.1:18080")},
			{Port: 8443, Target: netip.MustParseAddrPort("127.0.0.1:18443")},
		}},
	}, c.Agents)
	a, ok := c.Find("payments", "ledger")
	require.True(t, ok)
	assert.False(t, a.Attest)
	_, ok = c.Find("support", "ledger")
	assert.False(t, ok)

	o, err := Default().Apply(Overrides{Interface: ptr("proxy")})
	require.NoError(t, err)
	assert.Equal(t, InterfaceProxy, o.Interface)
}

func ptr(s string) *string { return &s }

func TestParseProxyAgentErrors(t *testing.T) {
	for _, tc := range []struct {
		name, src string
		err       error
		field     string
		msg       string
	}{
		{"not a list", "agents: x\n", ErrBadValue, "agents", "expected a list"},
		{"unknown key", "agents:\n  - {name: a, zone: z, sock: 127.0.0.1:1}\n", ErrUnknownField, "agents[0].sock", "allowed: name"},
		{"missing zone", "agents:\n  - name: a\n", ErrBadValue, "agents[0]", "needs name and zone"},
		{"bad name", "agents:\n  - {name: A_b, zone: z}\n", ErrBadValue, "agents[0].name", ""},
		{"twice", "agents:\n  - {name: a, zone: z}\n  - {name: a, zone: z}\n", ErrBadValue, "agents[1]", "listed twice"},
		{"socks public", "agents:\n  - {name: a, zone: z, socks: 0.0.0.0:1080}\n", ErrBadValue, "agents[0].socks", "loopback only"},
		{"http host name", "agents:\n  - {name: a, zone: z, http: localhost:3128}\n", ErrBadValue, "agents[0].http", "not an IP address"},
		{"same port twice", "agents:\n  - {name: a, zone: z, socks: 127.0.0.1:1080}\n  - {name: b, zone: z, http: 127.0.0.1:1080}\n", ErrBadValue, "agents[1].http", "already used"},
		{"attest string", "agents:\n  - {name: a, zone: z, attest: \"no\"}\n", ErrBadValue, "agents[0].attest", "true or false"},
		{"proxy_protocol number", "agents:\n  - {name: a, zone: z, proxy_protocol: 2}\n", ErrBadValue, "agents[0].proxy_protocol", "true or false"},
		{"forward list", "agents:\n  - {name: a, zone: z, forward: [8080]}\n", ErrBadValue, "agents[0].forward", "expected a mapping"},
		{"forward port 0", "agents:\n  - name: a\n    zone: z\n    forward: {0: 127.0.0.1:1}\n", ErrBadValue, "agents[0].forward", "not a port"},
		{"forward port big", "agents:\n  - name: a\n    zone: z\n    forward: {70000: 127.0.0.1:1}\n", ErrBadValue, "agents[0].forward", "not a port"},
		{"forward public", "agents:\n  - name: a\n    zone: z\n    forward: {8080: 192.0.2.1:80}\n", ErrBadValue, "agents[0].forward.8080", "loopback only"},
		{"forward no port", "agents:\n  - name: a\n    zone: z\n    forward: {8080: 127.0.0.1:0}\n", ErrBadValue, "agents[0].forward.8080", "no port"},
		{"forward twice", "agents:\n  - name: a\n    zone: z\n    forward: {8080: 127.0.0.1:1, \"08080\": 127.0.0.1:2}\n", ErrBadValue, "agents[0].forward.8080", "twice"},
		{"forward alias", "agents:\n  - name: a\n    zone: z\n    forward:\n      8080: &x 127.0.0.1:1\n      81: *x\n", ErrUnsupported, "agents[0].forward.8080", "anchors"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse("p.yaml", []byte(tc.src))
			require.ErrorIs(t, err, tc.err)
			var pe *ParseError
			require.True(t, errors.As(err, &pe), "%v", err)
			if tc.field != "" {
				assert.Equal(t, tc.field, pe.Field)
			}
			assert.Contains(t, err.Error(), tc.msg)
		})
	}
}

func TestAgentsChangeNeedsRestart(t *testing.T) {
	old, err := Parse("p.yaml", []byte(proxyConfig))
	require.NoError(t, err)
	next, err := Parse("p.yaml", []byte(proxyConfig))
	require.NoError(t, err)
	p, err := old.ReloadPlan(next)
	require.NoError(t, err)
	assert.True(t, p.Empty())
	next.Agents[1].Forward[0].Target = netip.MustParseAddrPort("127.0.0.1:1")
	_, err = old.ReloadPlan(next)
	require.ErrorIs(t, err, ErrRestartRequired)
	assert.Contains(t, err.Error(), "agents changed")
}

// FuzzAgents: the agents section either loads with only loopback addresses and valid ports, or
// gives a one-line *ParseError wrapping a sentinel.
func FuzzAgents(f *testing.F) {
	for _, s := range []string{
		proxyConfig, "agents:\n", "agents: []\n", "agents: [{name: a, zone: z, forward: {1: 127.0.0.1:1}}]\n",
		"agents:\n  - name: a\n    zone: z\n    forward:\n      8080: &x 127.0.0.1:1\n      81: *x\n",
		"agents: [{name: a, zone: z, socks: \"[::1]:0\", http: 127.0.0.1:0, attest: false, proxy_protocol: true}]\n",
		"agents: [{name: a, zone: z, forward: {? [1]: x}}]\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := Parse("f.yaml", data)
		if err != nil {
			var pe *ParseError
			if !errors.As(err, &pe) || strings.Contains(err.Error(), "\n") {
				t.Fatalf("bad error: %v", err)
			}
			return
		}
		for _, a := range c.Agents {
			if a.Name == "" || a.Zone == "" || (a.SOCKS.IsValid() && !a.SOCKS.Addr().IsLoopback()) || (a.HTTP.IsValid() && !a.HTTP.Addr().IsLoopback()) {
				t.Fatalf("bad agent accepted: %+v", a)
			}
			for _, fw := range a.Forward {
				if fw.Port == 0 || !fw.Target.Addr().IsLoopback() || fw.Target.Port() == 0 {
					t.Fatalf("bad forward accepted: %+v", fw)
				}
			}
		}
	})
}
