package main

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/ute-project/ute/identity/authority"
	"github.com/ute-project/ute/node/config"
	"github.com/ute-project/ute/zones"
)

func newAuthorityCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "authority",
		Short: "Run the trust domain's authority: root key, join tokens, node certificates",
	}
	cmd.AddCommand(newAuthorityInitCmd(), newAuthorityRunCmd(), newAuthorityAuditCmd(), newAuthorityReleaseCmd(), newAuthorityBundleCmd())
	return cmd
}

func newAuthorityInitCmd() *cobra.Command {
	var dir, td, policy string
	cmd := &cobra.Command{
		Use:   "init --dir D --trust-domain TD --policy FILE",
		Short: "Create the authority's root key, certificate and store",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if dir == "" || td == "" || policy == "" {
				return usagef("authority init needs --dir, --trust-domain and --policy")
			}
			if err := authority.Init(dir, td, policy, authority.Options{}); err != nil {
				return err
			}
			a, err := authority.Open(dir, authority.Options{})
			if err != nil {
				return err
			}
			defer func() { _ = a.Close() }()
			_, err = fmt.Fprintf(cmd.OutOrStdout(), "authority for %s initialized in %s\npin %s\n", a.TrustDomain(), dir, a.Pin())
			return err
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "authority directory to create (0700)")
	cmd.Flags().StringVar(&td, "trust-domain", "", "trust domain, e.g. acme.internal")
	cmd.Flags().StringVar(&policy, "policy", "", "zone policy file (YAML)")
	return cmd
}

func newAuthorityRunCmd() *cobra.Command {
	var dir, listen, logFormat, logLevel string
	cmd := &cobra.Command{
		Use:   "run --dir D [--listen ADDR] [--log-level LEVEL] [--log-format text|json]",
		Short: "Serve joins and renewals over QUIC, and the admin socket, until interrupted",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if dir == "" {
				return usagef("authority run needs --dir")
			}
			// The same flags as `ute node run`, parsed by the same code so that values and errors
			// agree; the authority keeps JSON as its default, which its log collectors expect.
			var ov config.Overrides
			if cmd.Flags().Changed("log-format") {
				ov.LogFormat = &logFormat
			}
			if cmd.Flags().Changed("log-level") {
				ov.LogLevel = &logLevel
			}
			logCfg := config.Default()
			logCfg.Log.Format = config.LogJSON
			logCfg, err := logCfg.Apply(ov)
			if err != nil {
				return err
			}
			log := slog.New(logCfg.Log.Handler(cmd.ErrOrStderr(), logCfg.Log.Level))
			a, err := authority.Open(dir, authority.Options{Logger: log})
			if err != nil {
				return err
			}
			defer func() { _ = a.Close() }()
			srv, err := a.Listen(listen)
			if err != nil {
				return err
			}
			// Bound before "listening" is printed, so a caller that waits for that line reaches the
			// daemon through the socket rather than finding the store locked.
			admin, err := a.ListenAdmin()
			if err != nil {
				_ = srv.Close()
				return err
			}
			ctx, cancel := context.WithCancel(cmd.Context())
			defer cancel()
			adminDone := make(chan error, 1)
			go func() {
				adminDone <- admin.Serve(ctx)
				cancel()
			}()
			// Tests and scripts wait for this line to learn the bound address.
			if _, err := fmt.Fprintf(cmd.OutOrStdout(), "listening %s\n", srv.Addr()); err != nil {
				cancel()
			}
			serveErr := srv.Serve(ctx)
			cancel()
			adminErr := <-adminDone
			if serveErr != nil {
				return serveErr
			}
			if adminErr != nil {
				return adminErr
			}
			log.Info("authority stopped")
			return nil
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "authority directory")
	cmd.Flags().StringVar(&listen, "listen", "127.0.0.1:7443", "UDP address for QUIC joins and renewals")
	cmd.Flags().StringVar(&logFormat, "log-format", "json", "log format: text or json")
	cmd.Flags().StringVar(&logLevel, "log-level", "info", "log level: debug, info, warn or error")
	return cmd
}

func newAuthorityAuditCmd() *cobra.Command {
	var (
		dir, lineage string
		asJSON       bool
		timeout      time.Duration
	)
	cmd := &cobra.Command{
		Use:   "audit --dir D [--lineage NAME] [--json]",
		Short: "Print the authority's audit trail (token creations, joins, renewals, refusals) or one node's certificate lineage",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if dir == "" {
				return usagef("authority audit needs --dir")
			}
			adm, err := authority.OpenAdmin(cmd.Context(), dir, authority.Options{StoreTimeout: timeout})
			if err != nil {
				return err
			}
			defer func() { _ = adm.Close() }()
			if cmd.Flags().Changed("lineage") {
				return printLineage(cmd, adm, lineage, asJSON)
			}
			recs, err := adm.Audit(cmd.Context())
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if asJSON {
				if recs == nil {
					recs = []authority.AuditRecord{}
				}
				enc := json.NewEncoder(out)
				enc.SetIndent("", "  ")
				return enc.Encode(recs)
			}
			tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
			_, _ = fmt.Fprintln(tw, "SEQ\tTIME\tEVENT\tOUTCOME\tTOKEN\tSUBJECT\tSERIAL\tREMOTE\tREASON")
			for _, r := range recs {
				_, _ = fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", r.Seq, r.Time.Format(time.RFC3339), r.Event,
					r.Outcome, orDash(r.TokenID), orDash(r.Subject), serialOrDash(r.Serial), orDash(r.Remote), orDash(r.Reason))
			}
			return tw.Flush()
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "authority directory")
	cmd.Flags().StringVar(&lineage, "lineage", "", "print the certificate lineage of node NAME (joins, renewals, revocations) instead")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	cmd.Flags().DurationVar(&timeout, "lock-timeout", time.Second, "how long to wait for the store when no daemon answers")
	return cmd
}

