package node

import (
	"context"
	"io"
	"testing"

	"github.com/stretchr/testify/require"
)

// BenchmarkDialAdmitted measures one new agent flow through two nodes: record signing, the
// receiver's full admission (chain, signature, policy, replay) and the verdict round trip.
func BenchmarkDialAdmitted(b *testing.B) {
	ns := threeNodes(b)
	billing := agent(b, ns["a"], "payments", "billing-api")
	_ = serveSink(b, agent(b, ns["b"], "payments", "ledger"), "8080")
	ctx := context.Background()
	c, err := billing.Dial(ctx, "tcp", "ledger.payments:8080")
	require.NoError(b, err)
	require.NoError(b, c.Close())
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		c, err := billing.Dial(ctx, "tcp", "ledger.payments:8080")
		if err != nil {
			b.Fatal(err)
		}
		_ = c.Close()
	}
}

// BenchmarkAgentStream measures agent-to-agent throughput on one admitted flow (compare with the
// bare quic-go stream benchmark of overlay/tunnel in the same run).
func BenchmarkAgentStream(b *testing.B) {
	ns := threeNodes(b)
	billing := agent(b, ns["a"], "payments", "billing-api")
	s := serveSink(b, agent(b, ns["b"], "payments", "ledger"), "8080")
	c, err := billing.Dial(context.Background(), "tcp", "ledger.payments:8080")
	require.NoError(b, err)
	buf := make([]byte, 64<<10)
	b.SetBytes(int64(len(buf)))
	b.ResetTimer()
	for b.Loop() {
		if _, err := c.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	_ = c.(interface{ CloseWrite() error }).CloseWrite()
	_, _ = io.Copy(io.Discard, c)
	_ = c.Close()
	_ = s
}
