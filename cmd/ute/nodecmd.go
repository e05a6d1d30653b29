package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/identity/authority"
	"github.com/ute-project/ute/node"
	"github.com/ute-project/ute/node/state"
)

// newNodeCmd groups the node commands. extra lets the daemon's file attach `node run` without
// editing this one.
func newNodeCmd(extra ...*cobra.Command) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "node",
		Short: "Join a trust domain and manage this node's identity",
	}
	cmd.AddCommand(newNodeJoinCmd(), newNodeRenewCmd())
	cmd.AddCommand(extra...)
	return cmd
}

type joinView struct {
	Dir      string    `json:"dir"`
	Node     string    `json:"node"`
	Serial   string    `json:"serial"`
	Zones    []string  `json:"zones"`
	Regions  []string  `json:"regions"`
	NotAfter time.Time `json:"not_after"`
}

// envJoinToken names the environment variable `node join` reads the token from when --token is
// not given. Unlike a command-line argument, which every local user can read in /proc/PID/cmdline
// while the join runs, a process's environment and stdin are visible only to its owner and root.
const envJoinToken = "UTE_JOIN_TOKEN"

// maxTokenInput bounds what `--token -` reads from stdin: blank lines before the token (a here
// document, an echo with a leading newline) and the token itself.
const maxTokenInput = 4096 + 4*identity.TokenLen

// joinToken resolves the --token flag: "-" reads the first non-blank line from stdin, "" falls
// back to the environment, anything else is the token itself.
func joinToken(flag string, stdin io.Reader, getenv func(string) string) (string, error) {
	switch flag {
	case "-":
		r := bufio.NewReader(io.LimitReader(stdin, int64(maxTokenInput)))
		for {
			line, err := r.ReadString('\n')
			if err != nil && !errors.Is(err, io.EOF) {
				return "", fmt.Errorf("read the join token from stdin: %w", err)
			}
			if tok := strings.TrimSpace(line); tok != "" {
				return tok, nil
			}
			if err != nil {
				return "", usagef("--token - read no token from stdin; pipe the token printed by `ute token create`")
			}
		}
	case "":
		return strings.TrimSpace(getenv(envJoinToken)), nil
	default:
		return flag, nil
	}
}

// joinRetryAdvice completes a join that timed out before the authority was reached with what the
// operator needs next: the token is untouched. A join that timed out after its request was sent
// already says (node.Join) that its key stays staged and that the same command collects the
// certificate if the authority issued it.
func joinRetryAdvice(err error) error {
	var ne net.Error
	timedOut := errors.Is(err, authority.ErrNoAnswer) || errors.Is(err, context.DeadlineExceeded) ||
		errors.Is(err, os.ErrDeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout())
	if !timedOut {
		return err
	}
	if errors.Is(err, authority.ErrRequestNotSent) {
		return fmt.Errorf("%w; the authority was not reached, so the token was not used: retrying with the same token is safe", err)
	}
	return err
}

