package daemon

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"sync"

	"github.com/ute-project/ute/identity/record"
	"github.com/ute-project/ute/node"
	"github.com/ute-project/ute/node/attest"
	"github.com/ute-project/ute/node/config"
	"github.com/ute-project/ute/node/proxy"
	"github.com/ute-project/ute/node/state"
)

// EventWorkloadRefused is the audit event of a proxy connection refused by workload
// attestation (the process is not the agent's enrolled workload, or could not be attested).
const EventWorkloadRefused = "workload-refused"

// ProxyInfo is one agent's proxy interface as the daemon runs it.
type ProxyInfo struct {
	Agent, Zone string
	SOCKS, HTTP netip.AddrPort
	Forward     []config.Forward
	Attest      bool
	// ProxyProtocol: the forwards send a PROXY protocol v2 header.
	ProxyProtocol bool
}

// proxyDiagSockets is how many proxied connections' socket lookups can run at once.
const proxyDiagSockets = 4

// proxySet is the proxy interface: one proxy.Server per agent and one proxy.Forwarder per
// forwarded port, sharing one attester (and so one digest cache).
type proxySet struct {
	att  *attest.Attester
	diag *attest.Diag // the attester's sock_diag sockets; nil: one per lookup

	mu      sync.Mutex // guards the lists: an agent added at run time joins them
	servers []*proxy.Server
	fwds    []*proxy.Forwarder
	info    []ProxyInfo
	closed  bool
}

func (p *proxySet) close() {
	p.mu.Lock()
	p.closed = true
	servers, fwds := p.servers, p.fwds
	p.servers, p.fwds = nil, nil
	p.mu.Unlock()
	for _, s := range servers {
		_ = s.Close()
	}
	for _, f := range fwds {
		_ = f.Close()
	}
	if p.diag != nil {
		_ = p.diag.Close() // waits for lookups still under way
	}
}

// add keeps what startAgentProxy started; false (and everything closed) once the set is closed.
func (p *proxySet) add(srv *proxy.Server, fwds []*proxy.Forwarder, info ProxyInfo) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		_ = srv.Close()
		for _, f := range fwds {
			_ = f.Close()
		}
		return false
	}
	p.servers = append(p.servers, srv)
	p.fwds = append(p.fwds, fwds...)
	p.info = append(p.info, info)
	return true
}

// startProxies serves every agent registered on this node with `interface: proxy`: the agents
// listed in the config with their addresses and forwards, the others with proxies on ports the
// kernel picks (logged, and in Proxies).
func (d *Daemon) startProxies() error {
	if d.cfg.Interface != config.InterfaceProxy {
		if len(d.cfg.Agents) > 0 {
			d.log.Warn("config lists agents, but the interface is not proxy: no proxies started", "interface", string(d.cfg.Interface))
		}
		return nil
	}
	agents, err := d.dir.Agents()
	if err != nil {
		return err
	}
	have := map[string]*state.Agent{}
	for _, a := range agents {
		have[a.Name+"."+a.Zone] = a
	}
	for i, ac := range d.cfg.Agents {
		if have[ac.Name+"."+ac.Zone] == nil {
			return fmt.Errorf("daemon: config agents[%d]: %s.%s is not registered on this node; add it with `ute agent add --dir %s --zone %s --name %s --exe PATH`",
				i, ac.Name, ac.Zone, d.opts.Dir, ac.Zone, ac.Name)
		}
	}
	// The proxies listen in the daemon's namespace: sock_diag sockets opened here find their
	// clients' sockets without a socket per connection.
	diag, err := attest.OpenDiag(proxyDiagSockets)
	if err != nil {
		d.log.Warn("sock_diag sockets could not be opened: each proxied connection opens its own, then falls back to /proc/net/tcp", "err", err)
		diag = nil
	}
	ps := &proxySet{att: attest.New(attest.Options{Diag: diag}), diag: diag}
	for _, st := range agents {
		ac, ok := d.cfg.Find(st.Zone, st.Name)
		if !ok {
			ac = config.AgentProxy{Name: st.Name, Zone: st.Zone, Attest: true}
		}
		if err := d.startAgentProxy(ps, st, ac); err != nil {
			ps.close()
			return err
		}
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		ps.close()
		return errors.New("daemon: closed")
	}
	d.proxy = ps
	return nil
}

