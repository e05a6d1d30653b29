package tunnel

import "sync/atomic"

// Stats is a snapshot of an endpoint's counters (the node exports them to Prometheus).
type Stats struct {
	TunnelsOpened     uint64 // tunnels established, both directions
	HandshakesRefused uint64 // handshakes this endpoint refused (peer failed verification)
	DialFailures      uint64 // dial attempts that failed
	FlowsAdmitted     uint64 // inbound flows the Admitter accepted
	FlowsDenied       uint64 // inbound flows refused (Admitter or limits) with a Reject
	FlowsDropped      uint64 // inbound streams dropped before admission: garbage, truncated, oversized, slow
	FlowsExpired      uint64 // inbound flows closed by idle expiry
	DatagramsDropped  uint64 // datagrams for unknown/unadmitted flow ids, malformed, or over a full queue
	// ControlStreams counts inbound control streams handed to Config.ControlHandler.
	ControlStreams uint64
	// ControlStreamsRefused counts inbound control streams reset: no ControlHandler, or over
	// Limits.MaxControlStreams on their tunnel.
	ControlStreamsRefused uint64
	// ControlDatagrams counts datagrams handed to Config.ControlDatagram.
	ControlDatagrams uint64
	// ControlDatagramsDropped counts control datagrams dropped for want of a ControlDatagram
	// handler (they are counted in DatagramsDropped too).
	ControlDatagramsDropped uint64
	// FlowsStalled counts inbound streams reset because their first frame missed its deadline
	// (also counted in FlowsDropped); StreamsBusy those reset at once over a pending budget;
	// TunnelsBusy inbound tunnels closed over a per-peer or per-source connection cap (budget.go).
	FlowsStalled uint64
	StreamsBusy  uint64
	TunnelsBusy  uint64
	// TunnelsIdleClosed counts tunnels that carried only control traffic closed after
	// Limits.GossipIdleTimeout of silence (idle.go).
	TunnelsIdleClosed uint64
	Tunnels           int // tunnels open now
	ActiveFlows       int // inbound flows in the flow table now
	// PendingStreams is the number of inbound streams waiting for their first frame or verdict now.
	PendingStreams int
}

type counters struct {
	tunnelsOpened, handshakesRefused, dialFailures     atomic.Uint64
	admitted, denied, dropped, expired, datagramsDrops atomic.Uint64

	controlStreams, controlRefused, controlDatagrams, controlDatagramDrops atomic.Uint64

	stalled, busyStreams, busyTunnels atomic.Uint64

	idleClosed atomic.Uint64
}

func (c *counters) snapshot() Stats {
	return Stats{
		TunnelsOpened:     c.tunnelsOpened.Load(),
		HandshakesRefused: c.handshakesRefused.Load(),
		DialFailures:      c.dialFailures.Load(),
		FlowsAdmitted:     c.admitted.Load(),
		FlowsDenied:       c.denied.Load(),
		FlowsDropped:      c.dropped.Load(),
		FlowsExpired:      c.expired.Load(),
		DatagramsDropped:  c.datagramsDrops.Load(),

		ControlStreams:          c.controlStreams.Load(),
		ControlStreamsRefused:   c.controlRefused.Load(),
		ControlDatagrams:        c.controlDatagrams.Load(),
		ControlDatagramsDropped: c.controlDatagramDrops.Load(),

		FlowsStalled: c.stalled.Load(),
		StreamsBusy:  c.busyStreams.Load(),
		TunnelsBusy:  c.busyTunnels.Load(),

		TunnelsIdleClosed: c.idleClosed.Load(),
	}
}
