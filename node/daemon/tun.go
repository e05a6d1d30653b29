package daemon

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"time"

	"github.com/ute-project/ute/identity/record"
	"github.com/ute-project/ute/node"
	"github.com/ute-project/ute/node/attest"
	"github.com/ute-project/ute/node/config"
	"github.com/ute-project/ute/node/state"
	"github.com/ute-project/ute/overlay/tundev"
	"github.com/ute-project/ute/overlay/tunstack"
)

// EventTUNRefused is the audit event of a flow from a local program through the TUN interface
// that the sending node refused itself (another zone, an unknown address, no tunnel, or the
// peer's refusal); workload mismatches are EventWorkloadRefused.
const EventTUNRefused = "tun-refused"

// ErrTUNRoot: the TUN interface needs root (CAP_NET_ADMIN).
var ErrTUNRoot = errors.New("daemon: --interface tun needs root (CAP_NET_ADMIN); without root run --interface proxy")

// ErrNoAgent: a flow whose source address is no agent of this node (the stack's filter drops
// such packets first; this is the second line).
var ErrNoAgent = errors.New("daemon: source address is no agent of this node")

// TUNOptions configure the kernel TUN interface (Config.Interface tun).
type TUNOptions struct {
	// Name of the interface; default tundev.DefaultName ("ute0").
	Name string
	// MTU of the interface; default tunstack.DefaultMTU.
	MTU int
}

// TUNInfo describes the running interface.
type TUNInfo struct {
	Name   string
	Addrs  []netip.Prefix
	Routes []netip.Prefix
	Stats  tunstack.Stats
}

// tunDiagSockets is how many socket lookups of new flows can run at once; more wait their turn
// (a lookup takes microseconds).
const tunDiagSockets = 4

// tunIface is the TUN interface: the kernel device, the userspace stack that terminates its
// flows, and one catch-all inbound listener pair per agent.
type tunIface struct {
	d      *Daemon
	dev    *tundev.Device
	st     *tunstack.Stack
	att    *attest.Attester
	diag   *attest.Diag // sock_diag sockets opened in the interface's network namespace; nil: none
	routes []netip.Prefix

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu     sync.Mutex
	agents map[netip.Addr]*tunAgent
	whois  map[netip.AddrPort]*node.Provenance // the peer address a local program sees → the flow
	// dialing counts inbound flows being originated per remote agent address: the program may
	// accept such a connection (and ask whois) before DialFrom returns and its whois entry is
	// written, so a whois miss for that address waits for whoisChanged (closed and replaced on
	// every change of whois or dialing).
	dialing      map[netip.Addr]int
	whoisChanged chan struct{}
	closed       bool
}

type tunAgent struct {
	name   string // name.zone
	ip     netip.Addr
	a      *node.Agent
	attest bool
	want   attest.Expected
	l      net.Listener
	pl     net.PacketConn
}

