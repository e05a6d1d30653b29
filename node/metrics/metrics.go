package metrics

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// ErrNotLoopback: Listen was asked for an address other hosts could reach.
var ErrNotLoopback = errors.New("metrics: address is not loopback")

// Namespace prefixes every metric name.
const Namespace = "ute"

// Metrics is one node's set of metrics. All methods are safe for concurrent use.
type Metrics struct {
	reg *prometheus.Registry

	tunnels          *prometheus.GaugeVec
	flowsAdmitted    *prometheus.CounterVec
	flowsDenied      *prometheus.CounterVec
	flowsRefused     *prometheus.CounterVec
	revocationsHeld  prometheus.Gauge
	revocationAge    prometheus.Histogram
	gossipMembers    *prometheus.GaugeVec
	gossipDropped    *prometheus.CounterVec
	renewalExpiry    prometheus.Gauge
	renewalFailure   prometheus.Gauge
	renewalFailures  prometheus.Counter
	renewalSuccesses prometheus.Counter
	auditAside       *prometheus.GaugeVec

	now    func() time.Time
	expiry atomic.Int64 // unix nanoseconds of the node certificate's NotAfter; 0 = unknown
}

// Option configures New.
type Option func(*Metrics)

// WithClock sets the clock behind ute_node_certificate_expiry_seconds (tests).
func WithClock(now func() time.Time) Option { return func(m *Metrics) { m.now = now } }

// New creates the metrics on a fresh registry, with the Go runtime and process collectors.
func New(opts ...Option) *Metrics {
	m := &Metrics{
		now: time.Now,
		reg: prometheus.NewRegistry(),
		tunnels: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: Namespace, Name: "tunnels",
			Help: "Open tunnels to peer nodes, per zone."}, []string{"zone"}),
		flowsAdmitted: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: Namespace, Name: "flows_admitted_total",
			Help: "Flows admitted after their DTL record verified, per zone."}, []string{"zone"}),
		flowsDenied: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: Namespace, Name: "flows_denied_total",
			Help: "Flows refused before delivery, per reason (the admission reason code)."}, []string{"reason"}),
		flowsRefused: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: Namespace, Name: "flows_refused_total",
			Help: "Flows this node's agents tried to open that were refused, here (stage resolve or tunnel) or by the peer (stage admission), per stage and reason."}, []string{"stage", "reason"}),
		revocationsHeld: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: Namespace, Name: "revocations_held",
			Help: "Revocation records in the node's set."}),
		revocationAge: prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: Namespace, Name: "revocation_age_seconds",
			Help: "Time from a revocation's issue to its first arrival at this node.",
			// Convergence is meant to take under a second; the tail shows partitions healing.
			Buckets: []float64{0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600}}),
		gossipMembers: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: Namespace, Name: "gossip_members",
			Help: "Live members of each zone's gossip pool, this node included."}, []string{"zone"}),
		gossipDropped: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: Namespace, Name: "gossip_records_dropped_total",
			Help: "Gossip and revocation records dropped unapplied, per reason."}, []string{"reason"}),
		renewalExpiry: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: Namespace, Name: "node_certificate_expiry_timestamp_seconds",
			Help: "Unix time at which the node certificate expires."}),
		renewalFailure: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: Namespace, Name: "renewal_last_failure_timestamp_seconds",
			Help: "Unix time of the last failed renewal attempt (0: none since start)."}),
		renewalFailures: prometheus.NewCounter(prometheus.CounterOpts{Namespace: Namespace, Name: "renewal_failures_total",
			Help: "Failed node certificate renewal attempts."}),
		renewalSuccesses: prometheus.NewCounter(prometheus.CounterOpts{Namespace: Namespace, Name: "renewals_total",
			Help: "Successful node certificate renewals."}),
		auditAside: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: Namespace, Name: "audit_set_aside",
			Help: "Audit log content the node found it could not verify at start and moved aside (kept, named in the log): files and entries."}, []string{"unit"}),
	}
	m.reg.MustRegister(m.tunnels, m.flowsAdmitted, m.flowsDenied, m.flowsRefused, m.revocationsHeld, m.revocationAge,
		m.gossipMembers, m.gossipDropped, m.renewalExpiry, m.renewalFailure, m.renewalFailures, m.renewalSuccesses, m.auditAside,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	for _, o := range opts {
		o(m)
	}
	// Seconds left is what an operator alerts on; computed at scrape time so it never goes stale.
	m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: Namespace, Name: "node_certificate_expiry_seconds",
		Help: "Seconds until the node certificate expires (negative once expired; 0 before it is known)."}, func() float64 {
		ns := m.expiry.Load()
		if ns == 0 {
			return 0
		}
		return time.Unix(0, ns).Sub(m.now()).Seconds()
	}))
	return m
}

// Registry is the metrics' own registry, for tests and for adding collectors.
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// Handler serves the registry in the Prometheus exposition format.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{Registry: m.reg, MaxRequestsInFlight: 4, Timeout: 10 * time.Second})
}

// SetTunnels records the number of open tunnels of a zone.
func (m *Metrics) SetTunnels(zone string, n int) { m.tunnels.WithLabelValues(zone).Set(float64(n)) }

