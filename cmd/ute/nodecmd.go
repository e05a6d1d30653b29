package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
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

// joinToken resolves the --token flag: "-" reads one line from stdin, "" falls back to the
// environment, anything else is the token itself.
func joinToken(flag string, stdin io.Reader, getenv func(string) string) (string, error) {
	switch flag {
	case "-":
		line, err := bufio.NewReader(io.LimitReader(stdin, int64(4*identity.TokenLen))).ReadString('\n')
		if err != nil && !errors.Is(err, io.EOF) {
			return "", fmt.Errorf("read the join token from stdin: %w", err)
		}
		tok := strings.TrimSpace(line)
		if tok == "" {
			return "", usagef("--token - read no token from stdin; pipe the token printed by `ute token create`")
		}
		return tok, nil
	case "":
		return strings.TrimSpace(getenv(envJoinToken)), nil
	default:
		return flag, nil
	}
}

func newNodeJoinCmd() *cobra.Command {
	var (
		dir, addr, token, name, region string
		asJSON                         bool
	)
	cmd := &cobra.Command{
		Use:   "join --dir N --authority ADDR --token T [--name NAME] [--region R]",
		Short: "Generate this node's key and obtain its certificate with a join token",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) (retErr error) {
			resolved, err := joinToken(token, cmd.InOrStdin(), os.Getenv)
			if err != nil {
				return err
			}
			token = resolved
			if dir == "" || addr == "" || token == "" {
				return usagef("node join needs --dir, --authority and --token (or --token - with the token on stdin, or %s)", envJoinToken)
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
			_, statErr := os.Stat(dir)
			d, err := state.Create(dir)
			if err != nil {
				return err
			}
			if os.IsNotExist(statErr) {
				// A failed join must not leave behind a directory the next attempt would trip on.
				defer func() {
					if retErr != nil {
						_ = os.RemoveAll(dir)
					}
				}()
			}
			host, err := identity.ReadHostFingerprint(region, "")
			if err != nil {
				return fmt.Errorf("host fingerprint: %w", err)
			}
			fp := host.Digest()
			key, err := identity.GenerateKey()
			if err != nil {
				return err
			}
			j, err := authority.Join(cmd.Context(), authority.JoinParams{
				Addr: addr, Token: token, Key: key, Name: name, Region: region, HostFingerprint: fp[:],
			})
			if err != nil {
				return err
			}
			nodeRegion := ""
			if len(j.Node.Claims.Regions) > 0 {
				nodeRegion = j.Node.Claims.Regions[0]
			}
			if err := d.SaveJoin(state.Joined{
				Key: key, NodeCert: j.NodeCertDER, AuthorityCert: j.AuthorityDER, Policy: j.Policy,
				Info: state.Info{Name: name, Region: nodeRegion, TrustDomain: j.Node.ID.TrustDomain, Authority: addr, JoinedAt: time.Now().UTC()},
			}); err != nil {
				return err
			}
			v := joinView{Dir: dir, Node: j.Node.ID.String(), Serial: j.Node.Serial().String(),
				Zones: j.Node.Claims.ZoneNames(), Regions: j.Node.Claims.Regions, NotAfter: j.Node.X509.NotAfter.UTC()}
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
	cmd.Flags().StringVar(&token, "token", "", "join token from `ute token create`; - reads it from stdin (keeps it out of ps), default $"+envJoinToken)
	cmd.Flags().StringVar(&name, "name", "", "node name (default: the hostname)")
	cmd.Flags().StringVar(&region, "region", "", "region this node runs in (default: the token's only region)")
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
