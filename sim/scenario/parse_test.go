package scenario

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const minimal = `name: t
zones:
  - name: payments
    cidr: 100.100.1.0/24
    regions: [eu-west-1]
nodes:
  - name: a
    region: eu-west-1
    zones: [payments]
    agents: [{name: x, zone: payments}]
`

// two is minimal with a second node b running agent y.
const two = minimal + `  - name: b
    region: eu-west-1
    zones: [payments]
    agents: [{name: y, zone: payments}]
`

func TestNewEventDefaults(t *testing.T) {
	s, err := Parse("c.yaml", []byte(two+`  - name: w
    count: 4
    region: eu-west-1
    zones: [payments]
timeline:
  - {event: churn, group: w}
  - {event: policy_change, zone: payments, rules: [{from: x, to: y, ports: [tcp/80]}]}
`))
	require.NoError(t, err)
	c := s.Timeline[0]
	assert.Equal(t, 1, c.Count)
	assert.Equal(t, 1, c.Rounds)
	assert.Equal(t, Duration(500e6), c.Down)
	assert.Equal(t, "converged", c.Expect.Outcome)
	p := s.Timeline[1]
	assert.Equal(t, []Rule{{From: "x", To: "y", Ports: []string{"tcp/80"}}}, p.Rules)
	assert.Equal(t, float64(1), p.Expect.Converged)
}

func TestShippedScenariosParse(t *testing.T) {
	files, err := filepath.Glob("../scenarios/*.yaml")
	require.NoError(t, err)
	require.NotEmpty(t, files)
	for _, f := range files {
		s, err := Load(f)
		require.NoError(t, err, f)
		assert.NotEmpty(t, s.Timeline, f)
	}
}

func TestMinimalDefaults(t *testing.T) {
	s, err := Parse("m.yaml", []byte(minimal))
	require.NoError(t, err)
	assert.Equal(t, "sim.internal", s.TrustDomain)
	assert.Equal(t, "fast", s.Gossip)
	assert.Equal(t, 1, s.NodeCount())
	assert.Zero(t, s.TunnelIdle, "the node default")
	assert.Equal(t, 1, s.Dilation, "no dilation")
	assert.Equal(t, "all", s.Start)
	assert.Zero(t, s.Warmup)
}

