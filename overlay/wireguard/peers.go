package wireguard

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync"

	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/tun"
)

// Member is one peer node as verified in one zone: its key binding (VerifyBinding over the zone's
// tunnel), the overlay prefixes its node certificate grants in that zone, and the addresses of
// its agents in that zone taken from verified agent certificates.
type Member struct {
	Zone     string
	Binding  *Binding
	Prefixes []netip.Prefix
	Agents   []netip.Addr
}

// PeerSpec is one wireguard-go peer: a node, its bound key, its endpoint and its allowed IPs
// (one single-address prefix per agent).
type PeerSpec struct {
	Node       string
	Key        Key
	Endpoint   netip.AddrPort
	AllowedIPs []netip.Prefix
}

// Conflict is a key bound by more than one node; none of them is configured.
type Conflict struct {
	Key   Key
	Nodes []string
}

// Exclude says which nodes and agent addresses the peer set leaves out; a nil func excludes
// nothing.
type Exclude struct {
	// Node excludes a whole node (revoked, isolated): it is no peer.
	Node func(node string) bool
	// Agent excludes one agent address of a node (that agent was revoked): it is no allowed IP.
	Agent func(node string, addr netip.Addr) bool
}

// ComputePeers is the device's peer set: one peer per node that has a verified binding in a
// zone this node serves and is not excluded (revoked, isolated), with the key and endpoint of its
// newest binding and, as allowed IPs, exactly its agents' addresses in those zones that lie in
// the prefixes its certificate grants there and are not excluded. A key bound by two nodes
// configures neither (it is reported), nor does a binding of this node's own key. Output is
// sorted by node.
func ComputePeers(self Key, zones []string, members []Member, ex Exclude) ([]PeerSpec, []Conflict) {
	byNode := map[string]*PeerSpec{}
	newest := map[string]*Binding{}
	ips := map[string]map[netip.Addr]struct{}{}
	for _, m := range members {
		b := m.Binding
		if b == nil || !slices.Contains(zones, m.Zone) || !slices.Contains(b.Zones, m.Zone) || b.Key == self || b.Key.IsZero() {
			continue
		}
		if ex.Node != nil && ex.Node(b.Node) {
			continue
		}
		if cur := newest[b.Node]; cur == nil || b.IssuedAt.After(cur.IssuedAt) {
			newest[b.Node] = b
		}
		set := ips[b.Node]
		if set == nil {
			set = map[netip.Addr]struct{}{}
			ips[b.Node] = set
		}
		for _, a := range m.Agents {
			a = a.Unmap()
			if ex.Agent != nil && ex.Agent(b.Node, a) {
				continue
			}
			if slices.ContainsFunc(m.Prefixes, func(p netip.Prefix) bool { return p.Contains(a) }) {
				set[a] = struct{}{}
			}
		}
	}
	owners := map[Key][]string{}
	for node, b := range newest {
		owners[b.Key] = append(owners[b.Key], node)
	}
	var conflicts []Conflict
	for k, nodes := range owners {
		if len(nodes) > 1 {
			slices.Sort(nodes)
			conflicts = append(conflicts, Conflict{Key: k, Nodes: nodes})
			for _, n := range nodes {
				delete(newest, n)
			}
		}
	}
	slices.SortFunc(conflicts, func(a, b Conflict) int { return strings.Compare(a.Nodes[0], b.Nodes[0]) })
	for node, b := range newest {
		p := &PeerSpec{Node: node, Key: b.Key, Endpoint: b.Endpoint}
		for a := range ips[node] {
			p.AllowedIPs = append(p.AllowedIPs, netip.PrefixFrom(a, a.BitLen()))
		}
		slices.SortFunc(p.AllowedIPs, func(x, y netip.Prefix) int { return x.Addr().Compare(y.Addr()) })
		byNode[node] = p
	}
	out := make([]PeerSpec, 0, len(byNode))
	for _, p := range byNode {
		out = append(out, *p)
	}
	slices.SortFunc(out, func(a, b PeerSpec) int { return strings.Compare(a.Node, b.Node) })
	return out, conflicts
}

// DeviceConfig configures a Device.
type DeviceConfig struct {
	// TUN is what the device reads packets from and writes them to: the Filter in front of the
	// kernel TUN. The device closes it.
	TUN tun.Device
	// Bind is the UDP socket abstraction; nil means conn.NewDefaultBind() (a real UDP socket).
	Bind conn.Bind
	// Key is the device's key pair.
	Key KeyPair
	// Port is the UDP port to listen on; 0 picks one (Port reports it).
	Port uint16
	// Keepalive is the persistent keepalive interval in seconds for every peer; 0 is off.
	Keepalive int
	Logger    *slog.Logger
}

// Device is a wireguard-go device whose peers are set only from PeerSpecs.
type Device struct {
	dev       *device.Device
	log       *slog.Logger
	keepalive int
	port      uint16

	mu    sync.Mutex
	peers map[string]PeerSpec // by node
}

// ErrDevice wraps a failure to configure the wireguard-go device.
var ErrDevice = errors.New("wireguard: device configuration failed")

