package tunnel

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"time"

	"github.com/ute-project/ute/overlay/dtl"
)

// ALPNPrefix starts every tunnel ALPN value; the zone name follows it.
const ALPNPrefix = "ute/1/zone/"

// ALPN returns the ALPN protocol naming zone.
func ALPN(zone string) string { return ALPNPrefix + zone }

// zoneFromALPN is the inverse of ALPN.
func zoneFromALPN(proto string) (string, bool) {
	z, ok := strings.CutPrefix(proto, ALPNPrefix)
	return z, ok && z != ""
}

// Peer is a verified peer node as the PeerVerifier describes it.
type Peer struct {
	NodeID      string            // the node's SPIFFE ID, e.g. spiffe://acme.internal/node/n1
	Certificate *x509.Certificate // the peer's leaf certificate
	Info        any               // whatever the verifier wants the Admitter to see (e.g. *identity.Certificate)
}

// PeerVerifier decides whether a peer node may hold a tunnel for zone. rawCerts is the peer's
// certificate chain as sent in TLS, leaf first. It runs inside the TLS handshake on both sides; an
// error aborts the handshake. The node implements it with identity.Verifier, the revocation store
// and the zones tunnel decision.
type PeerVerifier interface {
	VerifyPeer(zone string, rawCerts [][]byte) (Peer, error)
}

// FlowRequest is what the receiving node knows about a flow before it is admitted.
type FlowRequest struct {
	Zone     string // the tunnel's zone
	Peer     Peer   // the tunnel's verified peer node
	Exporter []byte // the tunnel's TLS exporter value (the DTL session binding)
	Record   []byte // the DTL record exactly as received
}

// Admission is the Admitter's verdict on an admitted flow.
type Admission struct {
	Agent  string   // source agent identity, keyed for the per-agent limit; must not be empty
	Kind   FlowKind // from the verified record's protocol: KindStream (TCP) or KindPacket (UDP, ICMP)
	FlowID uint64   // the record's flow id; names the datagrams of a packet flow
	Local  net.Addr // overlay address of the destination (the conn's LocalAddr)
	Remote net.Addr // overlay address of the source agent (the conn's RemoteAddr)
	Info   any      // the verified record, handed to the handler (WhoIs)
}

// Verdict is the endpoint's final decision on one inbound flow stream, reported to
// Config.OnVerdict so that the node can audit every admission and every refusal, including the
// ones this package makes itself (unreadable or oversized first frames, flow-table limits, flow ids
// the peer may not use) and refusals after the Admitter approved the record.
type Verdict struct {
	Zone string // the tunnel's zone
	Peer Peer   // the tunnel's verified peer node
	// Record is the DTL record as received; nil when the stream never delivered a whole record
	// frame.
	Record []byte
	// Admission is what the Admitter returned, with a refusal too (its Info may then describe the
	// refused record); the zero value when the Admitter did not run.
	Admission Admission
	// Err is nil when the flow was admitted; otherwise why it was refused or dropped (matching the
	// dtl sentinel of its reason code with errors.Is).
	Err error
}

// Admitter verifies a flow's DTL record and decides whether the flow may be delivered. An error
// refuses the flow; a *dtl.Denial (or an error wrapping a dtl sentinel) chooses the reason code
// sent to the peer, anything else is sent as "internal". With an error, the returned Admission is
// never used to deliver anything; it is only passed on to Config.OnVerdict (for audit).
type Admitter interface {
	Admit(ctx context.Context, req FlowRequest) (Admission, error)
}

