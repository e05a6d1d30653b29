package config

import (
	"bytes"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const full = `# every key
listen: 127.0.0.1:0
advertise: 192.0.2.10:7444
interface: tun
transport: wireguard
peers:
  - node: b
    addr: 192.0.2.11:7444
  - node: spiffe://acme.internal/node/c
    addr: "[2001:db8::c]:7444"
metrics: 127.0.0.1:9464
log:
  level: debug
  format: json
gossip:
  interval: 100ms
  probe_interval: 2s
  push_pull_interval: 5s
  retransmit_mult: 3
  tunnel_idle: 2m
renewal:
  min_retry: 1s
  max_retry: 1m
  timeout: 10s
authority: auth.acme.internal:7443
`

func TestParseFull(t *testing.T) {
	c, err := Parse("node.yaml", []byte(full))
	require.NoError(t, err)
	assert.Equal(t, Config{
		Listen:    netip.MustParseAddrPort("127.0.0.1:0"),
		Advertise: netip.MustParseAddrPort("192.0.2.10:7444"),
		Interface: InterfaceTUN,
		Transport: TransportWireGuard,
		Peers: []Peer{
			{Node: "b", Addr: netip.MustParseAddrPort("192.0.2.11:7444")},
			{Node: "spiffe://acme.internal/node/c", Addr: netip.MustParseAddrPort("[2001:db8::c]:7444")},
		},
		Metrics:   netip.MustParseAddrPort("127.0.0.1:9464"),
		Log:       Log{Level: slog.LevelDebug, Format: LogJSON},
		Gossip:    Gossip{Interval: 100 * time.Millisecond, ProbeInterval: 2 * time.Second, PushPullInterval: 5 * time.Second, RetransmitMult: 3, TunnelIdle: 2 * time.Minute},
		Renewal:   Renewal{MinRetry: time.Second, MaxRetry: time.Minute, Timeout: 10 * time.Second},
		Authority: "auth.acme.internal:7443",
	}, c)
}

func TestEmptyFileIsDefault(t *testing.T) {
	for _, src := range []string{"", "# nothing\n", "---\n", "\n\n"} {
		c, err := Parse("empty.yaml", []byte(src))
		require.NoError(t, err, "%q", src)
		assert.Equal(t, Default(), c, "%q", src)
	}
	d := Default()
	assert.Equal(t, netip.MustParseAddrPort("0.0.0.0:7444"), d.Listen)
	assert.False(t, d.Metrics.IsValid(), "metrics are off by default")
	assert.Equal(t, InterfaceProxy, d.Interface, "the issue: proxy is the default interface without root")
	assert.Equal(t, TransportQUIC, d.Transport)
	assert.Equal(t, time.Minute, d.Gossip.TunnelIdle, "tunnel.Limits.GossipIdleTimeout's default")
}

func TestPartialKeepsDefaults(t *testing.T) {
	c, err := Parse("p.yaml", []byte("log:\n  level: warn\ngossip:\n  interval: 50ms\nmetrics:\nadvertise: \"\"\n"))
	require.NoError(t, err)
	want := Default()
	want.Log.Level = slog.LevelWarn
	want.Gossip.Interval = 50 * time.Millisecond
	assert.Equal(t, want, c)
}

// Every refusal, with the sentinel, the place and the field it must name.
func TestParseErrors(t *testing.T) {
	deep := "peers: " + strings.Repeat("[", MaxDepth+1) + strings.Repeat("]", MaxDepth+1) + "\n"
	dashes := "peers:\n  " + strings.Repeat("- ", MaxDepth+1) + "x\n"
	for _, tc := range []struct {
		name, src string
		err       error
		where     string // "line:col" prefix after the file name
		field     string
		msg       string
	}{
		{"unknown top key", "listen: 127.0.0.1:1\nlisen: 1\n", ErrUnknownField, "2:1", "lisen", "allowed: listen"},
		{"unknown nested key", "log:\n  levl: debug\n", ErrUnknownField, "2:3", "log.levl", "allowed: level, format"},
		{"unknown peer key", "peers:\n  - node: b\n    adr: 1.2.3.4:5\n", ErrUnknownField, "3:5", "peers[0].adr", ""},
		{"duplicate key", "listen: 127.0.0.1:1\nlisten: 127.0.0.1:2\n", ErrSyntax, "2:1", "", "already defined"},
		{"duplicate nested key", "log:\n  level: info\n  level: debug\n", ErrSyntax, "3:3", "", "already defined"},
		{"anchor", "log: &a\n  level: info\n", ErrUnsupported, "1:6", "log", "anchors"},
		{"alias", "log:\n  level: &l info\n  format: *l\n", ErrUnsupported, "2:10", "log.level", "anchors"},
		{"tag", "listen: !!str 127.0.0.1:1\n", ErrUnsupported, "1:9", "listen", "tags"},
		{"merge key", "log:\n  <<: {level: info}\n", ErrUnsupported, "", "log", "merge keys"},
		{"two documents", "listen: 127.0.0.1:1\n---\nlisten: 127.0.0.1:2\n", ErrUnsupported, "", "", "2 YAML documents"},
		{"not a mapping", "- listen\n", ErrBadValue, "1:1", "", "expected a mapping"},
		{"syntax", "listen: [\n", ErrSyntax, "", "", ""},
		{"bad listen", "listen: localhost:7444\n", ErrBadValue, "1:9", "listen", "host names are not resolved"},
		{"listen as port number", "listen: 7444\n", ErrBadValue, "1:9", "listen", "got an integer"},
		{"listen empty", "listen:\n", ErrBadValue, "1:1", "listen", "got nothing"},
		{"ipv6 unquoted", "listen: [::1]:7444\n", ErrSyntax, "1:", "", ""},
		{"ipv6 zone", "listen: \"[fe80::1%eth0]:7444\"\n", ErrBadValue, "1:9", "listen", "zone"},
		{"advertise unspecified", "advertise: 0.0.0.0:7444\n", ErrBadValue, "1:12", "advertise", "cannot be reached"},
		{"advertise port 0", "advertise: 192.0.2.1:0\n", ErrBadValue, "1:12", "advertise", "non-zero port"},
		{"metrics not loopback", "metrics: 0.0.0.0:9464\n", ErrNotLoopback, "1:10", "metrics", "loopback only"},
		{"metrics public", "metrics: 192.0.2.1:9464\n", ErrNotLoopback, "1:10", "metrics", ""},
		{"metrics host name", "metrics: localhost:9464\n", ErrBadValue, "1:10", "metrics", ""},
		{"interface", "interface: tap\n", ErrBadValue, "1:12", "interface", "netstack or tun"},
		{"transport", "transport: tcp\n", ErrBadValue, "1:12", "transport", "quic or wireguard"},
		{"peers not list", "peers: b\n", ErrBadValue, "1:8", "peers", "expected a list"},
		{"peer missing addr", "peers:\n  - node: b\n", ErrBadValue, "2:5", "peers[0].addr", "needs node and addr"},
		{"peer missing node", "peers:\n  - addr: 192.0.2.1:7444\n", ErrBadValue, "2:5", "peers[0].node", "needs node and addr"},
		{"peer bad name", "peers:\n  - node: Bad_Name\n    addr: 192.0.2.1:7444\n", ErrBadValue, "2:11", "peers[0].node", "node name"},
		{"peer agent id", "peers:\n  - node: spiffe://td/zone/z/agent/a\n    addr: 192.0.2.1:7444\n", ErrBadValue, "2:11", "peers[0].node", "is a agent ID"},
		{"peer bad spiffe", "peers:\n  - node: spiffe://TD/node/a\n    addr: 192.0.2.1:7444\n", ErrBadValue, "2:11", "peers[0].node", ""},
		{"peer twice", "peers:\n  - {node: b, addr: 192.0.2.1:7444}\n  - {node: b, addr: 192.0.2.2:7444}\n", ErrBadValue, "3:12", "peers[1].node", "listed twice"},
		{"peer addr unspecified", "peers:\n  - {node: b, addr: 0.0.0.0:7444}\n", ErrBadValue, "2:21", "peers[0].addr", "not a reachable"},
		{"peer item not mapping", "peers:\n  - b\n", ErrBadValue, "2:5", "peers[0]", "expected a mapping"},
		{"too many peers", "peers: [" + strings.Repeat("{node: b, addr: 192.0.2.1:1},", maxPeers+1) + "]\n", ErrTooLarge, "1:8", "peers", "more than 256"},
		{"log level", "log:\n  level: verbose\n", ErrBadValue, "2:10", "log.level", "debug, info, warn or error"},
		{"log format", "log: {format: xml}\n", ErrBadValue, "1:15", "log.format", "text or json"},
		{"log null", "log:\n", ErrBadValue, "", "log", "expected a mapping"},
		{"gossip unitless", "gossip:\n  interval: 200\n", ErrBadValue, "2:13", "gossip.interval", "with a unit"},
		{"gossip bad duration", "gossip:\n  interval: fast\n", ErrBadValue, "2:13", "gossip.interval", "not a duration"},
		{"gossip too fast", "gossip:\n  interval: 1ms\n", ErrBadValue, "2:13", "gossip.interval", "outside 10ms..1m0s"},
		{"gossip negative", "gossip:\n  push_pull_interval: -1s\n", ErrBadValue, "2:23", "gossip.push_pull_interval", "outside"},
		{"tunnel idle too short", "gossip:\n  tunnel_idle: 10ms\n", ErrBadValue, "2:16", "gossip.tunnel_idle", "outside 1s..24h0m0s"},
		{"retransmit zero", "gossip:\n  retransmit_mult: 0\n", ErrBadValue, "2:20", "gossip.retransmit_mult", "outside 1..16"},
		{"retransmit huge", "gossip:\n  retransmit_mult: 99999999999999999999\n", ErrBadValue, "", "gossip.retransmit_mult", ""},
		{"retransmit string", "gossip:\n  retransmit_mult: \"3\"\n", ErrBadValue, "2:20", "gossip.retransmit_mult", "expected an integer"},
		{"renewal min > max", "renewal:\n  min_retry: 10m\n  max_retry: 1m\n", ErrBadValue, "3:14", "renewal.max_retry", "longer than max_retry"},
		{"renewal min > default max", "renewal:\n  min_retry: 1h\n", ErrBadValue, "2:14", "renewal.min_retry", "longer than"},
		{"renewal timeout", "renewal: {timeout: 0s}\n", ErrBadValue, "1:20", "renewal.timeout", "outside"},
		{"authority no port", "authority: auth.acme.internal\n", ErrBadValue, "1:12", "authority", "host:port"},
		{"authority port 0", "authority: auth:0\n", ErrBadValue, "1:12", "authority", "no valid port"},
		{"authority bool", "authority: true\n", ErrBadValue, "1:12", "authority", "got a boolean"},
		{"too deep flow", deep, ErrTooDeep, "1:", "", "nested"},
		{"too deep compact", dashes, ErrTooDeep, "2:", "", "nested"},
		{"too large", strings.Repeat("#", MaxSize+1), ErrTooLarge, "", "", ""},
		{"non-string key", "1: x\n", ErrBadValue, "1:1", "", "plain names"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse("node.yaml", []byte(tc.src))
			require.Error(t, err)
			require.ErrorIs(t, err, tc.err, "%v", err)
			var pe *ParseError
			require.ErrorAs(t, err, &pe)
			assert.Equal(t, "node.yaml", pe.File)
			assert.Equal(t, tc.field, pe.Field, "%v", err)
			if tc.where != "" {
				assert.True(t, strings.HasPrefix(err.Error(), "node.yaml:"+tc.where), "%v", err)
			}
			assert.Contains(t, err.Error(), tc.msg)
			assert.NotContains(t, err.Error(), "\n", "one line")
		})
	}
}

