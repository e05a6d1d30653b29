package zones

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"path"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func examplePolicy(t testing.TB) *Policy {
	t.Helper()
	p, err := Load(examplePath)
	require.NoError(t, err)
	return p
}

// healthy returns an unrevoked payments agent in placement with a good score.
func healthy(name string) Agent {
	return Agent{Name: name, Zone: "payments", Region: "eu-west-1", Trust: Score{Value: 80, Known: true}}
}

func node(name, region string, zones ...string) Node {
	return Node{Name: name, Zones: zones, Region: region}
}

func TestTunnel(t *testing.T) {
	p := examplePolicy(t)
	a := node("n1", "eu-west-1", "payments", "support")
	b := node("n2", "eu-west-1", "payments")
	tests := []struct {
		name   string
		p      *Policy
		zone   string
		a, b   Node
		reason Reason
	}{
		{"allowed", p, "payments", a, b, ReasonAllowed},
		{"allowed second region", p, "support", a, node("n3", "us-east-1", "support"), ReasonAllowed},
		{"nil policy", nil, "payments", a, b, ReasonNoPolicy},
		{"unknown zone", p, "other", a, b, ReasonUnknownZone},
		{"empty zone", p, "", a, b, ReasonUnknownZone},
		{"unnamed node", p, "payments", a, Node{Zones: []string{"payments"}, Region: "eu-west-1"}, ReasonUnknownNode},
		{"a revoked", p, "payments", Node{Name: "n1", Zones: a.Zones, Region: a.Region, Revoked: true}, b, ReasonRevoked},
		{"b revoked", p, "payments", a, Node{Name: "n2", Zones: b.Zones, Region: b.Region, Revoked: true}, ReasonRevoked},
		{"b not certified", p, "support", a, b, ReasonNotCertified},
		{"no zones at all", p, "payments", a, node("n4", "eu-west-1"), ReasonNotCertified},
		{"region unknown", p, "payments", a, node("n5", "", "payments"), ReasonRegionUnknown},
		{"region outside", p, "payments", node("n6", "us-east-1", "payments"), b, ReasonRegionOutside},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := tt.p.Tunnel(tt.zone, tt.a, tt.b)
			assert.Equal(t, tt.reason, d.Reason, d.Message)
			assert.Equal(t, tt.reason == ReasonAllowed, d.Allow)
			assert.NotEmpty(t, d.Message)
			assert.Nil(t, d.Rule)
		})
	}
}