// Limits bounds the endpoint. Zero fields take the defaults listed.
type Limits struct {
	HandshakeTimeout time.Duration // per handshake attempt; default 3 s
	MaxIdleTimeout   time.Duration // QUIC idle timeout; default 30 s
	// GossipIdleTimeout closes a tunnel with no agent flow and no control stream open once
	// nothing has crossed it for this long (keep-alives do not count), instead of keeping it up
	// on keep-alives (idle.go); the next gossip message or flow dials again. Default 60 s;
	// negative: never. Endpoint.SetGossipIdlePolicy replaces it per tunnel (the node daemon
	// holds its tunnels across probe rounds in a small pool).
	GossipIdleTimeout time.Duration
	KeepAlivePeriod   time.Duration // QUIC keep-alive, sent by the dialing side only; default 15 s (quic-go caps it at half the idle timeout); negative: none
	FirstFrameTimeout time.Duration // time for a new stream to deliver its record; default 5 s
	AdmitTimeout      time.Duration // time the Admitter may take; default 5 s
	VerdictTimeout    time.Duration // time OpenFlow waits for accept/reject; default 10 s
	MaxRecordSize     int           // record frame cap; default dtl.MaxRecordSize
	MaxFlowsPerPeer   int           // concurrent inbound flows per peer node; default 4096
	MaxFlowsPerAgent  int           // concurrent inbound flows per source agent; default 1024
	FlowIdleTimeout   time.Duration // inbound flows idle this long are closed; default 5 min
	SweepInterval     time.Duration // how often idle flows are swept; default 10 s
	// MaxIncomingFlows is the concurrent QUIC streams a peer may open on one tunnel (its flows,
	// admitted or pending, and control streams); default 1024. It is also the QUIC stream credit:
	// quic-go keeps the state of up to this many streams per tunnel before this package accepts
	// them, so MaxConnsPerPeer × MaxIncomingFlows bounds what a peer can make the node hold (issue
	// 10 §5 measured 4096 as too much). An opener beyond it waits in OpenFlow for a free stream.
	MaxIncomingFlows  int64
	DialAttempts      int           // handshake attempts per Dial; default 4
	BackoffBase       time.Duration // first retry delay; default 100 ms
	BackoffMax        time.Duration // retry delay cap; default 5 s
	DatagramQueue     int           // queued inbound datagrams per packet flow; default 256
	MaxControlStreams int           // concurrent inbound control streams per tunnel; default 16
	// Cost before admission (budget.go): inbound tunnels one peer node may hold (default 16) and
	// one source IP address may hold (default 1024: nodes behind one NAT share an address, and the
	// per-peer cap is the bound on one identity); streams accepted but not yet admitted per
	// tunnel (default 256) and per peer node (default 1024), over which a new stream is reset at
	// once; and the floor of the first-frame deadline, which shrinks from FirstFrameTimeout as
	// the pending budget fills (default 250 ms). A tunnel whose pending budget is full while
	// MaxSilentPerConn of its pending streams have not delivered their first frame is closed
	// (default MaxPendingPerConn/2).
	MaxConnsPerPeer      int
	MaxConnsPerSource    int
	MaxPendingPerConn    int
	MaxPendingPerPeer    int
	MinFirstFrameTimeout time.Duration
	MaxSilentPerConn     int
}

// defaultGossipIdle is Limits.GossipIdleTimeout's default: a pool where each pair of members
// exchanges something at least once a minute keeps its tunnels; a larger or quieter one pays a
// handshake on the next contact instead of holding a tunnel per member.
const defaultGossipIdle = 60 * time.Second

func (l Limits) withDefaults() Limits {
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	defInt := func(d *int, v int) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&l.HandshakeTimeout, 3*time.Second)
	def(&l.MaxIdleTimeout, 30*time.Second)
	if l.GossipIdleTimeout == 0 {
		l.GossipIdleTimeout = defaultGossipIdle
	}
	switch {
	case l.KeepAlivePeriod < 0: // off: idle tunnels time out (tests; links billed per packet)
		l.KeepAlivePeriod = 0
	case l.KeepAlivePeriod == 0:
		l.KeepAlivePeriod = 15 * time.Second
	}
	def(&l.FirstFrameTimeout, 5*time.Second)
	def(&l.AdmitTimeout, 5*time.Second)
	def(&l.VerdictTimeout, 10*time.Second)
	defInt(&l.MaxRecordSize, dtl.MaxRecordSize)
	defInt(&l.MaxFlowsPerPeer, 4096)
	defInt(&l.MaxFlowsPerAgent, 1024)
	def(&l.FlowIdleTimeout, 5*time.Minute)
	def(&l.SweepInterval, 10*time.Second)
	if l.MaxIncomingFlows <= 0 {
		l.MaxIncomingFlows = 1024
	}
	defInt(&l.DialAttempts, 4)
	def(&l.BackoffBase, 100*time.Millisecond)
	def(&l.BackoffMax, 5*time.Second)
	defInt(&l.DatagramQueue, 256)
	defInt(&l.MaxControlStreams, 16)
	defInt(&l.MaxConnsPerPeer, 16)
	defInt(&l.MaxConnsPerSource, 1024)
	defInt(&l.MaxPendingPerConn, 256)
	defInt(&l.MaxPendingPerPeer, 1024)
	def(&l.MinFirstFrameTimeout, 250*time.Millisecond)
	defInt(&l.MaxSilentPerConn, max(l.MaxPendingPerConn/2, 1))
	return l
}

