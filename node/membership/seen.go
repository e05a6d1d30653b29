package membership

import (
	"crypto/sha256"
	"sync"
)

// seenKey names a record in one zone's pool: re-broadcast happens once per zone.
type seenKey struct {
	zone string
	hash [sha256.Size]byte
}

// seenSet is a bounded set of record hashes, oldest evicted first. Forgetting a record only
// costs one more Add (which the Records store answers isNew=false) and perhaps one more
// broadcast round, so a fixed bound is safe.
type seenSet struct {
	mu    sync.Mutex
	max   int
	set   map[seenKey]struct{}
	order []seenKey // ring buffer of insertion order
	next  int
}

func newSeenSet(max int) *seenSet {
	// Grown on demand: most nodes hold far fewer records than the bound.
	return &seenSet{max: max, set: make(map[seenKey]struct{})}
}

func (s *seenSet) has(k seenKey) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, ok := s.set[k]
	return ok
}

// add inserts k and reports whether it was absent.
func (s *seenSet) add(k seenKey) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.set[k]; ok {
		return false
	}
	if len(s.order) < s.max {
		s.order = append(s.order, k)
	} else {
		delete(s.set, s.order[s.next])
		s.order[s.next] = k
		s.next = (s.next + 1) % s.max
	}
	s.set[k] = struct{}{}
	return true
}
