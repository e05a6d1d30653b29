package state

import (
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity"
)

const (
	tokA = "aaaaaaaaaaaaaaaa"
	tokB = "bbbbbbbbbbbbbbbb"
)

// The join key is staged on disk (0600) before the request is sent and is returned again for the
// same token, also by a later process (a new Create), so that a join whose answer was lost is
// retried for the same key; SaveJoin consumes it.
func TestJoinKeyIsStagedUntilJoined(t *testing.T) {
	f := &fixture{caKey: mustKey(t), now: time.Now()}
	var err error
	f.ca, err = identity.NewAuthority("acme.internal", f.caKey, f.now.Add(-time.Hour), 24*365*time.Hour)
	require.NoError(t, err)
	path := filepath.Join(t.TempDir(), "node")
	d, err := Create(path)
	require.NoError(t, err)

	k1, fresh, err := d.JoinKey(tokA)
	require.NoError(t, err)
	assert.True(t, fresh)
	assert.Equal(t, os.FileMode(0o600), permOf(t, JoinKeyFile(path, tokA)))

	d2, err := Create(path) // the retry, in another process
	require.NoError(t, err)
	k2, fresh, err := d2.JoinKey(tokA)
	require.NoError(t, err)
	assert.False(t, fresh)
	assert.True(t, k1.Equal(k2), "the retry gets the staged key")

	ok, err := d2.HasStagedJoinKey()
	require.NoError(t, err)
	assert.True(t, ok)

	node := f.issueNode(t, k2, []identity.ZoneGrant{{Name: "payments", Prefixes: []netip.Prefix{netip.MustParsePrefix("100.100.1.0/28")}}})
	require.NoError(t, d2.SaveJoin(Joined{
		Key: k2, NodeCert: node.Raw(), IssuerCert: f.issuerFor(t, node, k2).Raw(), AuthorityCert: f.ca.Raw(), Policy: []byte("zones: []\n"),
		Info: Info{Name: "n1", TrustDomain: "acme.internal", Authority: "127.0.0.1:7443", JoinedAt: f.now},
	}))
	assert.NoFileExists(t, JoinKeyFile(path, tokA), "the join consumed the staged key")
	_, _, err = d2.JoinKey(tokA)
	require.ErrorIs(t, err, ErrAlreadyJoined, "a completed join is never redone")
	_, err = Create(path)
	require.ErrorIs(t, err, ErrAlreadyJoined)
}

// A key staged for one token is neither reused for another token (two identities would share a
// key) nor replaced (the first join may have completed, and the key is the only way to collect
// its certificate).
func TestJoinKeyOfAnotherTokenIsKept(t *testing.T) {
	path := filepath.Join(t.TempDir(), "node")
	d, err := Create(path)
	require.NoError(t, err)
	k1, _, err := d.JoinKey(tokA)
	require.NoError(t, err)

	_, _, err = d.JoinKey(tokB)
	require.ErrorIs(t, err, ErrJoinPending)
	assert.ErrorContains(t, err, "token id "+tokA)
	assert.ErrorContains(t, err, JoinKeyFile(path, tokA))
	kept, err := identity.ReadKey(JoinKeyFile(path, tokA))
	require.NoError(t, err)
	assert.True(t, k1.Equal(kept))
	assert.NoFileExists(t, JoinKeyFile(path, tokB))

	require.NoError(t, d.DiscardJoinKey(tokA))
	assert.NoFileExists(t, JoinKeyFile(path, tokA))
	require.NoError(t, d.DiscardJoinKey(tokA), "discarding twice is harmless")
	k3, fresh, err := d.JoinKey(tokB)
	require.NoError(t, err)
	assert.True(t, fresh)
	assert.False(t, k3.Equal(k1))
}

// A token id is part of a file name: one that could name another file is refused.
func TestJoinKeyRefusesUnsafeTokenID(t *testing.T) {
	d, err := Create(filepath.Join(t.TempDir(), "node"))
	require.NoError(t, err)
	for _, id := range []string{"", "../../etc/x", "a/b", "a.b", "AAAA0000"} {
		_, _, err := d.JoinKey(id)
		require.Error(t, err, id)
		require.Error(t, d.DiscardJoinKey(id), id)
	}
}

// A staged key left beside node.crt (a crash between writing node.crt and removing the staged
// key) is dropped by Open: node.key is that key.
func TestOpenDropsLeftoverJoinKey(t *testing.T) {
	f := newFixture(t)
	p := f.dir.Path()
	require.NoError(t, identity.WriteKey(JoinKeyFile(p, tokA), mustKey(t)))
	_, err := Open(p)
	require.NoError(t, err)
	assert.NoFileExists(t, JoinKeyFile(p, tokA))
}
