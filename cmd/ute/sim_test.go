package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// A scenario that expects a block where the policy allows the flow fails the run: exit 1, the
// failure in the table, and a report page that shows it.
func TestSimRunFailingExpectationExits1(t *testing.T) {
	report := filepath.Join(t.TempDir(), "r.html")
	var out, errOut bytes.Buffer
	code := run(context.Background(), []string{"sim", "run", "../../sim/testdata/wrong-expectation.yaml", "--report", report}, &out, &errOut)
	require.Equal(t, 1, code, "stdout: %s\nstderr: %s", out.String(), errOut.String())
	assert.Contains(t, out.String(), "FAIL an allowed flow wrongly expected to be blocked: expected blocked, was allowed")
	assert.Contains(t, errOut.String(), "ute: sim: 1 expectation(s) failed")
	page, err := os.ReadFile(report)
	require.NoError(t, err)
	assert.Contains(t, string(page), "<svg")
	assert.Contains(t, string(page), "1 of 2 expectation(s) failed")
	assert.NotContains(t, string(page), "<script")
}

func TestSimRunJSON(t *testing.T) {
	var out, errOut bytes.Buffer
	code := run(context.Background(), []string{"sim", "run", "token-reuse", "--json", "--seed", "3"}, &out, &errOut)
	require.Equal(t, 0, code, errOut.String())
	var res struct {
		Seed   uint64 `json:"seed"`
		Failed int    `json:"failed"`
		Events []struct {
			Outcome string `json:"outcome"`
			Reason  string `json:"reason"`
		} `json:"events"`
	}
	require.NoError(t, json.Unmarshal(out.Bytes(), &res))
	assert.Equal(t, uint64(3), res.Seed)
	require.Len(t, res.Events, 2)
	assert.Equal(t, "authority: token already used", res.Events[0].Reason)
}

func TestSimRunRefusals(t *testing.T) {
	dir := t.TempDir()
	drift := filepath.Join(dir, "drift.yaml")
	src, err := os.ReadFile("../../sim/testdata/wrong-expectation.yaml")
	require.NoError(t, err)
	body := strings.SplitN(string(src), "timeline:", 2)[0] + "timeline:\n  - {event: duplicate_identity, node: a}\n"
	require.NoError(t, os.WriteFile(drift, []byte(body), 0o600))
	var out, errOut bytes.Buffer
	code := run(context.Background(), []string{"sim", "run", drift}, &out, &errOut)
	assert.Equal(t, 1, code)
	assert.Contains(t, errOut.String(), "duplicate_identity is not supported in this version")
	assert.Equal(t, 1, strings.Count(errOut.String(), "\n"), "one line: %q", errOut.String())

	errOut.Reset()
	assert.Equal(t, 2, run(context.Background(), []string{"sim", "run", "no-such-scenario"}, &out, &errOut))
	assert.Contains(t, errOut.String(), "shipped:")
	errOut.Reset()
	assert.Equal(t, 2, run(context.Background(), []string{"sim", "run", "--report", filepath.Join(dir, "x.html")}, &out, &errOut))
	for _, k := range []string{"0", "1001", "-3"} {
		errOut.Reset()
		assert.Equal(t, 2, run(context.Background(), []string{"sim", "run", "token-reuse", "--dilation", k}, &out, &errOut), k)
		assert.Contains(t, errOut.String(), "--dilation "+k+": a whole factor from 1 (none) to 1000")
	}
}

// --dilation replaces the scenario's factor: the table says so and times stay simulated.
func TestSimRunDilation(t *testing.T) {
	var out, errOut bytes.Buffer
	code := run(context.Background(), []string{"sim", "run", "token-reuse", "--dilation", "3"}, &out, &errOut)
	require.Equal(t, 0, code, errOut.String())
	assert.Contains(t, out.String(), "time dilation k = 3")
}

// --real runs a shipped scenario over real UDP on loopback and says so in the table.
func TestSimRunReal(t *testing.T) {
	var out, errOut bytes.Buffer
	code := run(context.Background(), []string{"sim", "run", "token-reuse", "--real"}, &out, &errOut)
	require.Equal(t, 0, code, errOut.String())
	assert.Contains(t, out.String(), "real UDP on loopback")
	errOut.Reset()
	code = run(context.Background(), []string{"sim", "run", "revocation-convergence-1000", "--real"}, &out, &errOut)
	assert.Equal(t, 1, code)
	assert.Contains(t, errOut.String(), "--real runs at most 64 nodes")
}
