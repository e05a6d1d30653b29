package main

import (
	"io"
	"strings"
	"testing"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"github.com/stretchr/testify/assert"
)

// Every flag's help shows a real placeholder: pflag takes the first `quoted` word of a usage
// string as the value's name, so a backticked command in a help text would print as
// "--token ute token create".
func TestFlagPlaceholdersAreWords(t *testing.T) {
	var walk func(*cobra.Command)
	walk = func(c *cobra.Command) {
		c.Flags().VisitAll(func(f *pflag.Flag) {
			name, _ := pflag.UnquoteUsage(f)
			assert.NotContains(t, name, " ", "%s --%s shows the placeholder %q", c.CommandPath(), f.Name, name)
		})
		for _, sub := range c.Commands() {
			walk(sub)
		}
	}
	walk(newRootCmd(io.Discard, io.Discard))
}

// `ute --version` names the version, the commit and the Go toolchain.
func TestVersion(t *testing.T) {
	r := ute(t, "--version")
	assert.Equal(t, 0, r.code, r.stderr)
	assert.True(t, strings.HasPrefix(r.stdout, "ute "), r.stdout)
	assert.Contains(t, r.stdout, "go1.")
}