func TestLoad(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "node.yaml")
	require.NoError(t, os.WriteFile(p, []byte(full), 0o600))
	c, err := Load(p)
	require.NoError(t, err)
	assert.Equal(t, InterfaceTUN, c.Interface)

	_, err = Load(filepath.Join(dir, "missing.yaml"))
	require.ErrorIs(t, err, os.ErrNotExist)

	big := filepath.Join(dir, "big.yaml")
	require.NoError(t, os.WriteFile(big, bytes.Repeat([]byte("#"), MaxSize+10), 0o600))
	_, err = Load(big)
	require.ErrorIs(t, err, ErrTooLarge)

	bad := filepath.Join(dir, "bad.yaml")
	require.NoError(t, os.WriteFile(bad, []byte("listen: 127.0.0.1:1\nnope: 1\n"), 0o600))
	_, err = Load(bad)
	require.ErrorIs(t, err, ErrUnknownField)
	assert.True(t, strings.HasPrefix(err.Error(), bad+":2:1: nope: "), err.Error())
}

// The sample config shipped in docs/ must load and must differ from the defaults only where it
// says so, so the reference cannot drift from the code.
func TestExampleConfigLoads(t *testing.T) {
	c, err := Load(filepath.Join("..", "..", "docs", "examples", "node.yaml"))
	require.NoError(t, err)
	assert.Equal(t, netip.MustParseAddrPort("0.0.0.0:7444"), c.Listen)
	assert.Equal(t, netip.MustParseAddrPort("127.0.0.1:9464"), c.Metrics)
	assert.Equal(t, LogJSON, c.Log.Format)
	assert.Len(t, c.Peers, 2)
	d := Default()
	assert.Equal(t, d.Gossip, c.Gossip, "the example spells out the default gossip values")
	assert.Equal(t, d.Renewal, c.Renewal, "the example spells out the default renewal values")
}

