package membership

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"iter"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/memberlist"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/overlay/gossip"
	"github.com/ute-project/ute/overlay/tunnel"
)

// Records is the node's signed-record store as gossip sees it. Records are opaque here.
type Records interface {
	// Add verifies raw, persists it and acts on it, all before returning; zone is the pool it
	// arrived on. isNew is false for a record already held. An error means raw is refused
	// (malformed, unsigned, wrongly signed, stale...): it is dropped, counted and never spread.
	Add(zone string, raw []byte) (isNew bool, err error)
	// Snapshot returns the records zone's pool reconciles in push/pull: those that concern the
	// zone. It must not return records of other zones, which would leak them into this pool.
	Snapshot(zone string) [][]byte
}

// Sentinel errors, matched with errors.Is.
var (
	// ErrName means a member name is not a node SPIFFE ID of this trust domain.
	ErrName = errors.New("membership: member name is not a node of this trust domain")
	// ErrRevokedMember means a member name is revoked.
	ErrRevokedMember = errors.New("membership: member is revoked")
	// ErrUnknownZone means this node runs no pool for the zone.
	ErrUnknownZone = errors.New("membership: no pool for zone")
	// ErrClosed is returned after Close.
	ErrClosed = errors.New("membership: closed")
	// ErrRecordSize means a record is empty or over Config.MaxRecordSize.
	ErrRecordSize = errors.New("membership: record size out of range")
)

// Timing are memberlist's gossip and failure-detection timings.
type Timing struct {
	// GossipInterval is how often queued records are gossiped: a pool sends them every
	// GossipInterval while any is queued and sleeps while none is (pool.pump).
	GossipInterval time.Duration
	// MemberGossipInterval is memberlist's own gossip ticker, which carries member state (alive,
	// suspect, dead) and also sends queued records. It fires whether or not anything is queued,
	// so at rest each tick is a wake-up for nothing; zero means GossipInterval. A longer one
	// leaves the records' pace (GossipInterval, pool.pump) alone but slows member state.
	MemberGossipInterval time.Duration
	GossipNodes          int           // members each gossip round goes to
	ProbeInterval        time.Duration // failure-detection probe period
	ProbeTimeout         time.Duration // time to wait for a probe's ack
	PushPullInterval     time.Duration // full state exchange with one random member
	SuspicionMult        int           // suspicion timeout = mult * log(N+1) * ProbeInterval
	RetransmitMult       int           // a broadcast is sent mult * log(N+1) times by each sender
	TCPTimeout           time.Duration // stream operations: push/pull, join, fallback probes
	GossipToTheDeadTime  time.Duration // dead members still gossiped to, so they can refute
}

// LANTiming is memberlist's LAN profile (200 ms gossip to 3 members, 1 s probes, 30 s push/pull).
// MemberGossipInterval is left unset, so memberlist's own ticker keeps the 200 ms: slowed to
// 500 ms it saved about three wake-ups a second at rest, but 100 in-process members on a loaded
// machine then failed to settle (docs/architecture.md, "Gossip pace").
func LANTiming() Timing {
	c := memberlist.DefaultLANConfig()
	return Timing{
		GossipInterval:      c.GossipInterval,
		GossipNodes:         c.GossipNodes,
		ProbeInterval:       c.ProbeInterval,
		ProbeTimeout:        c.ProbeTimeout,
		PushPullInterval:    c.PushPullInterval,
		SuspicionMult:       c.SuspicionMult,
		RetransmitMult:      c.RetransmitMult,
		TCPTimeout:          c.TCPTimeout,
		GossipToTheDeadTime: c.GossipToTheDeadTime,
	}
}

// memberGossip is memberlist's own gossip period: MemberGossipInterval, or GossipInterval when that
// is unset or longer (memberlist's rounds are never more frequent than the records').
func (t Timing) memberGossip() time.Duration {
	if t.MemberGossipInterval <= 0 {
		return t.GossipInterval
	}
	return max(t.MemberGossipInterval, t.GossipInterval)
}

// FastTiming is for tests and the simulator on loopback.
func FastTiming() Timing {
	return Timing{
		GossipInterval:      20 * time.Millisecond,
		GossipNodes:         3,
		ProbeInterval:       500 * time.Millisecond,
		ProbeTimeout:        250 * time.Millisecond,
		PushPullInterval:    time.Second,
		SuspicionMult:       4,
		RetransmitMult:      4,
		TCPTimeout:          5 * time.Second, // a timeout, not a pace: loaded machines need slack
		GossipToTheDeadTime: 2 * time.Second,
	}
}

// udpBufferSize is memberlist's packet budget: a gossip packet of this size fits in one control
// datagram right after the handshake (1,235 bytes minus the mux's channel byte), so packets
// rarely fall back to a stream.
const udpBufferSize = 1200

// maxBroadcast is the largest gossip message that fits beside memberlist's headers; larger
// records travel by direct push and push/pull only.
const maxBroadcast = udpBufferSize - 16