func (d *Daemon) startAgentProxy(ps *proxySet, st *state.Agent, ac config.AgentProxy) error {
	name := st.Name + "." + st.Zone
	if d.node.Revoked(st.Cert.ID.String(), record.SerialKey(st.Cert.Serial())) {
		d.log.Warn("agent is revoked: no proxy", "agent", name)
		return nil
	}
	a, err := d.node.Agent(st.Zone, st.Name)
	if err != nil {
		return fmt.Errorf("daemon: proxy for %s: %w", name, err)
	}
	loop := netip.MustParseAddrPort("127.0.0.1:0")
	socks, httpAddr := ac.SOCKS, ac.HTTP
	if !socks.IsValid() {
		socks = loop
	}
	if !httpAddr.IsValid() {
		httpAddr = loop
	}
	// Relay: the proxy attests each connection's owner itself; this process is not the agent.
	cfg := proxy.Config{Agent: name, Dialer: a.Relay(), SOCKS: socks, HTTP: httpAddr, Logger: d.log}
	if ac.Attest {
		want, err := expectedWorkload(st)
		if err != nil {
			return err
		}
		cfg.Attest = func(client, server netip.AddrPort) error {
			return d.attestFlow(ps.att, "proxy", name, want, client, server)
		}
	}
	srv, err := proxy.Start(cfg)
	if err != nil {
		return fmt.Errorf("daemon: proxy for %s: %w", name, err)
	}
	info := ProxyInfo{Agent: st.Name, Zone: st.Zone, SOCKS: srv.SOCKSAddr(), HTTP: srv.HTTPAddr(), Forward: ac.Forward, Attest: ac.Attest, ProxyProtocol: ac.ProxyProtocol}
	var fwds []*proxy.Forwarder
	fail := func(err error) error {
		_ = srv.Close()
		for _, f := range fwds {
			_ = f.Close()
		}
		return err
	}
	for _, fw := range ac.Forward {
		l, err := a.Listen("tcp", ":"+strconv.Itoa(int(fw.Port)))
		if err != nil {
			return fail(fmt.Errorf("daemon: forward %s port %d: %w", name, fw.Port, err))
		}
		f, err := proxy.StartForwarder(proxy.ForwarderConfig{Agent: name, Listener: l, Target: fw.Target, Logger: d.log, ProxyProtocol: ac.ProxyProtocol})
		if err != nil {
			_ = l.Close()
			return fail(fmt.Errorf("daemon: forward %s port %d: %w", name, fw.Port, err))
		}
		fwds = append(fwds, f)
	}
	if !ps.add(srv, fwds, info) {
		return errors.New("daemon: closed")
	}
	d.log.Info("agent proxy up", "agent", name, "socks5", info.SOCKS.String(), "http", info.HTTP.String(),
		"forwards", len(ac.Forward), "attest", ac.Attest)
	return nil
}

// workloadRefused records a proxy connection refused by attestation (workloadRefusedVia).
func (d *Daemon) workloadRefused(agent string, client netip.AddrPort, p attest.Process, err error) {
	d.workloadRefusedVia("proxy", agent, client, p, err)
}

// workloadRefusedVia records a connection refused by attestation: counted, audited, and — for a
// process that is not the enrolled workload — reported to Options.OnMismatch (TrustFlow). via
// names the interface ("proxy", "tun").
func (d *Daemon) workloadRefusedVia(via, agent string, client netip.AddrPort, p attest.Process, err error) {
	d.metrics.FlowDenied("workload")
	fields := map[string]string{"agent": agent, "client": client.String(), "error": err.Error(), "via": via}
	if p.PID != 0 {
		fields["pid"] = strconv.Itoa(p.PID)
		fields["exe"] = p.Exe
		fields["exe_sha256"] = hex.EncodeToString(p.Workload.ExeDigest[:])
	}
	if aerr := d.node.AppendAudit(context.Background(), EventWorkloadRefused, fields); aerr != nil {
		d.log.Error("audit append failed", "event", EventWorkloadRefused, "err", aerr)
	}
	d.log.Warn(via+" connection refused by workload attestation", "agent", agent, "client", client.String(), "err", err)
	if errors.Is(err, attest.ErrMismatch) && d.opts.OnMismatch != nil {
		d.opts.OnMismatch(agent, err.Error())
	}
}

// Proxies lists the proxy interface's agents with the addresses they listen on.
func (d *Daemon) Proxies() []ProxyInfo {
	d.mu.Lock()
	ps := d.proxy
	d.mu.Unlock()
	if ps == nil {
		return nil
	}
	ps.mu.Lock()
	defer ps.mu.Unlock()
	return append([]ProxyInfo(nil), ps.info...)
}

// proxyWhoIs finds the flow a forwarder handed to a local server from src.
func (d *Daemon) proxyWhoIs(src netip.AddrPort) (*node.Provenance, bool) {
	d.mu.Lock()
	ps := d.proxy
	d.mu.Unlock()
	if ps == nil {
		return nil, false
	}
	ps.mu.Lock()
	defer ps.mu.Unlock()
	for _, f := range ps.fwds {
		if p, ok := f.WhoIs(src); ok {
			return p, true
		}
	}
	return nil, false
}

// proxyAgentAdded serves an agent added through the local API while the daemon runs, with the
// config's settings for it or allocated ports. Errors are logged: the agent is registered either
// way and gets its proxies at the next start.
func (d *Daemon) proxyAgentAdded(st *state.Agent) {
	d.mu.Lock()
	ps, cfg := d.proxy, d.cfg
	d.mu.Unlock()
	if ps == nil {
		return
	}
	ac, ok := cfg.Find(st.Zone, st.Name)
	if !ok {
		ac = config.AgentProxy{Name: st.Name, Zone: st.Zone, Attest: true}
	}
	if err := d.startAgentProxy(ps, st, ac); err != nil {
		d.log.Error("proxy for a new agent not started; it starts with the daemon's next start", "agent", st.Name+"."+st.Zone, "err", err)
	}
}

func (d *Daemon) closeProxies() {
	d.mu.Lock()
	ps := d.proxy
	d.mu.Unlock()
	if ps != nil {
		ps.close()
	}
}
