package authority

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"
)

// Once ListenAdmin returns, a CLI call reaches the daemon through its socket: it must never find
// the store locked by a daemon whose socket is not bound yet (the race `authority run` had when it
// printed "listening" before the socket existed).
func TestAdminSocketAnswersAsSoonAsListenAdminReturns(t *testing.T) {
	clock := newTestClock()
	dir := filepath.Join(t.TempDir(), "auth")
	require.NoError(t, Init(dir, "acme.internal", writePolicy(t, testPolicy), Options{Now: clock.Now}))
	ta, _ := serveAuthority(t, dir, clock)

	admin, err := ta.ListenAdmin()
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- admin.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		require.NoError(t, <-done)
	})

	adm, err := OpenAdmin(ctx, dir, Options{})
	require.NoError(t, err)
	t.Cleanup(func() { _ = adm.Close() })
	require.IsType(t, &adminClient{}, adm, "the daemon answers on its socket, not a direct store open")
	tok, err := adm.CreateToken(ctx, TokenSpec{Zones: []string{"payments"}})
	require.NoError(t, err)
	require.NotEmpty(t, tok.Token)
}
