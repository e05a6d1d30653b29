package node

import (
	"bytes"
	"context"
	"crypto/rand"
	"net/netip"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/node/state"
	"github.com/ute-project/ute/overlay/dtl"
	"github.com/ute-project/ute/overlay/tunnel"
)

// attackEnv is the three-node topology with ledger (b) and billing-api (a) listening on 8080, each
// behind a sink that counts what reaches the agent.
type attackEnv struct {
	ns              map[string]*testNode
	billing, ledger *Agent
	ledgerSink      *sink
	billingSink     *sink
	ab              *tunnel.Tunnel // a → b, payments
}

func newAttackEnv(t *testing.T, limitsA tunnel.Limits) *attackEnv {
	t.Helper()
	ns := cluster(t,
		nodeSpec{name: "a", zones: []string{"payments"}, limits: limitsA, agents: []state.AgentSpec{{Name: "billing-api", Zone: "payments"}}},
		nodeSpec{name: "b", zones: []string{"payments", "support"}, agents: []state.AgentSpec{
			{Name: "ledger", Zone: "payments"}, {Name: "tickets", Zone: "support"}}},
		nodeSpec{name: "c", zones: []string{"support"}, agents: []state.AgentSpec{{Name: "helpdesk", Zone: "support"}}},
	)
	e := &attackEnv{ns: ns, billing: agent(t, ns["a"], "payments", "billing-api"), ledger: agent(t, ns["b"], "payments", "ledger")}
	e.ledgerSink = serveSink(t, e.ledger, "8080")
	e.billingSink = serveSink(t, e.billing, "8080")
	var err error
	e.ab, err = ns["a"].tunnelTo(context.Background(), ns["b"].ID().String(), "payments")
	require.NoError(t, err)
	// The tunnel-up directory exchange is a flow of its own; let it finish so that it cannot race
	// with what a case does to the session (revocations, clock jumps). Both sides: b learns a's
	// agents when a's half arrives, a learns b's only when b's answer has been processed.
	waitDirectory(t, ns["b"], "payments", "billing-api")
	waitDirectory(t, ns["a"], "payments", "ledger")
	return e
}

var toLedger = dtl.Destination{Agent: "ledger", Port: 8080, Proto: dtl.ProtoTCP}

// open sends record on tunnel t and, if the flow were admitted, 1 KiB of payload.
func open(t *testing.T, tun *tunnel.Tunnel, record []byte) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	fc, err := tun.OpenFlow(ctx, record, nil, nil)
	if err != nil {
		return err
	}
	_, _ = fc.Write(make([]byte, 1024))
	_ = fc.Close()
	return nil
}

// admitOnce has billing send ledger one legitimate flow on e.ab, waits until ledger received it,
// and returns its record for a replay; the sink's counter is reset so that only the replay counts.
func admitOnce(t *testing.T, e *attackEnv) []byte {
	t.Helper()
	rec, err := e.billing.Record(e.ab, toLedger)
	require.NoError(t, err)
	fc, err := e.ab.OpenFlow(context.Background(), rec, nil, nil)
	require.NoError(t, err, "the original flow is admitted")
	require.NoError(t, fc.Close())
	require.Eventually(t, func() bool { return e.ledgerSink.conns.Load() == 1 }, 5*time.Second, 5*time.Millisecond)
	e.ledgerSink.conns.Store(0)
	return rec
}

