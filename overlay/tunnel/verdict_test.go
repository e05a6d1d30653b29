package tunnel

import (
	"encoding/binary"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/overlay/dtl"
)

// verdictLog collects what OnVerdict reports.
type verdictLog struct {
	mu   sync.Mutex
	seen []Verdict
}

func (l *verdictLog) hook(v Verdict) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.seen = append(l.seen, v)
}

func (l *verdictLog) list() []Verdict {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]Verdict(nil), l.seen...)
}

func withVerdicts(l *verdictLog) nodeOpt { return func(c *Config) { c.OnVerdict = l.hook } }

// Every inbound flow gets exactly one verdict, including the refusals the endpoint makes itself
// after the Admitter approved the record (flow limit, a flow id the peer may not open) and the
// streams dropped before a record could be read. Before OnVerdict existed, the node audited
// inside the Admitter, so a flow refused by the flow limit was logged as "admit" and a dropped
// stream was not logged at all.
func TestEveryInboundFlowGetsOneVerdict(t *testing.T) {
	pki := newPKI(t, testTD)
	lim := fastLimits()
	lim.MaxFlowsPerAgent = 1
	var log verdictLog
	a := startNode(t, pki, "a", pki.node(t, "a", "payments"), []string{"payments"}, "")
	b := startNode(t, pki, "b", pki.node(t, "b", "payments"), []string{"payments"}, "", withLimits(lim), withVerdicts(&log))
	tun, err := a.ep.Dial(ctxT(t), b.addr, b.id, "payments")
	require.NoError(t, err)

	// 1: admitted.
	c, err := tun.OpenFlow(ctxT(t), rec(t, testRecord{Agent: "billing", Flow: 0}), nil, nil)
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Close() })
	// 2: the Admitter approves, the per-agent limit refuses.
	_, err = tun.OpenFlow(ctxT(t), rec(t, testRecord{Agent: "billing", Flow: 2}), nil, nil)
	require.ErrorIs(t, err, dtl.ErrLimit)
	// 3: the Admitter approves a flow id of the accepting side's parity: the dialer may not use it.
	_, err = tun.OpenFlow(ctxT(t), rec(t, testRecord{Agent: "reports", Flow: 1}), nil, nil)
	require.ErrorIs(t, err, dtl.ErrMalformed)
	// 4: the Admitter refuses.
	_, err = tun.OpenFlow(ctxT(t), rec(t, testRecord{Agent: "audit", Flow: 4, Deny: true}), nil, nil)
	require.ErrorIs(t, err, dtl.ErrPolicy)
	// 5: a record frame over the cap never reaches the Admitter.
	str, err := tun.conn.OpenStreamSync(ctxT(t))
	require.NoError(t, err)
	hdr := []byte{byte(dtl.FrameRecord), 0, 0}
	binary.BigEndian.PutUint16(hdr[1:], dtl.MaxRecordSize+1)
	_, err = str.Write(hdr)
	require.NoError(t, err)

	require.Eventually(t, func() bool { return len(log.list()) == 5 }, 5*time.Second, 5*time.Millisecond)
	time.Sleep(50 * time.Millisecond) // nothing is reported twice
	vs := log.list()
	require.Len(t, vs, 5)
	byAgent := map[string]Verdict{}
	var dropped []Verdict
	for _, v := range vs {
		assert.Equal(t, "payments", v.Zone)
		assert.Equal(t, a.id, v.Peer.NodeID)
		if v.Record == nil {
			dropped = append(dropped, v)
			continue
		}
		if v.Admission.Agent == "" { // the Admitter's refusal carries no admission
			byAgent["denied-by-admitter"] = v
			continue
		}
		key := v.Admission.Agent
		if _, dup := byAgent[key]; dup {
			key += "-2"
		}
		byAgent[key] = v
	}
	require.Len(t, dropped, 1)
	assert.ErrorIs(t, dropped[0].Err, dtl.ErrTooLarge)
	assert.ErrorIs(t, byAgent["denied-by-admitter"].Err, dtl.ErrPolicy)
	assert.ErrorIs(t, byAgent["reports"].Err, dtl.ErrMalformed)
	var admitted, limited int
	for _, k := range []string{"billing", "billing-2"} {
		v := byAgent[k]
		switch {
		case v.Err == nil:
			admitted++
		case errors.Is(v.Err, dtl.ErrLimit):
			limited++
		default:
			t.Errorf("unexpected verdict for %s: %v", k, v.Err)
		}
	}
	assert.Equal(t, 1, admitted)
	assert.Equal(t, 1, limited)
	assert.Len(t, b.streams, 1, "only the admitted flow reached the handler")
}
