package main

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestDemoHoldsEveryExpectation(t *testing.T) {
	var out, errOut bytes.Buffer
	report := filepath.Join(t.TempDir(), "demo.html")
	start := time.Now()
	code := run(context.Background(), []string{"demo", "--html", report}, &out, &errOut)
	require.Equal(t, 0, code, "stdout:\n%s\nstderr:\n%s", out.String(), errOut.String())
	t.Logf("demo ran in %s", time.Since(start).Round(time.Millisecond))
	s := out.String()
	assert.Equal(t, 5, strings.Count(s, "  ok  "), "two allowed flows, the revocation, the drift and the stolen credentials")
	refused := 10
	if _, err := exec.LookPath("bash"); err == nil {
		refused++ // another executable using an agent's proxy
		assert.Contains(t, s, "workload mismatch")
	}
	assert.Equal(t, refused, strings.Count(s, "REFUSED"))
	assert.Equal(t, refused, strings.Count(s, "delivered 0 B"))
	assert.Contains(t, s, "c revoked itself", "TrustFlow isolates the drifted node")
	assert.Contains(t, s, "found its zone peers by itself", "nodes discover each other by gossip")
	assert.Contains(t, s, "the live flow was cut")
	assert.Contains(t, s, "the authority verified them and revoked the identity", "scenario 4: duplicate identity revoked on evidence")
	assert.NotContains(t, s, "FAIL")
	assert.Contains(t, s, "every expectation held")
	assert.Contains(t, s, "HTML report: "+report)

	page, err := os.ReadFile(report)
	require.NoError(t, err)
	html := string(page)
	assert.Equal(t, refused, strings.Count(html, `<span class="tag refused">REFUSED</span>`))
	assert.Contains(t, html, "every expectation held")
	assert.NotContains(t, html, "<script", "self-contained, no script")
	for _, ref := range []string{"src=", "href=", "url(", "@import"} {
		assert.NotContains(t, html, ref, "no external resources")
	}
	assert.Contains(t, html, "<td>cross-zone dial: helpdesk.support → ledger.payments:8080</td><td>refused locally: cross_zone</td>")
}

func TestParseTranscript(t *testing.T) {
	rows := parseTranscript("Attacks (each must be refused)\n" +
		"  REFUSED  replay of an admitted DTL record on its own session           → peer rejected: replay            1.234ms  delivered 0 B\n" +
		"  REFUSED  helpdesk.support → ledger.payments:8080  → refused locally: cross_zone    5µs  delivered 0 B\n" +
		"  ok       node c moved\n           node b held it\n  FAIL     oops\n")
	require.Len(t, rows, 6)
	assert.Equal(t, demoRow{Kind: "section", Text: "Attacks (each must be refused)"}, rows[0])
	assert.Equal(t, demoRow{Kind: "refused", Text: "replay of an admitted DTL record on its own session", Reason: "peer rejected: replay",
		Elapsed: "1.234ms", Bytes: "0 B"}, rows[1])
	assert.Equal(t, demoRow{Kind: "refused", Text: "helpdesk.support → ledger.payments:8080", Reason: "refused locally: cross_zone",
		Elapsed: "5µs", Bytes: "0 B"}, rows[2])
	assert.Equal(t, "ok", rows[3].Kind)
	assert.Equal(t, demoRow{Kind: "detail", Text: "node b held it"}, rows[4])
	assert.Equal(t, "fail", rows[5].Kind)
}
