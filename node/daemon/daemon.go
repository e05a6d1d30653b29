package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/identity/record"
	"github.com/ute-project/ute/node"
	"github.com/ute-project/ute/node/config"
	"github.com/ute-project/ute/node/membership"
	"github.com/ute-project/ute/node/metrics"
	"github.com/ute-project/ute/node/revstore"
	"github.com/ute-project/ute/node/state"
	"github.com/ute-project/ute/overlay/gossip"
)

// Options configure a Daemon.
type Options struct {
	// Dir is the joined node directory.
	Dir string
	// Config is the loaded config file with the command line's overrides applied.
	Config config.Config
	// Logger receives the daemon's logs; nil discards them.
	Logger *slog.Logger
	// Clock is the time source; nil means time.Now.
	Clock func() time.Time
	// PacketConn, when set, is the underlay socket (tests inject one); otherwise the daemon
	// listens on Config.Listen.
	PacketConn net.PacketConn
	// NoAuthority skips the authority watch (tests of gossip alone, or an operator who runs
	// without one); renewal still uses the authority address when it has one.
	NoAuthority bool
	// LogLevel, when set, is the level of Logger's handler; Reload changes it.
	LogLevel *slog.LevelVar
	// Timing, when set, replaces the gossip timings of Config.Gossip (tests use
	// membership.FastTiming).
	Timing *membership.Timing
	// ReconnectInterval is how often a node whose pool already has members joins again through
	// the bootstrap members missing from it; default 30 s (tests shorten it).
	ReconnectInterval time.Duration
	// PruneInterval is how often expired revocations are dropped from the store; default 10 min.
	PruneInterval time.Duration
	// OnMismatch is told when a process that is not an agent's enrolled workload connects to the
	// agent's proxy (interface proxy; proxy.go); TrustFlow can lower the agent's trust with it.
	OnMismatch func(agent, reason string)
	// DuplicateConfirm is how long a node ID must stay live at two underlay addresses before
	// TrustFlow counts it as a duplicate identity (trust.go); default 45 s, above QUIC's idle
	// timeout, so that a peer restarted on another port is not its own duplicate.
	DuplicateConfirm time.Duration
	// TrustTick is the TrustFlow loop's period while it holds a score, an action or trust events
	// (trust.go); zero means 250 ms. With nothing held the loop wakes every 500 ms, or every
	// TrustTick if that is longer. A region-file change is noticed within one period: the
	// simulator lengthens it to spare the CPU of a thousand nodes, at the cost of that delay.
	TrustTick time.Duration
	// Version is the running binary's version line, reported by the local API's status.
	Version string
	// WireGuard tunes the WireGuard transport (Config.Transport wireguard; wireguard.go).
	WireGuard WireGuardOptions
	// TUN configures the kernel TUN interface (Config.Interface tun; tun.go).
	TUN TUNOptions

	// anchors overrides anchorsPerPool (tests; < 0: none); meshTunnels overrides meshTunnels
	// (tests; < 0: never hold a pool's tunnels across probe rounds).
	anchors, meshTunnels int
}

// Daemon is a running node with its gossip, authority watch, local API and metrics.
type Daemon struct {
	opts    Options
	log     *slog.Logger
	now     func() time.Time
	dir     *state.Dir
	store   *revstore.Store
	node    *node.Node
	mux     *gossip.Mux
	metrics *metrics.Metrics
	verif   record.Verifier
	started time.Time
	// authority is the authority's address: renewal and the watch use it; empty runs without.
	authority string
	advertise netip.AddrPort

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu     sync.Mutex
	cfg    config.Config
	pools  *pools
	proxy  *proxySet // interface proxy (proxy.go)
	tun    *tunIface // interface tun (tun.go)
	trust  *trust    // TrustFlow (trust.go); set before the node opens
	api    closer
	msrv   closer
	closed bool
	// retired is set once this node learns that it is revoked (records.go).
	retired, retiring bool
	stopWatch         context.CancelFunc

	// wgt is the WireGuard transport (wireguard.go); nil with QUIC.
	wgt *wgTransport
	// region caches the region file (trust.go).
	region regionFile
	// idle is the gossip tunnels' idle policy (idle.go), installed as soon as the node opens (a
	// tunnel accepted before that takes it at its first idle check).
	idle atomic.Pointer[idlePolicy]
	// anchors is the gossip anchors of every pool (anchors.go); anchorDials the dials to them in
	// flight (under mu).
	anchors     atomic.Pointer[anchorSet]
	anchorDials map[string]bool
}

type closer interface{ Close() error }