// OpenDevice starts a wireguard-go device with no peers.
func OpenDevice(cfg DeviceConfig) (*Device, error) {
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	bind := cfg.Bind
	if bind == nil {
		bind = conn.NewDefaultBind()
	}
	wlog := &device.Logger{
		// Formatted only when debug is on: wireguard-go logs every keepalive and handshake.
		Verbosef: func(format string, args ...any) {
			if log.Enabled(context.Background(), slog.LevelDebug) {
				log.Debug("wireguard-go: " + fmt.Sprintf(format, args...))
			}
		},
		Errorf: func(format string, args ...any) { log.Warn("wireguard-go: " + fmt.Sprintf(format, args...)) },
	}
	dev := device.NewDevice(cfg.TUN, bind, wlog)
	if err := dev.IpcSet(fmt.Sprintf("private_key=%s\nlisten_port=%d\n", cfg.Key.Private.hex(), cfg.Port)); err != nil {
		dev.Close()
		return nil, fmt.Errorf("%w: %w", ErrDevice, err)
	}
	if err := dev.Up(); err != nil {
		dev.Close()
		return nil, fmt.Errorf("%w: up: %w", ErrDevice, err)
	}
	d := &Device{dev: dev, log: log, keepalive: cfg.Keepalive, peers: map[string]PeerSpec{}}
	got, err := dev.IpcGet()
	if err != nil {
		dev.Close()
		return nil, fmt.Errorf("%w: %w", ErrDevice, err)
	}
	for _, line := range strings.Split(got, "\n") {
		if v, ok := strings.CutPrefix(line, "listen_port="); ok {
			var p uint16
			if _, err := fmt.Sscan(v, &p); err == nil {
				d.port = p
			}
		}
	}
	return d, nil
}

// Port is the UDP port the device listens on.
func (d *Device) Port() uint16 { return d.port }

// Apply makes the device's peers exactly specs: peers not in specs are removed, new ones added,
// and changed keys, endpoints and allowed IPs updated in one configuration transaction.
func (d *Device) Apply(specs []PeerSpec) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	var b strings.Builder
	next := map[string]PeerSpec{}
	for _, s := range specs {
		next[s.Node] = s
	}
	for node, cur := range d.peers {
		if s, ok := next[node]; !ok || s.Key != cur.Key {
			fmt.Fprintf(&b, "public_key=%s\nremove=true\n", cur.Key.hex())
		}
	}
	for _, s := range specs {
		cur, had := d.peers[s.Node]
		if had && cur.Key == s.Key && cur.Endpoint == s.Endpoint && slices.Equal(cur.AllowedIPs, s.AllowedIPs) {
			continue
		}
		fmt.Fprintf(&b, "public_key=%s\n", s.Key.hex())
		if !had || cur.Key != s.Key || cur.Endpoint != s.Endpoint {
			fmt.Fprintf(&b, "endpoint=%s\n", s.Endpoint)
		}
		if !had || cur.Key != s.Key {
			if d.keepalive > 0 {
				fmt.Fprintf(&b, "persistent_keepalive_interval=%d\n", d.keepalive)
			}
			cur.AllowedIPs = nil
		}
		for _, p := range cur.AllowedIPs {
			if !slices.Contains(s.AllowedIPs, p) {
				fmt.Fprintf(&b, "allowed_ip=-%s\n", p)
			}
		}
		for _, p := range s.AllowedIPs {
			if !slices.Contains(cur.AllowedIPs, p) {
				fmt.Fprintf(&b, "allowed_ip=%s\n", p)
			}
		}
	}
	if b.Len() == 0 {
		return nil
	}
	if err := d.dev.IpcSet(b.String()); err != nil {
		return fmt.Errorf("%w: %w", ErrDevice, err)
	}
	d.peers = next
	return nil
}

// RemoveNode removes node's peer at once (revocation) and reports whether it was configured.
func (d *Device) RemoveNode(node string) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	p, ok := d.peers[node]
	if !ok {
		return false
	}
	d.dev.RemovePeer(device.NoisePublicKey(p.Key))
	delete(d.peers, node)
	return true
}

// RemoveAllowedIP removes one agent address from whichever peer has it and reports whether one
// had it.
func (d *Device) RemoveAllowedIP(a netip.Addr) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	pfx := netip.PrefixFrom(a.Unmap(), a.Unmap().BitLen())
	for node, p := range d.peers {
		if i := slices.Index(p.AllowedIPs, pfx); i >= 0 {
			if err := d.dev.IpcSet(fmt.Sprintf("public_key=%s\nallowed_ip=-%s\n", p.Key.hex(), pfx)); err != nil {
				d.log.Warn("remove allowed ip", "node", node, "ip", pfx, "err", err)
			}
			p.AllowedIPs = slices.Delete(slices.Clone(p.AllowedIPs), i, i+1)
			d.peers[node] = p
			return true
		}
	}
	return false
}

// UAPI is the device's configuration as wireguard-go reports it (its UAPI "get" text): what the
// device really holds, as opposed to Peers, which is what this package last applied.
func (d *Device) UAPI() (string, error) {
	s, err := d.dev.IpcGet()
	if err != nil {
		return "", fmt.Errorf("%w: %w", ErrDevice, err)
	}
	return s, nil
}

// Peers returns the configured peers, sorted by node.
func (d *Device) Peers() []PeerSpec {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make([]PeerSpec, 0, len(d.peers))
	for _, p := range d.peers {
		out = append(out, p)
	}
	slices.SortFunc(out, func(a, b PeerSpec) int { return strings.Compare(a.Node, b.Node) })
	return out
}

// Close stops the device and closes its TUN and socket.
func (d *Device) Close() {
	d.dev.Close()
}
