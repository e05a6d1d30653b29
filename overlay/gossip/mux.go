package gossip

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ute-project/ute/overlay/tunnel"
)

// Control channels on a zone tunnel (the control frame's byte for streams, the first payload byte
// for datagrams; docs/protocol.md, "Control streams and gossip").
const (
	// ChannelPacket carries one memberlist packet: a control datagram's body, or a whole control
	// stream when the packet does not fit in a datagram.
	ChannelPacket byte = 1
	// ChannelStream carries one memberlist stream (push/pull, fallback probes).
	ChannelStream byte = 2
	// ChannelRecords is node/membership's direct record push (records too large to gossip).
	ChannelRecords byte = 3
)

// MaxPacketSize caps a memberlist packet carried on a control stream.
const MaxPacketSize = 64 << 10

// Sentinel errors, matched with errors.Is.
var (
	// ErrMalformed means a control datagram could not be parsed.
	ErrMalformed = errors.New("gossip: malformed control datagram")
	// ErrZoneTaken means a transport for the zone is already registered on the mux.
	ErrZoneTaken = errors.New("gossip: zone already has a transport on this mux")
	// ErrChannelTaken means a stream handler for the channel is already registered.
	ErrChannelTaken = errors.New("gossip: control channel already has a handler")
	// ErrNoNodeName means memberlist addressed a member by address alone and no join hint names
	// the node expected there; without a name the tunnel cannot verify who answers.
	ErrNoNodeName = errors.New("gossip: no node name for address")
	// ErrShutdown is returned by a transport after Shutdown.
	ErrShutdown = errors.New("gossip: transport shut down")
	// ErrPartitioned is returned while a transport is partitioned (SetPartitioned).
	ErrPartitioned = errors.New("gossip: transport partitioned")
)

// ParseDatagram splits a control datagram payload into its channel and body.
func ParseDatagram(payload []byte) (channel byte, body []byte, err error) {
	if len(payload) < 1 {
		return 0, nil, fmt.Errorf("%w: empty", ErrMalformed)
	}
	return payload[0], payload[1:], nil
}

// AppendDatagram appends a control datagram payload for channel to b.
func AppendDatagram(b []byte, channel byte, body []byte) []byte {
	return append(append(b, channel), body...)
}

// StreamHandler takes an inbound control stream of a registered channel. It runs on an
// endpoint-owned goroutine and owns c.
type StreamHandler func(t *tunnel.Tunnel, c net.Conn)

// MuxStats counts what the mux dropped.
type MuxStats struct {
	NoTransport    uint64 // gossip for a zone with no transport registered
	UnknownChannel uint64 // control traffic on a channel nobody handles
	Malformed      uint64 // unparsable control datagrams and oversized packet streams
}

// Mux dispatches a tunnel endpoint's control traffic by the tunnel's zone to that zone's
// Transport, and other channels to registered StreamHandlers. Plug ControlHandler,
// ControlDatagram and TunnelUp (as OnTunnel) into tunnel.Config; create the Mux first, then the
// endpoint, then transports.
type Mux struct {
	log *slog.Logger

	mu      sync.RWMutex
	zones   map[string]*Transport
	streams map[byte]StreamHandler

	noTransport, unknownChannel, malformed atomic.Uint64
}

// NewMux returns an empty mux. logger may be nil (slog.Default()).
func NewMux(logger *slog.Logger) *Mux {
	if logger == nil {
		logger = slog.Default()
	}
	return &Mux{log: logger, zones: map[string]*Transport{}, streams: map[byte]StreamHandler{}}
}

