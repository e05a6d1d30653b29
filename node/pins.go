//go:build tools

// This file never builds (the tools tag is never set). It keeps go.mod's pins of the modules the
// design card fixes for the node's next parts (gossip over hashicorp/memberlist, the WireGuard
// transport and gVisor netstack from wireguard-go, Prometheus metrics) stable under `go mod tidy`
// until the code that uses them lands, so that every engineer builds against the same versions.
package node

import (
	_ "github.com/hashicorp/memberlist"
	_ "github.com/prometheus/client_golang/prometheus"
	_ "golang.zx2c4.com/wireguard/device"
	_ "golang.zx2c4.com/wireguard/tun/netstack"
)