// printLineage prints one line per certificate of node name, each join starting a lineage and
// each renewal indented under what it renews, with the revocation that covers it.
func printLineage(cmd *cobra.Command, adm authority.Admin, name string, asJSON bool) error {
	lin, err := adm.Lineage(cmd.Context(), name)
	if err != nil {
		return err
	}
	out := cmd.OutOrStdout()
	if asJSON {
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		return enc.Encode(lin)
	}
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	_, _ = fmt.Fprintln(tw, "SERIAL\tORIGIN\tISSUED\tNOT AFTER\tSTATE")
	for _, e := range lin {
		origin := "join (token " + e.TokenID + ")"
		serial := fmt.Sprintf("%d", e.Serial)
		if e.Renews != 0 {
			origin = fmt.Sprintf("renews %d", e.Renews)
			serial = "  └ " + serial
		}
		state := "live"
		switch {
		case e.Revoked && e.RevokedBy == e.Serial:
			state = fmt.Sprintf("revoked %s: %s", e.RevokedAt.Format(time.RFC3339), e.Reason)
		case e.Revoked || e.RevokedBy != 0:
			state = fmt.Sprintf("revoked with its lineage (serial %d)", e.RevokedBy)
		case !time.Now().Before(e.NotAfter):
			state = "expired"
		}
		_, _ = fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", serial, origin, e.IssuedAt.Format(time.RFC3339), e.NotAfter.Format(time.RFC3339), state)
	}
	return tw.Flush()
}

func newAuthorityReleaseCmd() *cobra.Command {
	var (
		dir, reason string
		asJSON      bool
		timeout     time.Duration
	)
	cmd := &cobra.Command{
		Use:   "release --dir D NAME --reason TEXT",
		Short: "Reopen a node name whose certificate lineage was revoked, so that a new join may take it (audited)",
		Long: `Revoking a node, or any serial of its lineage, closes its name: a join under that name is
refused (name_revoked) however many tokens the joiner holds and however long ago the certificates
expired. When the operator has rebuilt the host and wants the name back, this command reopens it
for the next join (which starts a new lineage). The release and its reason are written to the
authority's audit trail. A name still held by a live, unrevoked certificate is refused: revoke it
first. Works while ` + "`ute authority run`" + ` runs (through its admin socket) and when it does not.`,
		Args: oneArg("authority release takes one node NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if dir == "" {
				return usagef("authority release needs --dir (the authority directory) and --reason")
			}
			if err := authority.ValidateRevokeReason(reason); err != nil {
				return usageError{err}
			}
			return withAdmin(cmd, dir, timeout, asJSON,
				func(ctx context.Context, adm authority.Admin) (authority.Released, error) {
					return adm.Release(ctx, args[0], reason)
				},
				func(rel authority.Released) string {
					return fmt.Sprintf("released %s (last serial %d, lineage revoked at serial %d): the next join may take the name; audited\n",
						rel.SPIFFEID, rel.Serial, rel.RevokedSerial)
				})
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "authority directory")
	cmd.Flags().StringVar(&reason, "reason", "", "why (required; stored in the audit trail)")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the release as JSON")
	cmd.Flags().DurationVar(&timeout, "lock-timeout", time.Second, "how long to wait for the store when no daemon answers")
	return cmd
}

func newPolicyApplyCmd() *cobra.Command {
	var (
		dir     string
		asJSON  bool
		timeout time.Duration
	)
	cmd := &cobra.Command{
		Use:   "apply --dir D FILE",
		Short: "Replace the authority's policy: validated, signed as the next version, pushed to watching nodes",
		Long: `Validate FILE like ` + "`ute policy check`" + ` (exit 1 with FILE:LINE on the first problem; nothing changes),
then have the authority in D sign it as the next policy version (the current one plus one), store it
durably and hand it out from then on: at join and renewal, and at once to every node watching the
authority. Nodes refuse a release that is not newer than the one they hold. Works while
` + "`ute authority run`" + ` runs (through its admin socket) and when it does not (on the store directly;
nodes then receive it when they reconnect to the daemon).`,
		Args: oneArg("policy apply takes one FILE"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if dir == "" {
				return usagef("policy apply needs --dir (the authority directory)")
			}
			file := args[0]
			// Checked here too, so a bad file is refused before the daemon is bothered; the
			// authority validates again whatever it receives.
			if _, err := zones.Load(file); err != nil {
				return fmt.Errorf("%w: %w", authority.ErrPolicyInvalid, err)
			}
			policy, err := os.ReadFile(file)
			if err != nil {
				return err
			}
			return withAdmin(cmd, dir, timeout, asJSON,
				func(ctx context.Context, adm authority.Admin) (authority.PolicyApplied, error) {
					return adm.ApplyPolicy(ctx, file, policy)
				},
				func(applied authority.PolicyApplied) string {
					return fmt.Sprintf("policy version %d applied from %s (%d bytes, zones %s)\n", applied.Version, file, applied.Bytes, strings.Join(applied.Zones, ", "))
				})
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "authority directory")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the new version as JSON")
	cmd.Flags().DurationVar(&timeout, "lock-timeout", time.Second, "how long to wait for the store when no daemon answers")
	return cmd
}

// serialOrDash prints a serial, or "-" for events that concern none (serials start at 1).
func serialOrDash(n uint64) string {
	if n == 0 {
		return "-"
	}
	return strconv.FormatUint(n, 10)
}
