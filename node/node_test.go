package node

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/overlay/audit"
	"github.com/ute-project/ute/overlay/dtl"
)

// echoServer answers each conn with the SHA-256 of everything it read, then 1 MiB of its own data
// followed by that data's SHA-256: data both ways, checksummed.
func echoServer(t *testing.T, a *Agent, port string) <-chan *Provenance {
	t.Helper()
	l, err := a.Listen("tcp", ":"+port)
	require.NoError(t, err)
	who := make(chan *Provenance, 4)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			p, err := WhoIs(c)
			if err == nil {
				who <- p
			}
			go func() {
				defer func() { _ = c.Close() }()
				var hdr [8]byte
				if _, err := io.ReadFull(c, hdr[:]); err != nil {
					return
				}
				h := sha256.New()
				if _, err := io.CopyN(h, c, int64(binary.BigEndian.Uint64(hdr[:]))); err != nil {
					return
				}
				_, _ = c.Write(h.Sum(nil))
				buf := make([]byte, 1<<20)
				_, _ = rand.Read(buf)
				sum := sha256.Sum256(buf)
				_, _ = c.Write(buf)
				_, _ = c.Write(sum[:])
			}()
		}
	}()
	t.Cleanup(func() { _ = l.Close(); <-done })
	return who
}

func exchangeMiB(t *testing.T, c net.Conn) {
	t.Helper()
	buf := make([]byte, 1<<20)
	_, err := rand.Read(buf)
	require.NoError(t, err)
	want := sha256.Sum256(buf)
	// Length-prefixed rather than half-closed: same-node flows are net.Pipe conns, which have no
	// CloseWrite.
	go func() {
		_, _ = c.Write(binary.BigEndian.AppendUint64(nil, uint64(len(buf))))
		_, _ = c.Write(buf)
	}()
	got := make([]byte, 32+(1<<20)+32)
	_, err = io.ReadFull(c, got)
	require.NoError(t, err)
	assert.Equal(t, want[:], got[:32], "server saw exactly what we sent")
	back := sha256.Sum256(got[32 : 32+(1<<20)])
	assert.Equal(t, back[:], got[32+(1<<20):], "we received exactly what the server sent")
}

func TestTwoZonesThreeNodesDataBothWaysAndWhoIs(t *testing.T) {
	ns := threeNodes(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	billing := agent(t, ns["a"], "payments", "billing-api")
	ledger := agent(t, ns["b"], "payments", "ledger")
	helpdesk := agent(t, ns["c"], "support", "helpdesk")
	tickets := agent(t, ns["b"], "support", "tickets")

	ledgerWho := echoServer(t, ledger, "8080")
	ticketsWho := echoServer(t, tickets, "8080")

	for _, tc := range []struct {
		name     string
		from     *Agent
		addr     string
		who      <-chan *Provenance
		fromNode *testNode
	}{
		{"payments a to b by name", billing, "ledger.payments:8080", ledgerWho, ns["a"]},
		{"support c to b by overlay IP", helpdesk, net.JoinHostPort(tickets.IP().String(), "8080"), ticketsWho, ns["c"]},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := tc.from.Dial(ctx, "tcp", tc.addr)
			require.NoError(t, err)
			defer func() { _ = c.Close() }()
			exchangeMiB(t, c)
			p := <-tc.who
			assert.Equal(t, tc.from.ID().String(), p.Agent)
			assert.Equal(t, tc.fromNode.ID().String(), p.Node)
			assert.Equal(t, tc.from.Zone(), p.Zone)
			assert.Equal(t, tc.from.cert.Claims.Fingerprint, p.Fingerprint)
			assert.Equal(t, "eu-west-1", p.Region)
			assert.Equal(t, uint8(DefaultTrust), p.Trust)
			assert.Equal(t, dtl.DriftFlags(0), p.Drift)
			assert.Equal(t, tc.from.IP(), p.SourceIP)
			assert.False(t, p.Local)
		})
	}
}

func TestHTTPWhoIsRequest(t *testing.T) {
	ns := threeNodes(t)
	ledger := agent(t, ns["b"], "payments", "ledger")
	billing := agent(t, ns["a"], "payments", "billing-api")
	l, err := ledger.Listen("tcp", ":8080")
	require.NoError(t, err)
	srv := &http.Server{ConnContext: ConnContext, ReadHeaderTimeout: 5 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p, err := WhoIsRequest(r)
		if err != nil {
			http.Error(w, err.Error(), http.StatusForbidden)
			return
		}
		_, _ = fmt.Fprintf(w, "%s via %s", p.Agent, p.Node)
	})}
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(func() { _ = srv.Close() })

	hc := billing.HTTPClient()
	defer hc.CloseIdleConnections()
	resp, err := hc.Get("http://ledger.payments:8080/")
	require.NoError(t, err)
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	require.NoError(t, resp.Body.Close())
	require.Equal(t, http.StatusOK, resp.StatusCode, string(body))
	assert.Equal(t, billing.ID().String()+" via "+ns["a"].ID().String(), string(body))
}

