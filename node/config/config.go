package config

import (
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/ute-project/ute/identity"
)

// DefaultPort is the node's UDP port (QUIC tunnels and gossip share it) when the config names
// none. The authority listens on 7443 by default; nodes sit next to it.
const DefaultPort = 7444

// Interface says how agents reach the overlay.
type Interface string

// Interfaces.
const (
	InterfaceNetstack Interface = "netstack" // agents embedded in the daemon process (gVisor userspace stack), no root
	InterfaceTUN      Interface = "tun"      // kernel TUN device ute0, needs CAP_NET_ADMIN
	// InterfaceProxy serves each agent a SOCKS5 and an HTTP proxy on loopback, and forwards its
	// inbound flows to local ports (Agents); no root needed. It is the default, for root too: a
	// kernel interface with routes into the host's routing table is an operator's explicit choice.
	InterfaceProxy Interface = "proxy"
)

// Transport says how agent traffic crosses between nodes.
type Transport string

// Transports.
const (
	TransportQUIC      Transport = "quic" // the default
	TransportWireGuard Transport = "wireguard"
)

// LogFormat is the encoding of log lines.
type LogFormat string

// Log formats.
const (
	LogText LogFormat = "text"
	LogJSON LogFormat = "json"
)

// Config is the node daemon's configuration. The zero value is not valid; start from Default or
// Load.
type Config struct {
	// Listen is the UDP address of the node's QUIC endpoint (tunnels and gossip).
	Listen netip.AddrPort
	// Advertise is the address peers should use to reach this node; the zero value means "the
	// address the endpoint is bound to" (see AdvertiseAddr).
	Advertise netip.AddrPort
	Interface Interface
	Transport Transport
	// Peers are the fallback bootstrap: nodes to contact when the authority is unreachable.
	Peers []Peer
	// Metrics is the loopback address of the Prometheus endpoint; the zero value turns it off.
	Metrics netip.AddrPort
	Log     Log
	Gossip  Gossip
	Renewal Renewal
	// Authority overrides the authority address recorded in node.json at join; "" keeps it.
	Authority string
	// Agents are per-agent settings of the proxy interface (proxy addresses, inbound forwards,
	// attestation); used with Interface proxy only.
	Agents []AgentProxy
}

// Peer is a bootstrap peer: a node name or node SPIFFE ID, and its UDP address. The name is
// what the peer's certificate must prove; an address answering with another identity is refused
// by the tunnel layer.
type Peer struct {
	Node string
	Addr netip.AddrPort
}

// Log configures logging.
type Log struct {
	Level  slog.Level
	Format LogFormat
}

// Gossip tunes the per-zone memberlist pools (the names follow memberlist.Config).
type Gossip struct {
	Interval         time.Duration // GossipInterval
	ProbeInterval    time.Duration
	PushPullInterval time.Duration
	RetransmitMult   int
	// TunnelIdle closes a tunnel with no agent flow and no gossip stream open after this long
	// without traffic (tunnel.Limits.GossipIdleTimeout); the next message or flow dials again.
	TunnelIdle time.Duration
}

// Renewal bounds the credential scheduler's retries (node.Config.RenewMinRetry and friends).
type Renewal struct {
	MinRetry time.Duration
	MaxRetry time.Duration
	Timeout  time.Duration // one renewal attempt
}

// Default is the configuration of a node started without a config file.
func Default() Config {
	return Config{
		Listen:    netip.AddrPortFrom(netip.IPv4Unspecified(), DefaultPort),
		Interface: InterfaceProxy,
		Transport: TransportQUIC,
		Log:       Log{Level: slog.LevelInfo, Format: LogText},
		// memberlist's LAN defaults, except a faster push/pull so that a member that missed a
		// revocation catches up within seconds rather than half a minute.
		Gossip: Gossip{Interval: 200 * time.Millisecond, ProbeInterval: time.Second, PushPullInterval: 10 * time.Second, RetransmitMult: 4,
			TunnelIdle: 60 * time.Second},
		Renewal: Renewal{MinRetry: 5 * time.Second, MaxRetry: 5 * time.Minute, Timeout: 30 * time.Second},
	}
}

