package daemon

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/node"
	"github.com/ute-project/ute/overlay/audit"
	"github.com/ute-project/ute/overlay/dtl"
)

// An attacker who can write the node's audit log but does not hold the node key appends a line.
// The restarted daemon moves it aside (kept), and says so in a metric as well as in the log.
func TestForgedAuditAppendShowsInMetric(t *testing.T) {
	ta := startAuthority(t)
	dir, pc := joinNode(t, ta, spec{name: "a", zones: []string{"payments"}})
	d := startDaemon(t, "a", dir, pc, true)
	assert.Equal(t, 0.0, gaugeValue(t, d.Daemon, "ute_audit_set_aside", "files"), "a clean log sets nothing aside")
	require.NoError(t, d.Close())

	logPath := filepath.Join(dir, node.DirAudit, audit.LogFile)
	f, err := os.OpenFile(logPath, os.O_APPEND|os.O_WRONLY, 0)
	require.NoError(t, err)
	_, err = f.WriteString(`{"seq":999,"event":"flow-admitted","fields":{"agent":"forged"}}` + "\n")
	require.NoError(t, err)
	require.NoError(t, f.Close())

	d2 := startDaemon(t, "a", dir, pc, true)
	parts, err := audit.ListAside(filepath.Join(dir, node.DirAudit))
	require.NoError(t, err)
	require.Len(t, parts, 1, "the forged line is set aside, not signed over")
	assert.Equal(t, 1.0, gaugeValue(t, d2.Daemon, "ute_audit_set_aside", "files"))
	assert.Equal(t, 1.0, gaugeValue(t, d2.Daemon, "ute_audit_set_aside", "entries"))
}

// gaugeValue reads the gauge name{unit=unit} from the daemon's registry.
func gaugeValue(t *testing.T, d *Daemon, name, unit string) float64 {
	t.Helper()
	fams, err := d.Metrics().Registry().Gather()
	require.NoError(t, err)
	for _, f := range fams {
		if f.GetName() != name {
			continue
		}
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "unit" && l.GetValue() == unit {
					return m.GetGauge().GetValue()
				}
			}
		}
	}
	t.Fatalf("no %s{unit=%q}", name, unit)
	return 0
}

// An agent probing what it may not reach shows on its own node's metrics too, not only on the
// receiver's: a refusal by the peer's admission (policy) and one by this node (cross-zone).
func TestSenderSideRefusalsCounted(t *testing.T) {
	ta := startAuthority(t)
	a, _ := paymentsPair(t, ta)
	require.ErrorIs(t, dialLedger(t, a, "9090"), dtl.ErrPolicy)
	billing, err := a.Node().Agent("payments", "billing-api")
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err = billing.Dial(ctx, "tcp", "tickets.support:8080")
	require.ErrorIs(t, err, node.ErrCrossZone)

	assert.Equal(t, 1.0, counterValue(t, a.Daemon, "ute_flows_refused_total", map[string]string{"stage": "admission", "reason": "policy"}))
	assert.Equal(t, 1.0, counterValue(t, a.Daemon, "ute_flows_refused_total", map[string]string{"stage": "resolve", "reason": "cross_zone"}))
}

// counterValue reads the counter name with exactly labels from the daemon's registry.
func counterValue(t *testing.T, d *Daemon, name string, labels map[string]string) float64 {
	t.Helper()
	fams, err := d.Metrics().Registry().Gather()
	require.NoError(t, err)
	for _, f := range fams {
		if f.GetName() != name {
			continue
		}
	next:
		for _, m := range f.GetMetric() {
			if len(m.GetLabel()) != len(labels) {
				continue
			}
			for _, l := range m.GetLabel() {
				if labels[l.GetName()] != l.GetValue() {
					continue next
				}
			}
			return m.GetCounter().GetValue()
		}
	}
	t.Fatalf("no %s%v", name, labels)
	return 0
}