func TestLocalDeliveryIsAdmitted(t *testing.T) {
	ns := threeNodes(t)
	b := ns["b"]
	ledger := agent(t, b, "payments", "ledger")
	batch := agent(t, b, "payments", "billing-batch")
	who := echoServer(t, ledger, "8080")

	c, err := batch.Dial(context.Background(), "tcp", "ledger.payments:8080")
	require.NoError(t, err)
	exchangeMiB(t, c)
	require.NoError(t, c.Close())
	p := <-who
	assert.True(t, p.Local)
	assert.Equal(t, batch.ID().String(), p.Agent)
	assert.Equal(t, b.ID().String(), p.Node)

	// The same policy applies locally: ledger → billing-batch has no rule.
	s := serveSink(t, batch, "9000")
	_, err = ledger.Dial(context.Background(), "tcp", "billing-batch.payments:9000")
	var re *RefusedError
	require.ErrorAs(t, err, &re)
	assert.Equal(t, "policy", re.Reason)
	assert.ErrorIs(t, err, dtl.ErrPolicy)
	assert.Zero(t, s.conns.Load())

	// Revocation too.
	require.NoError(t, b.Revoke(context.Background(), batch.ID().String(), "test"))
	_, err = batch.Dial(context.Background(), "tcp", "ledger.payments:8080")
	require.ErrorIs(t, err, dtl.ErrRevoked)
	assert.Equal(t, []string{"policy", "revoked"}, denials(t, b))
}

func TestDirectoryAndAudit(t *testing.T) {
	ns := threeNodes(t)
	billing := agent(t, ns["a"], "payments", "billing-api")
	ledger := agent(t, ns["b"], "payments", "ledger")
	_ = serveSink(t, ledger, "8080")
	c, err := billing.Dial(context.Background(), "tcp", "ledger.payments:8080")
	require.NoError(t, err)
	require.NoError(t, c.Close())

	// a learned b's payments agents only, b learned a's, c learned nothing of payments.
	d, ok := ns["a"].lookup("payments", "ledger", ledger.IP(), 1)
	require.True(t, ok)
	assert.Equal(t, ns["b"].ID().String(), d.node)
	_, ok = ns["a"].lookup("payments", "tickets", ledger.IP(), 1)
	assert.False(t, ok, "a support agent must never enter the payments view")
	_, ok = ns["b"].lookup("payments", "billing-api", billing.IP(), 1)
	assert.True(t, ok)

	var events []string
	for _, r := range auditEntries(t, ns["b"]) {
		events = append(events, r.Event)
	}
	assert.Contains(t, events, eventDirectory)
	assert.Contains(t, events, audit.EventAdmit)
}

func TestNameErrors(t *testing.T) {
	ns := threeNodes(t)
	billing := agent(t, ns["a"], "payments", "billing-api")
	for _, tc := range []struct {
		network, addr string
		want          error
		reason        string
	}{
		{"tcp", "nobody.payments:8080", ErrUnknownName, "unknown-name"},
		{"tcp", "ledger.payments:0", ErrUnsupported, "unsupported"},
		{"unix", "ledger.payments:53", ErrUnsupported, "unsupported"},
		{"tcp", "not a host:1", ErrUnsupported, "unsupported"},
		{"tcp", "tickets.support:8080", ErrCrossZone, "cross_zone"},
		{"tcp", "100.100.2.1:8080", ErrCrossZone, "cross_zone"},
		{"tcp", "10.0.0.1:8080", ErrCrossZone, "cross_zone"},
	} {
		t.Run(tc.addr, func(t *testing.T) {
			_, err := billing.Dial(context.Background(), tc.network, tc.addr)
			require.ErrorIs(t, err, tc.want)
			var re *RefusedError
			require.ErrorAs(t, err, &re)
			assert.Equal(t, tc.reason, re.Reason)
		})
	}
	_, err := billing.Listen("tcp", ":8080")
	require.NoError(t, err)
	_, err = billing.Listen("tcp", ":8080")
	require.ErrorIs(t, err, ErrAddrInUse)
	_, err = ns["a"].Agent("payments", "ghost")
	require.Error(t, err)
}

func TestRevokeSubjects(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want string
		err  bool
	}{
		{"spiffe://acme.internal/node/a", "spiffe://acme.internal/node/a", false},
		{"spiffe://acme.internal/zone/payments/agent/billing", "spiffe://acme.internal/zone/payments/agent/billing", false},
		{"serial:42", "serial:42", false},
		{"serial:042", "", true},
		{"serial:", "", true},
		{"serial:-1", "", true},
		{"spiffe://acme.internal", "", true},
		{"billing", "", true},
	} {
		got, err := canonicalSubject(tc.in)
		if tc.err {
			require.ErrorIs(t, err, ErrBadRevocation, tc.in)
			continue
		}
		require.NoError(t, err)
		assert.Equal(t, tc.want, got)
	}
}

func TestCloseStopsEverything(t *testing.T) {
	ns := cluster(t, nodeSpec{name: "solo", zones: []string{"payments"}, agents: nil})
	n := ns["solo"]
	require.NoError(t, n.Close())
	require.NoError(t, n.Close())
	_, err := n.Agent("payments", "x")
	require.True(t, errors.Is(err, ErrClosed))
}
