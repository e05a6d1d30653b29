package authority

import (
	"context"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// Serve owns every goroutine it starts (connections, streams, the admin socket, the audit
// summary ticker, watch connections): after joins, a refused replay, a renewal, an open watch
// and an admin call, stopping the authority brings the goroutine count back to where it was.
func TestStoppedAuthorityLeavesNoGoroutines(t *testing.T) {
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
		clock := newTestClock()
		dir := filepath.Join(t.TempDir(), "auth")
		require.NoError(t, Init(dir, "acme.internal", writePolicy(t, testPolicy), Options{Now: clock.Now}))
		ta, stop := serveAuthority(t, dir, clock)
		admin, err := ta.ListenAdmin()
		require.NoError(t, err)
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- admin.Serve(ctx) }()
		t.Cleanup(func() { cancel(); require.NoError(t, <-done) })

		p := joinParams(t, ta, ta.token(t, TokenSpec{Zones: []string{"payments"}}), "n1", clock)
		j, err := Join(context.Background(), p)
		require.NoError(t, err)
		nodeKey := p.Key
		p.Key = newKey(t)
		_, err = Join(context.Background(), p)
		require.ErrorIs(t, err, ErrTokenUsed)
		clock.Advance(13 * time.Hour)
		renewedKey := newKey(t)
		r, err := Renew(context.Background(), RenewParams{Addr: ta.addr, Authority: j.Authority, Current: j.Node, Key: nodeKey, NewKey: renewedKey, Now: clock.Now})
		require.NoError(t, err)
		// A watch is open when the authority stops: both ends must let go of it.
		w := startWatch(t, ta.addr, r.Authority, r.Node, renewedKey, 0, 0)
		nextPolicy(t, w)
		require.Eventually(t, func() bool { return ta.Watchers() == 1 }, 5*time.Second, 10*time.Millisecond)
		defer func() {
			stop()
			require.Eventually(t, func() bool { return w.lastErr() != nil }, 5*time.Second, 10*time.Millisecond)
			w.stop()
		}()
		adm, err := OpenAdmin(ctx, dir, Options{})
		require.NoError(t, err)
		_, err = adm.CreateToken(ctx, TokenSpec{Zones: []string{"payments"}})
		require.NoError(t, err)
		require.NoError(t, adm.Close())
	})
	if after := settle(before); after > before {
		buf := make([]byte, 1<<20)
		n := runtime.Stack(buf, true)
		t.Fatalf("%d goroutines before the authority started, %d after it stopped:\n%s", before, after, buf[:n])
	}
}
