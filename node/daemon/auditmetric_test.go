package daemon

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/node"
	"github.com/ute-project/ute/overlay/audit"
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