// Refusal describes a handshake this endpoint refused (or that failed) for the OnRefused hook.
type Refusal struct {
	Zone   string   // zone the peer asked for (empty when ALPN failed)
	Remote net.Addr // peer's underlay address
	Err    error    // the verifier's error, wrapped in ErrPeerRefused
}

// Config configures an Endpoint.
type Config struct {
	// PacketConn is the underlay socket. The caller owns it and closes it after Endpoint.Close.
	PacketConn net.PacketConn
	// Certificate is this node's certificate chain and key; Leaf should be set.
	Certificate tls.Certificate
	// Zones are the zones this node serves; the listener offers exactly these ALPNs.
	Zones []string
	// Verifier checks every peer on both sides of every handshake. Required.
	Verifier PeerVerifier
	// Admitter decides every inbound flow. Required.
	Admitter Admitter
	// StreamHandler receives admitted stream flows. It runs on an endpoint-owned goroutine, owns
	// the conn (must Close it) and should return promptly; Endpoint.Close closes every flow.
	StreamHandler func(*FlowConn)
	// PacketHandler receives admitted packet flows, with the same contract as StreamHandler.
	PacketHandler func(*PacketFlow)
	// SessionBinding computes the tunnel's DTL session binding value. Default: dtl.Exporter.
	SessionBinding func(tls.ConnectionState) ([]byte, error)
	// OnTunnel, if set, is called once for every established tunnel, inbound and outbound, after
	// the tunnel is registered (and, inbound, after the ready signal). It runs on its own
	// endpoint-owned goroutine, so it may block (e.g. to open a flow on the tunnel), but it must
	// return once the tunnel or the endpoint closes: Endpoint.Close waits for it.
	OnTunnel func(*Tunnel)
	// OnVerdict, if set, is told the final verdict on every inbound flow stream exactly once,
	// before the peer sees the accept, reject or reset: admitted, or refused/dropped for any
	// reason, whether the Admitter or the endpoint itself refused it. It runs on the flow's
	// goroutine and must not block for long.
	OnVerdict func(Verdict)
	// OnRefused, if set, is told about every refused handshake (for audit). It must not block.
	OnRefused func(Refusal)
	// OnStalled, if set, receives one StallReport per peer that had streams stalled or reset over
	// its pending budget, or tunnels refused over its connection cap, in the last SweepInterval
	// (and once more at Close). Such streams get no Verdict: a peer can open them by the
	// thousand, so they are audited in aggregate (as "stalled"), never one entry each. It runs on
	// the endpoint's sweep goroutine and must not block for long.
	OnStalled func(StallReport)
	// ControlHandler, if set, receives the peer node's control streams (docs/protocol.md,
	// "Control streams and gossip"): node-level traffic such as gossip, authenticated by the
	// tunnel's mutual TLS and never delivered to an agent. channel is the control frame's byte.
	// It runs on an endpoint-owned goroutine and owns c (must Close it, which also frees the
	// stream's place under Limits.MaxControlStreams); Endpoint.Close closes the tunnel under it.
	// Without a handler, control streams are reset (stream error 0x207).
	ControlHandler func(t *Tunnel, channel byte, c net.Conn)
	// ControlDatagram, if set, receives the payload of every datagram tagged ControlFlowID. It
	// runs on the tunnel's datagram goroutine and must not block; payload is its own copy.
	// Without it such datagrams are dropped and counted.
	ControlDatagram func(t *Tunnel, payload []byte)
	// Clock is the time source for flow idle expiry. Default time.Now.
	Clock func() time.Time
	// Logger receives refusals and drops. Default slog.Default().
	Logger *slog.Logger
	// Limits bounds the endpoint.
	Limits Limits
}

func (c *Config) validate() error {
	var errs []error
	if c.PacketConn == nil {
		errs = append(errs, errors.New("a PacketConn is required"))
	}
	if len(c.Certificate.Certificate) == 0 || c.Certificate.PrivateKey == nil {
		errs = append(errs, errors.New("the node certificate needs a chain and a private key"))
	}
	if c.Verifier == nil {
		errs = append(errs, errors.New("a PeerVerifier is required"))
	}
	if c.Admitter == nil {
		errs = append(errs, errors.New("an Admitter is required"))
	}
	for _, z := range c.Zones {
		if z == "" || strings.ContainsAny(z, "/ ") {
			errs = append(errs, fmt.Errorf("zone name %q is invalid: it must be non-empty without '/' or spaces", z))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("tunnel: invalid config: %w", err)
	}
	return nil
}
