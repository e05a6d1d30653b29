package node

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/node/state"
)

// swapKey replaces the key file at path with another valid Ed25519 key, mode 0600: what someone
// who can write the directory but does not hold the identity would do to take it over.
func swapKey(t *testing.T, path string) {
	t.Helper()
	k, err := identity.GenerateKey()
	require.NoError(t, err)
	require.NoError(t, os.Remove(path))
	require.NoError(t, identity.WriteKey(path, k))
}

// Issue 10 §2: a valid but different agent.key must be refused by `ute node renew` (which
// reissues every agent) and by the SDK, never certified.
func TestSwappedAgentKeyRefused(t *testing.T) {
	env := newRenewEnv(t)
	dir := env.join(t, "a", "ledger")
	agentDir := filepath.Join(dir, state.DirAgents, "payments", "ledger")
	keyPath, certPath := filepath.Join(agentDir, "agent.key"), filepath.Join(agentDir, "agent.crt")
	certBefore, err := os.ReadFile(certPath)
	require.NoError(t, err)
	swapKey(t, keyPath)

	// `ute node renew`: the node itself renews (its key is intact), the swapped agent is not
	// certified again.
	d, err := state.Open(dir)
	require.NoError(t, err)
	_, err = RenewDir(context.Background(), d, env.auth.addr, env.clk.Now)
	require.NoError(t, err)
	_, err = ReissueAgents(d)
	require.ErrorIs(t, err, identity.ErrKeyMismatch)
	assert.Contains(t, err.Error(), keyPath)
	assert.Contains(t, err.Error(), certPath)
	certAfter, err := os.ReadFile(certPath)
	require.NoError(t, err)
	assert.Equal(t, certBefore, certAfter, "no certificate was issued for the swapped key")

	// SDK use.
	n := env.open(t, dir, Config{})
	_, err = n.Agent("payments", "ledger")
	require.ErrorIs(t, err, identity.ErrKeyMismatch)
	assert.Contains(t, err.Error(), keyPath)
	assert.Contains(t, err.Error(), certPath)
}

// Issue 10 §2: a valid but different node.key must be refused at start and by renewal, before
// any request reaches the authority.
func TestSwappedNodeKeyRefused(t *testing.T) {
	env := newRenewEnv(t)
	dir := env.join(t, "a", "ledger")
	keyPath, certPath := filepath.Join(dir, state.FileNodeKey), filepath.Join(dir, state.FileNodeCert)
	swapKey(t, keyPath)

	_, err := Open(context.Background(), Config{Dir: dir, Clock: env.clk.Now})
	require.ErrorIs(t, err, identity.ErrKeyMismatch, "start")
	assert.Contains(t, err.Error(), keyPath)
	assert.Contains(t, err.Error(), certPath)

	d, err := state.Open(dir)
	require.NoError(t, err)
	_, err = RenewDir(context.Background(), d, env.auth.addr, env.clk.Now)
	require.ErrorIs(t, err, identity.ErrKeyMismatch, "renew")
	assert.Contains(t, err.Error(), keyPath)
	assert.Contains(t, err.Error(), certPath)
	_, err = os.Stat(keyPath + ".next")
	assert.ErrorIs(t, err, os.ErrNotExist, "no renewal key was staged: the request never left")
}
