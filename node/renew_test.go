package node

import (
	"context"
	"crypto/sha256"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/identity/authority"
	"github.com/ute-project/ute/node/state"
	"github.com/ute-project/ute/overlay/audit"
)

const renewPolicy = `zones:
  - name: payments
    cidr: 100.100.1.0/24
    regions: [eu-west-1]
    min_trust: 50
    isolate_below: 20
    rules:
      - from: billing-*
        to: ledger-*
        ports: [tcp/8080]
`

// renewLifetime is the node certificate lifetime in the renewal tests: half-life at 30 min.
const renewLifetime = time.Hour

// fakeTimers is the credential scheduler's After: each call is recorded and fires only when the test
// says so, so the test sees every wait the loop asks for and no attempt happens unseen.
type fakeTimers struct {
	mu    sync.Mutex
	waits []time.Duration
	chans []chan time.Time
}

func (f *fakeTimers) After(d time.Duration) <-chan time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	ch := make(chan time.Time, 1)
	f.waits = append(f.waits, d)
	f.chans = append(f.chans, ch)
	return ch
}

func (f *fakeTimers) count() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.waits)
}

// await waits until the loop has asked for n timers and returns the n-th wait.
func (f *fakeTimers) await(t *testing.T, n int) time.Duration {
	t.Helper()
	require.Eventually(t, func() bool { return f.count() >= n }, 10*time.Second, time.Millisecond,
		"the credential scheduler never asked for timer %d", n)
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.waits[n-1]
}

func (f *fakeTimers) fire(n int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.chans[n-1] <- time.Time{}
}

// logCounter counts log records by message.
type logCounter struct {
	mu   sync.Mutex
	msgs map[string]int
}

func (l *logCounter) Enabled(context.Context, slog.Level) bool { return true }
func (l *logCounter) Handle(_ context.Context, r slog.Record) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.msgs[r.Message]++
	return nil
}
func (l *logCounter) WithAttrs([]slog.Attr) slog.Handler { return l }
func (l *logCounter) WithGroup(string) slog.Handler      { return l }
func (l *logCounter) count(msg string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.msgs[msg]
}

type renewEnv struct {
	clk  *clock
	auth *testAuthority
	exe  string
}

// newRenewEnv starts an authority issuing short-lived node certificates, on a clock shared with
// the nodes (records, certificates and the authority must agree on the time).
func newRenewEnv(t *testing.T) *renewEnv {
	t.Helper()
	clk := &clock{}
	ta := startAuthorityWith(t, renewPolicy, authority.Options{Now: clk.Now, NodeLifetime: renewLifetime})
	exe, err := os.Executable()
	require.NoError(t, err)
	return &renewEnv{clk: clk, auth: ta, exe: exe}
}

// join joins node name with agents and returns its directory.
func (e *renewEnv) join(t *testing.T, name string, agents ...string) string {
	t.Helper()
	tok, err := e.auth.CreateToken(context.Background(), authority.TokenSpec{Zones: []string{"payments"}, TTL: time.Minute})
	require.NoError(t, err)
	dir := filepath.Join(t.TempDir(), name)
	fp := sha256.Sum256([]byte(name))
	d, err := Join(context.Background(), JoinParams{Dir: dir, Authority: e.auth.addr, Token: tok.Token, Name: name, HostFingerprint: fp[:], Now: e.clk.Now})
	require.NoError(t, err)
	for _, ag := range agents {
		_, err := d.AddAgent(state.AgentSpec{Name: ag, Zone: "payments", Exe: e.exe})
		require.NoError(t, err)
	}
	return dir
}

func (e *renewEnv) open(t *testing.T, dir string, cfg Config) *testNode {
	t.Helper()
	cfg.Dir, cfg.Clock = dir, e.clk.Now
	n, err := Open(context.Background(), cfg)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, n.Close()) })
	return &testNode{Node: n, dir: dir, clock: e.clk}
}

func dialWrite(t *testing.T, a *Agent, addr, msg string) net.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := a.Dial(ctx, "tcp", addr)
	require.NoError(t, err)
	_, err = c.Write([]byte(msg))
	require.NoError(t, err)
	return c
}

func nextWhoIs(t *testing.T, s *sink) *Provenance {
	t.Helper()
	select {
	case p := <-s.whois:
		return p
	case <-time.After(5 * time.Second):
		t.Fatal("no admitted flow reached the listener")
		return nil
	}
}