// Config configures a Membership. Zero sizes and durations take the defaults listed.
type Config struct {
	NodeID    string         // this node's SPIFFE ID; its memberlist name
	Advertise netip.AddrPort // this node's underlay address as members dial it
	Endpoint  gossip.Dialer  // the node's tunnel endpoint
	Mux       *gossip.Mux    // plugged into that endpoint's control hooks
	Records   Records
	// Revoked reports whether a node ID is revoked; its gossip names are refused. Optional.
	Revoked func(nodeID string) bool
	Timing  Timing // default LANTiming()

	MaxRecordSize int           // default 64 KiB
	MaxStateBytes int           // push/pull state cap; default 1 MiB, at least MaxRecordSize+9 (memberlist allows 20 MiB)
	SeenSize      int           // dedupe set entries; default 65,536
	WorkQueue     int           // gossiped records awaiting Add; default 1,024
	PushTimeout   time.Duration // one direct record push; default 5 s
	PushParallel  int           // concurrent direct pushes; default 8
	LeaveTimeout  time.Duration // Close announces the leave this long at most; default 500 ms
	// JoinParallel is how many seeds Join dials at once; default 8 (the authority names up to 8
	// members). JoinSeedTimeout bounds the dial of one seed address; default 3 s, one handshake
	// attempt at the tunnel's default, so that a black-holed seed frees its slot for the next.
	JoinParallel    int
	JoinSeedTimeout time.Duration
	// NoRequeue turns off re-broadcast on first receipt and the immediate sends over open
	// tunnels (pool.sendOpen), leaving the publisher's own gossip rounds alone (retransmissions from the
	// publisher only). For the benchmark baseline and tests only.
	NoRequeue bool
	Logger    *slog.Logger
}

func (c Config) withDefaults() Config {
	if c.Timing == (Timing{}) {
		c.Timing = LANTiming()
	}
	def := func(v *int, d int) {
		if *v <= 0 {
			*v = d
		}
	}
	def(&c.MaxRecordSize, 64<<10)
	def(&c.MaxStateBytes, 1<<20)
	// A record that cannot fit in a state would never be reconciled.
	c.MaxStateBytes = max(c.MaxStateBytes, c.MaxRecordSize+9)
	def(&c.SeenSize, 1<<16)
	def(&c.WorkQueue, 1024)
	def(&c.PushParallel, 8)
	if c.PushTimeout <= 0 {
		c.PushTimeout = 5 * time.Second
	}
	if c.LeaveTimeout <= 0 {
		c.LeaveTimeout = 500 * time.Millisecond
	}
	def(&c.JoinParallel, 8)
	if c.JoinSeedTimeout <= 0 {
		c.JoinSeedTimeout = 3 * time.Second
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	return c
}

// Seed is a member to join through: its node ID and underlay address.
type Seed struct {
	NodeID string
	Addr   netip.AddrPort
}

// Member is a pool member as memberlist sees it: an unverified claim until a tunnel handshake
// with NodeID at Addr succeeds.
type Member struct {
	NodeID string
	Addr   netip.AddrPort
	State  string // alive, suspect
}

// Stats are the record and name counters, for metrics.
type Stats struct {
	RecordsAccepted   uint64 // records Add took as new
	RecordsKnown      uint64 // records Add already held
	RecordsDropped    uint64 // records Add refused (malformed, unsigned, wrong signature...)
	RecordsDuplicate  uint64 // copies skipped by the seen-set without calling Add
	RecordsViaState   uint64 // records Add took as new from a push/pull state (catch-up)
	MessagesMalformed uint64 // gossip messages, push/pull states and record pushes that did not parse
	QueueDropped      uint64 // gossiped records dropped because the Add queue was full
	Rebroadcasts      uint64 // records re-queued on first receipt
	DirectSends       uint64 // new records sent at once to a member with an open tunnel (pool.sendOpen)
	TunnelUpSends     uint64 // queued records sent to a member when a tunnel with it opened (pool.tunnelUp)
	DirectPushes      uint64 // records pushed to a member over a control stream
	PushFailures      uint64 // direct pushes and record syncs that failed
	StateTruncated    uint64 // records left out of a push/pull state by MaxStateBytes
	RecordSyncs       uint64 // record pushes after a probe's ack carried a different record digest
	NamesRefused      uint64 // member names refused: foreign, not a node, revoked
	// LastGossipArrival is when the gossip packet carrying the last record that a gossip packet
	// brought new to this node arrived, before it waited for the worker that verifies and stores
	// records: with the store's own time of the record, it tells a record that waited on its
	// way from one that waited here. Zero until such a record.
	LastGossipArrival time.Time
	// LastGossipDequeued is when the worker took that record's packet from its queue: arrival to
	// dequeue is the wait for the worker, dequeue to the store's time the verification and write.
	LastGossipDequeued time.Time
}

type counters struct {
	accepted, known, dropped, duplicate, malformed, queueDropped atomic.Uint64
	viaState, directSends, tunnelUpSends, syncs                  atomic.Uint64
	rebroadcasts, pushes, pushFailures, truncated, namesRefused  atomic.Uint64
	lastArrival, lastDequeued                                    atomic.Int64 // unix nanoseconds
}

// source is how a record arrived.
type source uint8

const (
	fromGossip source = iota // a broadcast
	fromPush                 // a direct push
	fromState                // a push/pull state
)

type job struct {
	zone string
	raw  []byte
	at   time.Time // arrival at the transport
}

// Membership runs the node's gossip pools, one per zone.
type Membership struct {
	cfg  Config
	td   string
	log  *slog.Logger
	seen *seenSet
	work chan job
	sem  chan struct{}
	// changed holds one pending notice that some pool's member set changed (see Changes).
	changed chan struct{}

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu     sync.Mutex
	closed bool
	pools  map[string]*pool

	st counters
}

// New validates cfg, registers the record-push channel on the mux and starts the worker that
// feeds gossiped records to Records.Add. Add zones with AddZone.
func New(cfg Config) (*Membership, error) {
	cfg = cfg.withDefaults()
	id, err := identity.ParseID(cfg.NodeID)
	var errs []error
	if err != nil || id.Kind != identity.KindNode {
		errs = append(errs, fmt.Errorf("node ID %q is not a node SPIFFE ID", cfg.NodeID))
	}
	if cfg.Endpoint == nil || cfg.Mux == nil || cfg.Records == nil {
		errs = append(errs, errors.New("an Endpoint, a Mux and Records are required"))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("membership: invalid config: %w", err)
	}
	m := &Membership{
		cfg:   cfg,
		td:    id.TrustDomain,
		log:   cfg.Logger,
		seen:  newSeenSet(cfg.SeenSize),
		work:  make(chan job, cfg.WorkQueue),
		sem:   make(chan struct{}, cfg.PushParallel),
		pools: map[string]*pool{},

		changed: make(chan struct{}, 1),
	}
	if err := cfg.Mux.HandleStream(gossip.ChannelRecords, m.handlePush); err != nil {
		return nil, fmt.Errorf("membership: %w", err)
	}
	m.ctx, m.cancel = context.WithCancel(context.Background())
	m.wg.Go(m.worker)
	return m, nil
}

// AddZone starts the zone's pool. It is alone until Join (or until a member joins it).
func (m *Membership) AddZone(zone string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return ErrClosed
	}
	if _, ok := m.pools[zone]; ok {
		return nil
	}
	p, err := m.newPool(zone)
	if err != nil {
		return err
	}
	m.pools[zone] = p
	return nil
}

