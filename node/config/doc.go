// Package config reads the node daemon's YAML configuration file (`ute node run --config FILE`),
// applies command-line overrides on top of it, and decides which changes a SIGHUP may apply to a
// running daemon (Config.ReloadPlan). docs/operations.md is the reference for every key.
//
// Owns: the schema, the defaults, strict parsing (unknown and duplicate keys, anchors, aliases,
// tags, merge keys, several documents, values of the wrong type or out of range, oversized or
// too deeply nested files are refused with file:line:column and the field's path) and the
// reloadable/restart-only split.
//
// It must never open sockets, start anything or read any file but the one it is given, never
// accept a metrics address that is not loopback, and never let a partly valid file through: a
// file either loads completely or not at all.
package config