// FlowAdmitted counts one admitted flow in zone.
func (m *Metrics) FlowAdmitted(zone string) { m.flowsAdmitted.WithLabelValues(zone).Inc() }

// FlowDenied counts one refused flow. reason must come from a fixed set (the admission reason
// codes, such as "replay" or "zone"), never from the peer's bytes.
func (m *Metrics) FlowDenied(reason string) { m.flowsDenied.WithLabelValues(reason).Inc() }

// FlowRefused counts one outbound flow of a local agent that was refused, at stage (resolve,
// tunnel or admission) for reason (a node or dtl reason code).
func (m *Metrics) FlowRefused(stage, reason string) {
	m.flowsRefused.WithLabelValues(stage, reason).Inc()
}

// SetRevocationsHeld records the size of the revocation set.
func (m *Metrics) SetRevocationsHeld(n int) { m.revocationsHeld.Set(float64(n)) }

// RevocationArrived records how old a revocation was when this node first received it. A
// negative age (the issuer's clock ahead of ours) counts as zero.
func (m *Metrics) RevocationArrived(age time.Duration) {
	m.revocationAge.Observe(max(age, 0).Seconds())
}

// SetGossipMembers records the live members of a zone's pool.
func (m *Metrics) SetGossipMembers(zone string, n int) {
	m.gossipMembers.WithLabelValues(zone).Set(float64(n))
}

// GossipDropped counts a dropped gossip or revocation record; reason comes from a fixed set
// such as "malformed", "oversized", "unsigned", "signature", "other_zone".
func (m *Metrics) GossipDropped(reason string) { m.gossipDropped.WithLabelValues(reason).Inc() }

// SetAuditSetAside records the audit log parts set aside (files) and the entries they hold: a
// non-zero value means someone wrote to or cut the log without the node key.
func (m *Metrics) SetAuditSetAside(files, entries int) {
	m.auditAside.WithLabelValues("files").Set(float64(files))
	m.auditAside.WithLabelValues("entries").Set(float64(entries))
}

// Renewed records a successful renewal and the new certificate's expiry.
func (m *Metrics) Renewed(notAfter time.Time) {
	m.renewalSuccesses.Inc()
	m.SetCertificateExpiry(notAfter)
}

// SetCertificateExpiry records the node certificate's expiry (at start and after renewal).
func (m *Metrics) SetCertificateExpiry(notAfter time.Time) {
	m.expiry.Store(notAfter.UnixNano())
	m.renewalExpiry.Set(float64(notAfter.UnixNano()) / 1e9)
}

// RenewalFailed records a failed renewal attempt at time at.
func (m *Metrics) RenewalFailed(at time.Time) {
	m.renewalFailures.Inc()
	m.renewalFailure.Set(float64(at.UnixNano()) / 1e9)
}

// ForgetZone drops a zone's per-zone series once the node no longer holds the zone.
func (m *Metrics) ForgetZone(zone string) {
	m.tunnels.DeleteLabelValues(zone)
	m.flowsAdmitted.DeleteLabelValues(zone)
	m.gossipMembers.DeleteLabelValues(zone)
}

// Server serves /metrics on a loopback address.
type Server struct {
	ln  net.Listener
	srv *http.Server
}

// Listen binds addr ("127.0.0.1:9464"; port 0 picks one), refusing any address that is not a
// loopback IP literal with ErrNotLoopback. Host names are refused too: "localhost" could
// resolve elsewhere.
func (m *Metrics) Listen(addr string, log *slog.Logger) (*Server, error) {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return nil, fmt.Errorf("%w: %q is not an IP address and port; write 127.0.0.1:9464", ErrNotLoopback, addr)
	}
	if !ap.Addr().IsLoopback() {
		return nil, fmt.Errorf("%w: %s is reachable from other hosts; use 127.0.0.1 or [::1]", ErrNotLoopback, addr)
	}
	ln, err := net.Listen("tcp", ap.String())
	if err != nil {
		return nil, fmt.Errorf("metrics: listen %s: %w", addr, err)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", m.Handler())
	return &Server{ln: ln, srv: &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      15 * time.Second,
		MaxHeaderBytes:    8 << 10,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}}, nil
}

// Addr is the bound address.
func (s *Server) Addr() net.Addr { return s.ln.Addr() }

// Serve answers until ctx is cancelled, then shuts down (in-flight scrapes get a second) and
// returns nil; it returns an error only if serving failed.
func (s *Server) Serve(ctx context.Context) error {
	done := make(chan error, 1)
	go func() { done <- s.srv.Serve(s.ln) }()
	select {
	case <-ctx.Done():
		shut, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		if err := s.srv.Shutdown(shut); err != nil {
			_ = s.srv.Close()
		}
		<-done
		return nil
	case err := <-done:
		return fmt.Errorf("metrics: serve: %w", err)
	}
}

// Close releases the listener of a Server that was never served.
func (s *Server) Close() error { return s.ln.Close() }

// Serve binds addr and serves until ctx is cancelled: Listen then Server.Serve.
func (m *Metrics) Serve(ctx context.Context, addr string, log *slog.Logger) error {
	s, err := m.Listen(addr, log)
	if err != nil {
		return err
	}
	return s.Serve(ctx)
}
