package authority

import (
	"context"
	"crypto/ed25519"
	"errors"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/identity/record"
)

// watchProbe runs Watch in the background and collects what it delivers, verified again here.
type watchProbe struct {
	records  chan *record.Revocation
	policies chan *record.PolicyRelease
	mu       sync.Mutex
	errs     []error
	state    WatchState
	cancel   context.CancelFunc
	done     chan struct{}
}

func (w *watchProbe) lastErr() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.errs) == 0 {
		return nil
	}
	return w.errs[len(w.errs)-1]
}

// stop ends the watch and returns the state it reached.
func (w *watchProbe) stop() WatchState {
	w.cancel()
	<-w.done
	return w.state
}

func startWatch(t *testing.T, addr string, anchor, cert *identity.Certificate, key ed25519.PrivateKey, since, policy uint64) *watchProbe {
	t.Helper()
	v := record.Verifier{Certs: identity.Verifier{Authority: anchor}}
	w := &watchProbe{records: make(chan *record.Revocation, 64), policies: make(chan *record.PolicyRelease, 16), done: make(chan struct{})}
	ctx, cancel := context.WithCancel(context.Background())
	w.cancel = cancel
	go func() {
		defer close(w.done)
		st, err := Watch(ctx, WatchParams{
			Addr: addr, Anchor: anchor, Certificate: cert, Key: key, SinceSeq: since, PolicyVersion: policy,
			MinBackoff: 20 * time.Millisecond, MaxBackoff: 200 * time.Millisecond,
			OnRecord: func(raw []byte) error {
				r, err := v.VerifyRevocation(raw, time.Now())
				if err != nil {
					return err
				}
				w.records <- r
				return nil
			},
			OnPolicy: func(raw []byte) error {
				p, err := v.VerifyPolicy(raw, time.Now())
				if err != nil {
					return err
				}
				w.policies <- p
				return nil
			},
			OnError: func(err error) {
				w.mu.Lock()
				defer w.mu.Unlock()
				w.errs = append(w.errs, err)
			},
		})
		assert.NoError(t, err)
		w.state = st
	}()
	t.Cleanup(func() { w.stop() })
	return w
}

func nextRecord(t *testing.T, w *watchProbe) *record.Revocation {
	t.Helper()
	select {
	case r := <-w.records:
		return r
	case <-time.After(5 * time.Second):
		t.Fatalf("no revocation record within 5 s (last error: %v)", w.lastErr())
		return nil
	}
}

func nextPolicy(t *testing.T, w *watchProbe) *record.PolicyRelease {
	t.Helper()
	select {
	case p := <-w.policies:
		return p
	case <-time.After(5 * time.Second):
		t.Fatalf("no policy release within 5 s (last error: %v)", w.lastErr())
		return nil
	}
}

func assertQuiet(t *testing.T, w *watchProbe) {
	t.Helper()
	select {
	case r := <-w.records:
		t.Fatalf("unexpected record %d (%s)", r.Claims.Seq, r.Claims.Subject)
	case p := <-w.policies:
		t.Fatalf("unexpected policy version %d", p.Claims.PolicyVersion)
	case <-time.After(150 * time.Millisecond):
	}
}

// A watcher receives the records above its sequence number, then each new revocation within
// 100 ms of RevokeSubject returning.
func TestWatchStreamsRecordsSinceAndPushesNew(t *testing.T) {
	clock := newTestClock()
	ta := startAuthority(t, clock)
	ctx := context.Background()
	watcher, rp := joinNode(t, ta, clock, "w")
	for _, n := range []string{"a", "b", "c"} {
		joinNode(t, ta, clock, n)
	}
	for _, n := range []string{"a", "b"} {
		_, err := ta.RevokeSubject(ctx, "spiffe://acme.internal/node/"+n, "retired")
		require.NoError(t, err)
	}

	w := startWatch(t, ta.addr, watcher.Authority, watcher.Node, rp.Key, 1, 1)
	r := nextRecord(t, w)
	assert.Equal(t, uint64(2), r.Claims.Seq, "only the records above SinceSeq")
	assert.Equal(t, "spiffe://acme.internal/node/b", r.Claims.Subject)
	assertQuiet(t, w) // policy version 1 is held already

	rev, err := ta.RevokeSubject(ctx, "spiffe://acme.internal/node/c", "compromised")
	returned := time.Now()
	require.NoError(t, err)
	r = nextRecord(t, w)
	latency := time.Since(returned)
	assert.Less(t, latency, 100*time.Millisecond)
	t.Logf("revocation reached the watcher %v after RevokeSubject returned", latency)
	assert.Equal(t, rev.Seq, r.Claims.Seq)
	assert.Equal(t, uint64(3), r.Claims.Seq)
	assert.Equal(t, rev.Record, r.Raw(), "the watcher gets the exact stored bytes")
	assert.Equal(t, 1, ta.Watchers())

	// Revoking the same node again writes no record, so the watcher hears nothing.
	again, err := ta.RevokeSubject(ctx, "spiffe://acme.internal/node/c", "again")
	require.NoError(t, err)
	assert.True(t, again.Already)
	assert.Equal(t, uint64(3), again.Seq)
	assertQuiet(t, w)
	assert.Equal(t, WatchState{Seq: 3, PolicyVersion: 1}, w.stop())
}