// A node with Config.Authority renews by itself at half-life: a new certificate (new serial and
// key, same identity and address slice), agents reissued under it, flows on the old tunnel still
// running, new tunnels presenting the new chain in both directions, the renewal audited and the
// audit head signed by the new key; and the old certificate can no longer renew.
func TestNodeRenewsItselfAtHalfLife(t *testing.T) {
	env := newRenewEnv(t)
	timers := &fakeTimers{}
	a := env.open(t, env.join(t, "a", "billing-api", "ledger-a"), Config{Authority: env.auth.addr, After: timers.After})
	b := env.open(t, env.join(t, "b", "billing-batch", "ledger-b"), Config{})
	require.NoError(t, a.AddPeer(Peer{Node: "b", Addr: b.Addr()}))
	require.NoError(t, b.AddPeer(Peer{Node: "a", Addr: a.Addr()}))

	oldCert := a.Certificate()
	oldKey := nodeKey(t, a)
	// Nothing happens before half-life: the loop sleeps until then.
	assert.InDelta(t, float64(renewLifetime/2), float64(timers.await(t, 1)), float64(2*time.Minute))
	st := a.RenewalStatus()
	assert.True(t, st.Enabled)
	assert.False(t, st.Retrying)
	assert.Equal(t, oldCert.RenewAt(), st.NextAt)
	assert.True(t, st.LastSuccess.IsZero() && st.LastFailure.IsZero(), "no attempt yet: %+v", st)

	billing := agent(t, a, "payments", "billing-api")
	ledgerB := serveSink(t, agent(t, b, "payments", "ledger-b"), "8080")
	ledgerA := serveSink(t, agent(t, a, "payments", "ledger-a"), "8080")
	oldFlow := dialWrite(t, billing, "ledger-b.payments:8080", "before renewal ")
	defer func() { _ = oldFlow.Close() }()
	assert.Equal(t, serialKey(oldCert), nextWhoIs(t, ledgerB).NodeSerial)

	env.clk.Advance(renewLifetime/2 + time.Minute)
	timers.fire(1)
	// After a renewal the loop asks for the next half-life: the swap is complete by then.
	next := timers.await(t, 2)
	assert.InDelta(t, float64(renewLifetime/2), float64(next), float64(2*time.Minute))

	cur := a.Certificate()
	require.NotEqual(t, oldCert.Serial(), cur.Serial(), "renewal issues a new serial")
	st = a.RenewalStatus()
	assert.False(t, st.Retrying)
	assert.WithinDuration(t, env.clk.Now(), st.LastSuccess, time.Second)
	assert.Equal(t, cur.RenewAt(), st.NextAt, "next: the new certificate's half-life")
	assert.Empty(t, st.LastError)
	assert.Equal(t, oldCert.ID, cur.ID, "same identity")
	assert.Equal(t, oldCert.Claims.Zones, cur.Claims.Zones, "same zones and address slice")
	assert.False(t, cur.PublicKey().Equal(oldCert.PublicKey()), "renewal rotates the node key")
	onDisk, err := a.Node.dir.NodeCert()
	require.NoError(t, err)
	assert.Equal(t, cur.Serial(), onDisk.Serial())
	assert.Equal(t, cur.Serial(), a.ep.Certificate().Leaf.SerialNumber)

	// Agents were reissued under the new issuing certificate (renewed with the node certificate),
	// on disk and in the handles given out.
	iss := a.issuerCertificate()
	assert.Equal(t, cur.Serial(), iss.NodeSerial(), "the issuing certificate was renewed with the node certificate")
	for _, name := range []string{"billing-api", "ledger-a"} {
		st, err := a.Node.dir.Agent("payments", name)
		require.NoError(t, err)
		require.NoError(t, a.verif.VerifyAgent(iss, st.Cert, env.clk.Now()), name)
	}
	cr := billing.creds()
	assert.Same(t, iss, cr.node)
	require.NoError(t, a.verif.VerifyAgent(iss, cr.cert, env.clk.Now()))
	// Each reissue is audited, and the peer already holds the new certificates: the renewed node
	// announced them over a fresh tunnel (the old one presents the old node certificate, under
	// which they would not verify).
	for _, name := range []string{"billing-api", "ledger-a"} {
		recs := agentAudit(t, a, name)
		require.Len(t, recs, 1, name)
		assert.Equal(t, causeNodeRenewed, recs[0].Fields["cause"])
	}
	ledgerCert := agent(t, a, "payments", "ledger-a").creds().cert
	assert.Equal(t, serialKey(ledgerCert), viewSerial(b, "payments", "ledger-a"))

	// The flow opened before the renewal still carries bytes on its (now stale) tunnel.
	_, err = oldFlow.Write([]byte("after renewal"))
	require.NoError(t, err)

	// A new flow goes through a new tunnel and carries the new chain.
	newFlow := dialWrite(t, billing, "ledger-b.payments:8080", "new chain")
	defer func() { _ = newFlow.Close() }()
	p := nextWhoIs(t, ledgerB)
	assert.Equal(t, serialKey(cur), p.NodeSerial, "the peer admitted the new chain")
	assert.Equal(t, billing.ID().String(), p.Agent)
	require.NoError(t, oldFlow.Close())
	require.NoError(t, newFlow.Close())
	require.Eventually(t, func() bool {
		return ledgerB.bytes.Load() == int64(len("before renewal after renewal")+len("new chain"))
	}, 5*time.Second, 5*time.Millisecond, "both flows delivered everything")

	// The peer can still reach an agent of the renewed node.
	in := dialWrite(t, agent(t, b, "payments", "billing-batch"), "ledger-a.payments:8080", "inbound")
	defer func() { _ = in.Close() }()
	pin := nextWhoIs(t, ledgerA)
	assert.Equal(t, "spiffe://acme.internal/zone/payments/agent/billing-batch", pin.Agent)

	// The renewal is audited, and the running log's head verifies with the new key in node.crt.
	var renewed *audit.Record
	for _, r := range auditEntries(t, a) {
		if r.Event == eventRenewed {
			renewed = &r
		}
	}
	require.NotNil(t, renewed, "no renewed audit entry")
	assert.Equal(t, oldCert.Serial().String(), renewed.Fields["old_serial"])
	assert.Equal(t, cur.Serial().String(), renewed.Fields["serial"])
	assert.Equal(t, "2", renewed.Fields["agents_reissued"])
	_, err = audit.VerifyWithKey(filepath.Join(a.dir, DirAudit), cur.PublicKey())
	require.NoError(t, err)

	// The old key is dead: the authority refuses to renew the superseded certificate.
	ca, err := a.Node.dir.AuthorityCert()
	require.NoError(t, err)
	stolenNew, err := identity.GenerateKey()
	require.NoError(t, err)
	_, err = authority.Renew(context.Background(), authority.RenewParams{
		Addr: env.auth.addr, Authority: ca, Current: oldCert, Key: oldKey, NewKey: stolenNew, Now: env.clk.Now})
	require.ErrorIs(t, err, authority.ErrSuperseded)
}

