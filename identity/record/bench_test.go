package record

import (
	"testing"
	"time"
)

func BenchmarkVerifyRevocation(b *testing.B) {
	p := newTestPKI(b)
	for name, raw := range map[string][]byte{
		"authority":  mustSign(b, p.authClaims(p.n1.ID.String(), 1), p.authKey),
		"node-agent": mustSign(b, AgentRevocation(p.n1, p.i1, p.a1, "drift", t0), p.n1Key),
	} {
		b.Run(name, func(b *testing.B) {
			for b.Loop() {
				if _, err := p.v.VerifyRevocation(raw, t0.Add(time.Minute)); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(len(raw)), "bytes")
		})
	}
}