// startTUN brings the TUN interface up when the config asks for it: the device with every
// agent's overlay IP and every zone CIDR of the node, the stack, and the inbound listeners.
func (d *Daemon) startTUN() error {
	// With the WireGuard transport the kernel interface's packets go through wireguard-go, which
	// opens the interface itself (wireguard.go); this carriage is the QUIC transport's.
	if d.cfg.Interface != config.InterfaceTUN || d.cfg.Transport == config.TransportWireGuard {
		return nil
	}
	agents, err := d.dir.Agents()
	if err != nil {
		return err
	}
	var routes []netip.Prefix
	pol := d.node.Policy()
	for _, z := range d.node.Zones() {
		if zz, ok := pol.Zone(z); ok {
			routes = append(routes, zz.CIDRs...)
		}
	}
	var addrs []netip.Prefix
	for _, st := range agents {
		if !d.agentRevoked(st) {
			addrs = append(addrs, netip.PrefixFrom(st.IP, st.IP.BitLen()))
		}
	}
	o := d.opts.TUN
	if o.MTU == 0 {
		o.MTU = tunstack.DefaultMTU
	}
	dev, err := tundev.Open(d.ctx, tundev.Config{Name: o.Name, MTU: o.MTU, Addrs: addrs, Routes: routes}, d.log)
	if errors.Is(err, tundev.ErrPermission) || (err != nil && os.Geteuid() != 0) {
		return fmt.Errorf("%w (%w)", ErrTUNRoot, err)
	}
	if err != nil {
		return fmt.Errorf("daemon: tun interface: %w", err)
	}
	// Socket lookups must answer for the namespace the interface lives in, which is this
	// thread's (a daemon runs in one; the in-process tests and an embedder may have moved the
	// calling thread): sock_diag sockets opened here keep answering for it from any goroutine.
	diag, derr := attest.OpenDiag(tunDiagSockets)
	if derr != nil {
		d.log.Warn("sock_diag sockets could not be opened: each attested flow opens its own, and TCP falls back to /proc/net/tcp", "err", derr)
		diag = nil
	}
	t := &tunIface{d: d, dev: dev, att: attest.New(attest.Options{Diag: diag}), diag: diag, routes: routes,
		agents: map[netip.Addr]*tunAgent{}, whois: map[netip.AddrPort]*node.Provenance{},
		dialing: map[netip.Addr]int{}, whoisChanged: make(chan struct{})}
	t.ctx, t.cancel = context.WithCancel(d.ctx)
	if t.st, err = tunstack.New(dev.TUN(), o.MTU, t, d.log); err != nil {
		t.close()
		return err
	}
	for _, st := range agents {
		if err := t.addAgent(st); err != nil {
			t.close()
			return err
		}
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		t.close()
		return errors.New("daemon: closed")
	}
	d.tun = t
	return nil
}

func (d *Daemon) agentRevoked(st *state.Agent) bool {
	return d.node.Revoked(st.Cert.ID.String(), record.SerialKey(st.Cert.Serial()))
}

// addAgent serves one agent on the interface: its address, its inbound flows, and the stack's
// permission for its source address.
func (t *tunIface) addAgent(st *state.Agent) error {
	d := t.d
	name := st.Name + "." + st.Zone
	if d.agentRevoked(st) {
		d.log.Warn("agent is revoked: not on the tun interface", "agent", name)
		return nil
	}
	a, err := d.node.Agent(st.Zone, st.Name)
	if err != nil {
		return fmt.Errorf("daemon: tun agent %s: %w", name, err)
	}
	ta := &tunAgent{name: name, ip: st.IP, a: a, attest: true}
	if ac, ok := d.cfg.Find(st.Zone, st.Name); ok {
		ta.attest = ac.Attest
	}
	if ta.attest {
		if ta.want, err = expectedWorkload(st); err != nil {
			return err
		}
	}
	if err := t.dev.AddAddr(netip.PrefixFrom(st.IP, st.IP.BitLen())); err != nil {
		return err
	}
	if ta.l, err = a.ListenAll(); err != nil {
		return fmt.Errorf("daemon: tun agent %s: %w", name, err)
	}
	if ta.pl, err = a.ListenPacketAll(); err != nil {
		_ = ta.l.Close()
		return fmt.Errorf("daemon: tun agent %s: %w", name, err)
	}
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		_ = ta.l.Close()
		_ = ta.pl.Close()
		return errors.New("daemon: closed")
	}
	t.agents[st.IP] = ta
	local := make([]netip.Addr, 0, len(t.agents))
	for ip := range t.agents {
		local = append(local, ip)
	}
	t.wg.Add(2)
	t.mu.Unlock()
	t.st.SetLocal(local)
	go func() { defer t.wg.Done(); t.acceptStreams(ta) }()
	go func() { defer t.wg.Done(); t.acceptPackets(ta) }()
	d.log.Info("agent on tun interface", "agent", name, "ip", st.IP.String(), "interface", t.dev.Name(), "attest", ta.attest)
	return nil
}

