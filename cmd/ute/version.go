package main

import (
	"fmt"
	"runtime"
	"runtime/debug"
)

// version and commit are set by `make build` (-ldflags "-X main.version=…", from git describe); a plain
// `go build` falls back to the VCS stamp the Go toolchain records.
var version, commit = "", ""

// versionString is what `ute --version` prints: version, commit and Go toolchain.
func versionString() string {
	v, rev, modified := version, commit, ""
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				if rev == "" {
					rev = s.Value[:min(12, len(s.Value))]
				}
			case "vcs.modified":
				if s.Value == "true" {
					modified = "+dirty"
				}
			}
		}
		if v == "" {
			v = bi.Main.Version
		}
	}
	if v == "" || v == "(devel)" {
		v = "dev"
	}
	if rev == "" {
		rev = "unknown"
	}
	return fmt.Sprintf("%s (commit %s%s, %s %s/%s)", v, rev, modified, runtime.Version(), runtime.GOOS, runtime.GOARCH)
}
