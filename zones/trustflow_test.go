package zones

import (
	"errors"
	"os"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const trustflowPolicy = `zones:
  - name: payments
    cidr: 100.100.1.0/24
    regions: [eu-west-1]
    min_trust: 50
    isolate_below: 20
    trustflow:
      decay_per_hour: 5
      weights:
        policy_denial: 20
        destination_burst: 40
  - name: support
    cidr: 100.100.2.0/24
    regions: [eu-west-1]
    min_trust: 30
    isolate_below: 10
`

func TestTrustFlowBlock(t *testing.T) {
	p, err := Parse("policy.yaml", []byte(trustflowPolicy))
	require.NoError(t, err)
	pay, _ := p.Zone("payments")
	require.NotNil(t, pay.TrustFlow)
	assert.Equal(t, &TrustFlow{Weights: map[string]int{"policy_denial": 20, "destination_burst": 40}, DecayPerHour: 5, Line: 7}, pay.TrustFlow)
	sup, _ := p.Zone("support")
	assert.Nil(t, sup.TrustFlow, "no block: the defaults")

	// New validates a block built in Go the same way.
	z := *pay
	z.TrustFlow = &TrustFlow{Weights: map[string]int{"vibes": 3}}
	_, err = New([]Zone{z})
	require.ErrorIs(t, err, ErrUnknownField)
	z.TrustFlow = &TrustFlow{DecayPerHour: MaxDecayPerHour + 1}
	_, err = New([]Zone{z})
	require.ErrorIs(t, err, ErrBadValue)
}

// The block is as strict as the rest of the file: unknown keys and signals, wrong types and
// out-of-range numbers are refused at their line.
func TestTrustFlowBlockRefusals(t *testing.T) {
	for _, tc := range []struct {
		name, block string
		want        error
		where       string
	}{
		{"unknown key", "    trustflow:\n      decay: 5\n", ErrUnknownField, "policy.yaml:8:7: zones[0].trustflow.decay"},
		{"unknown signal", "    trustflow:\n      weights:\n        vibes: 5\n", ErrUnknownField, "policy.yaml:9:9: zones[0].trustflow.weights.vibes"},
		{"weight above 100", "    trustflow:\n      weights:\n        policy_denial: 101\n", ErrBadValue, "policy.yaml:9:24"},
		{"negative weight", "    trustflow:\n      weights:\n        policy_denial: -1\n", ErrBadValue, "policy.yaml:9:24"},
		{"weight as text", "    trustflow:\n      weights:\n        policy_denial: high\n", ErrBadValue, "policy.yaml:9:24"},
		{"zero decay", "    trustflow:\n      decay_per_hour: 0\n", ErrBadValue, "policy.yaml:8:23"},
		{"block not a mapping", "    trustflow: 5\n", ErrBadValue, "policy.yaml:7:16"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			src := "zones:\n  - name: payments\n    cidr: 100.100.1.0/24\n    regions: [eu-west-1]\n    min_trust: 50\n    isolate_below: 20\n" + tc.block
			_, err := Parse("policy.yaml", []byte(src))
			require.ErrorIs(t, err, tc.want)
			var pe *ParseError
			require.True(t, errors.As(err, &pe))
			assert.Contains(t, err.Error(), tc.where)
		})
	}
}

// The example in docs/trustflow.md parses as written.
func TestTrustFlowDocExample(t *testing.T) {
	doc, err := os.ReadFile("../docs/trustflow.md")
	require.NoError(t, err)
	_, rest, ok := strings.Cut(string(doc), "```yaml\n")
	require.True(t, ok, "docs/trustflow.md has a yaml example")
	example, _, ok := strings.Cut(rest, "```")
	require.True(t, ok)
	p, err := Parse("docs/trustflow.md", []byte(example))
	require.NoError(t, err)
	pay, _ := p.Zone("payments")
	require.NotNil(t, pay.TrustFlow)
	assert.Equal(t, map[string]int{"policy_denial": 20, "destination_burst": 40, "renewal_failure": 0}, pay.TrustFlow.Weights)
	assert.Equal(t, 5, pay.TrustFlow.DecayPerHour)
}
