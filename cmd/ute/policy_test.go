package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const policyExample = "../../docs/examples/policy.yaml"

func runPolicyCLI(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	code := run(context.Background(), args, &stdout, &stderr)
	return code, stdout.String(), stderr.String()
}

func TestPolicyCheck(t *testing.T) {
	code, out, errOut := runPolicyCLI(t, "policy", "check", policyExample)
	require.Equal(t, 0, code, errOut)
	assert.Empty(t, errOut)
	assert.Contains(t, out, "valid, 2 zone(s), 5 rule(s)")
	assert.Contains(t, out, "zone payments")
	assert.Contains(t, out, "rule 1 (line 11): billing-* -> ledger on tcp/443")
	assert.Contains(t, out, "{labels: {team: risk}} -> ledger on tcp/443, tcp/8000-8100")

	code, out, errOut = runPolicyCLI(t, "policy", "check", "--json", policyExample)
	require.Equal(t, 0, code, errOut)
	var v policyView
	require.NoError(t, json.Unmarshal([]byte(out), &v))
	require.Len(t, v.Zones, 2)
	assert.True(t, v.Valid)
	assert.Equal(t, "payments", v.Zones[0].Name)
	assert.Equal(t, []string{"100.100.1.0/24"}, v.Zones[0].CIDRs)
	assert.Equal(t, []string{"/28"}, v.Zones[0].NodeSlices, "a /24 zone gives each node a /28 by default")
	assert.Equal(t, []string{"eu-west-1", "us-east-1"}, v.Zones[1].Regions)
	assert.Equal(t, "1h0m0s", v.Zones[0].MaxCertLifetime)
	assert.Equal(t, []string{"tcp/80", "icmp"}, v.Zones[1].Rules[1].Ports)
}

func TestPolicyCheckInvalid(t *testing.T) {
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad.yaml")
	src := "zones:\n  - name: payments\n    cidr: 100.100.1.0/24\n    regions: [eu-west-1]\n    min_trust: 50\n    isolate_below: 20\n" +
		"    rules:\n      - from: billing\n        to: other-zone/ledger\n        ports: [tcp/443]\n"
	require.NoError(t, os.WriteFile(bad, []byte(src), 0o600))

	code, out, errOut := runPolicyCLI(t, "policy", "check", bad)
	assert.Equal(t, 1, code)
	assert.Empty(t, out)
	assert.Equal(t, 1, strings.Count(errOut, "\n"), "one line on stderr: %q", errOut)
	assert.Contains(t, errOut, bad+":9:")
	assert.Contains(t, errOut, "zones[0].rules[0].to")
	assert.Contains(t, errOut, "other-zone")

	code, _, errOut = runPolicyCLI(t, "policy", "check", filepath.Join(dir, "absent.yaml"))
	assert.Equal(t, 1, code)
	assert.Contains(t, errOut, "absent.yaml")
}

func TestPolicyUsage(t *testing.T) {
	tests := []struct {
		name string
		args []string
		text string
	}{
		{"check without file", []string{"policy", "check"}, "accepts 1 arg"},
		{"check unknown flag", []string{"policy", "check", "--colour", policyExample}, "unknown flag"},
		{"explain without from", []string{"policy", "explain", policyExample, "--to", "payments/ledger", "--port", "443"}, "--from and --to are required"},
		{"explain bad proto", []string{"policy", "explain", policyExample, "--from", "payments/a", "--to", "payments/b", "--port", "1", "--proto", "sctp"}, "--proto"},
		{"explain no port", []string{"policy", "explain", policyExample, "--from", "payments/a", "--to", "payments/b"}, "--port must be 1..65535"},
		{"explain port too big", []string{"policy", "explain", policyExample, "--from", "payments/a", "--to", "payments/b", "--port", "70000"}, "--port must be 1..65535"},
		{"explain bare name", []string{"policy", "explain", policyExample, "--from", "a", "--to", "payments/b", "--port", "1"}, "write ZONE/NAME"},
		{"explain bad spiffe", []string{"policy", "explain", policyExample, "--from", "spiffe://td/node/n1", "--to", "payments/b", "--port", "1"}, "spiffe://TD/zone/ZONE/agent/NAME"},
		{"explain bad label", []string{"policy", "explain", policyExample, "--from", "payments/a", "--from-label", "team", "--to", "payments/b", "--port", "1"}, "KEY=VALUE"},
		{"explain bad trust", []string{"policy", "explain", policyExample, "--from", "payments/a", "--to", "payments/b", "--port", "1", "--trust", "300"}, "--trust"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, out, errOut := runPolicyCLI(t, tt.args...)
			assert.Equal(t, 2, code, errOut)
			assert.Empty(t, out)
			assert.Contains(t, errOut, tt.text)
			assert.Equal(t, 1, strings.Count(errOut, "\n"), "one line: %q", errOut)
		})
	}
}

