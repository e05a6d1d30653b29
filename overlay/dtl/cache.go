package dtl

import "sync"

// DefaultChainCacheSize bounds a session's chain cache when NewChainCache gets a non-positive size.
const DefaultChainCacheSize = 256

// ChainCache remembers the chains admitted on one session, keyed by CertChain.Hash, so that later
// records may carry the 32-byte hash instead of about 1 KiB of certificates. It is bounded (oldest
// entry evicted first) and safe for concurrent use. The sender switches to the hash only after an
// accept for a record with the full chain, and falls back to the full chain on ReasonChainUnknown,
// so eviction costs bytes, never correctness.
type ChainCache struct {
	mu      sync.Mutex
	max     int
	entries map[[HashLen]byte]cacheEntry
	order   [][HashLen]byte // insertion order, for FIFO eviction
}

type cacheEntry struct {
	chain CertChain
	info  AgentInfo
}

// NewChainCache returns an empty cache holding at most max chains. The map grows on demand: a
// tunnel sees a handful of chains, and sizing it for max cost about 38 KB per tunnel end (a
// heap profile of 100 simulated nodes).
func NewChainCache(max int) *ChainCache {
	if max <= 0 {
		max = DefaultChainCacheSize
	}
	return &ChainCache{max: max, entries: make(map[[HashLen]byte]cacheEntry)}
}

// Len reports how many chains are cached.
func (c *ChainCache) Len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.entries)
}

func (c *ChainCache) get(h [HashLen]byte) (cacheEntry, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.entries[h]
	return e, ok
}

// put stores a copy of *info (taken by pointer to keep a large copy out of the caller's frame).
func (c *ChainCache) put(chain *CertChain, info *AgentInfo) {
	h := chain.Hash()
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.entries[h]; ok {
		c.entries[h] = cacheEntry{chain: *chain, info: *info}
		return
	}
	for len(c.order) >= c.max {
		delete(c.entries, c.order[0])
		c.order = c.order[1:]
	}
	c.entries[h] = cacheEntry{chain: *chain, info: *info}
	c.order = append(c.order, h)
}

// KnownChains is the sender's side of chain caching: the hashes the peer has admitted on this
// session. Safe for concurrent use; bounded like ChainCache so both sides forget at the same rate.
type KnownChains struct {
	mu    sync.Mutex
	max   int
	known map[[HashLen]byte]struct{}
	order [][HashLen]byte
}

// NewKnownChains returns an empty set holding at most max hashes.
func NewKnownChains(max int) *KnownChains {
	if max <= 0 {
		max = DefaultChainCacheSize
	}
	return &KnownChains{max: max, known: make(map[[HashLen]byte]struct{})}
}

// Known reports whether the peer admitted a record carrying this chain.
func (k *KnownChains) Known(h [HashLen]byte) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	_, ok := k.known[h]
	return ok
}

// Accepted records that the peer admitted a record carrying the chain with hash h.
func (k *KnownChains) Accepted(h [HashLen]byte) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if _, ok := k.known[h]; ok {
		return
	}
	for len(k.order) >= k.max {
		delete(k.known, k.order[0])
		k.order = k.order[1:]
	}
	k.known[h] = struct{}{}
	k.order = append(k.order, h)
}

// Forget drops h, after the peer answered ReasonChainUnknown for it.
func (k *KnownChains) Forget(h [HashLen]byte) {
	k.mu.Lock()
	defer k.mu.Unlock()
	delete(k.known, h)
	// The stale order entry is harmless: evicting an absent hash is a no-op.
}
