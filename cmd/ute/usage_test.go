package main

import (
	"bytes"
	"context"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
)

// Every way of calling the binary wrongly exits 2 with one line on stderr that says how to call it.
func TestUsageErrors(t *testing.T) {
	cases := []struct {
		args []string
		hint string
	}{
		{[]string{"bogus"}, "run 'ute --help'"},
		{[]string{"node", "bogus"}, "run 'ute node --help'"},
		{[]string{"policy", "check"}, "usage: ute policy check FILE"},
		{[]string{"policy", "check", "a", "b"}, "usage: ute policy check FILE"},
		{[]string{"node", "join", "--bogus"}, "usage: ute node join"},
		{[]string{"token", "create"}, "needs --dir"},
	}
	for _, tc := range cases {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			code := run(context.Background(), tc.args, &stdout, &stderr)
			assert.Equal(t, 2, code)
			msg := stderr.String()
			assert.Equal(t, 1, strings.Count(msg, "\n"), "one line: %q", msg)
			assert.True(t, strings.HasPrefix(msg, "ute: "), msg)
			assert.Contains(t, msg, tc.hint)
			assert.Empty(t, stdout.String())
		})
	}
}

// A command group called alone prints its help and succeeds.
func TestGroupAloneShowsHelp(t *testing.T) {
	var stdout, stderr bytes.Buffer
	assert.Equal(t, 0, run(context.Background(), []string{"node"}, &stdout, &stderr))
	assert.Contains(t, stdout.String(), "Available Commands")
	assert.Empty(t, stderr.String())
}
