// Package overlay is UTE's data plane: zone-scoped QUIC tunnels between nodes, DTL provenance
// records on every flow, flow admission and the flow table, and the virtual interfaces agents use.
//
// It must never deliver a byte of a flow before the flow's DTL record is verified and admitted, and
// never decide policy itself: decisions come from package zones, identities from package identity.
package overlay