func TestApplyOverrides(t *testing.T) {
	c, err := Parse("n.yaml", []byte(full))
	require.NoError(t, err)
	s := func(v string) *string { return &v }
	got, err := c.Apply(Overrides{Listen: s("127.0.0.1:9000"), Metrics: s(""), LogFormat: s("text"), Advertise: s("")})
	require.NoError(t, err)
	assert.Equal(t, netip.MustParseAddrPort("127.0.0.1:9000"), got.Listen)
	assert.False(t, got.Metrics.IsValid(), "--metrics \"\" turns metrics off")
	assert.False(t, got.Advertise.IsValid())
	assert.Equal(t, LogText, got.Log.Format)
	assert.Equal(t, c.Peers, got.Peers, "untouched keys keep the file's values")
	assert.Equal(t, netip.MustParseAddrPort("127.0.0.1:9464"), c.Metrics, "Apply does not modify the receiver")

	for _, tc := range []struct {
		o    Overrides
		err  error
		flag string
	}{
		{Overrides{Listen: s("nope")}, ErrBadValue, "--listen: "},
		{Overrides{Metrics: s("10.0.0.1:9464")}, ErrNotLoopback, "--metrics: "},
		{Overrides{LogFormat: s("xml")}, ErrBadValue, "--log-format: "},
		{Overrides{LogLevel: s("loud")}, ErrBadValue, "--log-level: "},
		{Overrides{Advertise: s("0.0.0.0:1")}, ErrBadValue, "--advertise: "},
		{Overrides{Interface: s("tap")}, ErrBadValue, "--interface: "},
		{Overrides{Transport: s("udp")}, ErrBadValue, "--transport: "},
		{Overrides{Authority: s("x")}, ErrBadValue, "--authority: "},
	} {
		_, err := c.Apply(tc.o)
		require.ErrorIs(t, err, tc.err)
		assert.True(t, strings.HasPrefix(err.Error(), tc.flag), err.Error())
	}
}