// Outbound is the stack's Handler: a new flow from a local program. The program's socket is
// attested against the enrolled workload of the agent that owns the source address, then the
// flow is that agent's Dial: same record, admission, audit and refusals as an SDK flow.
func (t *tunIface) Outbound(ctx context.Context, proto string, src, dst netip.AddrPort) (net.Conn, error) {
	t.mu.Lock()
	ta := t.agents[src.Addr()]
	t.mu.Unlock()
	if ta == nil {
		return nil, fmt.Errorf("%w: %s", ErrNoAgent, src.Addr())
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if ta.attest {
		if err := t.attest(proto, ta, src, dst); err != nil {
			return nil, err
		}
	}
	c, err := ta.a.Relay().Dial(ctx, proto, dst.String()) // the socket's owner was attested above
	if err != nil {
		t.refused(ta, proto, src, dst, err)
		return nil, err
	}
	return c, nil
}

// attest checks the owner of the local program's socket src -> dst, looked up in the interface's
// network namespace (t.diag).
func (t *tunIface) attest(proto string, ta *tunAgent, src, dst netip.AddrPort) error {
	if proto == tunstack.UDP {
		return t.attestUDP(ta, src, dst)
	}
	return t.d.attestFlow(t.att, "tun", ta.name, ta.want, src, dst)
}

// refused audits and counts a flow the sending side refused or could not carry.
func (t *tunIface) refused(ta *tunAgent, proto string, src, dst netip.AddrPort, err error) {
	d := t.d
	stage, reason := "tunnel", "tunnel"
	var re *node.RefusedError
	if errors.As(err, &re) {
		stage, reason = re.Stage, re.Reason
	}
	if stage == "resolve" {
		d.metrics.FlowDenied(reason)
	}
	fields := map[string]string{"agent": ta.name, "proto": proto, "src": src.String(), "dst": dst.String(),
		"stage": stage, "reason": reason, "error": err.Error()}
	if aerr := d.node.AppendAudit(context.Background(), EventTUNRefused, fields); aerr != nil {
		d.log.Error("audit append failed", "event", EventTUNRefused, "err", aerr)
	}
	d.log.Info("tun flow refused", "agent", ta.name, "proto", proto, "src", src.String(), "dst", dst.String(), "stage", stage, "reason", reason, "err", err)
}

// acceptStreams hands every admitted TCP flow for the agent to the kernel, originated from the
// caller's overlay address.
func (t *tunIface) acceptStreams(ta *tunAgent) {
	for {
		c, err := ta.l.Accept()
		if err != nil {
			return
		}
		t.mu.Lock()
		closed := t.closed
		if !closed {
			t.wg.Add(1)
		}
		t.mu.Unlock()
		if closed {
			_ = c.Close()
			return
		}
		go func() { defer t.wg.Done(); t.inbound(tunstack.TCP, ta, c, 0) }()
	}
}

// inbound originates one admitted flow to the local program and splices it. srcPort is the
// source port the program sees (UDP: the port that names the flow; TCP: 0, the stack picks one).
func (t *tunIface) inbound(proto string, ta *tunAgent, c net.Conn, srcPort uint16) {
	var p *node.Provenance
	var err error
	if proto == tunstack.TCP {
		p, err = node.WhoIs(c)
	} else {
		p, err = c.(*tunPacketConn).prov()
	}
	if err != nil {
		_ = c.Close()
		return
	}
	dst := netip.AddrPortFrom(ta.ip, p.Destination.Port)
	t.originating(p.SourceIP)
	ctx, cancel := context.WithTimeout(t.ctx, 10*time.Second)
	lc, err := t.st.DialFrom(ctx, proto, netip.AddrPortFrom(p.SourceIP, srcPort), dst)
	cancel()
	var key netip.AddrPort
	if err == nil {
		key = addrPortOf(lc.LocalAddr())
	}
	t.originated(p.SourceIP, key, p)
	if err != nil {
		t.d.log.Debug("tun inbound flow not accepted locally", "agent", ta.name, "from", p.Agent, "dst", dst.String(), "err", err)
		_ = c.Close()
		return
	}
	// This goroutine is the flow's already (acceptStreams or acceptPackets started it, t.wg
	// counts it): the splice runs on it rather than on one more.
	t.st.SpliceHere(proto, lc, c)
	t.mu.Lock()
	if t.whois[key] == p {
		delete(t.whois, key)
	}
	t.mu.Unlock()
}

// originating notes a flow from src being originated to a local program.
func (t *tunIface) originating(src netip.Addr) {
	t.mu.Lock()
	t.dialing[src]++
	t.mu.Unlock()
}

// originated ends originating: the flow's whois entry is key (none if invalid: not accepted),
// and whois misses waiting for src look again.
func (t *tunIface) originated(src netip.Addr, key netip.AddrPort, p *node.Provenance) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.dialing[src]--; t.dialing[src] <= 0 {
		delete(t.dialing, src)
	}
	if key.IsValid() {
		t.whois[key] = p
	}
	close(t.whoisChanged)
	t.whoisChanged = make(chan struct{})
}

