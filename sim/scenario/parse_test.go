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
		{"unknown zone", strings.Replace(minimal, "zones: [payments]", "zones: [nope]", 1), ErrInvalid, "s.yaml:9:"},
		{"region not allowed", strings.Replace(minimal, "region: eu-west-1\n", "region: us-east-1\n", 1), ErrInvalid, "nodes[0].region"},
		{"unknown event", minimal + "timeline:\n  - {event: teleport}\n", ErrInvalid, "s.yaml:12:"},
		{"drift needs trustflow", minimal + "timeline:\n  - {event: region_drift, node: a}\n", ErrUnsupported, "not supported in this version"},
		{"lateral in one zone", minimal + "timeline:\n  - {event: lateral_movement, from: x.payments, to: x.payments:80, expect: {outcome: blocked}}\n", ErrInvalid, "crosses zones"},
		{"outcome missing", minimal + "timeline:\n  - {event: flow, from: x.payments, to: x.payments:80}\n", ErrInvalid, "blocked or allowed"},
		{"unknown agent", minimal + "timeline:\n  - {event: revoke, agent: y.payments}\n", ErrInvalid, "no node runs agent y.payments"},
		{"out of order", minimal + "timeline:\n  - {event: heal, at: 2s}\n  - {event: heal, at: 1s}\n", ErrInvalid, "time order"},
		{"two documents", minimal + "---\nname: x\n", ErrUnsupported, "one document"},
		{"not a mapping", "- a\n", ErrInvalid, "mapping"},
		{"deep", strings.Repeat("[", 40), ErrInvalid, "nested"},
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
	for _, p := range []string{"../scenarios/lateral-movement.yaml"} {
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
