// Package metrics holds the node daemon's Prometheus metrics on a registry of its own (never the
// global one, so two nodes in one process or a test never share counters) and serves them on a
// loopback address.
//
// Owns: the metric names, labels and buckets (docs/operations.md lists them), the update
// methods the daemon calls, and the HTTP listener for /metrics.
//
// It must never serve on an address other hosts can reach, never take labels from unbounded
// input (agent names, addresses or error strings: reasons come from a fixed set the caller
// owns), and never block the caller: every update is a few atomic operations.
package metrics
