package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/ute-project/ute/identity/authority"
	"github.com/ute-project/ute/node/state"
)

func newRevokeCmd() *cobra.Command {
	var (
		dir, reason string
		asJSON      bool
		timeout     time.Duration
	)
	cmd := &cobra.Command{
		Use:   "revoke --dir D SUBJECT --reason TEXT",
		Short: "Revoke a node (spiffe://TD/node/NAME), an agent (spiffe://TD/zone/Z/agent/A) or one certificate (serial:N) at the authority",
		Long: `Revoke a node, an agent or one certificate at the authority. SUBJECT is a node SPIFFE ID
(spiffe://TD/node/NAME: every unexpired certificate issued to it), an agent SPIFFE ID
(spiffe://TD/zone/Z/agent/A: every certificate any node issues under that name) or serial:N.
The authority signs a revocation record with the next sequence number and stores it with the
revocation; both are durable before the command returns, and the record's sequence number is
printed. Nodes watching the authority receive the record at once. Revoking twice is harmless and
keeps the first record. Revocation follows the lineage: revoking serial:N also revokes every live
renewal of N, and a revoked node can no longer renew from any certificate of its lineage. Its name
stays closed to new joins until the operator reopens it with ` + "`ute authority release NAME`" + `
(audited). Works while ` + "`ute authority run`" + ` runs (through its admin socket) and when it does
not (on the store directly; watchers receive the record when they reconnect to the daemon).`,
		Args: oneArg("revoke takes one SUBJECT (spiffe://TD/node/NAME or serial:N)"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if dir == "" {
				return usagef("revoke needs --dir (the authority directory) and --reason")
			}
			if isNodeDir(dir) {
				return revokeAtNode(cmd, dir, args[0], reason, asJSON)
			}
			// Syntax is checked here so that a malformed subject or reason is a usage error
			// (exit 2) whichever way the authority is reached; the authority checks again.
			if _, err := authority.ParseSubject(args[0]); err != nil {
				return usageError{err}
			}
			if err := authority.ValidateRevokeReason(reason); err != nil {
				return usageError{err}
			}
			return withAdmin(cmd, dir, timeout, asJSON,
				func(ctx context.Context, adm authority.Admin) (authority.Revocation, error) {
					return adm.Revoke(ctx, args[0], reason)
				}, revocationText)
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "authority directory")
	cmd.Flags().StringVar(&reason, "reason", "", "why (required; stored with the revocation and in the audit trail)")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the revoked serials as JSON")
	cmd.Flags().DurationVar(&timeout, "lock-timeout", time.Second, "how long to wait for the store when no daemon answers")
	return cmd
}

// revocationText is one line per serial, saying whether this command revoked it or it already was,
// then one line naming the revocation record.
func revocationText(rev authority.Revocation) string {
	var b strings.Builder
	if len(rev.Serials) == 0 && rev.Seq == 0 {
		return fmt.Sprintf("%s has no unexpired certificate; nothing to revoke\n", rev.Subject)
	}
	for _, s := range rev.Serials {
		who := s.SPIFFEID
		if who == "" {
			who = "never delivered"
		}
		if s.Already {
			fmt.Fprintf(&b, "serial %d (%s) was already revoked at %s: %s\n", s.Serial, who, s.RevokedAt.Format(time.RFC3339), s.Reason)
			continue
		}
		fmt.Fprintf(&b, "revoked serial %d (%s): %s\n", s.Serial, who, s.Reason)
	}
	switch {
	case rev.Record != nil:
		fmt.Fprintf(&b, "revocation record seq %d for %s, durable; nodes drop it after %s\n", rev.Seq, rev.Subject, rev.Expires.Format(time.RFC3339))
	case rev.Seq != 0:
		fmt.Fprintf(&b, "%s was already revoked by revocation record seq %d\n", rev.Subject, rev.Seq)
	}
	return b.String()
}

// isNodeDir reports whether dir is a node directory (it holds node.json) rather than an
// authority's.
func isNodeDir(dir string) bool {
	_, err := os.Stat(filepath.Join(dir, state.FileNodeInfo))
	return err == nil
}

// revokeAtNode asks the node daemon of dir to revoke one of its own agents (NAME.ZONE, its SPIFFE
// ID or serial:N) or the node itself: the node signs the record, stores it durably, cuts the
// subject off and gossips the record, with or without the authority.
func revokeAtNode(cmd *cobra.Command, dir, subject, reason string, asJSON bool) error {
	if reason == "" {
		return usagef("revoke needs --reason")
	}
	c, err := dialNode(cmd.Context(), dir)
	if err != nil {
		return err
	}
	defer func() { _ = c.Close() }()
	rev, err := c.Revoke(cmd.Context(), subject, reason)
	if err != nil {
		return err
	}
	if asJSON {
		return json.NewEncoder(cmd.OutOrStdout()).Encode(rev)
	}
	_, err = fmt.Fprintf(cmd.OutOrStdout(), "revoked %s (record signed by %s, durable, spreading by gossip)\n", rev.Subject, rev.Issuer)
	return err
}