// RemoveZone leaves the zone's pool and stops it.
func (m *Membership) RemoveZone(zone string) error {
	m.mu.Lock()
	p := m.pools[zone]
	delete(m.pools, zone)
	m.mu.Unlock()
	if p == nil {
		return fmt.Errorf("%w: %q", ErrUnknownZone, zone)
	}
	return p.stop(m.cfg.LeaveTimeout)
}

// Changes delivers a notice after a member joins, changes address or leaves any pool, so that a
// caller can react to membership instead of polling Members. Notices coalesce: one receive may
// stand for many changes, and a change made while a notice is pending adds none; the receiver
// re-reads Members after each. Never closed.
func (m *Membership) Changes() <-chan struct{} { return m.changed }

// notifyChanged posts a notice without blocking (memberlist calls it under its node lock).
func (m *Membership) notifyChanged() {
	select {
	case m.changed <- struct{}{}:
	default:
	}
}

// Zones returns the zones with a pool, sorted.
func (m *Membership) Zones() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]string, 0, len(m.pools))
	for z := range m.pools {
		out = append(out, z)
	}
	slices.Sort(out)
	return out
}

func (m *Membership) pool(zone string) (*pool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil, ErrClosed
	}
	p := m.pools[zone]
	if p == nil {
		return nil, fmt.Errorf("%w: %q", ErrUnknownZone, zone)
	}
	return p, nil
}

// Queued is how many records zone's pool still has to gossip (each until RetransmitMult·log(N+1)
// of its packets reached a tunnel, or it is given up); 0 without a pool. The simulator prints the
// sum over its nodes while a record spreads.
func (m *Membership) Queued(zone string) int {
	p, err := m.pool(zone)
	if err != nil {
		return 0
	}
	return p.recs.len()
}

// Transport returns the zone pool's transport (its counters; SetPartitioned for fault injection).
func (m *Membership) Transport(zone string) (*gossip.Transport, error) {
	p, err := m.pool(zone)
	if err != nil {
		return nil, err
	}
	return p.tr, nil
}

// Publish spreads a record this node originated (or learned outside gossip, e.g. from the
// authority) in zones, or in every pool when none is named. The caller has already stored it:
// Publish does not call Records.Add. Small records are broadcast; records too large for a gossip
// packet are pushed directly to every member over control streams; push/pull reconciles both.
func (m *Membership) Publish(raw []byte, zones ...string) error {
	if len(raw) == 0 || len(raw) > m.cfg.MaxRecordSize {
		return fmt.Errorf("%w: %d bytes, limit %d", ErrRecordSize, len(raw), m.cfg.MaxRecordSize)
	}
	if len(zones) == 0 {
		zones = m.Zones()
	}
	raw = slices.Clone(raw)
	var errs []error
	for _, z := range zones {
		p, err := m.pool(z)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		m.seen.add(key(z, raw))
		p.recordsChanged()
		p.spread(raw, true)
	}
	return errors.Join(errs...)
}

// Members returns zone's members that memberlist has not declared dead or left, this node
// included, without revoked or foreign names, sorted by node ID. The view comes from
// memberlist's join, update and leave events, copied while memberlist holds its lock (the nodes
// Memberlist.Members returns are mutated under that lock afterwards); memberlist raises no event
// for suspicion, so State is "alive" for every listed member, and an address a live member
// changes without a new incarnation's metadata is not seen until it leaves and rejoins.
//
// The slice is the caller's own copy. Callers that only read the members, and call often, use
// EachMember, NumMembers or LookupMember instead, which copy nothing: at 1,000 members a copy is
// 64 KiB, and the daemon's loops and the record rounds made one per call (docs/benchmarks.md,
// "member snapshots").
func (m *Membership) Members(zone string) []Member {
	p, err := m.pool(zone)
	if err != nil {
		return nil
	}
	snap := p.snapshot()
	out := make([]Member, 0, len(snap))
	for _, mem := range snap {
		if !m.revoked(mem.NodeID) {
			out = append(out, mem)
		}
	}
	return out
}

// EachMember yields the members Members returns, in the same order, without copying the list:
// the pool's shared snapshot is read as it stood when the iteration began (a change made meanwhile
// is seen by the next call). The yielded values are copies; nothing a caller does with them
// reaches the pool.
func (m *Membership) EachMember(zone string) iter.Seq[Member] {
	return func(yield func(Member) bool) {
		p, err := m.pool(zone)
		if err != nil {
			return
		}
		for _, mem := range p.snapshot() {
			if !m.revoked(mem.NodeID) && !yield(mem) {
				return
			}
		}
	}
}