func TestAttacksAreRefusedBeforeDelivery(t *testing.T) {
	for _, tc := range []struct {
		name   string
		limits tunnel.Limits // node a's, the attacker's side
		attack func(t *testing.T, e *attackEnv) error
		want   error  // sentinel the attacker sees
		reason string // the reason in the receiver's audit log ("" when dropped before admission)
		sink   func(e *attackEnv) *sink
	}{
		{
			name: "cross-zone dial through the SDK",
			attack: func(t *testing.T, e *attackEnv) error {
				_, err := agent(t, e.ns["c"], "support", "helpdesk").Dial(context.Background(), "tcp", "ledger.payments:8080")
				return err
			},
			want: ErrCrossZone,
		},
		{
			name: "cross-zone record on a tunnel of a zone both nodes share",
			attack: func(t *testing.T, e *attackEnv) error {
				// b holds payments and support; its support agent tries billing-api over payments.
				tickets := agent(t, e.ns["b"], "support", "tickets")
				ba, err := e.ns["b"].tunnelTo(context.Background(), e.ns["a"].ID().String(), "payments")
				require.NoError(t, err)
				rec, err := tickets.Record(ba, dtl.Destination{Agent: "billing-api", Port: 8080, Proto: dtl.ProtoTCP})
				require.NoError(t, err)
				return open(t, ba, rec)
			},
			want: dtl.ErrZone, reason: "zone", sink: func(e *attackEnv) *sink { return e.billingSink },
		},
		{
			name: "record captured on one session replayed on another",
			attack: func(t *testing.T, e *attackEnv) error {
				rec := admitOnce(t, e)
				require.NoError(t, e.ab.Close())
				<-e.ab.Done()
				fresh, err := e.ns["a"].tunnelTo(context.Background(), e.ns["b"].ID().String(), "payments")
				require.NoError(t, err)
				require.NotSame(t, e.ab, fresh)
				return open(t, fresh, rec)
			},
			want: dtl.ErrSignature, reason: "signature",
		},
		{
			name: "record replayed on the same session",
			attack: func(t *testing.T, e *attackEnv) error {
				rec := admitOnce(t, e)
				return open(t, e.ab, rec)
			},
			want: dtl.ErrReplay, reason: "replay",
		},
		{
			name: "record replayed on the same session after the receiver forgot its replay window",
			attack: func(t *testing.T, e *attackEnv) error {
				rec := admitOnce(t, e)
				// Past twice the freshness window b drops the idle session's state, replay window
				// included; the record must still be refused, because by then it is stale.
				e.ns["b"].clock.Advance(2*dtl.DefaultSkew + time.Second)
				return open(t, e.ab, rec)
			},
			want: dtl.ErrStale, reason: "stale",
		},
		{
			name: "valid signature from an agent of another node",
			attack: func(t *testing.T, e *attackEnv) error {
				// a presents a record that b's own agent signed for a's session.
				peerAgent := agent(t, e.ns["b"], "payments", "ledger")
				rec, err := peerAgent.Record(e.ab, toLedger)
				require.NoError(t, err)
				return open(t, e.ab, rec)
			},
			want: dtl.ErrPeer, reason: "peer",
		},
		{
			name: "tampered claim",
			attack: func(t *testing.T, e *attackEnv) error {
				rec, err := e.billing.Record(e.ab, toLedger)
				require.NoError(t, err)
				require.Equal(t, 1, bytes.Count(rec, []byte("ledger")))
				return open(t, e.ab, bytes.Replace(rec, []byte("ledger"), []byte("ledgar"), 1))
			},
			want: dtl.ErrSignature, reason: "signature",
		},
		{
			name: "expired agent certificate",
			attack: func(t *testing.T, e *attackEnv) error {
				e.ns["b"].clock.Advance(2 * time.Hour) // agent certificates live 1 h, nodes 24 h
				rec, err := e.billing.Record(e.ab, toLedger)
				require.NoError(t, err)
				return open(t, e.ab, rec)
			},
			want: dtl.ErrChain, reason: "chain",
		},
		{
			name: "revoked agent",
			attack: func(t *testing.T, e *attackEnv) error {
				require.NoError(t, e.ns["b"].Revoke(context.Background(), e.billing.ID().String(), "compromised"))
				rec, err := e.billing.Record(e.ab, toLedger)
				require.NoError(t, err)
				return open(t, e.ab, rec)
			},
			want: dtl.ErrRevoked, reason: "revoked",
		},
		{
			name: "revoked agent (by certificate serial)",
			attack: func(t *testing.T, e *attackEnv) error {
				require.NoError(t, e.ns["b"].Revoke(context.Background(), serialKey(e.billing.cert), "compromised"))
				rec, err := e.billing.Record(e.ab, toLedger)
				require.NoError(t, err)
				return open(t, e.ab, rec)
			},
			want: dtl.ErrRevoked, reason: "revoked",
		},
		{
			name: "revoked node (by certificate serial): tunnel closed, new handshake refused",
			attack: func(t *testing.T, e *attackEnv) error {
				require.NoError(t, e.ns["b"].Revoke(context.Background(), serialKey(e.ns["a"].Certificate()), "compromised"))
				select {
				case <-e.ab.Done():
				case <-time.After(2 * time.Second):
					t.Fatal("tunnel with the revoked node still open")
				}
				rec, err := e.billing.Record(e.ab, toLedger)
				require.NoError(t, err)
				require.ErrorIs(t, open(t, e.ab, rec), tunnel.ErrClosed)
				_, err = e.billing.Dial(context.Background(), "tcp", "ledger.payments:8080")
				return err
			},
			want: tunnel.ErrRefusedByPeer,
		},
		{
			name: "revoked node (by SPIFFE ID): tunnel closed, new handshake refused",
			attack: func(t *testing.T, e *attackEnv) error {
				c, err := e.billing.Dial(context.Background(), "tcp", "ledger.payments:8080")
				require.NoError(t, err, "before the revocation the flow is admitted")
				require.NoError(t, c.Close())
				require.Eventually(t, func() bool { return e.ledgerSink.conns.Load() == 1 }, 5*time.Second, 5*time.Millisecond)
				e.ledgerSink.conns.Store(0)
				require.NoError(t, e.ns["b"].Revoke(context.Background(), e.ns["a"].ID().String(), "compromised"))
				require.Eventually(t, func() bool { return !e.ab.Alive() }, 5*time.Second, 5*time.Millisecond)
				_, err = e.billing.Dial(context.Background(), "tcp", "ledger.payments:8080")
				return err
			},
			want: tunnel.ErrRefusedByPeer,
		},
		{
			name:   "garbage record",
			attack: func(t *testing.T, e *attackEnv) error { return open(t, e.ab, bytes.Repeat([]byte{0xa5}, 300)) },
			want:   dtl.ErrMalformed, reason: "malformed",
		},
		{
			name: "truncated record",
			attack: func(t *testing.T, e *attackEnv) error {
				rec, err := e.billing.Record(e.ab, toLedger)
				require.NoError(t, err)
				return open(t, e.ab, rec[:len(rec)/2])
			},
			want: dtl.ErrMalformed, reason: "malformed",
		},
		{
			name:   "oversized record",
			limits: tunnel.Limits{MaxRecordSize: 60000},
			attack: func(t *testing.T, e *attackEnv) error {
				big := make([]byte, dtl.MaxRecordSize+1)
				_, _ = rand.Read(big)
				err := open(t, e.ab, big)
				require.Eventually(t, func() bool { return e.ns["b"].Stats().FlowsDropped == 1 }, 5*time.Second, 5*time.Millisecond)
				return err
			},
			// Dropped by the endpoint before any admission, and still audited as a denial.
			reason: "too-large",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newAttackEnv(t, tc.limits)
			err := tc.attack(t, e)
			require.Error(t, err, "UTE must refuse")
			t.Logf("refused: %v", err)
			if tc.want != nil {
				require.ErrorIs(t, err, tc.want)
			}
			s := e.ledgerSink
			if tc.sink != nil {
				s = tc.sink(e)
			}
			// Give a wrongly admitted flow time to arrive before asserting that none did.
			time.Sleep(50 * time.Millisecond)
			assert.Zero(t, s.conns.Load(), "no flow reached the agent")
			assert.Zero(t, s.bytes.Load(), "no payload byte reached the agent")
			if tc.reason != "" {
				receiver := e.ns["b"]
				if tc.sink != nil {
					receiver = e.ns["a"]
				}
				assert.Equal(t, []string{tc.reason}, denials(t, receiver))
			}
		})
	}
}

