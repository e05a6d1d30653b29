package main

import (
	"context"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/ute-project/ute/node/localapi"
)

func newTrustCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "trust",
		Short: "TrustFlow scores: why a subject's trust is what it is",
	}
	cmd.AddCommand(newTrustExplainCmd())
	return cmd
}

func newTrustExplainCmd() *cobra.Command {
	var (
		dir    string
		asJSON bool
	)
	cmd := &cobra.Command{
		Use:   "explain --dir N SUBJECT [--json]",
		Short: "Show a subject's score at this node, the signals behind it and the arithmetic",
		Long: "SUBJECT is an agent or node SPIFFE ID, or NAME.ZONE of an agent this node hosts. The score is this\n" +
			"node's own view; docs/trustflow.md describes the weights, the decay and the thresholds.",
		Args: oneArg("trust explain takes one SUBJECT (a SPIFFE ID or NAME.ZONE)"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if dir == "" {
				return usagef("trust explain needs --dir (the node directory)")
			}
			return queryNode(cmd, dir, asJSON,
				func(c *localapi.Client, ctx context.Context) (localapi.TrustExplanation, error) {
					return c.TrustExplain(ctx, args[0])
				}, printTrust)
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "node directory")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

func printTrust(w io.Writer, x localapi.TrustExplanation) error {
	tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "subject\t%s\n", x.Subject)
	action := x.Action
	if action == "" {
		action = "none (no zone's thresholds apply)"
	}
	fmt.Fprintf(tw, "score\t%d (min_trust %d, isolate_below %d): %s\n", x.Score, x.MinTrust, x.IsolateBelow, action)
	fmt.Fprintf(tw, "penalty\t%g, decaying %d points per hour", x.Penalty, x.DecayPerHour)
	if !x.Full.IsZero() {
		fmt.Fprintf(tw, ", back to 100 at %s", x.Full.Format(time.RFC3339))
	}
	fmt.Fprintln(tw)
	for _, ev := range x.Events {
		fmt.Fprintf(tw, "signal\t%s  %s −%d  score %d → %d  %s\n", ev.At.Format(time.RFC3339), ev.Kind, ev.Weight, ev.ScoreBefore, ev.ScoreAfter, ev.Reason)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintln(w, "arithmetic:")
	for _, s := range x.Steps {
		fmt.Fprintf(w, "  %s\n", s)
	}
	return nil
}

// printTrustScores is the trust section of `ute status`: every subject TrustFlow holds a signal
// about, with its newest reasons.
func printTrustScores(tw *tabwriter.Writer, scores []localapi.TrustScore) {
	if len(scores) == 0 {
		fmt.Fprintf(tw, "trust\tevery subject at 100 (no signal held)\n")
		return
	}
	for _, ts := range scores {
		fmt.Fprintf(tw, "trust %d\t%s  %s\n", ts.Score, ts.Subject, orDash(ts.Action))
		for _, r := range ts.Reasons {
			fmt.Fprintf(tw, "  because\t%s\n", r)
		}
	}
}