// NumMembers is len(Members(zone)) without the copy.
func (m *Membership) NumMembers(zone string) int {
	p, err := m.pool(zone)
	if err != nil {
		return 0
	}
	n := 0
	for _, mem := range p.snapshot() {
		if !m.revoked(mem.NodeID) {
			n++
		}
	}
	return n
}

// LookupMember returns zone's member nodeID as Members lists it, and whether it is listed.
func (m *Membership) LookupMember(zone, nodeID string) (Member, bool) {
	p, err := m.pool(zone)
	if err != nil {
		return Member{}, false
	}
	snap := p.snapshot()
	i, ok := slices.BinarySearchFunc(snap, nodeID, func(mem Member, id string) int { return strings.Compare(mem.NodeID, id) })
	if !ok || m.revoked(nodeID) {
		return Member{}, false
	}
	return snap[i], true
}

func stateName(s memberlist.NodeStateType) string {
	switch s {
	case memberlist.StateAlive:
		return "alive"
	case memberlist.StateSuspect:
		return "suspect"
	case memberlist.StateDead:
		return "dead"
	case memberlist.StateLeft:
		return "left"
	}
	return "unknown"
}

// Stats returns the counters.
func (m *Membership) Stats() Stats {
	return Stats{
		RecordsAccepted:    m.st.accepted.Load(),
		RecordsKnown:       m.st.known.Load(),
		RecordsDropped:     m.st.dropped.Load(),
		RecordsDuplicate:   m.st.duplicate.Load(),
		RecordsViaState:    m.st.viaState.Load(),
		MessagesMalformed:  m.st.malformed.Load(),
		QueueDropped:       m.st.queueDropped.Load(),
		Rebroadcasts:       m.st.rebroadcasts.Load(),
		DirectSends:        m.st.directSends.Load(),
		TunnelUpSends:      m.st.tunnelUpSends.Load(),
		DirectPushes:       m.st.pushes.Load(),
		PushFailures:       m.st.pushFailures.Load(),
		StateTruncated:     m.st.truncated.Load(),
		RecordSyncs:        m.st.syncs.Load(),
		NamesRefused:       m.st.namesRefused.Load(),
		LastGossipArrival:  unixNanoTime(m.st.lastArrival.Load()),
		LastGossipDequeued: unixNanoTime(m.st.lastDequeued.Load()),
	}
}

func unixNanoTime(ns int64) time.Time {
	if ns == 0 {
		return time.Time{}
	}
	return time.Unix(0, ns)
}

// Close leaves every pool, stops them and waits for every goroutine this package started.
func (m *Membership) Close() error {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return nil
	}
	m.closed = true
	pools := m.pools
	m.pools = map[string]*pool{}
	m.mu.Unlock()
	m.cfg.Mux.RemoveStream(gossip.ChannelRecords)
	var errs []error
	for _, p := range pools {
		errs = append(errs, p.stop(m.cfg.LeaveTimeout))
	}
	m.cancel()
	m.wg.Wait()
	return errors.Join(errs...)
}

// checkName admits a member name only if it is a node of this trust domain and not revoked.
func (m *Membership) checkName(name string) error {
	if err := m.checkNode(name); err != nil {
		return err
	}
	if m.revoked(name) {
		return fmt.Errorf("%w: %q", ErrRevokedMember, name)
	}
	return nil
}

// checkNode is the part of checkName that depends on the name alone, so that its answer for a
// name never changes: whether it is a node SPIFFE ID of this trust domain.
func (m *Membership) checkNode(name string) error {
	id, err := identity.ParseID(name)
	if err != nil {
		return fmt.Errorf("%w: %q: %w", ErrName, name, err)
	}
	if id.Kind != identity.KindNode || id.TrustDomain != m.td {
		return fmt.Errorf("%w: %q", ErrName, name)
	}
	return nil
}

// revoked is the part of checkName that changes over time, with no event here: a revocation
// reaches the node's set (Config.Revoked) by records, the authority or a local TrustFlow
// isolation. So readers of a member snapshot ask it on every read.
func (m *Membership) revoked(name string) bool {
	return m.cfg.Revoked != nil && m.cfg.Revoked(name)
}

func key(zone string, raw []byte) seenKey {
	return seenKey{zone: zone, hash: sha256.Sum256(raw)}
}

// enqueue hands a gossiped record to the worker without blocking memberlist.
func (m *Membership) enqueue(zone string, raw []byte) {
	select {
	case m.work <- job{zone, raw, time.Now()}:
	default:
		m.st.queueDropped.Add(1)
	}
}

func (m *Membership) worker() {
	for {
		select {
		case <-m.ctx.Done():
			return
		case j := <-m.work:
			took := time.Now()
			if m.receive(j.zone, j.raw, fromGossip) {
				m.st.lastArrival.Store(j.at.UnixNano())
				m.st.lastDequeued.Store(took.UnixNano())
			}
		}
	}
}

