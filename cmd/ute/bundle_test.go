package main

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity"
)

// `ute authority bundle` exports the trust bundle in the SPIFFE bundle format and as PEM; both
// parse with go-spiffe and hold exactly the authority certificate.
func TestAuthorityBundleExport(t *testing.T) {
	tmp := t.TempDir()
	authDir, policy := filepath.Join(tmp, "auth"), filepath.Join(tmp, "policy.yaml")
	require.NoError(t, os.WriteFile(policy, []byte(cliPolicy), 0o644))
	runCLI(t, "authority", "init", "--dir", authDir, "--trust-domain", "acme.internal", "--policy", policy).ok(t)
	anchor, err := identity.ReadCertificates(filepath.Join(authDir, "authority.crt"))
	require.NoError(t, err)
	td := spiffeid.RequireTrustDomainFromString("acme.internal")

	r := runCLI(t, "authority", "bundle", "--dir", authDir, "--refresh-hint", "5m")
	require.Equal(t, 0, r.code, r.stderr)
	b, err := spiffebundle.Parse(td, []byte(r.stdout))
	require.NoError(t, err)
	require.Len(t, b.X509Authorities(), 1)
	assert.Equal(t, anchor[0].Raw(), b.X509Authorities()[0].Raw)
	hint, ok := b.RefreshHint()
	require.True(t, ok)
	assert.Equal(t, 5*time.Minute, hint)

	out := filepath.Join(tmp, "bundle.pem")
	msg := runCLI(t, "authority", "bundle", "--dir", authDir, "--format", "pem", "--out", out).ok(t)
	assert.Contains(t, msg, "written to "+out)
	pb, err := x509bundle.Load(td, out)
	require.NoError(t, err)
	assert.True(t, pb.HasX509Authority(anchor[0].X509))

	runCLI(t, "authority", "bundle", "--dir", authDir, "--format", "jwks").fails(t, 2, `--format is "jwks"; use spiffe or pem`)
	runCLI(t, "authority", "bundle").fails(t, 2, "needs --dir")
	runCLI(t, "authority", "bundle", "--dir", authDir, "--format", "pem", "--refresh-hint", "1m").fails(t, 2, "needs --format spiffe")
	runCLI(t, "authority", "bundle", "--dir", tmp).fails(t, 1, filepath.Join(tmp, "authority.crt"))
}
