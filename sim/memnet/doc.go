// Package memnet is an in-memory packet network for the simulator: one net.PacketConn per
// simulated host, with per-link latency, jitter and loss and with partitions that can be set and
// healed while the network runs.
//
// It owns only the delivery of datagrams between its own conns; it must never open a real socket
// or send anything on a real network, and it must never look inside the packets it carries: the
// code under test (QUIC, gossip) runs unmodified on top of it.
//
// Determinism: every link draws its loss and jitter from its own PRNG seeded from the network's
// seed and the link's two addresses, so the n-th packet on a link meets the same fate in every run
// with the same seed. What is not deterministic is the order in which goroutines send (the Go
// scheduler), and the timers of the code above (quic-go and memberlist read the real clock).
package memnet
