package main

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/node/localapi"
)

func TestTrustExplainUsage(t *testing.T) {
	for _, tc := range []struct {
		args []string
		hint string
	}{
		{[]string{"trust", "explain", "--dir", "x"}, "one SUBJECT"},
		{[]string{"trust", "explain", "--dir", "x", "a", "b"}, "one SUBJECT"},
		{[]string{"trust", "explain", "billing.payments"}, "needs --dir"},
	} {
		var stdout, stderr bytes.Buffer
		code := run(context.Background(), tc.args, &stdout, &stderr)
		assert.Equal(t, 2, code, "%v", tc.args)
		assert.Contains(t, stderr.String(), tc.hint)
		assert.Equal(t, 1, strings.Count(stderr.String(), "\n"))
	}
	// No daemon behind the directory: one clear line, exit 1.
	var stdout, stderr bytes.Buffer
	code := run(context.Background(), []string{"trust", "explain", "--dir", t.TempDir(), "billing.payments"}, &stdout, &stderr)
	assert.Equal(t, 1, code)
	assert.Equal(t, 1, strings.Count(stderr.String(), "\n"), stderr.String())
}

func TestPrintTrust(t *testing.T) {
	at := time.Date(2026, 12, 6, 10, 0, 0, 0, time.UTC)
	var b bytes.Buffer
	require.NoError(t, printTrust(&b, localapi.TrustExplanation{
		Subject: "spiffe://acme.internal/zone/payments/agent/billing-api", Score: 40, Action: "deny_flows", MinTrust: 50,
		IsolateBelow: 20, Penalty: 60, DecayPerHour: 10, Full: at.Add(6 * time.Hour),
		Events: []localapi.TrustEvent{{Kind: "policy_denial", Weight: 10, Reason: "flow to ledger:9090/tcp refused (policy)", At: at,
			ScoreBefore: 50, ScoreAfter: 40}},
		Steps: []string{"now: penalty 60 − decay 0 = 60, score = 100 − ceil(60) = 40"},
	}))
	out := b.String()
	for _, want := range []string{"score    40 (min_trust 50, isolate_below 20): deny_flows", "policy_denial −10  score 50 → 40",
		"back to 100 at 2026-12-06T16:00:00Z", "arithmetic:\n  now: penalty 60"} {
		assert.Contains(t, out, want)
	}
}

func TestStatusPrintsTrust(t *testing.T) {
	var b bytes.Buffer
	require.NoError(t, printStatus(&b, localapi.Status{Node: "spiffe://acme.internal/node/a", Trust: []localapi.TrustScore{{
		Subject: "spiffe://acme.internal/zone/payments/agent/billing-api", Score: 40, Action: "deny_flows",
		Reasons: []string{"policy_denial −10 at 2026-12-06T10:00:00Z: flow to ledger:9090/tcp refused (policy)"}}}}))
	assert.Regexp(t, `trust 40 +spiffe://acme.internal/zone/payments/agent/billing-api  deny_flows`, b.String())
	assert.Regexp(t, `because +policy_denial −10 at 2026-12-06T10:00:00Z: flow to ledger:9090/tcp`, b.String())
	b.Reset()
	require.NoError(t, printStatus(&b, localapi.Status{Node: "spiffe://acme.internal/node/a"}))
	assert.Contains(t, b.String(), "every subject at 100")
}

// `ute status` says when renewal runs next and, while it is failing, the last error: "ok" alone
// hid an authority that had been unreachable for hours.
func TestStatusShowsRenewal(t *testing.T) {
	at := func(s string) time.Time {
		v, err := time.Parse(time.RFC3339, s)
		require.NoError(t, err)
		return v
	}
	for _, tc := range []struct {
		name string
		r    localapi.Renewal
		want string
	}{
		{"disabled", localapi.Renewal{State: localapi.RenewalDisabled}, "renewal disabled\n"},
		{"scheduled", localapi.Renewal{State: localapi.RenewalOK, NextAt: at("2026-12-07T10:00:00Z")}, "renewal ok, next 2026-12-07T10:00:00Z\n"},
		{"renewed", localapi.Renewal{State: localapi.RenewalOK, NextAt: at("2026-12-07T10:00:00Z"), LastSuccess: at("2026-12-06T22:00:00Z")},
			"renewal ok, next 2026-12-07T10:00:00Z, last 2026-12-06T22:00:00Z\n"},
		{"retrying", localapi.Renewal{State: localapi.RenewalRetrying, NextAt: at("2026-12-06T22:00:04Z"), LastFailure: at("2026-12-06T22:00:00Z"),
			LastError: "dial authority.example:7443: connection refused"},
			"renewal retrying, next 2026-12-06T22:00:04Z, last attempt failed at 2026-12-06T22:00:00Z: dial authority.example:7443: connection refused\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var b strings.Builder
			require.NoError(t, printStatus(&b, localapi.Status{Node: "spiffe://acme.internal/node/a", Renewal: tc.r}))
			assert.Contains(t, b.String(), tc.want)
		})
	}
}
