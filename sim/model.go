package sim

import (
	"math"
	"time"
)

// predict is the epidemic (SI push) model's expected fraction of n members holding a record
// over time, when one member has it at t=0 and every member that has it pushes it to fanout
// members chosen at random every interval: x' = 1 − (1 − x)·(1 − fanout/(n−1))^(n·x). It is the
// mean-field model behind Serf's convergence simulator, without its packet-loss and
// retransmission-limit terms. The curve runs past horizon until it is within 1/(2n) of 1, and
// stops within 1e-4 of 1.
func predict(n, fanout int, interval, horizon time.Duration) []CurvePoint {
	if n <= 0 || interval <= 0 {
		return nil
	}
	x := 1 / float64(n)
	out := []CurvePoint{{T: 0, Fraction: x}}
	if n == 1 {
		return []CurvePoint{{T: 0, Fraction: 1}}
	}
	miss := 1 - float64(fanout)/float64(n-1)
	if miss < 0 {
		miss = 0
	}
	for k := 1; ; k++ {
		x = 1 - (1-x)*math.Pow(miss, float64(n)*x)
		t := time.Duration(k) * interval
		out = append(out, CurvePoint{T: t, Fraction: x})
		if (t >= horizon && 1-x < 1/(2*float64(n))) || 1-x < 1e-4 || k > 10000 {
			return out
		}
	}
}

// PredictTime is the model's time until fraction of n members hold a record.
func PredictTime(n, fanout int, interval time.Duration, fraction float64) time.Duration {
	for _, p := range predict(n, fanout, interval, time.Hour) {
		if p.Fraction >= fraction {
			return p.T
		}
	}
	return -1
}