func TestFlow(t *testing.T) {
	p := examplePolicy(t)
	with := func(a Agent, f func(*Agent)) Agent { f(&a); return a }
	billing, ledger := healthy("billing-7"), healthy("ledger")
	risk := with(healthy("scorer"), func(a *Agent) { a.Labels = map[string]string{"team": "risk", "tier": "1"} })
	bot := Agent{Name: "support-bot", Zone: "support", Region: "us-east-1", Trust: Score{45, true}}
	tickets := Agent{Name: "tickets", Zone: "support", Region: "eu-west-1", Trust: Score{90, true}}
	kb := Agent{Name: "kb", Zone: "support", Region: "eu-west-1"}

	tests := []struct {
		name     string
		p        *Policy
		src, dst Agent
		port     uint16
		proto    Proto
		reason   Reason
		ruleLine int
	}{
		{"glob rule", p, billing, ledger, 443, ProtoTCP, ReasonAllowed, 11},
		{"label rule", p, risk, ledger, 8050, ProtoTCP, ReasonAllowed, 14},
		{"label rule range edge", p, risk, ledger, 8100, ProtoTCP, ReasonAllowed, 14},
		{"exact rule udp", p, ledger, healthy("audit-log"), 514, ProtoUDP, ReasonAllowed, 17},
		{"second region", p, bot, tickets, 8080, ProtoTCP, ReasonAllowed, 27},
		{"star glob icmp", p, tickets, kb, 0, ProtoICMP, ReasonAllowed, 30},
		{"dst trust not needed", p, bot, kb, 80, ProtoTCP, ReasonAllowed, 30},
		{"nil policy", nil, billing, ledger, 443, ProtoTCP, ReasonNoPolicy, 0},
		{"unnamed src", p, with(billing, func(a *Agent) { a.Name = "" }), ledger, 443, ProtoTCP, ReasonUnknownAgent, 0},
		{"unnamed dst", p, billing, Agent{Zone: "payments"}, 443, ProtoTCP, ReasonUnknownAgent, 0},
		{"src revoked", p, with(billing, func(a *Agent) { a.Revoked = true }), ledger, 443, ProtoTCP, ReasonRevoked, 0},
		{"dst revoked", p, billing, with(ledger, func(a *Agent) { a.Revoked = true }), 443, ProtoTCP, ReasonRevoked, 0},
		{"cross zone", p, billing, with(tickets, func(a *Agent) {}), 443, ProtoTCP, ReasonCrossZone, 0},
		{"cross zone same name", p, billing, with(ledger, func(a *Agent) { a.Zone = "support" }), 443, ProtoTCP, ReasonCrossZone, 0},
		{"no zone", p, with(billing, func(a *Agent) { a.Zone = "" }), ledger, 443, ProtoTCP, ReasonUnknownZone, 0},
		{"unknown zone", p, with(billing, func(a *Agent) { a.Zone = "ghost" }), with(ledger, func(a *Agent) { a.Zone = "ghost" }), 443, ProtoTCP, ReasonUnknownZone, 0},
		{"port zero", p, billing, ledger, 0, ProtoTCP, ReasonBadRequest, 0},
		{"proto any", p, billing, ledger, 443, ProtoAny, ReasonBadRequest, 0},
		{"proto junk", p, billing, ledger, 443, Proto(42), ReasonBadRequest, 0},
		{"region unknown", p, with(billing, func(a *Agent) { a.Region = "" }), ledger, 443, ProtoTCP, ReasonRegionUnknown, 0},
		{"region outside", p, with(billing, func(a *Agent) { a.Region = "us-east-1" }), ledger, 443, ProtoTCP, ReasonRegionOutside, 0},
		{"score absent", p, with(billing, func(a *Agent) { a.Trust = Score{} }), ledger, 443, ProtoTCP, ReasonTrustUnknown, 0},
		{"score absent but value set", p, with(billing, func(a *Agent) { a.Trust = Score{Value: 99} }), ledger, 443, ProtoTCP, ReasonTrustUnknown, 0},
		{"score invalid", p, with(billing, func(a *Agent) { a.Trust = Score{101, true} }), ledger, 443, ProtoTCP, ReasonTrustUnknown, 0},
		{"score below min", p, with(billing, func(a *Agent) { a.Trust = Score{49, true} }), ledger, 443, ProtoTCP, ReasonTrustBelowMin, 0},
		{"score at min", p, with(billing, func(a *Agent) { a.Trust = Score{50, true} }), ledger, 443, ProtoTCP, ReasonAllowed, 11},
		{"score below isolate", p, with(billing, func(a *Agent) { a.Trust = Score{19, true} }), ledger, 443, ProtoTCP, ReasonTrustBelowIsolate, 0},
		{"wrong port", p, billing, ledger, 80, ProtoTCP, ReasonPortNotAllowed, 0},
		{"wrong proto", p, billing, ledger, 443, ProtoUDP, ReasonPortNotAllowed, 0},
		{"label partial", p, with(healthy("scorer"), func(a *Agent) { a.Labels = map[string]string{"team": "riskier"} }), ledger, 443, ProtoTCP, ReasonNoRule, 0},
		{"reverse direction", p, ledger, billing, 443, ProtoTCP, ReasonNoRule, 0},
		{"glob does not match", p, healthy("billingx"), ledger, 443, ProtoTCP, ReasonNoRule, 0},
		{"glob never crosses slash", p, healthy("billing-/x"), ledger, 443, ProtoTCP, ReasonNoRule, 0},
		{"self", p, ledger, ledger, 443, ProtoTCP, ReasonNoRule, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := tt.p.Flow(tt.src, tt.dst, tt.port, tt.proto)
			assert.Equal(t, tt.reason, d.Reason, d.Message)
			assert.Equal(t, tt.reason == ReasonAllowed, d.Allow)
			assert.NotEmpty(t, d.Message)
			if tt.ruleLine == 0 {
				assert.Nil(t, d.Rule)
			} else {
				require.NotNil(t, d.Rule)
				assert.Equal(t, tt.ruleLine, d.Rule.Line)
			}
		})
	}
}