// Start brings a node up: store, node, gossip, authority watch, local API, metrics. The
// revocations and the policy release held in the store are in force before the node's endpoint
// takes its first handshake.
func Start(ctx context.Context, opts Options) (*Daemon, error) {
	if opts.Dir == "" {
		return nil, errors.New("daemon: a node directory is required (--dir)")
	}
	d := &Daemon{opts: opts, log: opts.Logger, now: opts.Clock, cfg: opts.Config, metrics: metrics.New()}
	if d.log == nil {
		d.log = slog.New(slog.DiscardHandler)
	}
	if d.now == nil {
		d.now = time.Now
	}
	dir, err := state.Open(opts.Dir, state.WithClock(d.now))
	if err != nil {
		return nil, err
	}
	d.dir = dir
	info, err := dir.Info()
	if err != nil {
		return nil, err
	}
	store, rep, err := OpenStore(dir, revstore.Options{Now: d.now, Logger: d.log})
	if err != nil {
		return nil, fmt.Errorf("daemon: revocation store: %w", err)
	}
	d.store = store
	anchor, err := dir.AuthorityCert()
	if err != nil {
		_ = store.Close()
		return nil, err
	}
	d.verif = record.Verifier{Certs: identity.Verifier{Authority: anchor}}
	for _, q := range rep.Quarantined {
		d.log.Error("stored record failed verification and was quarantined", "bucket", q.Bucket, "key", q.Key, "err", q.Err)
	}
	// The release saved at join is stored (verified) on first start; an older one is refused by
	// the store as stale, which is what a restart after a newer release arrived must do.
	if raw, err := dir.PolicyRelease(); err != nil {
		_ = store.Close()
		return nil, err
	} else if raw != nil {
		if _, _, err := store.SetPolicy(raw); err != nil && !errors.Is(err, revstore.ErrStalePolicy) {
			d.log.Warn("policy release saved at join refused", "err", err)
		}
	}
	revoked := map[string]string{}
	for _, e := range store.All() {
		for _, k := range e.Record.Keys() {
			revoked[k] = e.Record.Claims.Reason
		}
	}
	ncfg := node.Config{
		Dir: opts.Dir, PacketConn: opts.PacketConn, Clock: d.now, Logger: d.log,
		Revoked:       revoked,
		RenewMinRetry: d.cfg.Renewal.MinRetry, RenewMaxRetry: d.cfg.Renewal.MaxRetry, RenewTimeout: d.cfg.Renewal.Timeout,
		OnRefused: func(_, stage, reason string) { d.metrics.FlowRefused(stage, reason) },
		OnVerdict: func(zone, reason string) {
			if reason == "" {
				d.metrics.FlowAdmitted(zone)
			} else {
				d.metrics.FlowDenied(reason)
			}
		},
	}
	ncfg.Resolve = d.resolve
	ncfg.Limits.GossipIdleTimeout = d.cfg.Gossip.TunnelIdle
	if d.trust, err = newTrust(d); err != nil {
		_ = store.Close()
		return nil, err
	}
	d.trust.hook(&ncfg)
	bound := d.cfg.Listen
	if opts.PacketConn != nil {
		bound, _ = netip.ParseAddrPort(opts.PacketConn.LocalAddr().String())
	}
	if adv, ok := d.cfg.AdvertiseAddr(bound); ok {
		ncfg.Advertise = adv.String()
	}
	if opts.PacketConn == nil {
		ncfg.ListenAddr = d.cfg.Listen.String()
	}
	ncfg.Authority = d.cfg.Authority
	if ncfg.Authority == "" {
		ncfg.Authority = info.Authority
	}
	d.authority = ncfg.Authority
	if rel := store.PolicyRelease(); rel != nil {
		if ncfg.Policy, err = parseRelease(rel); err != nil {
			_ = store.Close()
			return nil, err
		}
	}
	d.mux = gossip.NewMux(d.log)
	ncfg.ControlHandler, ncfg.ControlDatagram, ncfg.TunnelUp = d.mux.ControlHandler, d.mux.ControlDatagram, d.mux.TunnelUp
	n, err := node.Open(ctx, ncfg)
	if err != nil {
		_ = store.Close()
		return nil, err
	}
	d.node = n
	d.idle.Store(&idlePolicy{fixed: fixedIdle(d.cfg.Gossip)})
	n.Endpoint().SetGossipIdlePolicy(d.tunnelIdle)
	d.metrics.SetRevocationsHeld(store.Len())
	d.metrics.SetCertificateExpiry(n.Certificate().X509.NotAfter)
	d.auditAsideMetric()
	d.ctx, d.cancel = context.WithCancel(context.Background())
	d.started = d.now()

	if err := d.startPools(); err != nil {
		d.abort()
		return nil, err
	}
	if d.cfg.Transport == config.TransportWireGuard {
		if err := d.startWireGuard(); err != nil {
			d.abort()
			return nil, err
		}
	}
	// Proxies before the local API, so that an agent added through the API is never missed.
	if err := d.startProxies(); err != nil {
		d.abort()
		return nil, err
	}
	if err := d.startTUN(); err != nil {
		d.abort()
		return nil, err
	}
	if err := d.startAPI(); err != nil {
		d.abort()
		return nil, err
	}
	if d.cfg.Metrics.IsValid() {
		srv, err := d.metrics.Listen(d.cfg.Metrics.String(), d.log)
		if err != nil {
			d.abort()
			return nil, err
		}
		d.msrv = srv
		d.wg.Go(func() { _ = srv.Serve(d.ctx) })
	}
	if !opts.NoAuthority && ncfg.Authority != "" {
		wctx, stop := context.WithCancel(d.ctx)
		d.mu.Lock()
		d.stopWatch = stop
		d.mu.Unlock()
		d.wg.Go(func() { d.watchAuthority(wctx, ncfg.Authority) })
	}
	d.wg.Go(d.pruneLoop)
	d.retireIfRevoked()
	d.wg.Go(func() { d.trust.loop(d.ctx) })
	d.log.Info("node daemon up", "node", n.ID().String(), "addr", n.Addr().String(), "zones", n.Zones(),
		"revocations", store.Len(), "policy_version", rep.PolicyVersion)
	return d, nil
}

