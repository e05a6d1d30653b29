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

// A token given as an argument is readable by every local user in /proc/PID/cmdline while the
// join runs; stdin and the environment are not. Both must give exactly the token.
func TestJoinTokenSources(t *testing.T) {
	const tok = "ute1.aaaa.bbbb.cccc"
	noEnv := func(string) string { return "" }
	env := func(k string) string {
		if k == envJoinToken {
			return " " + tok + "\n"
		}
		return ""
	}
	tests := []struct {
		name, flag, stdin string
		getenv            func(string) string
		want              string
	}{
		{"flag", tok, "", noEnv, tok},
		{"stdin line", "-", tok + "\n", noEnv, tok},
		{"stdin without newline", "-", tok, noEnv, tok},
		{"stdin after blank lines", "-", "\n  \n\r\n\t\n" + tok + "\n", noEnv, tok},
		{"stdin after blank lines, no newline", "-", "\n\n" + tok, noEnv, tok},
		{"stdin wins over env", "-", tok + "\n", func(string) string { return "other" }, tok},
		{"environment", "", "", env, tok},
		{"nothing", "", "", noEnv, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := joinToken(tc.flag, strings.NewReader(tc.stdin), tc.getenv)
			require.NoError(t, err)
			assert.Equal(t, tc.want, got)
		})
	}
}

func TestJoinTokenEmptyStdinIsUsageError(t *testing.T) {
	for _, in := range []string{"", "\n", "\n\n  \n\r\n", strings.Repeat("\n", maxTokenInput+10) + "ute1.a.b.c\n"} {
		_, err := joinToken("-", strings.NewReader(in), func(string) string { return "" })
		var ue usageError
		require.ErrorAs(t, err, &ue, "%.20q", in)
		assert.Contains(t, err.Error(), "read no token from stdin")
	}
}

// The whole join flow with the token piped on stdin.
func TestCLIJoinWithTokenOnStdin(t *testing.T) {
	tmp := t.TempDir()
	authDir, pol := filepath.Join(tmp, "auth"), filepath.Join(tmp, "policy.yaml")
	require.NoError(t, os.WriteFile(pol, []byte(cliPolicy), 0o644))
	ute(t, "authority", "init", "--dir", authDir, "--trust-domain", "acme.internal", "--policy", pol).ok(t)
	d := startDaemon(t, authDir)
	tok := ute(t, "token", "create", "--dir", authDir, "--zone", "payments").ok(t)
	out := uteStdin(t, tok+"\n", "node", "join", "--dir", filepath.Join(tmp, "n1"), "--authority", d.addr, "--token", "-", "--name", "n1").ok(t)
	assert.Contains(t, out, "joined as spiffe://acme.internal/node/n1")
	assert.NotContains(t, out, tok)
}

// uteStdin runs the binary like ute, with stdin.
func uteStdin(t *testing.T, stdin string, args ...string) cliResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, uteBin, args...)
	var out, errb bytes.Buffer
	cmd.Stdin, cmd.Stdout, cmd.Stderr = strings.NewReader(stdin), &out, &errb
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else {
		require.NoError(t, err)
	}
	return cliResult{code, out.String(), errb.String()}
}