// receive runs a record through the seen-set and Records.Add, and re-broadcasts it on first
// receipt. From a push/pull state only records new to the store are re-broadcast, so that a
// restarted node does not re-broadcast its whole set. It reports whether the store took the
// record as new.
func (m *Membership) receive(zone string, raw []byte, src source) (isNew bool) {
	if m.ctx.Err() != nil {
		// Closed: a push still being read on an endpoint goroutine must not reach a store the
		// caller may be closing.
		return false
	}
	k := key(zone, raw)
	if m.seen.has(k) {
		m.st.duplicate.Add(1)
		return false
	}
	isNew, err := m.cfg.Records.Add(zone, raw)
	if err != nil {
		m.st.dropped.Add(1)
		m.log.Debug("gossiped record refused", "zone", zone, "err", err)
		return false
	}
	if isNew {
		if p, err := m.pool(zone); err == nil {
			p.recordsChanged()
		}
		m.st.accepted.Add(1)
		if src == fromState {
			m.st.viaState.Add(1)
		}
	} else {
		m.st.known.Add(1)
	}
	if !m.seen.add(k) || m.cfg.NoRequeue || (src == fromState && !isNew) {
		return
	}
	p, err := m.pool(zone)
	if err != nil {
		return
	}
	if p.spread(raw, false) {
		m.st.rebroadcasts.Add(1)
	}
	return isNew
}

// handlePush takes a direct record push (control channel gossip.ChannelRecords).
func (m *Membership) handlePush(t *tunnel.Tunnel, c net.Conn) {
	defer func() { _ = c.Close() }()
	zone := t.Zone()
	if _, err := m.pool(zone); err != nil {
		return
	}
	_ = c.SetDeadline(time.Now().Add(m.cfg.PushTimeout))
	for range maxPushRecords {
		raw, err := readPushRecord(c, m.cfg.MaxRecordSize)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			m.st.malformed.Add(1)
			m.log.Debug("record push dropped", "peer", t.Peer().NodeID, "zone", zone, "err", err)
			return
		}
		m.receive(zone, raw, fromPush)
	}
	// Answering end-of-stream tells the pusher its records were processed.
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
	}
}

// maxPushRecords bounds one record push stream.
const maxPushRecords = 64

// pushTo pushes recs (at most maxPushRecords) to one member over a control stream of the zone's
// tunnel, and waits for the receiver's end of stream.
func (m *Membership) pushTo(zone string, to Member, recs ...[]byte) error {
	ctx, cancel := context.WithTimeout(m.ctx, m.cfg.PushTimeout)
	defer cancel()
	tun, ok := m.cfg.Endpoint.LiveTunnel(to.NodeID, zone)
	if !ok {
		if !to.Addr.IsValid() {
			return fmt.Errorf("membership: no tunnel to %s and no address", to.NodeID)
		}
		var err error
		if tun, err = m.cfg.Endpoint.Dial(ctx, to.Addr, to.NodeID, zone); err != nil {
			return err
		}
	}
	c, err := tun.OpenControl(ctx, gossip.ChannelRecords)
	if err != nil {
		return err
	}
	defer func() { _ = c.Close() }()
	_ = c.SetDeadline(time.Now().Add(m.cfg.PushTimeout))
	for _, raw := range recs {
		if err := writePushRecord(c, raw); err != nil {
			return err
		}
	}
	if err := c.CloseWrite(); err != nil {
		return err
	}
	_, err = io.Copy(io.Discard, io.LimitReader(c, 1))
	return err
}

// spawnPush runs a direct push on a Membership-owned goroutine, PushParallel at a time.
func (m *Membership) spawnPush(zone string, to Member, raw []byte) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return
	}
	m.wg.Go(func() {
		select {
		case m.sem <- struct{}{}:
		case <-m.ctx.Done():
			return
		}
		defer func() { <-m.sem }()
		if err := m.pushTo(zone, to, raw); err != nil {
			m.st.pushFailures.Add(1)
			m.log.Debug("record push failed", "peer", to.NodeID, "zone", zone, "err", err)
			return
		}
		m.st.pushes.Add(1)
	})
}

// pool is one zone's memberlist and its delegates.
type pool struct {
	m    *Membership
	zone string
	tr   *gossip.Transport
	recs recordQueue
	list atomic.Pointer[memberlist.Memberlist]

	// queued holds one notice that a record was queued (see pump); stopPump ends the pump.
	queued   chan struct{}
	stopPump context.CancelFunc

	dig     digestCache // the record set's digest, for acks (antientropy.go)
	syncing atomic.Bool // a record sync push is under way

	mu      sync.Mutex
	members map[string]memberEntry // from memberlist's events
	failed  map[Seed]time.Time     // seeds whose last join dial failed, and when (join.go)
	// ver counts the changes to members. snap is the sorted snapshot of members as of snapVer
	// (see snapshot); it is stale when snapVer != ver.
	ver, snapVer uint64
	snap         []Member
}

// memberEntry is a member as memberlist's events last described it, and whether its name is a
// node of this trust domain (checkNode, asked once, when the name first appears: the answer
// depends on the name alone).
type memberEntry struct {
	Member
	node bool
}

// snapshot returns the pool's members whose names are nodes of this trust domain, sorted by node
// ID, revoked ones included: a revocation changes nothing here, so every reader filters with
// Membership.revoked. It is built on the first read after a change to the members (a join, a
// leave or death, a new address) and then shared by every reader until the next change, so that
// the daemon's loops and each gossip round stop copying, re-parsing and sorting 1,000 members per
// call. It is never written after it is built: READ ONLY for every caller, which must neither
// write to it nor keep an element's address. Its capacity is its length, so an append by mistake
// copies instead of writing into another reader's view. Building it on read rather than on each
// event keeps discovery, which raises an event per member, O(n) per event as before.
func (p *pool) snapshot() []Member {
	p.mu.Lock()
	if p.snap != nil && p.snapVer == p.ver {
		s := p.snap
		p.mu.Unlock()
		return s
	}
	ver := p.ver
	out := make([]Member, 0, len(p.members))
	for _, e := range p.members {
		if e.node {
			out = append(out, e.Member)
		}
	}
	p.mu.Unlock()
	// Sorted outside the lock: memberlist's event callbacks take it under memberlist's own.
	slices.SortFunc(out, func(a, b Member) int { return strings.Compare(a.NodeID, b.NodeID) })
	out = slices.Clip(out)
	p.mu.Lock()
	if p.ver == ver {
		p.snap, p.snapVer = out, ver
	}
	p.mu.Unlock()
	return out
}

