package localapi

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity/localsock"
)

// fakeBackend answers from fixed data and records what reached it. It stands in for the daemon:
// this package is the API layer, and what it must prove is that requests reach the Backend
// intact, or not at all.
type fakeBackend struct {
	calls  atomic.Int64
	mu     sync.Mutex
	err    error // returned by every method when set
	block  bool  // wait for ctx to end (timeouts)
	caller localsock.Cred
	seen   []any
}

var (
	fixedTime = time.Date(2026, 12, 6, 3, 0, 0, 0, time.UTC)
	uid1000   = uint32(1000)
	testStat  = Status{
		Node: "spiffe://acme.internal/node/a", Name: "a", TrustDomain: "acme.internal", Region: "eu-west-1",
		Serial: "serial:7", NotAfter: fixedTime.Add(24 * time.Hour), StartedAt: fixedTime, Interface: "netstack",
		Transport: "quic", Listen: "127.0.0.1:7444", Advertise: "192.0.2.1:7444", Metrics: "127.0.0.1:9464",
		Authority: "127.0.0.1:7443", PolicyVersion: 3,
		Zones: []ZoneStatus{{Name: "payments", CIDRs: []string{"100.100.1.0/24"}, Members: 3, Peers: []Peer{
			{Node: "spiffe://acme.internal/node/b", Addr: "127.0.0.1:7445", Tunnel: TunnelUp, Since: fixedTime, Flows: 2},
			{Node: "spiffe://acme.internal/node/c", Addr: "127.0.0.1:7446", Tunnel: TunnelDown},
		}}},
		Agents: []Agent{{Name: "billing", Zone: "payments", ID: "spiffe://acme.internal/zone/payments/agent/billing",
			OverlayIP: "100.100.1.1", Serial: "serial:9", NotAfter: fixedTime.Add(time.Hour), Fingerprint: "ab12", Exe: "/usr/bin/billing", UID: &uid1000}},
		Revocations: []Revocation{{Subject: "spiffe://acme.internal/node/x", Reason: "stolen", Issuer: "spiffe://acme.internal", IssuedAt: fixedTime, ReceivedAt: fixedTime.Add(time.Second)}},
		Renewal:     Renewal{State: RenewalOK, NextAt: fixedTime.Add(12 * time.Hour), LastSuccess: fixedTime},
		Trust:       []TrustScore{{Subject: "spiffe://acme.internal/zone/payments/agent/billing", Score: 100, Reasons: []string{}}},
	}
	testWhoIs = WhoIs{Agent: "spiffe://acme.internal/zone/payments/agent/billing", AgentName: "billing", Zone: "payments",
		Node: "spiffe://acme.internal/node/b", Region: "eu-west-1", Trust: 90, Drift: []string{"region"}, Fingerprint: "ab12",
		SourceIP: "100.100.1.1", Source: "100.100.1.1:43512", Destination: "100.100.1.17:443", FlowID: 12, IssuedAt: fixedTime,
		AgentSerial: "serial:9", NodeSerial: "serial:8"}
)

func (f *fakeBackend) enter(ctx context.Context, arg any) error {
	f.calls.Add(1)
	f.mu.Lock()
	f.seen = append(f.seen, arg)
	f.caller, _ = CallerFrom(ctx)
	err, block := f.err, f.block
	f.mu.Unlock()
	if block {
		<-ctx.Done()
		return fmt.Errorf("backend: %w", ctx.Err())
	}
	return err
}

func (f *fakeBackend) Status(ctx context.Context) (Status, error) {
	if err := f.enter(ctx, nil); err != nil {
		return Status{}, err
	}
	return testStat, nil
}

func (f *fakeBackend) WhoIs(ctx context.Context, addr netip.AddrPort) (WhoIs, error) {
	if err := f.enter(ctx, addr); err != nil {
		return WhoIs{}, err
	}
	if addr != netip.MustParseAddrPort("100.100.1.1:43512") {
		return WhoIs{}, fmt.Errorf("%w: no live flow from %s", ErrNotFound, addr)
	}
	return testWhoIs, nil
}

func (f *fakeBackend) AddAgent(ctx context.Context, spec AgentSpec) (Agent, error) {
	if err := f.enter(ctx, spec); err != nil {
		return Agent{}, err
	}
	return Agent{Name: spec.Name, Zone: spec.Zone, ID: "spiffe://acme.internal/zone/" + spec.Zone + "/agent/" + spec.Name, OverlayIP: "100.100.1.2", Exe: spec.Exe, UID: spec.UID}, nil
}

func (f *fakeBackend) RemoveAgent(ctx context.Context, zone, name string) error {
	return f.enter(ctx, zone+"/"+name)
}

func (f *fakeBackend) Revoke(ctx context.Context, req RevokeRequest) (Revocation, error) {
	if err := f.enter(ctx, req); err != nil {
		return Revocation{}, err
	}
	return Revocation{Subject: req.Subject, Reason: req.Reason, Issuer: "spiffe://acme.internal/node/a", IssuedAt: fixedTime}, nil
}

func (f *fakeBackend) Audit(ctx context.Context, q AuditQuery) (Audit, error) {
	if err := f.enter(ctx, q); err != nil {
		return Audit{}, err
	}
	a := Audit{Entries: 5, Anchored: 4, Unanchored: 1, LastHash: "ff", Signed: true, OK: true, FirstBad: -1}
	for i := range min(q.Recent, 2) {
		a.Recent = append(a.Recent, AuditEntry{Seq: uint64(5 - i), Time: fixedTime, Event: "admit", Fields: map[string]string{"zone": "payments"}})
	}
	return a, nil
}

func (f *fakeBackend) TrustExplain(ctx context.Context, subject string) (TrustExplanation, error) {
	if err := f.enter(ctx, subject); err != nil {
		return TrustExplanation{}, err
	}
	if subject != testStat.Trust[0].Subject {
		return TrustExplanation{}, fmt.Errorf("%w: %q is not a SPIFFE ID", ErrBadRequest, subject)
	}
	return TrustExplanation{Subject: subject, Score: 90, Action: "allow", MinTrust: 50, IsolateBelow: 20, Penalty: 10,
		DecayPerHour: 10, Now: fixedTime, Full: fixedTime.Add(time.Hour), Events: []TrustEvent{{Kind: "policy_denial",
			Weight: 10, Reason: "no rule", At: fixedTime, PenaltyAfter: 10, ScoreBefore: 100, ScoreAfter: 90}},
		Steps: []string{"one", "two"}}, nil
}

// sockDir is a short directory for sockets (sun_path is limited to 108 bytes, which a long test
// name inside t.TempDir can exceed).
func sockDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "ute-la-")
	require.NoError(t, err)
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	return dir
}

func start(t *testing.T, b Backend, opts Options) (*Server, string) {
	t.Helper()
	path := filepath.Join(sockDir(t), FileSocket)
	s, err := Start(path, b, opts)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, s.Close()) })
	return s, path
}

func dial(t *testing.T, path string) *Client {
	t.Helper()
	c, err := Dial(context.Background(), path)
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func oneLine(t *testing.T, err error) {
	t.Helper()
	require.False(t, strings.Contains(err.Error(), "\n"), "one line: %q", err.Error())
}
