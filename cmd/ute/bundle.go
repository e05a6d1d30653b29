package main

import (
	"fmt"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/identity/authority"
)

// Trust bundle formats of `ute authority bundle`.
const (
	bundleSPIFFE = "spiffe"
	bundlePEM    = "pem"
)

func newAuthorityBundleCmd() *cobra.Command {
	var (
		dir, format, out string
		refresh          time.Duration
	)
	cmd := &cobra.Command{
		Use:   "bundle --dir D [--format spiffe|pem] [--out FILE]",
		Short: "Export the trust bundle (the authority certificate) for SPIFFE tools, as a SPIFFE bundle or PEM",
		Long: `Print the trust domain's trust bundle: the authority's root certificate, the one anchor every
node, issuing and agent certificate chains to. D is the authority directory, or a node directory
(both hold authority.crt). --format spiffe (the default) writes the SPIFFE bundle format, a JWK Set
with one x509-svid key per root (the input of go-spiffe's spiffebundle.Load, SPIRE's federation and
Envoy's SDS); --format pem writes the certificate as PEM (x509bundle.Load, openssl verify -CAfile).
Nodes present their node certificate alone; an agent's certificate travels with its node's issuing
certificate, the intermediate, so the bundle never lists issuing certificates. Reads no store: it
works while ` + "`ute authority run`" + ` runs.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if dir == "" {
				return usagef("authority bundle needs --dir (the authority or node directory)")
			}
			if format != bundleSPIFFE && format != bundlePEM {
				return usagef("authority bundle --format is %q; use spiffe or pem", format)
			}
			if refresh < 0 || (refresh > 0 && format != bundleSPIFFE) {
				return usagef("authority bundle --refresh-hint must be positive and needs --format spiffe")
			}
			anchors, err := identity.ReadCertificates(filepath.Join(dir, authority.FileCert))
			if err != nil {
				return fmt.Errorf("authority bundle: %w", err)
			}
			var doc []byte
			if format == bundlePEM {
				for _, a := range anchors {
					if a.ID.Kind != identity.KindAuthority || a.Issuing {
						return fmt.Errorf("authority bundle: %w: %s holds %s, not an authority certificate", identity.ErrNoTrustAnchor, filepath.Join(dir, authority.FileCert), a.ID)
					}
				}
				doc = identity.EncodePEM(anchors...)
			} else if doc, err = identity.MarshalSPIFFEBundle(anchors, 0, refresh); err != nil {
				return fmt.Errorf("authority bundle: %s: %w", filepath.Join(dir, authority.FileCert), err)
			}
			if out == "" {
				_, err := cmd.OutOrStdout().Write(doc)
				return err
			}
			if err := identity.WriteFileAtomic(out, doc, 0o644); err != nil {
				return fmt.Errorf("authority bundle: %w", err)
			}
			_, err = fmt.Fprintf(cmd.OutOrStdout(), "trust bundle of %s (%s, %d root) written to %s\n", anchors[0].ID.TrustDomain, format, len(anchors), out)
			return err
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "authority directory, or a node directory")
	cmd.Flags().StringVar(&format, "format", bundleSPIFFE, "spiffe (JWK Set, SPIFFE bundle format) or pem")
	cmd.Flags().StringVar(&out, "out", "", "write the bundle to this file (0644, atomically) instead of standard output")
	cmd.Flags().DurationVar(&refresh, "refresh-hint", 0, "spiffe_refresh_hint to advertise, e.g. 5m (default: none)")
	return cmd
}
