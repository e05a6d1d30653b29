// Command ute is the one UTE binary: authority, node, agent, token, policy, audit and demo roles.
//
// It owns argument parsing, exit codes and the one-line error contract (exit 0 success, 1 failure,
// 2 usage error; errors are a single line on stderr naming the problem and the fix). It must never
// hold protocol or policy logic of its own: every decision is made by the packages it calls.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/spf13/cobra"
)

// usageError marks a mistake in how the command was called (exit 2).
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

func usagef(format string, args ...any) error { return usageError{fmt.Errorf(format, args...)} }

// oneArg is a cobra Args check for commands that take exactly one argument; what says what it is
// in the usage error ("revoke takes one SUBJECT (...), got 2 arguments").
func oneArg(what string) cobra.PositionalArgs {
	return func(_ *cobra.Command, args []string) error {
		if len(args) != 1 {
			return usagef("%s, got %d arguments", what, len(args))
		}
		return nil
	}
}

func newRootCmd(stdout, stderr io.Writer) *cobra.Command {
	root := &cobra.Command{
		Use:           "ute",
		Short:         "UTE: cryptographic identity for AI agents, enforced at the transport layer",
		SilenceUsage:  true,
		SilenceErrors: true,
		Version:       versionString(),
	}
	root.SetVersionTemplate("ute {{.Version}}\n")
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.SetFlagErrorFunc(func(c *cobra.Command, err error) error {
		return usageError{fmt.Errorf("%w; usage: %s", err, c.UseLine())}
	})
	root.AddCommand(commands()...)
	for _, c := range root.Commands() {
		guardGroup(c)
	}
	return root
}

// guardGroup makes a command group that is called with an unknown subcommand fail as a usage error
// (cobra would print the group's help and exit 0), and descends into nested groups.
func guardGroup(c *cobra.Command) {
	if !c.HasSubCommands() {
		return
	}
	if !c.Runnable() {
		c.Args = cobra.ArbitraryArgs
		c.RunE = func(cmd *cobra.Command, args []string) error {
			if len(args) > 0 {
				return usagef("unknown command %q for %q; run '%s --help' to list its commands",
					args[0], cmd.CommandPath(), cmd.CommandPath())
			}
			return cmd.Help()
		}
	}
	for _, sub := range c.Commands() {
		guardGroup(sub)
	}
}

// run executes the CLI and returns the process exit code.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	root := newRootCmd(stdout, stderr)
	root.SetArgs(args)
	cmd, err := root.ExecuteContextC(ctx)
	if err == nil {
		return 0
	}
	msg := strings.ReplaceAll(err.Error(), "\n", "; ")
	var ue usageError
	ours := errors.As(err, &ue)
	usage := ours || isCobraUsage(err)
	if usage && !ours && cmd != nil {
		// cobra's own argument errors do not say how to call the command; the usage line does.
		if cmd.HasAvailableSubCommands() {
			msg += fmt.Sprintf("; run '%s --help' to list its commands", cmd.CommandPath())
		} else {
			msg += "; usage: " + cmd.UseLine()
		}
	}
	fmt.Fprintln(stderr, "ute: "+msg)
	if usage {
		return 2
	}
	return 1
}

// isCobraUsage recognises the argument errors cobra produces itself (unknown command, wrong arg count).
func isCobraUsage(err error) bool {
	s := err.Error()
	return strings.HasPrefix(s, "unknown command") || strings.HasPrefix(s, "unknown flag") ||
		strings.HasPrefix(s, "accepts ") || strings.HasPrefix(s, "requires ") ||
		strings.HasPrefix(s, "required flag")
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}
