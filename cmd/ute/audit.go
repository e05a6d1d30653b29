package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/ute-project/ute/overlay/audit"
)

// newAuditCmd groups the commands over a node's tamper-evident audit log.
func newAuditCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "audit",
		Short: "Check a node's tamper-evident audit log",
	}
	cmd.AddCommand(newAuditVerifyCmd())
	return cmd
}

// auditDir accepts either the node directory (whose log lives in <dir>/audit) or the log directory
// itself, so the operator can point at whichever they know.
func auditDir(dir string) string {
	if _, err := os.Stat(filepath.Join(dir, audit.LogFile)); err == nil {
		return dir
	}
	return filepath.Join(dir, "audit")
}

func newAuditVerifyCmd() *cobra.Command {
	var (
		dir    string
		asJSON bool
	)
	cmd := &cobra.Command{
		Use:   "verify --dir N [--json]",
		Short: "Verify the audit log's hash chain; exit 1 naming the first edited, removed, reordered or truncated entry",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if dir == "" {
				return usagef("audit verify needs --dir (the node directory or the directory holding %s)", audit.LogFile)
			}
			logDir := auditDir(dir)
			rep, err := audit.Verify(logDir)
			if errors.Is(err, audit.ErrNoLog) {
				return fmt.Errorf("no audit log under %s: pass the node directory (--dir) that holds audit/%s", dir, audit.LogFile)
			}
			out := cmd.OutOrStdout()
			if asJSON {
				enc := json.NewEncoder(out)
				enc.SetIndent("", "  ")
				if jerr := enc.Encode(rep); jerr != nil {
					return fmt.Errorf("write report: %w", jerr)
				}
			}
			if err != nil {
				var ve *audit.VerifyError
				if errors.As(err, &ve) {
					return fmt.Errorf("audit log %s is tampered or damaged: %w", logDir, err)
				}
				return fmt.Errorf("audit log %s: %w", logDir, err)
			}
			if !asJSON {
				fmt.Fprintf(out, "audit log %s: ok, %d entries (%d anchored by the head, %d pending anchor), last hash %s\n",
					logDir, rep.Entries, rep.Anchored, rep.Unanchored, rep.LastHash)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "node directory (or the directory holding "+audit.LogFile+")")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the verification report as JSON")
	return cmd
}