func TestAdvertiseAddr(t *testing.T) {
	c := Default()
	_, ok := c.AdvertiseAddr(netip.MustParseAddrPort("0.0.0.0:7444"))
	assert.False(t, ok, "an unspecified bind address names no host to advertise")
	a, ok := c.AdvertiseAddr(netip.MustParseAddrPort("127.0.0.1:40000"))
	assert.True(t, ok)
	assert.Equal(t, netip.MustParseAddrPort("127.0.0.1:40000"), a, "the bound port, not the configured :0")
	c.Advertise = netip.MustParseAddrPort("192.0.2.1:7444")
	a, ok = c.AdvertiseAddr(netip.MustParseAddrPort("0.0.0.0:7444"))
	assert.True(t, ok)
	assert.Equal(t, c.Advertise, a)
}

func TestReloadPlan(t *testing.T) {
	old := Default()
	p, err := old.ReloadPlan(Default())
	require.NoError(t, err)
	assert.True(t, p.Empty())

	next := Default()
	next.Log.Level = slog.LevelDebug
	next.Peers = []Peer{{Node: "b", Addr: netip.MustParseAddrPort("192.0.2.1:7444")}}
	next.Metrics = netip.MustParseAddrPort("127.0.0.1:9464")
	p, err = old.ReloadPlan(next)
	require.NoError(t, err)
	assert.Equal(t, Plan{Changed: []string{"peers", "metrics", "log.level"}, LogLevel: true, Peers: true, Metrics: true}, p)

	for key, mut := range map[string]func(*Config){
		"listen":     func(c *Config) { c.Listen = netip.MustParseAddrPort("127.0.0.1:1") },
		"advertise":  func(c *Config) { c.Advertise = netip.MustParseAddrPort("192.0.2.1:1") },
		"interface":  func(c *Config) { c.Interface = InterfaceTUN },
		"transport":  func(c *Config) { c.Transport = TransportWireGuard },
		"log.format": func(c *Config) { c.Log.Format = LogJSON },
		"gossip":     func(c *Config) { c.Gossip.RetransmitMult = 5 },
		"renewal":    func(c *Config) { c.Renewal.Timeout = time.Minute },
		"authority":  func(c *Config) { c.Authority = "a:1" },
	} {
		n := next // a reloadable change next to a restart-only one: all or nothing
		mut(&n)
		p, err := old.ReloadPlan(n)
		require.ErrorIs(t, err, ErrRestartRequired, key)
		assert.True(t, p.Empty(), "nothing may be applied when %s changed", key)
		assert.Contains(t, err.Error(), key+" changed")
	}
}

func TestLogHandler(t *testing.T) {
	var buf bytes.Buffer
	lv := new(slog.LevelVar)
	lv.Set(slog.LevelWarn)
	log := slog.New(Log{Format: LogJSON}.Handler(&buf, lv))
	log.Info("hidden")
	log.Warn("shown", "k", "v")
	assert.Equal(t, 1, strings.Count(buf.String(), "\n"))
	assert.Contains(t, buf.String(), `"msg":"shown"`)
	lv.Set(slog.LevelInfo)
	log.Info("now shown")
	assert.Contains(t, buf.String(), "now shown")
	buf.Reset()
	slog.New(Log{Format: LogText}.Handler(&buf, lv)).Info("x")
	assert.True(t, strings.HasPrefix(buf.String(), "time="), buf.String())
}
