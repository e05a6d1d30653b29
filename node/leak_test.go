package node

import (
	"context"
	"runtime"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// Every goroutine a node starts has an owner that stops it: after nodes that held tunnels, TCP
// and UDP flows, directory exchanges and the credential scheduler are closed, the goroutine count
// returns to what it was before they were opened.
func TestClosedNodesLeaveNoGoroutines(t *testing.T) {
	settle := func(limit int) int {
		deadline := time.Now().Add(5 * time.Second)
		n := runtime.NumGoroutine()
		for n > limit && time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond)
			n = runtime.NumGoroutine()
		}
		return n
	}
	before := runtime.NumGoroutine()
	t.Run("work", func(t *testing.T) {
		ns := threeNodes(t)
		billing := agent(t, ns["a"], "payments", "billing-api")
		ledger := agent(t, ns["b"], "payments", "ledger")
		s := serveSink(t, ledger, "8080")
		c, err := billing.Dial(context.Background(), "tcp", "ledger.payments:8080")
		require.NoError(t, err)
		_, err = c.Write(make([]byte, 64<<10))
		require.NoError(t, err)
		// The sink counts a flow's bytes when it ends; its cleanup waits for its handlers, so the
		// TCP flow is closed here. The UDP flow below stays open for the nodes' Close to end.
		require.NoError(t, c.Close())
		require.Eventually(t, func() bool { return s.bytes.Load() == 64<<10 }, 5*time.Second, 5*time.Millisecond)
		pc, err := ledger.ListenPacket("udp", ":5353")
		require.NoError(t, err)
		u, err := billing.Dial(context.Background(), "udp", "ledger.payments:5353")
		require.NoError(t, err)
		udpPingPong(t, u, pc, billing, false, 3)
	})
	after := settle(before)
	if after > before {
		buf := make([]byte, 1<<20)
		n := runtime.Stack(buf, true)
		t.Fatalf("%d goroutines before the nodes were opened, %d after they were closed:\n%s", before, after, buf[:n])
	}
}
