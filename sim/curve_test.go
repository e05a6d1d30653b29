package sim

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
)

func TestCurveOf(t *testing.T) {
	ms := time.Millisecond
	tests := []struct {
		name  string
		times []time.Duration
		n     int
		want  []CurvePoint
	}{
		{"no members", nil, 0, []CurvePoint{{T: 0, Fraction: 1}}},
		{"nobody yet", nil, 4, []CurvePoint{{T: 9 * ms, Fraction: 0}}},
		{"one step per member, in time order", []time.Duration{3 * ms, 1 * ms, 2 * ms, 4 * ms}, 4,
			[]CurvePoint{{T: 1 * ms, Fraction: 0.25}, {T: 2 * ms, Fraction: 0.5}, {T: 3 * ms, Fraction: 0.75}, {T: 4 * ms, Fraction: 1}}},
		{"members at the same time make one step", []time.Duration{0, 0, 5 * ms}, 4,
			[]CurvePoint{{T: 0, Fraction: 0.5}, {T: 5 * ms, Fraction: 0.75}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assert.Equal(t, tt.want, curveOf(tt.times, tt.n, 9*ms))
		})
	}
}

func TestReachedAt(t *testing.T) {
	ms := time.Millisecond
	curve := curveOf([]time.Duration{40 * ms, 10 * ms, 30 * ms, 20 * ms}, 5, 0) // the fifth never
	tests := []struct {
		frac float64
		want time.Duration
		ok   bool
	}{
		{0.8, 40 * ms, true},
		{0.6, 30 * ms, true},
		{0.5, 30 * ms, true}, // 2.5 members of 5: the third
		{0.4, 20 * ms, true},
		{0.9, 0, false},
		{1, 0, false},
	}
	for _, tt := range tests {
		got, ok := reachedAt(curve, tt.frac)
		assert.Equal(t, tt.ok, ok, "frac %v", tt.frac)
		assert.Equal(t, tt.want, got, "frac %v", tt.frac)
	}
}