// A node whose authority does not answer keeps retrying with a growing backoff and logs each
// failure: one attempt per timer, never a busy loop. Once its certificate expires it refuses to
// dial with ErrCertificateExpired instead of offering peers a certificate they will refuse.
func TestNodeRenewalRetriesWhileAuthorityUnreachable(t *testing.T) {
	env := newRenewEnv(t)
	dir := env.join(t, "a", "billing-api")
	// An address nothing listens on: take a free port and give it back.
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	require.NoError(t, err)
	dead := pc.LocalAddr().String()
	require.NoError(t, pc.Close())

	timers := &fakeTimers{}
	logs := &logCounter{msgs: map[string]int{}}
	a := env.open(t, dir, Config{Authority: dead, After: timers.After, Logger: slog.New(logs),
		RenewMinRetry: time.Second, RenewMaxRetry: 4 * time.Second, RenewTimeout: 300 * time.Millisecond})
	before := a.Certificate()
	timers.await(t, 1)
	env.clk.Advance(renewLifetime/2 + time.Minute)

	// Each fired timer is one attempt; the waits double up to the cap.
	want := []time.Duration{time.Second, 2 * time.Second, 4 * time.Second, 4 * time.Second}
	for i, w := range want {
		timers.fire(i + 1)
		assert.Equal(t, w, timers.await(t, i+2), "wait after failure %d", i+1)
		assert.Equal(t, i+1, logs.count("renewal failed; retrying"))
	}
	// Nothing more happens until the next timer fires.
	time.Sleep(50 * time.Millisecond)
	assert.Equal(t, len(want)+1, timers.count(), "no attempt without a timer")
	assert.Equal(t, len(want), logs.count("renewal failed; retrying"))
	assert.Equal(t, before.Serial(), a.Certificate().Serial())
	st := a.RenewalStatus()
	assert.True(t, st.Retrying, "status after failed attempts: %+v", st)
	assert.WithinDuration(t, env.clk.Now(), st.LastFailure, time.Second)
	assert.True(t, st.LastSuccess.IsZero())
	assert.Contains(t, st.LastError, dead, "the error names the authority it could not reach")
	assert.WithinDuration(t, env.clk.Now().Add(4*time.Second), st.NextAt, time.Second, "next: the retry, not the certificate's half-life")
	failed := 0
	for _, r := range auditEntries(t, a) {
		if r.Event == eventRenewFailed {
			failed++
			assert.Equal(t, dead, r.Fields["authority"])
		}
	}
	assert.Equal(t, len(want), failed)

	// Past expiry the node stops dialing, with an error naming the cause.
	billing := agent(t, a, "payments", "billing-api")
	env.clk.Advance(renewLifetime)
	_, err = billing.Dial(context.Background(), "tcp", "ledger-b.payments:8080")
	require.ErrorIs(t, err, ErrCertificateExpired)
	assert.Contains(t, err.Error(), dead)
	_, err = a.Tunnel(context.Background(), "b", "payments")
	require.ErrorIs(t, err, ErrCertificateExpired)
}

// The shared renewal code refuses to run without an authority address.
func TestRenewDirNeedsAuthority(t *testing.T) {
	env := newRenewEnv(t)
	d, err := state.Open(env.join(t, "a"))
	require.NoError(t, err)
	_, err = RenewDir(context.Background(), d, "", env.clk.Now)
	require.ErrorIs(t, err, ErrConfig)
}