func TestTrustAction(t *testing.T) {
	p := examplePolicy(t)
	good := Score{80, true}
	in := Drift{Region: "eu-west-1"}
	tests := []struct {
		name   string
		p      *Policy
		zone   string
		score  Score
		drift  Drift
		action Action
		reason Reason
	}{
		{"healthy", p, "payments", good, in, ActionAllow, ReasonAllowed},
		{"at min", p, "payments", Score{50, true}, in, ActionAllow, ReasonAllowed},
		{"below min", p, "payments", Score{49, true}, in, ActionDenyFlows, ReasonTrustBelowMin},
		{"at isolate threshold", p, "payments", Score{20, true}, in, ActionDenyFlows, ReasonTrustBelowMin},
		{"below isolate", p, "payments", Score{19, true}, in, ActionIsolateAndRevoke, ReasonTrustBelowIsolate},
		{"zero", p, "payments", Score{0, true}, in, ActionIsolateAndRevoke, ReasonTrustBelowIsolate},
		{"score absent", p, "payments", Score{}, in, ActionDenyFlows, ReasonTrustUnknown},
		{"score invalid", p, "payments", Score{-3, true}, in, ActionDenyFlows, ReasonTrustUnknown},
		{"region unknown", p, "payments", good, Drift{}, ActionDenyFlows, ReasonRegionUnknown},
		{"region outside", p, "payments", good, Drift{Region: "us-east-1"}, ActionDenyFlows, ReasonRegionOutside},
		{"region inside other zone", p, "support", good, Drift{Region: "us-east-1"}, ActionAllow, ReasonAllowed},
		{"fingerprint", p, "payments", good, Drift{Region: "eu-west-1", FingerprintChanged: true}, ActionIsolateAndRevoke, ReasonFingerprintDrift},
		{"fingerprint without score", p, "payments", Score{}, Drift{FingerprintChanged: true}, ActionIsolateAndRevoke, ReasonFingerprintDrift},
		{"live twice", p, "payments", good, Drift{Region: "eu-west-1", LiveTwice: true}, ActionIsolateAndRevoke, ReasonDuplicateIdentity},
		{"low score beats region", p, "payments", Score{5, true}, Drift{Region: "mars"}, ActionIsolateAndRevoke, ReasonTrustBelowIsolate},
		{"unknown zone", p, "ghost", good, in, ActionDenyFlows, ReasonUnknownZone},
		{"nil policy", nil, "payments", good, in, ActionDenyFlows, ReasonNoPolicy},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := tt.p.TrustAction(tt.zone, tt.score, tt.drift)
			assert.Equal(t, tt.action, d.Action, d.Message)
			assert.Equal(t, tt.reason, d.Reason, d.Message)
			assert.NotEmpty(t, d.Message)
		})
	}
	assert.Equal(t, "isolate_and_revoke", ActionIsolateAndRevoke.String())
}

