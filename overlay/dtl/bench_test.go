package dtl

import (
	"bytes"
	"crypto/ed25519"
	"testing"
)

func BenchmarkSign(b *testing.B) {
	for _, tc := range []struct {
		name string
		hash bool
	}{{"chain", false}, {"hash", true}} {
		b.Run(tc.name, func(b *testing.B) {
			f := newFixture(b)
			s := aad(b)
			c := claimsFor(f.alice, 1, f.now)
			if tc.hash {
				h := c.Chain.Hash()
				c.Chain, c.ChainHash = nil, h[:]
			}
			var size int
			b.ReportAllocs()
			for b.Loop() {
				raw, err := Sign(c, f.alice.key, s)
				if err != nil {
					b.Fatal(err)
				}
				size = len(raw)
			}
			b.ReportMetric(float64(size), "bytes/record")
		})
	}
}

func BenchmarkParseVerify(b *testing.B) {
	f := newFixture(b)
	s := aad(b)
	c := claimsFor(f.alice, 1, f.now)
	h := c.Chain.Hash()
	c.Chain, c.ChainHash = nil, h[:]
	raw := mustSign(b, c, f.alice.key, s)
	pub := f.alice.key.Public().(ed25519.PublicKey)
	b.ReportAllocs()
	for b.Loop() {
		rec, err := Parse(raw)
		if err != nil {
			b.Fatal(err)
		}
		if err := rec.Verify(pub, s); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(len(raw)), "bytes/record")
}

// BenchmarkAdmit measures the receiving node's CPU per new flow: the first record on a session
// (full chain, X.509 verification) and later ones (cached chain by hash).
func BenchmarkAdmit(b *testing.B) {
	for _, tc := range []struct {
		name   string
		cached bool
	}{{"full-chain", false}, {"cached-chain", true}} {
		b.Run(tc.name, func(b *testing.B) {
			e := newAdmitEnv(b)
			s := session(b, e.f.n1, "payments")
			c := claimsFor(e.f.alice, 1, e.now)
			if tc.cached {
				if _, err := e.v.Admit(s, mustSign(b, c, e.f.alice.key, s.AAD)); err != nil {
					b.Fatal(err)
				}
				h := c.Chain.Hash()
				c.Chain, c.ChainHash = nil, h[:]
			}
			c.Seq = 2
			raw := mustSign(b, c, e.f.alice.key, s.AAD)
			b.ReportAllocs()
			for b.Loop() {
				s.Replay = &ReplayWindow{}
				if _, err := e.v.Admit(s, raw); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(len(raw)), "bytes/record")
		})
	}
}

// BenchmarkAdmitNewGoroutine admits a cached-chain record on a fresh goroutine each time, as the
// tunnel endpoint does for every flow stream: it includes growing that goroutine's small starting
// stack to what Ed25519 verification needs (see growStack).
func BenchmarkAdmitNewGoroutine(b *testing.B) {
	e := newAdmitEnv(b)
	s := session(b, e.f.n1, "payments")
	c := claimsFor(e.f.alice, 1, e.now)
	if _, err := e.v.Admit(s, mustSign(b, c, e.f.alice.key, s.AAD)); err != nil {
		b.Fatal(err)
	}
	h := c.Chain.Hash()
	c.Chain, c.ChainHash = nil, h[:]
	raws := make([][]byte, 0, 1<<12)
	for i := range cap(raws) {
		c.Seq = uint64(i + 2)
		raws = append(raws, mustSign(b, c, e.f.alice.key, s.AAD))
	}
	done := make(chan error)
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		if i == len(raws) {
			b.StopTimer()
			s.Replay, i = &ReplayWindow{}, 0
			b.StartTimer()
		}
		raw := raws[i]
		i++
		go func() {
			_, err := e.v.Admit(s, raw)
			done <- err
		}()
		if err := <-done; err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkReplayWindow(b *testing.B) {
	var w ReplayWindow
	var seq uint64
	for b.Loop() {
		seq++
		if err := w.Check(seq); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkFrameRoundTrip(b *testing.B) {
	body := make([]byte, 200)
	var buf bytes.Buffer
	for b.Loop() {
		buf.Reset()
		if err := WriteFrame(&buf, FrameRecord, body); err != nil {
			b.Fatal(err)
		}
		if _, _, err := ReadFrame(&buf, MaxRecordSize); err != nil {
			b.Fatal(err)
		}
	}
}