func (m *Membership) newPool(zone string) (*pool, error) {
	p := &pool{m: m, zone: zone, members: map[string]memberEntry{}, failed: map[Seed]time.Time{}}
	tr, err := gossip.NewTransport(gossip.TransportConfig{
		Zone:      zone,
		Advertise: m.cfg.Advertise,
		Dialer:    m.cfg.Endpoint,
		Mux:       m.cfg.Mux,
		// Until newPool returns nothing is queued, so tunnelUp sends nothing (and reads no p.tr).
		TunnelUp:   p.tunnelUp,
		Take:       p.take,
		Deferrable: deferrable,
		Logger:     m.log,
	})
	if err != nil {
		return nil, fmt.Errorf("membership: zone %s: %w", zone, err)
	}
	p.tr = tr

	t := m.cfg.Timing
	conf := memberlist.DefaultLANConfig()
	conf.Name = m.cfg.NodeID
	conf.Transport = tr
	conf.Delegate = p
	conf.Alive = p
	conf.Merge = p
	conf.Events = p
	conf.Ping = p
	// No gossip key: the tunnels' mutual TLS authenticates and encrypts every byte.
	conf.SecretKey = nil
	conf.Keyring = nil
	conf.UDPBufferSize = udpBufferSize
	// Gossip packets are small and the tunnel encrypts them; compressing each one cost a
	// fifth of an idle pool's CPU.
	conf.EnableCompression = false
	conf.GossipInterval = t.memberGossip()
	conf.GossipNodes = t.GossipNodes
	conf.ProbeInterval = t.ProbeInterval
	conf.ProbeTimeout = t.ProbeTimeout
	conf.PushPullInterval = t.PushPullInterval
	conf.SuspicionMult = t.SuspicionMult
	conf.RetransmitMult = t.RetransmitMult
	conf.TCPTimeout = t.TCPTimeout
	conf.GossipToTheDeadTime = t.GossipToTheDeadTime
	conf.LogOutput = nil
	conf.Logger = slog.NewLogLogger(m.log.With("zone", zone).Handler(), slog.LevelDebug)
	ml, err := memberlist.Create(conf)
	if err != nil {
		_ = tr.Shutdown()
		return nil, fmt.Errorf("membership: zone %s: %w", zone, err)
	}
	p.list.Store(ml)
	p.queued = make(chan struct{}, 1)
	ctx, cancel := context.WithCancel(m.ctx)
	p.stopPump = cancel
	m.wg.Go(func() { p.pump(ctx) })
	return p, nil
}

