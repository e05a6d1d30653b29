package main

import (
	"crypto/ed25519"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/node/state"
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

// auditView is the --json report: the library's report, with ok meaning what the exit status
// means (a chain that verifies, a head that anchors every entry, nothing set aside, unless
// --allow-unanchored-tail accepts the last two).
type auditView struct {
	audit.Report
	HeadAnchored bool `json:"head_anchored"` // every entry is covered by the signed head
	OK           bool `json:"ok"`
}

func newAuditVerifyCmd() *cobra.Command {
	var (
		dir                 string
		asJSON, allowUnanch bool
	)
	cmd := &cobra.Command{
		Use:   "verify --dir N [--json] [--allow-unanchored-tail]",
		Short: "Verify the audit log's hash chain and signed head; exit 1 naming the first edited, removed, reordered, truncated or unanchored entry",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if dir == "" {
				return usagef("audit verify needs --dir (the node directory or the directory holding %s)", audit.LogFile)
			}
			logDir := auditDir(dir)
			keys, err := nodeKeys(dir, logDir)
			if err != nil {
				return err
			}
			var rep audit.Report
			if keys != nil {
				rep, err = audit.VerifyWithKeys(logDir, keys...)
			} else {
				rep, err = audit.Verify(logDir)
			}
			if errors.Is(err, audit.ErrNoLog) {
				return fmt.Errorf("no audit log under %s: pass the node directory (--dir) that holds audit/%s", dir, audit.LogFile)
			}
			v := auditView{Report: rep, HeadAnchored: err == nil && rep.Unanchored == 0}
			v.OK = err == nil && (allowUnanch || (rep.Unanchored == 0 && len(rep.Aside) == 0))
			out := cmd.OutOrStdout()
			if asJSON {
				enc := json.NewEncoder(out)
				enc.SetIndent("", "  ")
				if jerr := enc.Encode(v); jerr != nil {
					return fmt.Errorf("write report: %w", jerr)
				}
			}
			if err != nil {
				if errors.Is(err, audit.ErrHeadSignature) {
					return fmt.Errorf("audit log %s: head not signed by the key of %s nor by an earlier key that handed over to it (%s): the head was forged, or the log cut and re-anchored: %w",
						logDir, filepath.Join(dir, nodeCertFile), state.FileKeyHistory, err)
				}
				var ve *audit.VerifyError
				if errors.As(err, &ve) {
					return fmt.Errorf("audit log %s is tampered or damaged: %w", logDir, err)
				}
				return fmt.Errorf("audit log %s: %w", logDir, err)
			}
			if !v.OK {
				return unanchoredError(logDir, rep)
			}
			if !asJSON {
				signed := "head not signature-checked (pass the node directory to check it against node.crt)"
				if rep.Key != "" {
					signed = "head signed by the node key (" + rep.Key[:16] + "…)"
				}
				fmt.Fprintf(out, "audit log %s: ok, %d entries (%d anchored by the head, %d unanchored), %s, last hash %s%s\n",
					logDir, rep.Entries, rep.Anchored, rep.Unanchored, signed, rep.LastHash, asideNote(rep))
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "node directory (or the directory holding "+audit.LogFile+")")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the verification report as JSON")
	cmd.Flags().BoolVar(&allowUnanch, "allow-unanchored-tail", false,
		"accept entries after the last signed head and parts the node set aside (a running node flushes every 100 ms; anything else was written by someone without its key)")
	return cmd
}

// unanchoredError says what cannot be verified: entries after the signed head, and parts the node
// set aside because it could not verify them.
func unanchoredError(logDir string, rep audit.Report) error {
	var parts []string
	if rep.Unanchored > 0 {
		parts = append(parts, fmt.Sprintf("%d entries after the last signed head (entries %d to %d) are unanchored: written by someone without the node key, or by a running node since its last flush",
			rep.Unanchored, rep.Anchored+1, rep.Entries))
	}
	for _, a := range rep.Aside {
		parts = append(parts, fmt.Sprintf("%s (%d lines) was set aside by the node because it could not verify it", a.File, a.Entries))
	}
	return fmt.Errorf("audit log %s: %s; inspect them, then pass --allow-unanchored-tail to accept", logDir, strings.Join(parts, "; "))
}

func asideNote(rep audit.Report) string {
	if len(rep.Aside) == 0 {
		return ""
	}
	return fmt.Sprintf(" (accepted: %d part(s) set aside)", len(rep.Aside))
}

// nodeCertFile is the node certificate inside a node directory (node/state.FileNodeCert).
const nodeCertFile = "node.crt"

// nodeKeys returns the keys whose signature on the audit head is accepted when dir is a node
// directory: node.crt's key and the earlier keys that handed over to it at renewal, so a log
// whose head the previous key signed verifies after `ute node renew`. nil for a bare log
// directory.
func nodeKeys(dir, logDir string) ([]ed25519.PublicKey, error) {
	pub, err := nodePublicKey(dir, logDir)
	if err != nil || pub == nil {
		return nil, err
	}
	hist, err := state.ReadKeyHistory(dir)
	if err != nil {
		return nil, fmt.Errorf("read the key history to check the audit head's signature: %w", err)
	}
	return identity.Predecessors(pub, hist), nil
}

// nodePublicKey returns the key the node signs its audit heads with, when dir is a node directory
// (the log in dir/audit, the certificate in dir/node.crt); nil when dir is a bare log directory.
// A node directory whose certificate cannot be read is an error, not a silent unsigned check.
func nodePublicKey(dir, logDir string) (ed25519.PublicKey, error) {
	if logDir == dir {
		return nil, nil
	}
	path := filepath.Join(dir, nodeCertFile)
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	certs, err := identity.ReadCertificates(path)
	if err != nil || len(certs) == 0 {
		return nil, fmt.Errorf("read the node certificate %s to check the audit head's signature: %w", path, errors.Join(err, errNoCert(len(certs))))
	}
	pub, ok := certs[0].X509.PublicKey.(ed25519.PublicKey)
	if !ok {
		return nil, fmt.Errorf("node certificate %s has no Ed25519 key", path)
	}
	return pub, nil
}

func errNoCert(n int) error {
	if n == 0 {
		return errors.New("no certificate in the file")
	}
	return nil
}