func TestPolicyExplain(t *testing.T) {
	tests := []struct {
		name   string
		args   []string
		allow  bool
		reason string
		line   int
	}{
		{"glob rule", []string{"--from", "payments/billing-1", "--to", "payments/ledger", "--port", "443"}, true, "allowed", 11},
		{"spiffe ids", []string{"--from", "spiffe://acme.internal/zone/payments/agent/billing-1", "--to", "spiffe://acme.internal/zone/payments/agent/ledger", "--port", "443"}, true, "allowed", 11},
		{"label rule", []string{"--from", "payments/scorer", "--from-label", "team=risk", "--to", "payments/ledger", "--port", "8080"}, true, "allowed", 14},
		{"icmp", []string{"--from", "support/tickets", "--to", "support/kb", "--proto", "icmp"}, true, "allowed", 30},
		{"wrong port", []string{"--from", "payments/billing-1", "--to", "payments/ledger", "--port", "80"}, false, "port_not_allowed", 0},
		{"no rule", []string{"--from", "payments/ledger", "--to", "payments/billing-1", "--port", "443"}, false, "no_rule", 0},
		{"cross zone", []string{"--from", "payments/billing-1", "--to", "support/kb", "--port", "80"}, false, "cross_zone", 0},
		{"unknown zone", []string{"--from", "ghost/a", "--to", "ghost/b", "--port", "80"}, false, "unknown_zone", 0},
		{"region outside", []string{"--from", "payments/billing-1", "--to", "payments/ledger", "--port", "443", "--region", "us-east-1"}, false, "region_outside", 0},
		{"low trust", []string{"--from", "payments/billing-1", "--to", "payments/ledger", "--port", "443", "--trust", "30"}, false, "trust_below_min", 0},
		{"absent trust", []string{"--from", "payments/billing-1", "--to", "payments/ledger", "--port", "443", "--trust", "-1"}, false, "trust_unknown", 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			args := append([]string{"policy", "explain", policyExample, "--json"}, tt.args...)
			code, out, errOut := runPolicyCLI(t, args...)
			require.Equal(t, 0, code, errOut)
			var v explainView
			require.NoError(t, json.Unmarshal([]byte(out), &v))
			assert.Equal(t, tt.allow, v.Allow, v.Message)
			assert.Equal(t, tt.reason, v.Reason)
			assert.Equal(t, tt.line, v.RuleLine)
			assert.NotEmpty(t, v.Message)
		})
	}

	code, out, _ := runPolicyCLI(t, "policy", "explain", policyExample, "--from", "payments/ledger", "--to", "payments/billing-1", "--port", "443")
	require.Equal(t, 0, code)
	assert.True(t, strings.HasPrefix(out, "deny  no_rule\n"), out)
	assert.Contains(t, out, "default deny")

	code, _, errOut := runPolicyCLI(t, "policy", "explain", filepath.Join(t.TempDir(), "none.yaml"), "--from", "a/b", "--to", "a/c", "--port", "1")
	assert.Equal(t, 1, code, "a missing policy file is a failure, not a usage error")
	assert.Contains(t, errOut, "none.yaml")
}

// TestPolicyDeepDocumentRefused is the deep-nesting attack through the CLI: the reproduction as reported
// (50,000 nested lists) is refused at once by check and by explain, naming the file, the line and
// the limit.
func TestPolicyDeepDocumentRefused(t *testing.T) {
	deep := filepath.Join(t.TempDir(), "deep.yaml")
	require.NoError(t, os.WriteFile(deep, []byte("zones: "+strings.Repeat("[", 50000)+strings.Repeat("]", 50000)+"\n"), 0o600))
	for _, args := range [][]string{
		{"policy", "check", deep},
		{"policy", "explain", deep, "--from", "payments/a", "--to", "payments/b", "--port", "443"},
	} {
		start := time.Now()
		code, out, errOut := runPolicyCLI(t, args...)
		assert.Less(t, time.Since(start), time.Second, args[1])
		assert.Equal(t, 1, code, errOut)
		assert.Empty(t, out)
		assert.Contains(t, errOut, deep+":1:", args[1])
		assert.Contains(t, errOut, "more than 32 levels", args[1])
		assert.Equal(t, 1, strings.Count(errOut, "\n"), "one line: %q", errOut)
	}
}
