//go:build race

package membership

import "time"

// heldWithin is how long the multi-node tests give a published record to reach every member. The
// design's 1 s holds without the race detector; under it, on 2 cores shared with the other
// packages' tests, the same gossip rounds run several times slower (docs/benchmarks.md has the
// real measurements).
const heldWithin = 3 * time.Second
