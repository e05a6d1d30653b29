// Package scenarios ships the simulator's example scenarios inside the binary, so that
// `ute sim run NAME` works without the source tree. It holds data only and must never run
// anything.
package scenarios

import "embed"

// FS holds every shipped scenario file (*.yaml).
//
//go:embed *.yaml
var FS embed.FS
