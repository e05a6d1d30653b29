package identity

import (
	"crypto/ed25519"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestPredecessorsFollowsVerifiedHandoversOnly(t *testing.T) {
	k1, k2, k3, mallory := mustKey(t), mustKey(t), mustKey(t), mustKey(t)
	pub := func(k ed25519.PrivateKey) ed25519.PublicKey { return k.Public().(ed25519.PublicKey) }
	h12, h23 := SignHandover(k1, pub(k2)), SignHandover(k2, pub(k3))

	got := Predecessors(pub(k3), []Handover{h12, h23})
	require.Len(t, got, 3)
	assert.True(t, got[1].Equal(pub(k2)))
	assert.True(t, got[2].Equal(pub(k1)))

	// A handover the retiring key did not sign proves nothing: mallory claims to precede k3.
	forged := SignHandover(mallory, pub(k3))
	forged.From = h23.From // claims to be k2's, signed by mallory
	_, _, err := forged.Keys()
	require.ErrorIs(t, err, ErrHandover)
	assert.Len(t, Predecessors(pub(k3), []Handover{forged}), 1)

	// A handover leading elsewhere, loops and junk are ignored.
	loop := SignHandover(k3, pub(k1))
	assert.Len(t, Predecessors(pub(k3), []Handover{h12, h23, loop, {From: "zz"}}), 3)
	assert.Len(t, Predecessors(pub(k2), []Handover{h23}), 1, "k3's handover does not precede k2")
}
