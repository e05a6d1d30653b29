package state

import (
	"net/netip"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity"
)

// Bad input to AddAgent (here a label the claims extension refuses) must be harmless (I8): a clear
// error, and no half-made agent left behind that would break listing every agent, block the name
// or burn an overlay IP.
func TestAddAgentBadLabelLeavesNoTrace(t *testing.T) {
	f := newFixture(t)
	_, err := f.dir.AddAgent(AgentSpec{Name: "ledger", Zone: "payments", Exe: f.exe, Labels: map[string]string{"Team": "risk"}})
	require.ErrorIs(t, err, identity.ErrClaims)
	assert.Contains(t, err.Error(), `label key "Team"`)

	agents, err := f.dir.Agents()
	require.NoError(t, err, "a refused agent must not break the listing")
	assert.Empty(t, agents)
	_, err = os.Stat(filepath.Join(f.dir.Path(), DirAgents, "payments", "ledger"))
	assert.ErrorIs(t, err, os.ErrNotExist)

	ag, err := f.dir.AddAgent(AgentSpec{Name: "ledger", Zone: "payments", Exe: f.exe, Labels: map[string]string{"team": "risk"}})
	require.NoError(t, err, "the name is still free")
	assert.Equal(t, netip.MustParseAddr("100.100.1.1"), ag.IP, "the refused attempt burnt no address")
}

// A crash while an agent is being written (simulated: a staging directory left behind) must not
// break the listing of the agents that were completed.
func TestAgentsIgnoresUnfinishedAgent(t *testing.T) {
	f := newFixture(t)
	_, err := f.dir.AddAgent(AgentSpec{Name: "ledger", Zone: "payments", Exe: f.exe})
	require.NoError(t, err)
	stale := filepath.Join(f.dir.Path(), DirAgents, "payments", ".billing.tmp-123")
	require.NoError(t, os.MkdirAll(stale, 0o700))

	agents, err := f.dir.Agents()
	require.NoError(t, err)
	require.Len(t, agents, 1)
	assert.Equal(t, "ledger", agents[0].Name)
}

// Agent lookups take names from callers (local API, CLI): a name that is not a label must be
// refused before it becomes a path.
func TestAgentRefusesPathNames(t *testing.T) {
	f := newFixture(t)
	for _, name := range []string{"../../node", "..", "a/b", ""} {
		_, err := f.dir.Agent("payments", name)
		require.ErrorIs(t, err, identity.ErrSPIFFEID, name)
		_, err = f.dir.AgentKey("payments", name)
		require.ErrorIs(t, err, identity.ErrSPIFFEID, name)
		_, err = f.dir.Agent(name, "ledger")
		require.ErrorIs(t, err, identity.ErrSPIFFEID, name)
	}
}