// A node outside the zone signs an agent certificate for the zone: it neither enters any
// directory nor passes admission.
func TestForgedAgentCertificateFromNodeOutsideZone(t *testing.T) {
	e := newAttackEnv(t, tunnel.Limits{})
	c, b := e.ns["c"], e.ns["b"]
	iss, issKey := nodeIssuer(t, c)
	forged, key := forgeAgent(t, iss, issKey, "payments", "mallory", netip.MustParseAddr("100.100.1.77"))

	cb, err := c.tunnelTo(context.Background(), b.ID().String(), "support")
	require.NoError(t, err)
	// b installs entries under its tunnel peer's certificate: c's, the forger's (the tunnel c
	// dialed has b as its peer, which would refuse the entry for the wrong reason).
	bc, err := b.tunnelTo(context.Background(), c.ID().String(), "support")
	require.NoError(t, err)
	require.Equal(t, c.ID().String(), bc.Peer().NodeID)
	accepted, refused := b.installDirectory(context.Background(), bc.Peer(), "support", [][]byte{iss.Raw(), forged.Raw()})
	assert.Zero(t, accepted)
	assert.Equal(t, 1, refused)
	_, ok := b.lookup("payments", "mallory", netip.Addr{}, 1)
	assert.False(t, ok)
	var dirErr string
	for _, r := range auditEntries(t, b) {
		if r.Event == eventDirectory && r.Fields["peer"] == c.ID().String() && r.Fields["refused"] == "1" {
			dirErr = r.Fields["error"]
		}
	}
	assert.Contains(t, dirErr, "zone", "refused for its zone, not for a signature mismatch")
	assert.NotContains(t, dirErr, "signature")

	claims := &dtl.Claims{
		Zone: "payments", Agent: forged.ID.String(), Chain: &dtl.CertChain{Node: iss.Raw(), Agent: forged.Raw()},
		Node: c.ID().String(), Fingerprint: forged.Claims.Fingerprint, Region: "eu-west-1", Trust: 100,
		Destination: toLedger, FlowID: cb.NewFlowID(), Seq: 1, IssuedAt: time.Now(),
	}
	rec, err := dtl.Sign(claims, key, cb.Exporter())
	require.NoError(t, err)
	err = open(t, cb, rec)
	require.ErrorIs(t, err, dtl.ErrChain)
	assert.Contains(t, err.Error(), "zone")
	assert.Zero(t, e.ledgerSink.conns.Load())
	assert.Equal(t, []string{"chain"}, denials(t, b))
}