// serveOn serves the authority in dir on addr until the returned stop is called.
func serveOn(t *testing.T, dir, addr string, clock *testClock) (*Authority, string, func()) {
	t.Helper()
	a, err := Open(dir, Options{Now: clock.Now})
	require.NoError(t, err)
	srv, err := a.Listen(addr)
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			require.NoError(t, <-done)
			require.NoError(t, a.Close())
		})
	}
	t.Cleanup(stop)
	return a, srv.Addr().String(), stop
}

// A watcher that loses the authority reconnects by itself and, sending the highest sequence it
// holds, receives only the records it missed, including one written while the daemon was down.
func TestWatchReconnectsAndResumes(t *testing.T) {
	clock := newTestClock()
	dir := filepath.Join(t.TempDir(), "auth")
	require.NoError(t, Init(dir, "acme.internal", writePolicy(t, testPolicy), Options{Now: clock.Now}))
	a, addr, stop := serveOn(t, dir, "127.0.0.1:0", clock)
	ta := &testAuthority{Authority: a, dir: dir, addr: addr}
	ctx := context.Background()
	watcher, rp := joinNode(t, ta, clock, "w")
	for _, n := range []string{"a", "b", "c"} {
		joinNode(t, ta, clock, n)
	}
	_, err := a.RevokeSubject(ctx, "spiffe://acme.internal/node/a", "retired")
	require.NoError(t, err)

	w := startWatch(t, addr, watcher.Authority, watcher.Node, rp.Key, 0, 0)
	assert.Equal(t, uint64(1), nextRecord(t, w).Claims.Seq)
	assert.Equal(t, uint64(1), nextPolicy(t, w).Claims.PolicyVersion)

	stop()
	offline, err := Open(dir, Options{Now: clock.Now})
	require.NoError(t, err)
	_, err = offline.RevokeSubject(ctx, "spiffe://acme.internal/node/b", "revoked while the daemon was down")
	require.NoError(t, err)
	require.NoError(t, offline.Close())

	a2, _, _ := serveOn(t, dir, addr, clock)
	r := nextRecord(t, w)
	assert.Equal(t, uint64(2), r.Claims.Seq, "only the record it missed")
	_, err = a2.RevokeSubject(ctx, "spiffe://acme.internal/node/c", "and one more")
	require.NoError(t, err)
	assert.Equal(t, uint64(3), nextRecord(t, w).Claims.Seq)
	assertQuiet(t, w)
	require.Error(t, w.lastErr(), "the lost connection was reported")
	assert.Equal(t, WatchState{Seq: 3, PolicyVersion: 1}, w.stop())
}

// A revoked node, a superseded certificate and a certificate of another authority are refused
// when they open a watch; a node revoked while watching receives its own revocation and is cut.
func TestWatchRefusals(t *testing.T) {
	clock := newTestClock()
	ta := startAuthority(t, clock)
	ctx := context.Background()

	waitErr := func(t *testing.T, w *watchProbe, want error) {
		t.Helper()
		require.Eventually(t, func() bool { return errors.Is(w.lastErr(), want) }, 5*time.Second, 10*time.Millisecond, "last error: %v", w.lastErr())
	}

	t.Run("revoked", func(t *testing.T) {
		j, rp := joinNode(t, ta, clock, "revoked")
		_, err := ta.RevokeSubject(ctx, j.Node.ID.String(), "compromised")
		require.NoError(t, err)
		w := startWatch(t, ta.addr, j.Authority, j.Node, rp.Key, 0, 0)
		waitErr(t, w, ErrRevoked)
		assertQuiet(t, w)
		assert.Zero(t, w.stop())
	})
	t.Run("superseded", func(t *testing.T) {
		j, rp := joinNode(t, ta, clock, "renewed")
		_, err := Renew(ctx, rp)
		require.NoError(t, err)
		w := startWatch(t, ta.addr, j.Authority, j.Node, rp.Key, 0, 0)
		waitErr(t, w, ErrSuperseded)
		assertQuiet(t, w)
	})
	t.Run("foreign", func(t *testing.T) {
		other := startAuthority(t, clock)
		j, rp := joinNode(t, other, clock, "stranger")
		// The stranger trusts our authority's key (so the handshake gets that far) but holds a
		// certificate of another authority.
		w := startWatch(t, ta.addr, ta.Certificate(), j.Node, rp.Key, 0, 0)
		waitErr(t, w, ErrWatchRefused)
		assertQuiet(t, w)
	})
	t.Run("wrong authority key", func(t *testing.T) {
		other := startAuthority(t, clock)
		j, rp := joinNode(t, ta, clock, "pinned")
		w := startWatch(t, other.addr, j.Authority, j.Node, rp.Key, 0, 0)
		waitErr(t, w, ErrPinMismatch)
		assertQuiet(t, w)
	})
	t.Run("revoked while watching", func(t *testing.T) {
		j, rp := joinNode(t, ta, clock, "victim")
		last, err := ta.Store().LastRevocationSeq()
		require.NoError(t, err)
		w := startWatch(t, ta.addr, j.Authority, j.Node, rp.Key, last, 1)
		require.Eventually(t, func() bool { return ta.Watchers() == 1 }, 5*time.Second, 10*time.Millisecond)
		rev, err := ta.RevokeSubject(ctx, j.Node.ID.String(), "compromised")
		require.NoError(t, err)
		r := nextRecord(t, w)
		assert.Equal(t, rev.Seq, r.Claims.Seq, "it hears of its own revocation first")
		waitErr(t, w, ErrRevoked)
		require.Eventually(t, func() bool { return ta.Watchers() == 0 }, 5*time.Second, 10*time.Millisecond)
	})
}