func TestReload(t *testing.T) {
	old := examplePolicy(t)
	// The new policy drops the glob rule and narrows support to us-east-1.
	src := `zones:
  - name: payments
    cidr: 100.100.1.0/24
    regions: [eu-west-1]
    min_trust: 50
    isolate_below: 20
    rules:
      - from: ledger
        to: audit-log
        ports: [tcp/514]
  - name: support
    cidr: 100.100.2.0/24
    regions: [us-east-1]
    min_trust: 40
    isolate_below: 10
`
	next, err := Parse("next.yaml", []byte(src))
	require.NoError(t, err)

	tunnels := []LiveTunnel{
		{Zone: "payments", A: node("n1", "eu-west-1", "payments"), B: node("n2", "eu-west-1", "payments")},
		{Zone: "support", A: node("n1", "eu-west-1", "support"), B: node("n3", "us-east-1", "support")},
		{Zone: "support", A: node("n3", "us-east-1", "support"), B: node("n4", "us-east-1", "support")},
	}
	flows := []LiveFlow{
		{Src: healthy("billing-1"), Dst: healthy("ledger"), Port: 443, Proto: ProtoTCP},
		{Src: healthy("ledger"), Dst: healthy("audit-log"), Port: 514, Proto: ProtoTCP},
		{Src: healthy("ledger"), Dst: healthy("audit-log"), Port: 514, Proto: ProtoUDP},
		{Src: healthy("ledger"), Dst: healthy("billing-1"), Port: 443, Proto: ProtoTCP},
	}
	plan := Reload(old, next, tunnels, flows)
	require.Len(t, plan.Tunnels, 1)
	assert.Equal(t, 1, plan.Tunnels[0].Index)
	assert.Equal(t, ReasonRegionOutside, plan.Tunnels[0].Decision.Reason)
	assert.True(t, plan.Tunnels[0].WasAllowed)

	require.Len(t, plan.Flows, 3)
	assert.Equal(t, []int{0, 2, 3}, []int{plan.Flows[0].Index, plan.Flows[1].Index, plan.Flows[2].Index})
	assert.Equal(t, ReasonNoRule, plan.Flows[0].Decision.Reason)
	assert.True(t, plan.Flows[0].WasAllowed)
	assert.Equal(t, ReasonPortNotAllowed, plan.Flows[1].Decision.Reason)
	assert.True(t, plan.Flows[1].WasAllowed)
	assert.False(t, plan.Flows[2].WasAllowed, "never allowed: the reload is not the cause")

	// Same policy: nothing to tear down. Nil new policy: everything goes (fail closed).
	assert.True(t, Reload(old, old, tunnels[:1], flows[:2]).Empty())
	all := Reload(old, nil, tunnels, flows)
	assert.Len(t, all.Tunnels, len(tunnels))
	assert.Len(t, all.Flows, len(flows))
	assert.Equal(t, ReasonNoPolicy, all.Flows[0].Decision.Reason)
	// A removed zone tears down its tunnels with unknown_zone.
	onlyPay, err := New(next.Zones[:1])
	require.NoError(t, err)
	gone := Reload(next, onlyPay, tunnels, nil)
	require.Len(t, gone.Tunnels, 2)
	assert.Equal(t, ReasonUnknownZone, gone.Tunnels[1].Decision.Reason)
}

func TestFastGlobMatchesPathMatch(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 11))
	patterns := []string{"*", "a*", "ab*", "*b", "*ab", "a?c", "a[bc]*", "*-*", "billing-*", "*-1"}
	alphabet := "ab-c1/"
	for _, pat := range patterns {
		m := compileSelector(Selector{Glob: pat})
		for i := 0; i < 2000; i++ {
			n := make([]byte, rng.IntN(6))
			for j := range n {
				n[j] = alphabet[rng.IntN(len(alphabet))]
			}
			want, err := path.Match(pat, string(n))
			require.NoError(t, err)
			a := Agent{Name: string(n)}
			require.Equal(t, want, m.match(&a), "pattern %q name %q", pat, n)
		}
	}
}

func TestReasonsDistinct(t *testing.T) {
	seen := map[Reason]bool{}
	for _, r := range Reasons() {
		assert.False(t, seen[r], "duplicate reason %s", r)
		seen[r] = true
	}
}

// bigPolicy builds one zone with n rules of every selector shape, the allowed flow matching rule
// n/2 so that indexes, not luck, find it.
func bigPolicy(t testing.TB, n int) (*Policy, Agent, Agent) {
	t.Helper()
	rules := make([]Rule, 0, n)
	for i := 0; i < n; i++ {
		var r Rule
		switch i % 10 {
		case 7:
			r = Rule{From: Selector{Glob: fmt.Sprintf("svc%d-*", i)}, To: Selector{Name: fmt.Sprintf("db%d", i)}}
		case 8:
			r = Rule{From: Selector{Labels: map[string]string{"team": fmt.Sprintf("t%d", i)}}, To: Selector{Glob: fmt.Sprintf("*-db%d", i)}}
		case 9:
			r = Rule{From: Selector{Name: fmt.Sprintf("svc%d", i)}, To: Selector{Glob: fmt.Sprintf("db%d-?", i)}}
		default:
			r = Rule{From: Selector{Name: fmt.Sprintf("svc%d", i)}, To: Selector{Name: fmt.Sprintf("db%d", i)}}
		}
		r.Ports = []PortRange{{ProtoTCP, 443, 443}, {ProtoTCP, 8000, 8100}}
		rules = append(rules, r)
	}
	p, err := New([]Zone{{Name: "big", CIDRs: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")},
		Regions: []string{"r1"}, MinTrust: 50, IsolateBelow: 10, Rules: rules}})
	require.NoError(t, err)
	// Rule n/2+8 is a label rule: the slowest shape to match.
	i := n/2 - (n/2)%10 + 8
	src := Agent{Name: "scorer", Zone: "big", Region: "r1", Trust: Score{90, true}, Labels: map[string]string{"team": fmt.Sprintf("t%d", i), "x": "y"}}
	dst := Agent{Name: fmt.Sprintf("eu-db%d", i), Zone: "big", Region: "r1", Trust: Score{90, true}}
	return p, src, dst
}