func newNodeJoinCmd() *cobra.Command {
	var (
		dir, addr, token, name, region, advertise string
		asJSON                                    bool
	)
	cmd := &cobra.Command{
		Use:   "join --dir N --authority ADDR --token T [--name NAME] [--region R]",
		Short: "Generate this node's key and obtain its certificate with a join token",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			resolved, err := joinToken(token, cmd.InOrStdin(), os.Getenv)
			if err != nil {
				return err
			}
			token = resolved
			if dir == "" || addr == "" || token == "" {
				return usagef("node join needs --dir, --authority and --token (or --token - with the token on stdin, or %s)", envJoinToken)
			}
			// An explicitly empty --name (an unset shell variable) is a mistake, not a request
			// for the host name: refuse it before the one-time token is spent.
			if name == "" && cmd.Flags().Changed("name") {
				return usagef("--name is empty; give the node name, or leave --name out to use the host name")
			}
			if name == "" {
				h, err := os.Hostname()
				if err != nil || identity.ValidateName("node name", strings.ToLower(h)) != nil {
					return usagef("the hostname %q is not a valid node name; pass --name", h)
				}
				name = strings.ToLower(h)
			}
			if err := identity.ValidateName("node name", name); err != nil {
				return usageError{err}
			}
			if _, err := identity.ParseToken(token); err != nil {
				return fmt.Errorf("%w: %w", authority.ErrMalformedToken, err)
			}
			// node.Join stages the key in dir before anything is sent, so running this command
			// again after a lost answer collects the certificate the authority issued; it removes
			// what it created only when no certificate can have been issued for the key.
			d, err := node.Join(cmd.Context(), node.JoinParams{
				Dir: dir, Authority: addr, Token: token, Name: name, Region: region, Advertise: advertise,
			})
			if err != nil {
				return joinRetryAdvice(err)
			}
			info, err := d.Info()
			if err != nil {
				return err
			}
			nodeRegion := info.Region
			cert, err := d.NodeCert()
			if err != nil {
				return err
			}
			v := joinView{Dir: dir, Node: cert.ID.String(), Serial: cert.Serial().String(),
				Zones: cert.Claims.ZoneNames(), Regions: cert.Claims.Regions, NotAfter: cert.X509.NotAfter.UTC()}
			if asJSON {
				return json.NewEncoder(cmd.OutOrStdout()).Encode(v)
			}
			_, err = fmt.Fprintf(cmd.OutOrStdout(), "joined as %s (serial %s), zones %s, region %s, certificate valid until %s\n",
				v.Node, v.Serial, strings.Join(v.Zones, ","), nodeRegion, v.NotAfter.Format(time.RFC3339))
			return err
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "node directory to create (0700)")
	cmd.Flags().StringVar(&addr, "authority", "", "authority address host:port (UDP)")
	cmd.Flags().StringVar(&token, "token", "", "join TOKEN printed by ute token create; - reads it from stdin (keeps it out of ps), default $"+envJoinToken)
	cmd.Flags().StringVar(&name, "name", "", "node name (default: the hostname)")
	cmd.Flags().StringVar(&region, "region", "", "region this node runs in (default: the token's only region)")
	cmd.Flags().StringVar(&advertise, "advertise", "", "underlay address host:port other nodes will reach this node at; the authority hands it to them as a bootstrap member")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the result as JSON")
	return cmd
}

func newNodeRenewCmd() *cobra.Command {
	var (
		dir, addr string
		asJSON    bool
	)
	cmd := &cobra.Command{
		Use:   "renew --dir N [--authority ADDR]",
		Short: "Renew this node's certificate now (new key, proven with the current one) and reissue its agents",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if dir == "" {
				return usagef("node renew needs --dir")
			}
			d, err := state.Open(dir)
			if err != nil {
				return err
			}
			info, err := d.Info()
			if err != nil {
				return err
			}
			if addr == "" {
				addr = info.Authority
			}
			r, err := renewNode(cmd, d, addr)
			if err != nil {
				return err
			}
			v := joinView{Dir: dir, Node: r.Node.ID.String(), Serial: r.Node.Serial().String(),
				Zones: r.Node.Claims.ZoneNames(), Regions: r.Node.Claims.Regions, NotAfter: r.Node.X509.NotAfter.UTC()}
			if asJSON {
				return json.NewEncoder(cmd.OutOrStdout()).Encode(v)
			}
			_, err = fmt.Fprintf(cmd.OutOrStdout(), "renewed %s (serial %s), valid until %s\n", v.Node, v.Serial, v.NotAfter.Format(time.RFC3339))
			return err
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "node directory")
	cmd.Flags().StringVar(&addr, "authority", "", "authority address (default: the one joined)")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the result as JSON")
	return cmd
}

// renewNode renews the node certificate, installs it and re-signs every agent with the new key.
// It is safe to repeat after any failure: a crash after the authority committed the renewal is
// finished by the retry with the staged key. A running node with --authority does the same by
// itself at half-life (package node).
func renewNode(cmd *cobra.Command, d *state.Dir, addr string) (*authority.Joined, error) {
	r, err := node.RenewDir(cmd.Context(), d, addr, nil)
	if err != nil {
		return nil, err
	}
	if _, err := node.ReissueAgents(d); err != nil {
		return nil, fmt.Errorf("node renewed, but %w", err)
	}
	return r.Joined, nil
}