// A node holds at most MaxWatchersPerNode watches (a new one replaces the oldest), the authority
// at most MaxWatchers in total (more are refused busy).
func TestWatchLimits(t *testing.T) {
	clock := newTestClock()
	lim := Limits{MaxWatchers: 3, MaxWatchersPerNode: 2}
	dir := filepath.Join(t.TempDir(), "auth")
	require.NoError(t, Init(dir, "acme.internal", writePolicy(t, testPolicy), Options{Now: clock.Now}))
	a, err := Open(dir, Options{Now: clock.Now, Limits: lim})
	require.NoError(t, err)
	srv, err := a.Listen("127.0.0.1:0")
	require.NoError(t, err)
	sctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(sctx) }()
	t.Cleanup(func() { cancel(); require.NoError(t, <-done); require.NoError(t, a.Close()) })
	ta := &testAuthority{Authority: a, dir: dir, addr: srv.Addr().String()}

	j1, rp1 := joinNode(t, ta, clock, "n1")
	j2, rp2 := joinNode(t, ta, clock, "n2")
	j3, rp3 := joinNode(t, ta, clock, "n3")
	first := startWatch(t, ta.addr, j1.Authority, j1.Node, rp1.Key, 0, 1)
	require.Eventually(t, func() bool { return a.Watchers() == 1 }, 5*time.Second, 10*time.Millisecond)
	startWatch(t, ta.addr, j1.Authority, j1.Node, rp1.Key, 0, 1)
	require.Eventually(t, func() bool { return a.Watchers() == 2 }, 5*time.Second, 10*time.Millisecond)
	startWatch(t, ta.addr, j1.Authority, j1.Node, rp1.Key, 0, 1)
	require.Eventually(t, func() bool { return errors.Is(first.lastErr(), ErrBusy) }, 5*time.Second, 10*time.Millisecond,
		"the oldest watch of n1 was replaced")
	first.stop()
	require.Eventually(t, func() bool { return a.Watchers() == 2 }, 5*time.Second, 10*time.Millisecond)

	startWatch(t, ta.addr, j2.Authority, j2.Node, rp2.Key, 0, 1)
	require.Eventually(t, func() bool { return a.Watchers() == 3 }, 5*time.Second, 10*time.Millisecond)
	full := startWatch(t, ta.addr, j3.Authority, j3.Node, rp3.Key, 0, 1)
	require.Eventually(t, func() bool { return errors.Is(full.lastErr(), ErrBusy) }, 5*time.Second, 10*time.Millisecond)
	assert.Equal(t, 3, a.Watchers())
}

// Stopping the authority closes its watch connections at once: the watcher notices without
// waiting out the idle timeout.
func TestWatchSeesAuthorityStopAtOnce(t *testing.T) {
	clock := newTestClock()
	dir := filepath.Join(t.TempDir(), "auth")
	require.NoError(t, Init(dir, "acme.internal", writePolicy(t, testPolicy), Options{Now: clock.Now}))
	a, addr, stop := serveOn(t, dir, "127.0.0.1:0", clock)
	j, rp := joinNode(t, &testAuthority{Authority: a, dir: dir, addr: addr}, clock, "w")
	w := startWatch(t, addr, j.Authority, j.Node, rp.Key, 0, 1)
	require.Eventually(t, func() bool { return a.Watchers() == 1 }, 5*time.Second, 10*time.Millisecond)
	stopped := time.Now()
	stop()
	// Well under the watch's 10 s idle timeout, with room for a loaded machine.
	require.Eventually(t, func() bool { return w.lastErr() != nil }, 3*time.Second, 5*time.Millisecond)
	t.Logf("watcher noticed the stop after %v", time.Since(stopped))
}

// A node that claims more records than the authority holds (an authority restored from a backup)
// gets every record again rather than none of the next ones.
func TestWatchAheadOfAuthorityGetsEverything(t *testing.T) {
	clock := newTestClock()
	ta := startAuthority(t, clock)
	j, rp := joinNode(t, ta, clock, "w")
	joinNode(t, ta, clock, "a")
	_, err := ta.RevokeSubject(context.Background(), "spiffe://acme.internal/node/a", "retired")
	require.NoError(t, err)
	w := startWatch(t, ta.addr, j.Authority, j.Node, rp.Key, 40, 1)
	assert.Equal(t, uint64(1), nextRecord(t, w).Claims.Seq)
	assertQuiet(t, w)
}
