package revstore

import (
	"testing"
	"time"
)

// BenchmarkAdd measures a durable Add of a new record (verify, bbolt commit with fsync).
func BenchmarkAdd(b *testing.B) {
	p := newPKI(b)
	clk := &clock{t: t0}
	s, _ := open(b, storePath(b), p, clk)
	raws := make([][]byte, 0, 1024)
	for i := range cap(raws) {
		raws = append(raws, p.byAuthority(b, serial(i+1), uint64(i+1), time.Hour))
	}
	i := 0
	for b.Loop() {
		if i == len(raws) {
			b.StopTimer()
			_, _ = s.Prune(t0.Add(2 * time.Hour))
			i = 0
			b.StartTimer()
		}
		if _, _, err := s.Add(raws[i]); err != nil {
			b.Fatal(err)
		}
		i++
	}
}

// BenchmarkRevoked measures the lookup the node runs on every handshake and flow.
func BenchmarkRevoked(b *testing.B) {
	p := newPKI(b)
	clk := &clock{t: t0}
	s, _ := open(b, storePath(b), p, clk)
	for i := range 1000 {
		if _, _, err := s.Add(p.byAuthority(b, serial(i+1), uint64(i+1), time.Hour)); err != nil {
			b.Fatal(err)
		}
	}
	keys := []string{"spiffe://acme.internal/node/x", "serial:123456789", "spiffe://acme.internal/zone/z/agent/a", "serial:99999", "serial:1@spiffe://acme.internal/node/x"}
	for b.Loop() {
		if s.Revoked(keys...) {
			b.Fatal("revoked")
		}
	}
}
