package state

import (
	"crypto/ed25519"
	"net/netip"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity"
)

func replaceKey(t *testing.T, path string) {
	t.Helper()
	require.NoError(t, os.Remove(path))
	require.NoError(t, identity.WriteKey(path, mustKey(t)))
}

// A valid but different agent.key is never used nor certified again: every load of it goes
// through AgentKey, which checks it against agent.crt.
func TestSwappedAgentKeyNeverCertified(t *testing.T) {
	f := newFixture(t)
	ag, err := f.dir.AddAgent(AgentSpec{Name: "ledger", Zone: "payments", Exe: f.exe})
	require.NoError(t, err)
	key, err := f.dir.AgentKey("payments", "ledger")
	require.NoError(t, err, "the untouched pair loads")
	assert.True(t, ag.Cert.PublicKey().Equal(key.Public()))

	certBefore, err := os.ReadFile(ag.CertPath)
	require.NoError(t, err)
	replaceKey(t, ag.KeyPath)

	_, err = f.dir.AgentKey("payments", "ledger")
	require.ErrorIs(t, err, identity.ErrKeyMismatch)
	assert.Contains(t, err.Error(), ag.KeyPath)
	assert.Contains(t, err.Error(), ag.CertPath)

	_, err = f.dir.ReissueAgent("payments", "ledger")
	require.ErrorIs(t, err, identity.ErrKeyMismatch)
	assert.Contains(t, err.Error(), ag.KeyPath)
	certAfter, err := os.ReadFile(ag.CertPath)
	require.NoError(t, err)
	assert.Equal(t, certBefore, certAfter, "agent.crt is not reissued for the swapped key")
}

// A valid but different node.key is refused by every load of the node identity: the node key
// itself, and issuing an agent with it.
func TestSwappedNodeKeyRefused(t *testing.T) {
	f := newFixture(t)
	keyPath, certPath := filepath.Join(f.dir.Path(), FileNodeKey), filepath.Join(f.dir.Path(), FileNodeCert)
	replaceKey(t, keyPath)

	_, err := f.dir.NodeKey()
	require.ErrorIs(t, err, identity.ErrKeyMismatch)
	assert.Contains(t, err.Error(), keyPath)
	assert.Contains(t, err.Error(), certPath)
	_, _, err = f.dir.NodeIdentity()
	require.ErrorIs(t, err, identity.ErrKeyMismatch)

	_, err = f.dir.AddAgent(AgentSpec{Name: "ledger", Zone: "payments", Exe: f.exe})
	require.ErrorIs(t, err, identity.ErrKeyMismatch)
	assert.Contains(t, err.Error(), keyPath)
	assert.Contains(t, err.Error(), certPath)
}

// A renewal records the retiring key's handover to the new one, so what the old key signed (the
// audit head) stays verifiable from node.crt; a swapped node.key cannot sign one.
func TestInstallRenewalRecordsHandover(t *testing.T) {
	f := newFixture(t)
	oldKey, err := f.dir.NodeKey()
	require.NoError(t, err)
	grants := []identity.ZoneGrant{{Name: "payments", Prefixes: []netip.Prefix{netip.MustParsePrefix("100.100.1.0/24")}}}
	newKey := mustKey(t)
	renewed := f.issueNode(t, newKey, grants)
	require.NoError(t, f.dir.InstallRenewal(newKey, renewed.Raw(), f.issuerFor(t, renewed, newKey).Raw()))

	hist, err := f.dir.KeyHistory()
	require.NoError(t, err)
	require.Len(t, hist, 1)
	from, to, err := hist[0].Keys()
	require.NoError(t, err)
	assert.True(t, from.Equal(oldKey.Public()))
	assert.True(t, to.Equal(newKey.Public()))
	chain := identity.Predecessors(newKey.Public().(ed25519.PublicKey), hist)
	require.Len(t, chain, 2)

	// With node.key swapped, the renewal is refused before anything is installed.
	replaceKey(t, filepath.Join(f.dir.Path(), FileNodeKey))
	next := mustKey(t)
	nextCert := f.issueNode(t, next, grants)
	err = f.dir.InstallRenewal(next, nextCert.Raw(), f.issuerFor(t, nextCert, next).Raw())
	require.ErrorIs(t, err, identity.ErrKeyMismatch)
	hist, err = f.dir.KeyHistory()
	require.NoError(t, err)
	assert.Len(t, hist, 1)
}