func addrPortOf(a net.Addr) netip.AddrPort {
	switch v := a.(type) {
	case *net.TCPAddr:
		return v.AddrPort()
	case *net.UDPAddr:
		return v.AddrPort()
	}
	ap, _ := netip.ParseAddrPort(a.String())
	return ap
}

// whoisWait bounds how long a whois miss waits for a flow from that address still being
// originated: the local handshake completes within DialFrom, so the entry follows at once.
const whoisWait = 2 * time.Second

// tunWhoIs finds the admitted flow behind the peer address a local program sees. A program
// that asks right after accept may ask before the daemon has written the entry (the kernel
// completes the handshake inside DialFrom): while a flow from that address is being originated,
// a miss waits for it.
func (d *Daemon) tunWhoIs(src netip.AddrPort) (*node.Provenance, bool) {
	d.mu.Lock()
	t := d.tun
	d.mu.Unlock()
	if t == nil {
		return nil, false
	}
	deadline := time.NewTimer(whoisWait)
	defer deadline.Stop()
	for {
		t.mu.Lock()
		p, ok := t.whois[src]
		pending := t.dialing[src.Addr()] > 0
		changed := t.whoisChanged
		t.mu.Unlock()
		if ok || !pending {
			return p, ok
		}
		select {
		case <-changed:
		case <-deadline.C:
			return nil, false
		case <-t.ctx.Done():
			return nil, false
		}
	}
}

// tunAgentAdded puts an agent added through the local API on the interface at once.
func (d *Daemon) tunAgentAdded(st *state.Agent) {
	d.mu.Lock()
	t := d.tun
	d.mu.Unlock()
	if t == nil {
		return
	}
	if err := t.addAgent(st); err != nil {
		d.log.Error("new agent not on the tun interface; it is at the daemon's next start", "agent", st.Name+"."+st.Zone, "err", err)
	}
}

// TUN describes the running TUN interface; ok is false when the interface is not tun.
func (d *Daemon) TUN() (TUNInfo, bool) {
	d.mu.Lock()
	t := d.tun
	d.mu.Unlock()
	if t == nil {
		return TUNInfo{}, false
	}
	return TUNInfo{Name: t.dev.Name(), Addrs: t.dev.Addrs(), Routes: append([]netip.Prefix(nil), t.routes...), Stats: t.st.Stats()}, true
}

func (d *Daemon) closeTUN() {
	d.mu.Lock()
	t := d.tun
	d.mu.Unlock()
	if t != nil {
		t.close()
	}
}

// close removes the interface: listeners first (no new inbound flow), then the stack (every
// splice ends), then the device (addresses, routes and link go with it).
func (t *tunIface) close() {
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		return
	}
	t.closed = true
	agents := make([]*tunAgent, 0, len(t.agents))
	for _, ta := range t.agents {
		agents = append(agents, ta)
	}
	t.mu.Unlock()
	t.cancel()
	for _, ta := range agents {
		_ = ta.l.Close()
		_ = ta.pl.Close()
	}
	if t.st != nil {
		_ = t.st.Close()
	}
	t.wg.Wait()
	if t.diag != nil {
		_ = t.diag.Close()
	}
	if err := t.dev.Close(); err != nil {
		t.d.log.Warn("tun interface not fully removed", "name", t.dev.Name(), "err", err)
	}
}
