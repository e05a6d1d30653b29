package identity

import (
	"crypto/sha256"
	"encoding/binary"
	"sync"
)

// SignatureCache remembers certificate signatures that verified, so a node admitting many flows
// from the same agents pays for the two Ed25519 verifications of a chain once. Only successes are
// stored; a signature's validity does not depend on time, and the entry is keyed by exactly what
// was verified (issuer public key, signed bytes, signature), so a hit proves the same thing a fresh
// verification would. Time, zone and CIDR checks are not cached. Safe for concurrent use; the
// oldest entries are evicted first once the cache is full.
type SignatureCache struct {
	mu   sync.Mutex
	seen map[[32]byte]struct{}
	ring [][32]byte
	next int
}

// NewSignatureCache returns a cache holding at most size signatures (minimum 1).
func NewSignatureCache(size int) *SignatureCache {
	size = max(size, 1)
	return &SignatureCache{seen: make(map[[32]byte]struct{}, size), ring: make([][32]byte, 0, size)}
}

// Len returns the number of cached signatures.
func (c *SignatureCache) Len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.seen)
}

func sigKey(pub, signed, sig []byte) [32]byte {
	h := sha256.New()
	var n [4]byte
	for _, part := range [][]byte{pub, signed, sig} {
		binary.BigEndian.PutUint32(n[:], uint32(len(part)))
		h.Write(n[:])
		h.Write(part)
	}
	var k [32]byte
	h.Sum(k[:0])
	return k
}

func (c *SignatureCache) has(k [32]byte) bool {
	if c == nil {
		return false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	_, ok := c.seen[k]
	return ok
}

func (c *SignatureCache) add(k [32]byte) {
	if c == nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.seen[k]; ok {
		return
	}
	if len(c.ring) < cap(c.ring) {
		c.ring = append(c.ring, k)
	} else {
		delete(c.seen, c.ring[c.next])
		c.ring[c.next] = k
		c.next = (c.next + 1) % len(c.ring)
	}
	c.seen[k] = struct{}{}
}
