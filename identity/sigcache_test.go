package identity

import (
	"testing"

	"github.com/stretchr/testify/assert"
)

// The cache holds at most its size, evicts the oldest first, and reserves nothing up front.
func TestSignatureCacheBoundAndOrder(t *testing.T) {
	c := NewSignatureCache(3)
	assert.Zero(t, cap(c.ring), "nothing reserved before the first signature")
	keys := make([][32]byte, 5)
	for i := range keys {
		keys[i][0] = byte(i + 1)
		c.add(keys[i])
		c.add(keys[i]) // a signature added twice takes one entry
	}
	assert.Equal(t, 3, c.Len())
	assert.False(t, c.has(keys[0]), "the oldest evicted first")
	assert.False(t, c.has(keys[1]))
	for _, k := range keys[2:] {
		assert.True(t, c.has(k))
	}
	assert.Equal(t, 1, NewSignatureCache(0).size, "at least one entry")
}
