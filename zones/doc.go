// Package zones owns the model of virtual trust zones (VTZs) and is the one place where UTE makes
// allow/deny decisions: tunnels between nodes, flows between agents, what trust and drift do to a
// subject, and what a policy reload must tear down.
//
// It is pure: it must never perform I/O beyond parsing the bytes it is given, never read a clock
// (time is passed in), and never keep mutable global state.
package zones