func TestRefusals(t *testing.T) {
	cases := []struct {
		name, src string
		sentinel  error
		want      string // substring, including file:line
	}{
		{"unknown key", minimal + "bogus: 1\n", ErrSyntax, "s.yaml:11:"},
		{"duplicate key", minimal + "name: again\n", ErrSyntax, "s.yaml:11:"},
		{"anchor", strings.Replace(minimal, "regions: [eu-west-1]\nnodes", "regions: &r [eu-west-1]\nnodes", 1), ErrUnsupported, "s.yaml:5:"},
		{"alias", minimal + "description: *x\n", ErrUnsupported, "s.yaml:11:"},
		{"tag", minimal + "description: !!str x\n", ErrUnsupported, "s.yaml:11:"},
		{"bad duration", minimal + "settle: 5\n", ErrSyntax, "s.yaml:11:"},
		{"tunnel idle unitless", minimal + "tunnel_idle: 5\n", ErrSyntax, "s.yaml:11:"},
		{"tunnel idle negative", minimal + "tunnel_idle: -1s\n", ErrSyntax, "s.yaml:11:"},
		{"unknown zone", strings.Replace(minimal, "zones: [payments]", "zones: [nope]", 1), ErrInvalid, "s.yaml:9:"},
		{"region not allowed", strings.Replace(minimal, "region: eu-west-1\n", "region: us-east-1\n", 1), ErrInvalid, "nodes[0].region"},
		{"unknown event", minimal + "timeline:\n  - {event: teleport}\n", ErrInvalid, "s.yaml:12:"},
		{"duplicate is written as a copy", minimal + "timeline:\n  - {event: duplicate_identity, node: a}\n", ErrUnsupported, "write directory_copy"},
		{"drift needs a region", minimal + "timeline:\n  - {event: region_drift, node: a, to: x.payments:80, expect: {outcome: blocked}}\n", ErrInvalid, "needs region"},
		{"drift needs a target", minimal + "timeline:\n  - {event: region_drift, node: a, region: us-east-1, expect: {outcome: blocked}}\n", ErrInvalid, "needs to"},
		{"drift from another node's agent", two + "timeline:\n  - {event: region_drift, node: a, region: us-east-1, from: y.payments, to: x.payments:80, expect: {outcome: blocked}}\n", ErrInvalid, "not on the drifting node a"},
		{"exe swap of an unknown agent", minimal + "timeline:\n  - {event: exe_swap, agent: y.payments, to: x.payments:80, expect: {outcome: blocked}}\n", ErrInvalid, "no node runs agent y.payments"},
		{"copy targets itself", minimal + "timeline:\n  - {event: directory_copy, node: a, to: x.payments:80, expect: {outcome: blocked}}\n", ErrInvalid, "copied node itself"},
		{"churn of a whole group", minimal + "timeline:\n  - {event: churn, group: a, count: 1}\n", ErrInvalid, "between 1 and the group's size minus one"},
		{"churn of an unknown group", minimal + "timeline:\n  - {event: churn, group: z}\n", ErrInvalid, "no group is named"},
		{"policy change of an unknown zone", minimal + "timeline:\n  - {event: policy_change, zone: z}\n", ErrInvalid, "not declared"},
		{"policy change expects convergence", minimal + "timeline:\n  - {event: policy_change, zone: payments, expect: {outcome: blocked}}\n", ErrInvalid, "expects converged"},
		{"unknown gossip profile", minimal + "gossip: wan\n", ErrInvalid, "use fast, lan or scale"},
		{"lateral in one zone", minimal + "timeline:\n  - {event: lateral_movement, from: x.payments, to: x.payments:80, expect: {outcome: blocked}}\n", ErrInvalid, "crosses zones"},
		{"outcome missing", minimal + "timeline:\n  - {event: flow, from: x.payments, to: x.payments:80}\n", ErrInvalid, "blocked or allowed"},
		{"unknown agent", minimal + "timeline:\n  - {event: revoke, agent: y.payments}\n", ErrInvalid, "no node runs agent y.payments"},
		{"out of order", minimal + "timeline:\n  - {event: heal, at: 2s}\n  - {event: heal, at: 1s}\n", ErrInvalid, "time order"},
		{"two documents", minimal + "---\nname: x\n", ErrUnsupported, "one document"},
		{"not a mapping", "- a\n", ErrInvalid, "mapping"},
		{"deep", strings.Repeat("[", 40), ErrInvalid, "nested"},
		{"dilation below one", minimal + "dilation: -2\n", ErrInvalid, "s.yaml:11:"},
		{"dilation too large", minimal + "dilation: 5000\n", ErrInvalid, "from 1 (none) to 1000"},
		{"dilation not whole", minimal + "dilation: 2.5\n", ErrSyntax, "s.yaml:11:"},
		{"drift cannot be dilated", minimal + "dilation: 4\ntimeline:\n  - {event: region_drift, node: a, region: us-east-1, to: x.payments:80, expect: {outcome: blocked}}\n", ErrInvalid, "TrustFlow's evidence"},
		{"unknown start", minimal + "start: later\n", ErrInvalid, "use all or staggered"},
		{"warmup unitless", minimal + "warmup: 90\n", ErrSyntax, "s.yaml:11:"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := Parse("s.yaml", []byte(c.src))
			require.ErrorIs(t, err, c.sentinel)
			assert.Contains(t, err.Error(), c.want)
			assert.NotContains(t, err.Error(), "\n", "one-line errors")
		})
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte(minimal))
	for _, p := range []string{"../scenarios/lateral-movement.yaml", "../scenarios/trust-signals.yaml", "../scenarios/churn-partition-soak.yaml"} {
		if b, err := os.ReadFile(p); err == nil {
			f.Add(b)
		}
	}
	f.Add([]byte("name: &a x\n"))
	f.Add([]byte("{{{{"))
	f.Fuzz(func(t *testing.T, data []byte) {
		s, err := Parse("f.yaml", data)
		if err != nil {
			require.NotContains(t, err.Error(), "\n")
			return
		}
		require.NotEmpty(t, s.Name)
	})
}