// Bounds of the tunable values: outside them a node either floods its zone or notices nothing.
const (
	maxPeers          = 256
	minGossipInterval = 10 * time.Millisecond
	maxGossipInterval = time.Minute
	minProbeInterval  = 100 * time.Millisecond
	maxProbeInterval  = 5 * time.Minute
	minPushPull       = time.Second
	maxPushPull       = time.Hour
	minTunnelIdle     = time.Second
	maxTunnelIdle     = 24 * time.Hour
	maxRetransmitMult = 16
	minRetry          = 100 * time.Millisecond
	maxRetry          = 24 * time.Hour
	minRenewTimeout   = time.Second
	maxRenewTimeout   = 10 * time.Minute
	maxAuthorityLen   = 255 + 6
)

// AdvertiseAddr is the address to announce to peers and the authority: Advertise when set,
// else bound (the endpoint's actual address, with the port chosen for :0) when its IP is
// specific. With an unspecified listen IP (0.0.0.0, ::) and no advertise it returns false: there
// is no single right answer on a multi-homed host, so the caller must decide or ask for one.
func (c Config) AdvertiseAddr(bound netip.AddrPort) (netip.AddrPort, bool) {
	if c.Advertise.IsValid() {
		return c.Advertise, true
	}
	if bound.IsValid() && !bound.Addr().IsUnspecified() && bound.Port() != 0 {
		return bound, true
	}
	return netip.AddrPort{}, false
}

// Handler builds the slog handler for this log configuration; level is usually a *slog.LevelVar
// so that a reload can change it (ReloadPlan).
func (l Log) Handler(w io.Writer, level slog.Leveler) slog.Handler {
	opts := &slog.HandlerOptions{Level: level}
	if l.Format == LogJSON {
		return slog.NewJSONHandler(w, opts)
	}
	return slog.NewTextHandler(w, opts)
}

// Overrides are command-line flags that take precedence over the file; nil leaves the file's
// value. Each is parsed exactly like the file's key of the same name.
type Overrides struct {
	Listen    *string // --listen
	Advertise *string // --advertise ("" clears it)
	Metrics   *string // --metrics ("" turns metrics off)
	LogFormat *string // --log-format
	LogLevel  *string // --log-level
	Interface *string // --interface
	Transport *string // --transport
	Authority *string // --authority ("" keeps node.json's)
}

// Apply returns c with the overrides applied. Errors name the flag and wrap a sentinel.
func (c Config) Apply(o Overrides) (Config, error) {
	type step struct {
		flag string
		v    *string
		set  func(string) error
	}
	steps := []step{
		{"--listen", o.Listen, func(s string) (err error) { c.Listen, err = parseListen(s); return }},
		{"--advertise", o.Advertise, func(s string) (err error) { c.Advertise, err = parseAdvertise(s); return }},
		{"--metrics", o.Metrics, func(s string) (err error) { c.Metrics, err = parseMetrics(s); return }},
		{"--log-format", o.LogFormat, func(s string) (err error) { c.Log.Format, err = parseLogFormat(s); return }},
		{"--log-level", o.LogLevel, func(s string) (err error) { c.Log.Level, err = parseLogLevel(s); return }},
		{"--interface", o.Interface, func(s string) (err error) { c.Interface, err = parseInterface(s); return }},
		{"--transport", o.Transport, func(s string) (err error) { c.Transport, err = parseTransport(s); return }},
		{"--authority", o.Authority, func(s string) (err error) { c.Authority, err = parseAuthority(s); return }},
	}
	c.Peers = slices.Clone(c.Peers)
	c.Agents = slices.Clone(c.Agents)
	for _, s := range steps {
		if s.v == nil {
			continue
		}
		if err := s.set(*s.v); err != nil {
			return Config{}, fmt.Errorf("%s: %w", s.flag, err)
		}
	}
	return c, nil
}

