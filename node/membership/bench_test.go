package membership

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/ute-project/ute/overlay/gossip/gossiptest"
)

// BenchmarkRevocationConvergence measures, for 10, 50 and 100 in-process nodes of one zone over real
// QUIC on loopback with memberlist's LAN timings, the time from Publish of a revocation-sized
// record (~200 bytes) at a random member until the last member holds it: with re-broadcast on
// first receipt (this package) and with memberlist's own broadcast alone (NoRequeue), in the same
// run. ms/converge is the mean, max-ms the worst iteration, reached-% the share of members that
// held the record when the iteration ended (it ends at convergence or after 3 s).
//
//	go test -run '^$' -bench RevocationConvergence -benchtime 10x ./node/membership/
func BenchmarkRevocationConvergence(b *testing.B) {
	for _, n := range []int{10, 50, 100} {
		for _, mode := range []struct {
			name      string
			noRequeue bool
		}{{"requeue", false}, {"memberlist-only", true}} {
			b.Run(fmt.Sprintf("nodes=%d/%s", n, mode.name), func(b *testing.B) {
				benchConvergence(b, n, mode.noRequeue)
			})
		}
	}
}

func benchConvergence(b *testing.B, n int, noRequeue bool) {
	auth := gossiptest.NewAuthority(b, td)
	sg := newSigner(b)
	opts := clusterOpts{timing: LANTiming(), noRequeue: noRequeue}
	ms := make([]*member, n)
	for i := range ms {
		ms[i] = startMember(b, auth, sg, fmt.Sprintf("n%02d", i), []string{"z"}, gossiptest.NodeOptions{}, opts)
	}
	joinAll(b, ms)
	settle(b, ms, "z")
	const timeout = 3 * time.Second
	var (
		total, worst time.Duration
		reached      float64
	)
	b.ResetTimer()
	for range b.N {
		raw := sg.record(b, 130) // 64-byte signature + body: about a revocation record's size
		from := ms[rand.IntN(n)]
		from.store.put("z", raw)
		start := time.Now()
		if err := from.m.Publish(raw, "z"); err != nil {
			b.Fatal(err)
		}
		var took time.Duration
		for {
			held := 0
			for _, m := range ms {
				if m.store.holds("z", raw) {
					held++
				}
			}
			took = time.Since(start)
			if held == n || took > timeout {
				reached += float64(held) / float64(n)
				break
			}
			time.Sleep(time.Millisecond)
		}
		total += took
		worst = max(worst, took)
	}
	b.StopTimer()
	b.ReportMetric(float64(total.Microseconds())/1000/float64(b.N), "ms/converge")
	b.ReportMetric(float64(worst.Microseconds())/1000, "max-ms")
	b.ReportMetric(100*reached/float64(b.N), "reached-%")
	b.ReportMetric(0, "ns/op")
}

// settle makes every member see all the others before measuring. With LAN timings memberlist
// repairs a missed alive broadcast only by push/pull, every 30 s or more; re-joining through a
// random member runs that exchange at once.
func settle(b *testing.B, ms []*member, zone string) {
	deadline := time.Now().Add(time.Duration(len(ms)) * 1200 * time.Millisecond) // 2 min at 100 nodes
	for time.Now().Before(deadline) {
		short := slices.DeleteFunc(slices.Clone(ms), func(m *member) bool { return len(m.m.Members(zone)) == len(ms) })
		if len(short) == 0 {
			return
		}
		for _, m := range short {
			o := ms[rand.IntN(len(ms))]
			if o != m {
				_, _ = m.m.Join(ctxT(b), zone, []Seed{seedOf(o)})
			}
		}
		time.Sleep(500 * time.Millisecond)
	}
	b.Fatalf("membership of %d nodes did not settle in %v", len(ms), time.Duration(len(ms))*1200*time.Millisecond)
}
