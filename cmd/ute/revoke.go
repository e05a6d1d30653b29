package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/ute-project/ute/identity/authority"
)

func newRevokeCmd() *cobra.Command {
	var (
		dir, reason string
		asJSON      bool
		timeout     time.Duration
	)
	cmd := &cobra.Command{
		Use:   "revoke --dir D SUBJECT --reason TEXT",
		Short: "Revoke a node (spiffe://TD/node/NAME: all its live certificates) or one certificate (serial:N) at the authority",
		Long: `Revoke a node or one certificate at the authority. SUBJECT is a node SPIFFE ID
(spiffe://TD/node/NAME: every unexpired certificate issued to it) or serial:N. The revocation is
durable before the command returns and revoking twice is harmless. A revoked node can no longer
renew, and its name is free for a rejoin with a new token. Works while ` + "`ute authority run`" + ` runs
(through its admin socket) and when it does not (on the store directly).`,
		Args: func(_ *cobra.Command, args []string) error {
			if len(args) != 1 {
				return usagef("revoke takes one SUBJECT (spiffe://TD/node/NAME or serial:N), got %d arguments", len(args))
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			if dir == "" {
				return usagef("revoke needs --dir (the authority directory) and --reason")
			}
			// Syntax is checked here so that a malformed subject or reason is a usage error
			// (exit 2) whichever way the authority is reached; the authority checks again.
			if _, err := authority.ParseSubject(args[0]); err != nil && !errors.Is(err, authority.ErrAgentRevocation) {
				return usageError{err}
			}
			if err := authority.ValidateRevokeReason(reason); err != nil {
				return usageError{err}
			}
			adm, err := authority.OpenAdmin(cmd.Context(), dir, authority.Options{StoreTimeout: timeout})
			if err != nil {
				return err
			}
			defer func() { _ = adm.Close() }()
			rev, err := adm.Revoke(cmd.Context(), args[0], reason)
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if asJSON {
				return json.NewEncoder(out).Encode(rev)
			}
			_, err = fmt.Fprint(out, revocationText(rev))
			return err
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "authority directory")
	cmd.Flags().StringVar(&reason, "reason", "", "why (required; stored with the revocation and in the audit trail)")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the revoked serials as JSON")
	cmd.Flags().DurationVar(&timeout, "lock-timeout", time.Second, "how long to wait for the store when no daemon answers")
	return cmd
}

// revocationText is one line per serial, saying whether this command revoked it or it already was.
func revocationText(rev authority.Revocation) string {
	if len(rev.Serials) == 0 {
		return fmt.Sprintf("%s has no unexpired certificate; nothing to revoke\n", rev.Subject)
	}
	var b strings.Builder
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
	return b.String()
}