// Plan is what a reload (SIGHUP) changes in a running daemon. Only the fields flagged here may
// change at runtime; ReloadPlan refuses any other change.
type Plan struct {
	// Changed lists the changed fields by their config key, in file order.
	Changed  []string
	LogLevel bool // swap the level of the daemon's slog.LevelVar
	Peers    bool // re-read the bootstrap list (peers already met stay members)
	Metrics  bool // stop the metrics listener and start it on the new address (or not at all)
}

// Empty reports whether the reload changes nothing.
func (p Plan) Empty() bool { return len(p.Changed) == 0 }

// Reloadable are the config keys a SIGHUP may change; every other key needs a restart.
var Reloadable = []string{"log.level", "peers", "metrics"}

// ReloadPlan compares the running configuration c with next (freshly loaded, overrides applied)
// and says what to change. If any field that cannot change at runtime differs, it returns an
// error wrapping ErrRestartRequired naming those fields, and the daemon must apply nothing.
func (c Config) ReloadPlan(next Config) (Plan, error) {
	var p Plan
	var restart []string
	diff := func(key string, changed bool) {
		if !changed {
			return
		}
		if slices.Contains(Reloadable, key) {
			p.Changed = append(p.Changed, key)
		} else {
			restart = append(restart, key)
		}
	}
	diff("listen", c.Listen != next.Listen)
	diff("advertise", c.Advertise != next.Advertise)
	diff("interface", c.Interface != next.Interface)
	diff("transport", c.Transport != next.Transport)
	diff("peers", !slices.Equal(c.Peers, next.Peers))
	diff("metrics", c.Metrics != next.Metrics)
	diff("log.level", c.Log.Level != next.Log.Level)
	diff("log.format", c.Log.Format != next.Log.Format)
	diff("gossip", c.Gossip != next.Gossip)
	diff("renewal", c.Renewal != next.Renewal)
	diff("authority", c.Authority != next.Authority)
	diff("agents", !slices.EqualFunc(c.Agents, next.Agents, AgentProxy.Equal))
	if len(restart) > 0 {
		return Plan{}, fmt.Errorf("%w: %s changed; restart the daemon to apply (nothing was reloaded; runtime-reloadable keys are %s)",
			ErrRestartRequired, strings.Join(restart, ", "), strings.Join(Reloadable, ", "))
	}
	p.LogLevel = slices.Contains(p.Changed, "log.level")
	p.Peers = slices.Contains(p.Changed, "peers")
	p.Metrics = slices.Contains(p.Changed, "metrics")
	return p, nil
}

// The scalar parsers below serve both the file and the flags; their errors wrap a sentinel and
// say what to write instead.

func parseAddrPort(s, example string) (netip.AddrPort, error) {
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		return netip.AddrPort{}, valueError(ErrBadValue, "%q is not an IP address and port; write it like %s (quote IPv6: \"[::1]:%d\"); host names are not resolved", s, example, DefaultPort)
	}
	if ap.Addr().Zone() != "" {
		return netip.AddrPort{}, valueError(ErrBadValue, "%q has an IPv6 zone; zones are not supported", s)
	}
	return ap, nil
}

func parseListen(s string) (netip.AddrPort, error) {
	return parseAddrPort(s, "0.0.0.0:"+strconv.Itoa(DefaultPort))
}

func parseAdvertise(s string) (netip.AddrPort, error) {
	if s == "" {
		return netip.AddrPort{}, nil
	}
	ap, err := parseAddrPort(s, "203.0.113.7:"+strconv.Itoa(DefaultPort))
	if err != nil {
		return ap, err
	}
	if ap.Addr().IsUnspecified() || ap.Port() == 0 {
		return netip.AddrPort{}, valueError(ErrBadValue, "%q cannot be reached by peers; advertise a specific IP and a non-zero port", s)
	}
	return ap, nil
}

