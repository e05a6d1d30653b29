package state

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The renewal key is staged on disk before the request is sent and survives a restart (Open), so
// that a renewal whose response was lost is retried for the same key; installing the renewal
// consumes it.
func TestRenewalKeyIsStagedUntilInstalled(t *testing.T) {
	f := newFixture(t)
	p := f.dir.Path()
	staged := filepath.Join(p, FileNodeKey+suffixNext)

	k1, err := f.dir.RenewalKey()
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), permOf(t, staged))
	k2, err := f.dir.RenewalKey()
	require.NoError(t, err)
	assert.True(t, k1.Equal(k2), "a second call returns the staged key")

	// Restart: Open must keep a staged key that has no staged certificate beside it.
	d, err := Open(p)
	require.NoError(t, err)
	k3, err := d.RenewalKey()
	require.NoError(t, err)
	assert.True(t, k1.Equal(k3), "the staged key survives Open")
	cur, err := d.NodeKey()
	require.NoError(t, err)
	assert.False(t, cur.Equal(k1), "staging never touches the installed key")

	old, err := d.NodeCert()
	require.NoError(t, err)
	renewed := f.issueNode(t, k1, old.Claims.Zones)
	require.NoError(t, d.InstallRenewal(k1, renewed.Raw(), f.issuerFor(t, renewed, k1).Raw()))
	assert.NoFileExists(t, staged, "installing consumes the staged key")
	installed, err := d.NodeKey()
	require.NoError(t, err)
	assert.True(t, installed.Equal(k1))

	k4, err := d.RenewalKey()
	require.NoError(t, err)
	assert.False(t, k4.Equal(k1), "the next renewal gets a fresh key")
}

// A staged key damaged on disk is replaced rather than failing every later renewal: it never
// reached a certificate the node could use.
func TestRenewalKeyReplacesDamagedStagedKey(t *testing.T) {
	f := newFixture(t)
	staged := filepath.Join(f.dir.Path(), FileNodeKey+suffixNext)
	require.NoError(t, os.WriteFile(staged, []byte("not a key"), 0o600))
	k, err := f.dir.RenewalKey()
	require.NoError(t, err)
	again, err := f.dir.RenewalKey()
	require.NoError(t, err)
	assert.True(t, k.Equal(again))
}

func permOf(t *testing.T, path string) os.FileMode {
	t.Helper()
	st, err := os.Stat(path)
	require.NoError(t, err)
	return st.Mode().Perm()
}