// pump gossips the pool's queued records: a round at once when a record is queued, then one
// every GossipInterval, each to GossipNodes random members, for as long as any record is still
// queued (each is sent RetransmitMult·log(N+1) times in all, by these rounds and memberlist's
// own). With nothing queued it sleeps. memberlist's own gossip ticker fires whether or not it has
// anything to send (five wake-ups a second at rest with the LAN profile); with a longer
// MemberGossipInterval the records keep their pace here, and the first round of a record no
// longer waits for memberlist's next tick.
func (p *pool) pump(ctx context.Context) {
	every := p.m.cfg.Timing.GossipInterval
	t := time.NewTimer(every)
	t.Stop()
	defer t.Stop()
	for {
		if p.recs.len() == 0 {
			select {
			case <-ctx.Done():
				return
			case <-p.queued:
			}
		}
		if ctx.Err() != nil {
			// Stopped: no round after the stop, even with records queued (benchmarks stop the
			// pump to plan rounds themselves).
			return
		}
		p.gossipRound()
		t.Reset(every)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// gossipRound sends each queued record to GossipNodes members it has not reached yet, one record
// per packet (the framing of memberlist's user messages, so the receiver's NotifyMsg takes them
// alike). Members this node holds a live tunnel with are preferred for all but one of them: a
// packet to such a member needs no handshake, and memberlist's probes and the flows keep tunnels
// open to members spread across the pool; the one other member is drawn from all of them, so the
// record still jumps to random members. A packet counts against the record's retransmissions
// only once the transport handed it to a tunnel (recordQueue).
func (p *pool) gossipRound() {
	for _, s := range p.planRound() {
		p.tr.SendPacket(userMessage(s.rec.msg), s.member.Addr, s.member.NodeID, func(sent bool) { p.recs.done(s, sent) })
	}
}

// planRound plans a gossip round (see gossipRound) without sending anything. It hands the round
// the pool's shared snapshot and the few members to leave out of it (this node, members without
// an address, revoked ones) rather than a filtered copy of the members.
func (p *pool) planRound() []send {
	self := p.m.cfg.NodeID
	snap := p.snapshot()
	skip := []string{self}
	for _, mem := range snap {
		if mem.NodeID != self && (!mem.Addr.IsValid() || p.m.revoked(mem.NodeID)) {
			skip = append(skip, mem.NodeID)
		}
	}
	limit := retransmitLimit(p.m.cfg.Timing.RetransmitMult, p.numNodes())
	return p.recs.round(snap, skip, limit, p.m.cfg.Timing.GossipNodes, p.pick)
}

// pick chooses k of cands: up to k−1 with a live tunnel, the rest at random, none that the
// transport holds back after a failed dial (a packet to it would be dropped unsent). It draws
// candidates one at a time (a Fisher–Yates shuffle stopped early) and asks the transport and the
// endpoint only about the ones drawn: a round at 1,000 members looks at a few dozen of them, not
// all (every look takes a lock), and the choice has the distribution of a full shuffle. It
// reorders cands.
func (p *pool) pick(cands []Member, k int) []Member {
	return pickMembers(cands, k, p.tr.Held, func(id string) bool {
		_, ok := p.m.cfg.Endpoint.LiveTunnel(id, p.zone)
		return ok
	})
}

// pickMembers is pick with the transport's and the endpoint's answers as functions.
func pickMembers(cands []Member, k int, held, live func(nodeID string) bool) []Member {
	if k <= 0 {
		return nil
	}
	out := make([]Member, 0, k)
	// rest is drawn, not held, not taken for a live tunnel: the random part, in order. On the
	// stack for the fan-outs in use (3 by default).
	var restBuf [4]Member
	rest := restBuf[:0]
	for i := range cands {
		if len(out) >= k-1 && len(out)+len(rest) >= k {
			break
		}
		j := i + rand.IntN(len(cands)-i)
		cands[i], cands[j] = cands[j], cands[i]
		c := cands[i]
		if held(c.NodeID) {
			continue
		}
		if len(out) < k-1 && live(c.NodeID) {
			out = append(out, c)
			continue
		}
		if len(rest) < k {
			rest = append(rest, c)
		}
	}
	for _, c := range rest {
		if len(out) >= k {
			break
		}
		out = append(out, c)
	}
	return out
}

// userMsg is memberlist's message type for user messages (memberlist's userMsg, unexported):
// a record's packet is what Memberlist.SendBestEffort would send, so the receiving memberlist
// hands it to NotifyMsg (records travel only in these packets in
// TestRecordsKeepTheirPaceWhenMemberlistGossipIsSlow and TestDroppedPacketsDoNotSpendRetransmits).
const userMsg byte = 8

func userMessage(msg []byte) []byte {
	return append([]byte{userMsg}, msg...)
}

func (p *pool) ml() *memberlist.Memberlist { return p.list.Load() }

func (p *pool) numNodes() int {
	if ml := p.ml(); ml != nil {
		return ml.NumMembers()
	}
	return 1
}

func (p *pool) stop(leave time.Duration) error {
	p.stopPump()
	ml := p.ml()
	_ = ml.Leave(leave)
	return ml.Shutdown()
}

// spread broadcasts raw if it fits in a gossip packet; otherwise, when this node originated it,
// pushes it to every member directly. It reports whether it queued or pushed anything.
func (p *pool) spread(raw []byte, origin bool) bool {
	msg := encodeMessage(raw)
	if len(msg) <= maxBroadcast {
		rec := p.recs.add(msg)
		select { // rouse the pump
		case p.queued <- struct{}{}:
		default:
		}
		if !p.m.cfg.NoRequeue {
			p.sendOpen(rec)
		}
		return true
	}
	if !origin {
		return false
	}
	for _, mem := range p.snapshot() {
		if mem.NodeID != p.m.cfg.NodeID && !p.m.revoked(mem.NodeID) {
			p.m.spawnPush(p.zone, mem, raw)
		}
	}
	return true
}

// sendOpen sends rec at once, as one best-effort packet, to every member this node already holds
// a tunnel with: no handshake, no waiting for a gossip round. The publisher and every member that
// takes the record for the first time do this, so a record floods the graph of open tunnels in a
// few link delays, and the gossip rounds, which skip members sent a copy here, spend its
// transmissions on the members beyond it (at 1,000 simulated members most pairs have no tunnel,
// and a round's packet to such a member waits for a handshake). The cost is bounded: one packet
// per open tunnel per new record, each side at most once (the receiver's seen-set drops the copy
// it already holds before any verification). These packets do not count against the record's
// retransmissions, which stay for the random members.
func (p *pool) sendOpen(rec *outRecord) {
	pkt := userMessage(rec.msg)
	for _, mem := range p.snapshot() {
		if mem.NodeID == p.m.cfg.NodeID || !mem.Addr.IsValid() || p.m.revoked(mem.NodeID) {
			continue
		}
		if _, ok := p.m.cfg.Endpoint.LiveTunnel(mem.NodeID, p.zone); !ok {
			continue
		}
		p.sendClaimed(rec, pkt, mem.NodeID, mem.Addr, &p.m.st.directSends)
	}
}

// sendClaimed sends rec's packet pkt to a member outside the rounds unless a copy was handed to it
// or is on its way (recordQueue.claim), counting it in sent once a tunnel took it and releasing
// the claim if it was dropped here.
func (p *pool) sendClaimed(rec *outRecord, pkt []byte, id string, addr netip.AddrPort, sent *atomic.Uint64) {
	if !p.recs.claim(rec, id) {
		return
	}
	p.tr.SendPacket(pkt, addr, id, func(ok bool) {
		if ok {
			sent.Add(1)
			return
		}
		p.recs.unclaim(rec, id)
	})
}

// tunnelUp sends every record still queued for gossip, as one best-effort packet each, to a member
// a tunnel with which has just opened (either end dialed it), unless a copy was already handed to
// it. sendOpen floods a new record over the tunnels open when this node first takes it; a tunnel
// opened afterwards, by a probe, a gossip round or an anchor, would otherwise carry the record
// only if a round drew that member (measured at 1,000 simulated nodes: the last member to hold a
// revocation had held tunnels with three members that had it for about a second). The cost is one
// packet per queued record per new tunnel, and nothing at rest: records leave the queue once
// their retransmissions are spent. A peer this pool does not list as a member of the trust
// domain, or one revoked, gets nothing; push/pull hands a joining member the records anyway.
func (p *pool) tunnelUp(nodeID string) {
	if p.m.cfg.NoRequeue || nodeID == p.m.cfg.NodeID || p.recs.len() == 0 || p.m.revoked(nodeID) {
		return
	}
	p.mu.Lock()
	e, ok := p.members[nodeID]
	p.mu.Unlock()
	if !ok || !e.node || !e.Addr.IsValid() {
		return
	}
	for _, rec := range p.recs.pending() {
		p.sendClaimed(rec, userMessage(rec.msg), nodeID, e.Addr, &p.m.st.tunnelUpSends)
	}
}

// take consumes a record message, which this package sends as a packet of its own (a single
// user message, never compound: GetBroadcasts gives memberlist nothing), before memberlist
// queues it. In memberlist user messages wait in the pool's one handler queue behind alive
// messages and beside suspect and dead ones, and are dropped when that queue is full; a record
// takes the same seen-set, verification and store here as through NotifyMsg, a copy it already
// holds costs a lookup, and the peer is the tunnel's, authenticated as before. Anything else is
// memberlist's.
func (p *pool) take(b []byte) bool {
	if len(b) < 2 || b[0] != userMsg || b[1] != msgRecord {
		return false
	}
	p.NotifyMsg(b[1:])
	return true
}

// NodeMeta: members carry no metadata; nothing they could claim there is trusted anyway.
func (p *pool) NodeMeta(int) []byte { return nil }

// NotifyMsg takes a gossip message; it copies what it keeps and never blocks.
func (p *pool) NotifyMsg(b []byte) {
	raw, err := parseMessage(b, p.m.cfg.MaxRecordSize)
	if err != nil {
		p.m.st.malformed.Add(1)
		return
	}
	p.m.enqueue(p.zone, slices.Clone(raw))
}

// GetBroadcasts gives memberlist's own gossip rounds and probes nothing: records go in the
// pool's rounds (gossipRound), which count what reached a tunnel, and not in memberlist's, which
// would spend them blindly.
func (p *pool) GetBroadcasts(int, int) [][]byte { return nil }

// LocalState sends the zone's records, at most MaxStateBytes of them, starting at a random
// record so that successive exchanges of a set over the cap carry different parts of it.
func (p *pool) LocalState(bool) []byte {
	recs := p.m.cfg.Records.Snapshot(p.zone)
	start := 0
	if len(recs) > 1 {
		start = rand.IntN(len(recs))
	}
	b, skipped := encodeState(recs, start, p.m.cfg.MaxStateBytes)
	p.m.st.truncated.Add(uint64(skipped))
	return b
}

// MergeRemoteState adds each record of a peer's state (it runs on memberlist's push/pull
// goroutine, not its packet loop).
func (p *pool) MergeRemoteState(buf []byte, _ bool) {
	recs, err := parseState(buf, p.m.cfg.MaxStateBytes, p.m.cfg.MaxRecordSize)
	if err != nil {
		p.m.st.malformed.Add(1)
		return
	}
	for _, r := range recs {
		p.m.receive(p.zone, slices.Clone(r), fromState)
	}
}

// NotifyAlive refuses alive claims for names that are not nodes of this trust domain or that
// are revoked: memberlist then ignores the claim.
func (p *pool) NotifyAlive(n *memberlist.Node) error {
	if err := p.m.checkName(n.Name); err != nil {
		p.m.st.namesRefused.Add(1)
		return err
	}
	return nil
}

// NotifyMerge refuses a join whose member list names anything but nodes of this trust domain.
// Revoked names are left to NotifyAlive, one by one: an honest peer may not have learned of a
// revocation yet, and refusing its whole list would keep this node out of the pool.
func (p *pool) NotifyMerge(peers []*memberlist.Node) error {
	for _, n := range peers {
		if err := p.m.checkName(n.Name); err != nil && !errors.Is(err, ErrRevokedMember) {
			p.m.st.namesRefused.Add(1)
			return err
		}
	}
	return nil
}

// NotifyJoin records a member memberlist now considers alive. It runs under memberlist's node
// lock, so n is read safely here.
func (p *pool) NotifyJoin(n *memberlist.Node) { p.setMember(n) }

// NotifyUpdate records a member's new address or metadata.
func (p *pool) NotifyUpdate(n *memberlist.Node) { p.setMember(n) }

// NotifyLeave forgets a member declared dead or gone.
func (p *pool) NotifyLeave(n *memberlist.Node) {
	p.mu.Lock()
	_, had := p.members[n.Name]
	if had {
		delete(p.members, n.Name)
		p.ver++
	}
	p.mu.Unlock()
	if had {
		p.m.notifyChanged()
	}
}

func (p *pool) setMember(n *memberlist.Node) {
	addr, _ := netip.AddrFromSlice(n.Addr)
	mem := Member{NodeID: n.Name, Addr: netip.AddrPortFrom(addr.Unmap(), n.Port), State: stateName(memberlist.StateAlive)}
	p.mu.Lock()
	old, had := p.members[n.Name]
	changed := !had || old.Member != mem
	if changed {
		node := old.node
		if !had {
			node = p.m.checkNode(n.Name) == nil
		}
		p.members[n.Name] = memberEntry{Member: mem, node: node}
		p.ver++
	}
	p.mu.Unlock()
	if changed {
		p.m.notifyChanged()
	}
}