func parseMetrics(s string) (netip.AddrPort, error) {
	if s == "" {
		return netip.AddrPort{}, nil
	}
	ap, err := parseAddrPort(s, "127.0.0.1:9464")
	if err != nil {
		return ap, err
	}
	if !ap.Addr().IsLoopback() {
		return netip.AddrPort{}, valueError(ErrNotLoopback, "%q is reachable from other hosts; metrics are served on loopback only (write 127.0.0.1:9464 and scrape through an agent or a tunnel)", s)
	}
	return ap, nil
}

func parsePeerAddr(s string) (netip.AddrPort, error) {
	ap, err := parseAddrPort(s, "10.0.0.2:"+strconv.Itoa(DefaultPort))
	if err != nil {
		return ap, err
	}
	if ap.Addr().IsUnspecified() || ap.Port() == 0 {
		return netip.AddrPort{}, valueError(ErrBadValue, "%q is not a reachable peer address; give the peer's IP and port", s)
	}
	return ap, nil
}

func parsePeerNode(s string) (string, error) {
	if strings.HasPrefix(s, "spiffe://") {
		id, err := identity.ParseID(s)
		if err != nil {
			return "", valueError(ErrBadValue, "%v", err)
		}
		if id.Kind != identity.KindNode {
			return "", valueError(ErrBadValue, "%q is a %s ID; a peer is a node (spiffe://<td>/node/<name>) or a node name", s, id.Kind)
		}
		return s, nil
	}
	if err := identity.ValidateName("node name", s); err != nil {
		return "", valueError(ErrBadValue, "%v", err)
	}
	return s, nil
}

func parseAuthority(s string) (string, error) {
	if s == "" {
		return "", nil
	}
	host, port, err := net.SplitHostPort(s)
	if err != nil || host == "" || len(s) > maxAuthorityLen {
		return "", valueError(ErrBadValue, "%q is not host:port; write the authority's UDP address such as 10.0.0.1:7443", s)
	}
	if p, err := strconv.ParseUint(port, 10, 16); err != nil || p == 0 {
		return "", valueError(ErrBadValue, "%q has no valid port; write the authority's UDP address such as 10.0.0.1:7443", s)
	}
	return s, nil
}

func parseInterface(s string) (Interface, error) {
	switch i := Interface(s); i {
	case InterfaceNetstack, InterfaceTUN, InterfaceProxy:
		return i, nil
	}
	return "", valueError(ErrBadValue, "%q is not an interface; write netstack or tun, or proxy (SOCKS5/HTTP proxies per agent, no root)", s)
}

func parseTransport(s string) (Transport, error) {
	switch t := Transport(s); t {
	case TransportQUIC, TransportWireGuard:
		return t, nil
	}
	return "", valueError(ErrBadValue, "%q is not a transport; write quic or wireguard", s)
}

func parseLogFormat(s string) (LogFormat, error) {
	switch f := LogFormat(s); f {
	case LogText, LogJSON:
		return f, nil
	}
	return "", valueError(ErrBadValue, "%q is not a log format; write text or json", s)
}

func parseLogLevel(s string) (slog.Level, error) {
	switch s {
	case "debug":
		return slog.LevelDebug, nil
	case "info":
		return slog.LevelInfo, nil
	case "warn":
		return slog.LevelWarn, nil
	case "error":
		return slog.LevelError, nil
	}
	return 0, valueError(ErrBadValue, "%q is not a log level; write debug, info, warn or error", s)
}

func parseDuration(s string, lo, hi time.Duration) (time.Duration, error) {
	d, err := time.ParseDuration(s)
	if err != nil {
		return 0, valueError(ErrBadValue, "%q is not a duration; write it with a unit, e.g. 200ms, 5s or 1m", s)
	}
	if d < lo || d > hi {
		return 0, valueError(ErrBadValue, "%s is outside %s..%s", d, lo, hi)
	}
	return d, nil
}
