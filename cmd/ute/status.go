package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/ute-project/ute/node/localapi"
)

// dialNode reaches the daemon of node directory dir through its local API socket.
func dialNode(ctx context.Context, dir string) (*localapi.Client, error) {
	c, err := localapi.Dial(ctx, localapi.SocketPath(dir))
	if err != nil {
		return nil, fmt.Errorf("%w (node directory %s)", err, dir)
	}
	return c, nil
}

// queryNode asks the daemon of dir one read question and prints the answer, as indented JSON
// with --json or with print otherwise: the shape of every read command against a node.
func queryNode[T any](cmd *cobra.Command, dir string, asJSON bool, ask func(*localapi.Client, context.Context) (T, error), print func(io.Writer, T) error) error {
	ctx, cancel := context.WithTimeout(cmd.Context(), 15*time.Second)
	defer cancel()
	c, err := dialNode(ctx, dir)
	if err != nil {
		return err
	}
	defer func() { _ = c.Close() }()
	v, err := ask(c, ctx)
	if err != nil {
		return err
	}
	if asJSON {
		enc := json.NewEncoder(cmd.OutOrStdout())
		enc.SetIndent("", "  ")
		return enc.Encode(v)
	}
	return print(cmd.OutOrStdout(), v)
}

func newStatusCmd() *cobra.Command {
	var (
		dir    string
		asJSON bool
	)
	cmd := &cobra.Command{
		Use:   "status --dir N [--json]",
		Short: "Show the running node: zones, peers and tunnels, agents, revocations, renewal",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if dir == "" {
				return usagef("status needs --dir (the node directory)")
			}
			return queryNode(cmd, dir, asJSON, (*localapi.Client).Status, printStatus)
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "node directory")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

// renewalLine is the renewal state with when it runs next and, while retrying, the last error.
func renewalLine(r localapi.Renewal) string {
	out := r.State
	if !r.NextAt.IsZero() {
		out += ", next " + r.NextAt.Format(time.RFC3339)
	}
	if r.State == localapi.RenewalRetrying {
		out += fmt.Sprintf(", last attempt failed at %s: %s", r.LastFailure.Format(time.RFC3339), r.LastError)
	} else if !r.LastSuccess.IsZero() {
		out += ", last " + r.LastSuccess.Format(time.RFC3339)
	}
	return out
}

func printStatus(w io.Writer, st localapi.Status) error {
	tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "node\t%s\n", st.Node)
	if st.Version != "" {
		fmt.Fprintf(tw, "daemon\t%s\n", st.Version)
	}
	fmt.Fprintf(tw, "listen\t%s (advertise %s)\n", st.Listen, orDash(st.Advertise))
	fmt.Fprintf(tw, "certificate\t%s, valid until %s, renewal %s\n", st.Serial, st.NotAfter.Format(time.RFC3339), renewalLine(st.Renewal))
	fmt.Fprintf(tw, "policy\tversion %d\n", st.PolicyVersion)
	for _, z := range st.Zones {
		fmt.Fprintf(tw, "zone %s\t%s, %d gossip members\n", z.Name, strings.Join(z.CIDRs, ","), z.Members)
		for _, p := range z.Peers {
			fmt.Fprintf(tw, "  peer\t%s at %s, tunnel %s\n", p.Node, p.Addr, p.Tunnel)
		}
	}
	for _, a := range st.Agents {
		rev := ""
		if a.Revoked {
			rev = " REVOKED"
		}
		fmt.Fprintf(tw, "agent %s.%s\t%s%s\n", a.Name, a.Zone, a.OverlayIP, rev)
	}
	fmt.Fprintf(tw, "revocations\t%d held\n", len(st.Revocations))
	for _, r := range st.Revocations {
		fmt.Fprintf(tw, "  revoked\t%s by %s: %s\n", r.Subject, r.Issuer, r.Reason)
	}
	printTrustScores(tw, st.Trust)
	return tw.Flush()
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func newWhoisCmd() *cobra.Command {
	var (
		dir    string
		asJSON bool
	)
	cmd := &cobra.Command{
		Use:   "whois --dir N ADDR:PORT [--json]",
		Short: "Show the verified DTL provenance of the flow arriving from an overlay address and port",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if dir == "" {
				return usagef("whois needs --dir (the node directory)")
			}
			addr, err := localapi.ParseWhoIsAddr(args[0])
			if err != nil {
				return usagef("%v", err)
			}
			return queryNode(cmd, dir, asJSON,
				func(c *localapi.Client, ctx context.Context) (localapi.WhoIs, error) { return c.WhoIs(ctx, addr) },
				func(out io.Writer, w localapi.WhoIs) error {
					_, err := fmt.Fprintf(out, "%s (zone %s) via %s, region %s, trust %d, drift %s, flow %d to %s\n",
						w.Agent, w.Zone, w.Node, orDash(w.Region), w.Trust, orDash(strings.Join(w.Drift, "|")), w.FlowID, w.Destination)
					return err
				})
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "node directory")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}
