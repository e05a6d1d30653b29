package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/ute-project/ute/node"
)

// ForwarderConfig configures the forwarding of one agent port.
type ForwarderConfig struct {
	// Agent names the agent ("name.zone") in logs.
	Agent string
	// Listener accepts the agent's admitted flows on one port (node.Agent.Listen).
	Listener net.Listener
	// Target is the loopback TCP address of the local server.
	Target netip.AddrPort
	// Logger; nil discards.
	Logger *slog.Logger
	// DialTimeout bounds the connection to Target; default 5 s.
	DialTimeout time.Duration
	// ProxyProtocol sends a PROXY protocol v2 header first (caller's overlay IP, the agent's
	// overlay address, TLVs TLVAgent and TLVNode), for servers that speak it.
	ProxyProtocol bool
}

// Forwarder hands every admitted flow of an agent port to a local server, and remembers, while
// the connection lasts, which flow each local source address carries: the local server sees the
// forwarder's loopback address as its peer and asks the local API's whois with it.
type Forwarder struct {
	cfg    ForwarderConfig
	log    *slog.Logger
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu     sync.Mutex
	byAddr map[netip.AddrPort]*node.Provenance
	conns  map[net.Conn]struct{}
	closed bool

	forwarded, failed atomic.Uint64
}

// StartForwarder serves cfg.Listener until Close.
func StartForwarder(cfg ForwarderConfig) (*Forwarder, error) {
	if cfg.Listener == nil {
		return nil, errors.New("proxy: forwarder needs a listener")
	}
	if !cfg.Target.IsValid() || !cfg.Target.Addr().IsLoopback() || cfg.Target.Port() == 0 {
		return nil, fmt.Errorf("%w: forward target %s must be a loopback address with a port", ErrNotLoopback, cfg.Target)
	}
	if cfg.DialTimeout <= 0 {
		cfg.DialTimeout = 5 * time.Second
	}
	f := &Forwarder{cfg: cfg, log: cfg.Logger, byAddr: map[netip.AddrPort]*node.Provenance{}, conns: map[net.Conn]struct{}{}}
	if f.log == nil {
		f.log = slog.New(slog.DiscardHandler)
	}
	f.ctx, f.cancel = context.WithCancel(context.Background())
	f.wg.Go(f.acceptLoop)
	return f, nil
}

// Target is the local address flows are forwarded to.
func (f *Forwarder) Target() netip.AddrPort { return f.cfg.Target }

// Addr is the agent's overlay address flows arrive on.
func (f *Forwarder) Addr() net.Addr { return f.cfg.Listener.Addr() }

// Forwarded counts flows handed to the local server; Failed those it could not take.
func (f *Forwarder) Forwarded() uint64 { return f.forwarded.Load() }

// Failed counts admitted flows the local server did not accept.
func (f *Forwarder) Failed() uint64 { return f.failed.Load() }

// WhoIs returns the provenance of the flow forwarded from local source address src (the peer
// address the local server sees), while that connection is open.
func (f *Forwarder) WhoIs(src netip.AddrPort) (*node.Provenance, bool) {
	src = netip.AddrPortFrom(src.Addr().Unmap(), src.Port())
	f.mu.Lock()
	defer f.mu.Unlock()
	p, ok := f.byAddr[src]
	return p, ok
}

// Close stops accepting, closes every forwarded connection and waits.
func (f *Forwarder) Close() error {
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return nil
	}
	f.closed = true
	conns := f.conns
	f.conns = nil
	f.mu.Unlock()
	f.cancel()
	err := f.cfg.Listener.Close()
	for c := range conns {
		_ = c.Close()
	}
	f.wg.Wait()
	return err
}

func (f *Forwarder) track(cs ...net.Conn) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return false
	}
	for _, c := range cs {
		f.conns[c] = struct{}{}
	}
	return true
}

func (f *Forwarder) untrack(cs ...net.Conn) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, c := range cs {
		delete(f.conns, c)
	}
}

func (f *Forwarder) acceptLoop() {
	for {
		c, err := f.cfg.Listener.Accept()
		if err != nil {
			return // the node listener fails only when closed
		}
		if !f.track(c) {
			_ = c.Close()
			return
		}
		f.wg.Go(func() {
			defer f.untrack(c)
			defer func() { _ = c.Close() }()
			f.forward(c)
		})
	}
}

func (f *Forwarder) forward(flow net.Conn) {
	prov, err := node.WhoIs(flow)
	if err != nil {
		f.log.Warn("forwarded flow has no provenance; closed", "agent", f.cfg.Agent, "err", err)
		f.failed.Add(1)
		return
	}
	var src netip.AddrPort
	d := net.Dialer{Timeout: f.cfg.DialTimeout, Control: func(_, _ string, rc syscall.RawConn) error {
		// Bind before connecting so that the mapping exists before the server can accept and
		// ask whois about this address.
		var berr error
		if err := rc.Control(func(fd uintptr) {
			if berr = bindLoopback(int(fd), f.cfg.Target.Addr()); berr != nil {
				return
			}
			src, berr = sockName(int(fd))
		}); err != nil {
			return err
		}
		if berr != nil {
			return berr
		}
		f.mu.Lock()
		f.byAddr[src] = prov
		f.mu.Unlock()
		return nil
	}}
	defer func() {
		if src.IsValid() {
			f.mu.Lock()
			if f.byAddr[src] == prov {
				delete(f.byAddr, src)
			}
			f.mu.Unlock()
		}
	}()
	local, err := d.DialContext(f.ctx, "tcp", f.cfg.Target.String())
	if err != nil {
		f.failed.Add(1)
		f.log.Warn("local server did not accept a forwarded flow", "agent", f.cfg.Agent, "target", f.cfg.Target.String(), "from", prov.Agent, "err", err)
		return
	}
	if !f.track(local) {
		_ = local.Close()
		return
	}
	defer f.untrack(local)
	defer func() { _ = local.Close() }()
	if f.cfg.ProxyProtocol {
		dst := addrPort(flow.LocalAddr())
		h, err := proxyV2Header(netip.AddrPortFrom(prov.SourceIP, addrPort(flow.RemoteAddr()).Port()), dst, prov)
		if err == nil {
			_, err = local.Write(h)
		}
		if err != nil {
			f.failed.Add(1)
			f.log.Warn("PROXY header not sent; flow closed", "agent", f.cfg.Agent, "err", err)
			return
		}
	}
	f.forwarded.Add(1)
	splice(local, local, flow)
}

// bindLoopback binds the socket to the target's loopback address, port 0 (the kernel picks one).
func bindLoopback(fd int, a netip.Addr) error {
	if a.Is4() {
		return syscall.Bind(fd, &syscall.SockaddrInet4{Addr: a.As4()})
	}
	return syscall.Bind(fd, &syscall.SockaddrInet6{Addr: a.As16()})
}

func sockName(fd int) (netip.AddrPort, error) {
	sa, err := syscall.Getsockname(fd)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("getsockname: %w", err)
	}
	switch v := sa.(type) {
	case *syscall.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(v.Addr), uint16(v.Port)), nil
	case *syscall.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(v.Addr).Unmap(), uint16(v.Port)), nil
	}
	return netip.AddrPort{}, fmt.Errorf("getsockname: unexpected %T", sa)
}