func TestFlowAllowPathDoesNotAllocate(t *testing.T) {
	p, src, dst := bigPolicy(t, 1000)
	require.True(t, p.Flow(src, dst, 8050, ProtoTCP).Allow)
	exact := Agent{Name: "svc500", Zone: "big", Region: "r1", Trust: Score{90, true}}
	exactDst := Agent{Name: "db500", Zone: "big", Region: "r1"}
	require.True(t, p.Flow(exact, exactDst, 443, ProtoTCP).Allow)
	allocs := testing.AllocsPerRun(200, func() {
		if !p.Flow(src, dst, 8050, ProtoTCP).Allow || !p.Flow(exact, exactDst, 443, ProtoTCP).Allow {
			panic("flow denied")
		}
	})
	assert.Zero(t, allocs)
}

func BenchmarkFlowDecision1000Rules(b *testing.B) {
	p, src, dst := bigPolicy(b, 1000)
	exact := Agent{Name: "svc500", Zone: "big", Region: "r1", Trust: Score{90, true}}
	exactDst := Agent{Name: "db500", Zone: "big", Region: "r1"}
	b.Run("labels", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if !p.Flow(src, dst, 8050, ProtoTCP).Allow {
				b.Fatal("denied")
			}
		}
	})
	b.Run("exact", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if !p.Flow(exact, exactDst, 443, ProtoTCP).Allow {
				b.Fatal("denied")
			}
		}
	})
	b.Run("deny_no_rule", func(b *testing.B) {
		b.ReportAllocs()
		other := Agent{Name: "nobody", Zone: "big", Region: "r1", Trust: Score{90, true}}
		for b.Loop() {
			if p.Flow(other, exactDst, 443, ProtoTCP).Allow {
				b.Fatal("allowed")
			}
		}
	})
}

func BenchmarkParseExample(b *testing.B) {
	data, err := os.ReadFile(examplePath)
	require.NoError(b, err)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Parse("policy.yaml", data); err != nil {
			b.Fatal(err)
		}
	}
}

func TestDocsNameEveryReason(t *testing.T) {
	doc, err := os.ReadFile("../docs/zones.md")
	require.NoError(t, err)
	for _, r := range Reasons() {
		assert.Contains(t, string(doc), "`"+string(r)+"`", "docs/zones.md must explain reason %s", r)
	}
}

func TestZoneHelpers(t *testing.T) {
	p := examplePolicy(t)
	pay, _ := p.Zone("payments")
	sup, _ := p.Zone("support")
	assert.Equal(t, time.Hour, pay.CertLifetime(24*time.Hour), "capped")
	assert.Equal(t, 30*time.Minute, pay.CertLifetime(30*time.Minute))
	assert.Equal(t, time.Hour, pay.CertLifetime(0), "no request: the cap")
	assert.Equal(t, 24*time.Hour, sup.CertLifetime(24*time.Hour), "no cap set")
	assert.False(t, pay.AllowsRegion(""))
	assert.True(t, pay.Contains(netip.MustParseAddr("::ffff:100.100.1.9")), "4in6 form of a zone address")

	var nilPolicy *Policy
	_, ok := nilPolicy.Zone("payments")
	assert.False(t, ok)
	_, ok = nilPolicy.ZoneForAddr(netip.MustParseAddr("100.100.1.1"))
	assert.False(t, ok)
	_, ok = p.ZoneForAddr(netip.Addr{})
	assert.False(t, ok)

	assert.Equal(t, "{labels: {a: 1, b: 2}}", Selector{Labels: map[string]string{"b": "2", "a": "1"}}.String())
	for _, pr := range []Proto{ProtoTCP, ProtoUDP, ProtoICMP} {
		got, err := ParseProto(pr.String())
		require.NoError(t, err)
		assert.Equal(t, pr, got)
	}
	_, err := ParseProto("any")
	assert.ErrorIs(t, err, ErrBadPort)
}