// HandleStream registers h for inbound control streams on channel (not ChannelPacket or
// ChannelStream, which belong to the transports).
func (m *Mux) HandleStream(channel byte, h StreamHandler) error {
	if channel == ChannelPacket || channel == ChannelStream {
		return fmt.Errorf("%w: channel %d belongs to the memberlist transports", ErrChannelTaken, channel)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.streams[channel]; ok {
		return fmt.Errorf("%w: %d", ErrChannelTaken, channel)
	}
	m.streams[channel] = h
	return nil
}

// RemoveStream unregisters the handler of channel.
func (m *Mux) RemoveStream(channel byte) {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.streams, channel)
}

func (m *Mux) register(t *Transport) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.zones[t.zone]; ok {
		return fmt.Errorf("%w: %q", ErrZoneTaken, t.zone)
	}
	m.zones[t.zone] = t
	return nil
}

func (m *Mux) unregister(t *Transport) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.zones[t.zone] == t {
		delete(m.zones, t.zone)
	}
}

func (m *Mux) transport(zone string) *Transport {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.zones[zone]
}

// ControlDatagram is the tunnel.Config.ControlDatagram hook. It never blocks.
func (m *Mux) ControlDatagram(t *tunnel.Tunnel, payload []byte) {
	ch, body, err := ParseDatagram(payload)
	if err != nil {
		m.malformed.Add(1)
		return
	}
	if ch != ChannelPacket {
		m.unknownChannel.Add(1)
		return
	}
	tr := m.transport(t.Zone())
	if tr == nil {
		m.noTransport.Add(1)
		return
	}
	tr.deliverPacket(t, body)
}

// TunnelUp is the tunnel.Config.OnTunnel hook, or is called from the node's: it tells the
// transport of the tunnel's zone, if any, that a tunnel with the peer is established. It never
// blocks.
func (m *Mux) TunnelUp(t *tunnel.Tunnel) {
	if tr := m.transport(t.Zone()); tr != nil {
		tr.tunnelUp(t.Peer().NodeID)
	}
}

// ControlHandler is the tunnel.Config.ControlHandler hook. It returns promptly except on
// ChannelPacket, where it reads the one packet (bounded by MaxPacketSize and a deadline).
func (m *Mux) ControlHandler(t *tunnel.Tunnel, channel byte, c net.Conn) {
	switch channel {
	case ChannelPacket, ChannelStream:
		tr := m.transport(t.Zone())
		if tr == nil {
			m.noTransport.Add(1)
			_ = c.Close()
			return
		}
		if channel == ChannelStream {
			tr.deliverStream(c)
			return
		}
		buf, err := readPacketStream(c, tr.cfg.PacketStreamTimeout)
		_ = c.Close()
		if err != nil {
			m.malformed.Add(1)
			m.log.Debug("gossip packet stream dropped", "peer", t.Peer().NodeID, "zone", t.Zone(), "err", err)
			return
		}
		tr.deliverPacket(t, buf)
	default:
		m.mu.RLock()
		h := m.streams[channel]
		m.mu.RUnlock()
		if h == nil {
			m.unknownChannel.Add(1)
			_ = c.Close()
			return
		}
		h(t, c)
	}
}

// readPacketStream reads a whole packet stream: at most MaxPacketSize bytes before the deadline.
func readPacketStream(c net.Conn, timeout time.Duration) ([]byte, error) {
	_ = c.SetReadDeadline(time.Now().Add(timeout))
	buf, err := io.ReadAll(io.LimitReader(c, MaxPacketSize+1))
	if err != nil {
		return nil, fmt.Errorf("gossip: read packet stream: %w", err)
	}
	if len(buf) > MaxPacketSize {
		return nil, fmt.Errorf("gossip: packet stream exceeds %d bytes", MaxPacketSize)
	}
	if len(buf) == 0 {
		return nil, errors.New("gossip: empty packet stream")
	}
	return buf, nil
}

// Stats returns the mux's drop counters.
func (m *Mux) Stats() MuxStats {
	return MuxStats{
		NoTransport:    m.noTransport.Load(),
		UnknownChannel: m.unknownChannel.Load(),
		Malformed:      m.malformed.Load(),
	}
}
