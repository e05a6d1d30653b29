//go:build tools

// This file never builds (the tools tag is never set). It keeps go.mod's pins of the modules the
// design card fixes for the node's next parts (the WireGuard transport and gVisor netstack from
// wireguard-go) stable under `go mod tidy` until the code that uses them lands, so that every
// engineer builds against the same versions.
package node

import (
	_ "golang.zx2c4.com/wireguard/device"
	_ "golang.zx2c4.com/wireguard/tun/netstack"
)