// abort undoes a partial Start.
func (d *Daemon) abort() {
	_ = d.Close()
}

// Node is the running node.
func (d *Daemon) Node() *node.Node { return d.node }

// Store is the node's revocation store.
func (d *Daemon) Store() *revstore.Store { return d.store }

// Metrics are the node's metrics.
func (d *Daemon) Metrics() *metrics.Metrics { return d.metrics }

// Addr is the node's underlay address.
func (d *Daemon) Addr() netip.AddrPort { return d.node.Addr() }

// Revoke revokes subject at this node: the node signs a record for itself or one of its agents,
// stores it durably, cuts the subject off and spreads the record. It returns the signed record.
func (d *Daemon) Revoke(ctx context.Context, subject, reason string) ([]byte, error) {
	raw, err := d.node.SignRevocation(subject, reason)
	if err != nil {
		return nil, err
	}
	if _, err := d.Accept(ctx, raw, FromLocal); err != nil {
		return nil, err
	}
	return raw, nil
}

// Close stops the daemon: the local API, metrics and authority watch, the gossip pools (leaving
// them so peers learn at once), then the node (flows closed, audit log flushed) and the store.
func (d *Daemon) Close() error {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return nil
	}
	d.closed = true
	api, msrv, p := d.api, d.msrv, d.pools
	d.mu.Unlock()
	var errs []error
	if d.cancel != nil {
		d.cancel()
	}
	if api != nil {
		errs = append(errs, api.Close())
	}
	if msrv != nil {
		_ = msrv.Close()
	}
	d.closeProxies()
	d.closeTUN()
	d.closeWireGuard()
	if p != nil {
		errs = append(errs, p.close())
	}
	d.wg.Wait()
	if d.node != nil {
		errs = append(errs, d.node.Close())
	}
	if d.store != nil {
		errs = append(errs, d.store.Close())
	}
	return errors.Join(errs...)
}

// pruneLoop drops revocations whose certificates have all expired, so the set stays bounded.
func (d *Daemon) pruneLoop() {
	every := d.opts.PruneInterval
	if every <= 0 {
		every = 10 * time.Minute
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-d.ctx.Done():
			return
		case <-t.C:
			if n, err := d.store.Prune(d.now()); err != nil {
				d.log.Warn("prune revocations", "err", err)
			} else if n > 0 {
				d.log.Info("expired revocations dropped", "count", n)
				d.metrics.SetRevocationsHeld(d.store.Len())
			}
		}
	}
}

// Reload applies a re-read config (SIGHUP): the log level, the bootstrap peers and the metrics
// address change at once; a change to anything else is refused whole (config.ErrRestartRequired)
// and nothing is applied.
func (d *Daemon) Reload(next config.Config) (config.Plan, error) {
	d.mu.Lock()
	cur, closed := d.cfg, d.closed
	d.mu.Unlock()
	if closed {
		return config.Plan{}, errors.New("daemon: closed")
	}
	plan, err := cur.ReloadPlan(next)
	if err != nil || plan.Empty() {
		return plan, err
	}
	if plan.LogLevel && d.opts.LogLevel != nil {
		d.opts.LogLevel.Set(next.Log.Level)
	}
	if plan.Metrics {
		d.mu.Lock()
		old := d.msrv
		d.msrv = nil
		d.mu.Unlock()
		if old != nil {
			_ = old.Close()
		}
		if next.Metrics.IsValid() {
			srv, err := d.metrics.Listen(next.Metrics.String(), d.log)
			if err != nil {
				return plan, fmt.Errorf("daemon: reload metrics: %w", err)
			}
			d.mu.Lock()
			d.msrv = srv
			d.mu.Unlock()
			d.wg.Go(func() { _ = srv.Serve(d.ctx) })
		}
	}
	d.mu.Lock()
	d.cfg = next
	d.mu.Unlock()
	d.log.Info("config reloaded", "changed", plan.Changed)
	return plan, nil
}
