// Package zones owns the model of virtual trust zones (VTZs) and is the one place where UTE makes
// allow/deny decisions: tunnels between nodes, flows between agents, what trust and drift do to a
// subject, and what a policy reload must tear down.
//
// A policy is loaded from strict YAML (Parse, Load) or built in Go (New); either way it is validated
// completely and compiled into per-zone indexes, after which it is immutable and safe for concurrent
// use. Parsing is bounded: before the YAML library builds a tree, a document nested deeper than
// MaxDepth is refused (ErrTooDeep), so no policy file can exhaust a node's memory. Every decision returns a machine-readable Reason and a human sentence, and every decision
// fails closed: a nil policy, an unknown zone, an empty name, a missing region or an absent trust
// score is a denial, never an allow.
//
// It is pure: it must never perform I/O beyond Load reading the one file it is given, never read a
// clock (time is passed in), never keep mutable global state, and never allow a flow between zones.
// The caller fills the subject structs (Node, Agent, Score) from verified certificates and the
// revocation store; this package trusts those structs and nothing else.
package zones
