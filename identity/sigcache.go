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
	size int
}

// NewSignatureCache returns a cache holding at most size signatures (minimum 1). It grows as
// signatures are added instead of reserving size entries up front: a node reserved 4,096, about
// 470 KiB, whether its peers' agents were four or four thousand (the 1,000-node simulation:
// 28 % of the heap of 300 nodes at rest, docs/benchmarks.md).
func NewSignatureCache(size int) *SignatureCache {
	return &SignatureCache{seen: map[[32]byte]struct{}{}, size: max(size, 1)}
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
	if len(c.ring) < c.size {
		c.ring = append(c.ring, k)
	} else {
		delete(c.seen, c.ring[c.next])
		c.ring[c.next] = k
		c.next = (c.next + 1) % len(c.ring)
	}
	c.seen[k] = struct{}{}
}
