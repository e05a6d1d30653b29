package main

import (
	"crypto/ed25519"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/ute-project/ute/identity"
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
			pub, err := nodePublicKey(dir, logDir)
			if err != nil {
				return err
			}
			var rep audit.Report
			if pub != nil {
				rep, err = audit.VerifyWithKey(logDir, pub)
			} else {
				rep, err = audit.Verify(logDir)
			}
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
				if errors.Is(err, audit.ErrHeadSignature) {
					return fmt.Errorf("audit log %s: head not signed by the key of %s (forged head or cut log; if the node was renewed since it last ran, start it once and verify again): %w", logDir, filepath.Join(dir, nodeCertFile), err)
				}
				var ve *audit.VerifyError
				if errors.As(err, &ve) {
					return fmt.Errorf("audit log %s is tampered or damaged: %w", logDir, err)
				}
				return fmt.Errorf("audit log %s: %w", logDir, err)
			}
			if !asJSON {
				signed := "head not signature-checked (pass the node directory to check it against node.crt)"
				if pub != nil {
					signed = "head signed by the node key"
				}
				fmt.Fprintf(out, "audit log %s: ok, %d entries (%d anchored by the head, %d pending anchor), %s, last hash %s\n",
					logDir, rep.Entries, rep.Anchored, rep.Unanchored, signed, rep.LastHash)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "node directory (or the directory holding "+audit.LogFile+")")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the verification report as JSON")
	return cmd
}

// nodeCertFile is the node certificate inside a node directory (node/state.FileNodeCert).
const nodeCertFile = "node.crt"

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
