package tunnel

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Only the dialing side sends keep-alives (at-rest cost per tunnel); its PINGs alone must keep a
// silent tunnel up on both ends for several idle timeouts, and without them it must die.
func TestDialerKeepAliveHoldsIdleTunnel(t *testing.T) {
	for _, tc := range []struct {
		name      string
		keepAlive time.Duration
		wantUp    bool
	}{
		{"dialer keep-alive", 400 * time.Millisecond, true},
		{"no keep-alive", -1, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pki := newPKI(t, testTD)
			lim := fastLimits()
			lim.MaxIdleTimeout = time.Second
			lim.KeepAlivePeriod = tc.keepAlive
			a := startNode(t, pki, "a", pki.node(t, "a", "payments"), []string{"payments"}, "", withLimits(lim))
			b := startNode(t, pki, "b", pki.node(t, "b", "payments"), []string{"payments"}, "", withLimits(lim))
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			_, err := a.ep.Dial(ctx, b.addr, b.id, "payments")
			require.NoError(t, err)
			require.Eventually(t, func() bool { return len(b.ep.Tunnels()) == 1 }, 2*time.Second, 10*time.Millisecond)

			time.Sleep(3 * time.Second) // three idle timeouts without a byte of traffic
			if tc.wantUp {
				assert.Len(t, a.ep.Tunnels(), 1, "the dialer's tunnel stays up")
				assert.Len(t, b.ep.Tunnels(), 1, "the accepting side's tunnel stays up on the dialer's PINGs alone")
				return
			}
			assert.Empty(t, a.ep.Tunnels(), "without keep-alives the idle tunnel times out")
			assert.Empty(t, b.ep.Tunnels())
		})
	}
}
