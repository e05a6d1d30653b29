package proxy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ute-project/ute/node"
)

// Dialer opens an agent's flows; *node.Agent is one.
type Dialer interface {
	Dial(ctx context.Context, network, addr string) (net.Conn, error)
}

// ErrNotLoopback: a proxy or forward address other hosts could reach.
var ErrNotLoopback = errors.New("proxy: address is not loopback")

// ErrAttestation wraps an attestation failure in a Refusal, so that callers can tell it from a
// refused dial; the attester's own sentinel (attest.ErrMismatch, ...) is wrapped too.
var ErrAttestation = errors.New("proxy: connecting process failed attestation")

// Config configures one agent's proxies.
type Config struct {
	// Agent names the agent ("name.zone") in logs and refusals.
	Agent string
	// Dialer opens the agent's flows.
	Dialer Dialer
	// SOCKS and HTTP are the loopback addresses to listen on; port 0 picks a free port; the zero
	// AddrPort means no listener of that kind.
	SOCKS, HTTP netip.AddrPort
	// Attest, when set, is run on every accepted connection before anything is dialed, with the
	// client's address (its socket's local address) and the proxy's; an error refuses the
	// connection.
	Attest func(client, server netip.AddrPort) error
	// OnRefused is told about every refused connection (attestation, dial, bad request).
	OnRefused func(Refusal)
	// Logger; nil discards.
	Logger *slog.Logger
	// HandshakeTimeout bounds the request phase (greeting, request, attestation, dial); default 10 s.
	HandshakeTimeout time.Duration
	// MaxConns bounds concurrent client connections; default 1024. Connections past it are closed.
	MaxConns int
}

// Refusal is one refused proxy connection.
type Refusal struct {
	Agent  string
	Kind   string // "socks5" or "http"
	Client netip.AddrPort
	Target string // "" when the request could not be read
	Err    error  // wraps ErrAttestation, a *node.RefusedError, ErrSOCKS*, ErrHTTPProxy, ...
}

// Stats count a server's connections.
type Stats struct {
	Accepted     uint64 // client connections accepted
	Flows        uint64 // flows opened through the agent
	Refused      uint64 // connections refused for any reason (attestation included)
	AttestFailed uint64 // of which by attestation
}

// Server is one agent's SOCKS5 and HTTP proxies.
type Server struct {
	cfg    Config
	log    *slog.Logger
	socks  net.Listener
	http   net.Listener
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	slots  chan struct{}

	mu     sync.Mutex
	conns  map[net.Conn]struct{}
	closed bool

	accepted, flows, refusedN, attestFailed atomic.Uint64
}

// Start listens on the configured loopback addresses and serves until Close.
func Start(cfg Config) (*Server, error) {
	if cfg.Dialer == nil {
		return nil, errors.New("proxy: no dialer")
	}
	if cfg.HandshakeTimeout <= 0 {
		cfg.HandshakeTimeout = 10 * time.Second
	}
	if cfg.MaxConns <= 0 {
		cfg.MaxConns = 1024
	}
	s := &Server{cfg: cfg, log: cfg.Logger, conns: map[net.Conn]struct{}{}, slots: make(chan struct{}, cfg.MaxConns)}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	var err error
	if s.socks, err = listenLoopback(cfg.SOCKS, "socks"); err != nil {
		s.cancel()
		return nil, err
	}
	if s.http, err = listenLoopback(cfg.HTTP, "http"); err != nil {
		if s.socks != nil {
			_ = s.socks.Close()
		}
		s.cancel()
		return nil, err
	}
	if s.socks != nil {
		s.wg.Go(func() { s.acceptLoop(s.socks, s.serveSOCKS) })
	}
	if s.http != nil {
		s.wg.Go(func() { s.acceptLoop(s.http, s.serveHTTP) })
	}
	return s, nil
}

func listenLoopback(ap netip.AddrPort, what string) (net.Listener, error) {
	if !ap.IsValid() {
		return nil, nil
	}
	if !ap.Addr().IsLoopback() {
		return nil, fmt.Errorf("%w: %s proxy on %s would serve other hosts; use 127.0.0.1", ErrNotLoopback, what, ap)
	}
	ln, err := net.Listen("tcp", ap.String())
	if err != nil {
		return nil, fmt.Errorf("proxy: %s listener: %w", what, err)
	}
	return ln, nil
}

func addrPort(a net.Addr) netip.AddrPort {
	if t, ok := a.(*net.TCPAddr); ok {
		ap := t.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	return netip.AddrPort{}
}

// SOCKSAddr is the SOCKS5 listener's address (invalid when there is none).
func (s *Server) SOCKSAddr() netip.AddrPort {
	if s.socks == nil {
		return netip.AddrPort{}
	}
	return addrPort(s.socks.Addr())
}

// HTTPAddr is the HTTP proxy listener's address (invalid when there is none).
func (s *Server) HTTPAddr() netip.AddrPort {
	if s.http == nil {
		return netip.AddrPort{}
	}
	return addrPort(s.http.Addr())
}

// Stats returns the counters.
func (s *Server) Stats() Stats {
	return Stats{Accepted: s.accepted.Load(), Flows: s.flows.Load(), Refused: s.refusedN.Load(), AttestFailed: s.attestFailed.Load()}
}

// Close stops the listeners, closes every client connection and its flow, and waits.
func (s *Server) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	conns := s.conns
	s.conns = nil
	s.mu.Unlock()
	s.cancel()
	if s.socks != nil {
		_ = s.socks.Close()
	}
	if s.http != nil {
		_ = s.http.Close()
	}
	for c := range conns {
		_ = c.Close()
	}
	s.wg.Wait()
	return nil
}

// track registers c for Close; false when the server is closing.
func (s *Server) track(c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.conns[c] = struct{}{}
	return true
}

func (s *Server) untrack(c net.Conn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.conns, c)
}

func (s *Server) acceptLoop(ln net.Listener, serve func(net.Conn)) {
	for {
		c, err := ln.Accept()
		if err != nil {
			if s.ctx.Err() == nil && !errors.Is(err, net.ErrClosed) {
				s.log.Warn("proxy accept failed", "agent", s.cfg.Agent, "err", err)
				time.Sleep(50 * time.Millisecond) // EMFILE and friends: do not spin
				continue
			}
			return
		}
		s.accepted.Add(1)
		select {
		case s.slots <- struct{}{}:
		default:
			s.log.Warn("proxy connection limit reached; connection closed", "agent", s.cfg.Agent, "limit", s.cfg.MaxConns)
			_ = c.Close()
			continue
		}
		if !s.track(c) {
			<-s.slots
			_ = c.Close()
			return
		}
		s.wg.Go(func() {
			defer func() { <-s.slots }()
			defer s.untrack(c)
			defer func() { _ = c.Close() }()
			serve(c)
		})
	}
}

// refuse counts and reports a refusal.
func (s *Server) refuse(kind string, c net.Conn, target string, err error) {
	s.refusedN.Add(1)
	if errors.Is(err, ErrAttestation) {
		s.attestFailed.Add(1)
	}
	s.log.Info("proxy connection refused", "agent", s.cfg.Agent, "kind", kind, "client", c.RemoteAddr().String(), "target", target, "err", err)
	if s.cfg.OnRefused != nil {
		s.cfg.OnRefused(Refusal{Agent: s.cfg.Agent, Kind: kind, Client: addrPort(c.RemoteAddr()), Target: target, Err: err})
	}
}

// open attests the client and dials target through the agent.
func (s *Server) open(ctx context.Context, c net.Conn, target string) (net.Conn, error) {
	if s.cfg.Attest != nil {
		if err := s.cfg.Attest(addrPort(c.RemoteAddr()), addrPort(c.LocalAddr())); err != nil {
			return nil, fmt.Errorf("%w: %w", ErrAttestation, err)
		}
	}
	f, err := s.cfg.Dialer.Dial(ctx, "tcp", target)
	if err != nil {
		return nil, err
	}
	s.flows.Add(1)
	return f, nil
}

func (s *Server) serveSOCKS(c net.Conn) {
	ctx, cancel := context.WithTimeout(s.ctx, s.cfg.HandshakeTimeout)
	defer cancel()
	_ = c.SetDeadline(time.Now().Add(s.cfg.HandshakeTimeout))
	br := bufio.NewReaderSize(c, 512)
	if err := ReadSOCKSGreeting(br); err != nil {
		if errors.Is(err, ErrSOCKSNoAuth) {
			_, _ = c.Write([]byte{socksVersion, socksNoAcceptable})
		}
		s.refuse("socks5", c, "", err)
		return
	}
	if _, err := c.Write([]byte{socksVersion, socksNoAuth}); err != nil {
		return
	}
	req, err := ReadSOCKSRequest(br)
	if err != nil {
		code, target := ReplyGeneralFailure, ""
		if errors.Is(err, ErrSOCKSCommand) {
			code, target = ReplyCommandUnsupported, req.Target()
		}
		_, _ = c.Write(socksReply(code, netip.AddrPort{}))
		s.refuse("socks5", c, target, err)
		return
	}
	target := req.Target()
	f, err := s.open(ctx, c, target)
	if err != nil {
		_, _ = c.Write(socksReply(socksCode(err), netip.AddrPort{}))
		s.refuse("socks5", c, target, err)
		return
	}
	defer func() { _ = f.Close() }()
	if _, err := c.Write(socksReply(ReplySucceeded, addrPort(f.LocalAddr()))); err != nil {
		return
	}
	_ = c.SetDeadline(time.Time{})
	splice(c, br, f)
}

// headLimit bounds the bytes the request head may take; body reads are not limited.
type headLimit struct {
	r    io.Reader
	left int
	on   bool
}

func (h *headLimit) Read(p []byte) (int, error) {
	if !h.on {
		return h.r.Read(p)
	}
	if h.left <= 0 {
		return 0, fmt.Errorf("%w: request head larger than %d bytes", ErrHTTPProxy, maxHeader)
	}
	if len(p) > h.left {
		p = p[:h.left]
	}
	n, err := h.r.Read(p)
	h.left -= n
	return n, err
}

func (s *Server) serveHTTP(c net.Conn) {
	ctx, cancel := context.WithTimeout(s.ctx, s.cfg.HandshakeTimeout)
	defer cancel()
	_ = c.SetDeadline(time.Now().Add(s.cfg.HandshakeTimeout))
	lim := &headLimit{r: c, left: maxHeader, on: true}
	br := bufio.NewReaderSize(lim, 4096)
	bw := bufio.NewWriter(c)
	req, err := ReadHTTPProxyRequest(br)
	if err != nil {
		_ = httpStatus(bw, http.StatusBadRequest, "ute proxy: "+err.Error())
		s.refuse("http", c, "", err)
		return
	}
	lim.on = false
	f, err := s.open(ctx, c, req.Target)
	if err != nil {
		code, msg := httpCode(err)
		_ = httpStatus(bw, code, msg)
		s.refuse("http", c, req.Target, err)
		return
	}
	defer func() { _ = f.Close() }()
	_ = c.SetDeadline(time.Time{})
	if req.Tunnel {
		if _, err := bw.WriteString("HTTP/1.1 200 Connection established\r\n\r\n"); err != nil {
			return
		}
		if err := bw.Flush(); err != nil {
			return
		}
		splice(c, br, f)
		return
	}
	// Absolute-form request: forward it in origin form with Connection: close, then relay the
	// response; the client opens a new connection for its next request.
	req.Req.Close = true
	if err := req.Req.Write(f); err != nil {
		_ = httpStatus(bw, http.StatusBadGateway, "ute proxy: forwarding the request failed")
		return
	}
	// No half-close towards the server: Go's server (and others) take end-of-stream after a
	// request as the client going away and cancel the request.
	_, _ = io.Copy(c, f)
}

// splice copies both ways until both directions end; r holds what was read from client already.
func splice(client net.Conn, r io.Reader, flow net.Conn) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		_, _ = io.Copy(flow, r)
		closeWrite(flow)
	}()
	_, _ = io.Copy(client, flow)
	closeWrite(client)
	<-done
}

func closeWrite(c net.Conn) {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
		return
	}
	_ = c.Close()
}

// socksCode maps a refusal to the RFC 1928 reply: the class only, never the reason.
func socksCode(err error) byte {
	if errors.Is(err, ErrAttestation) {
		return ReplyNotAllowed
	}
	var re *node.RefusedError
	if errors.As(err, &re) {
		switch {
		case re.Stage == "resolve" && re.Reason == "cross_zone":
			return ReplyNotAllowed
		case re.Stage == "resolve":
			return ReplyHostUnreachable
		case re.Stage == "tunnel":
			return ReplyNetworkUnreachable
		case re.Reason == "unreachable":
			return ReplyConnectionRefused
		default:
			return ReplyNotAllowed
		}
	}
	return ReplyGeneralFailure
}

// httpCode maps a refusal to a status and a one-line body naming the class.
func httpCode(err error) (int, string) {
	if errors.Is(err, ErrAttestation) {
		return http.StatusForbidden, "ute proxy: refused: this process is not the agent's enrolled workload"
	}
	var re *node.RefusedError
	if errors.As(err, &re) {
		switch {
		case re.Stage == "resolve" && re.Reason == "cross_zone", re.Stage == "admission" && re.Reason != "unreachable":
			return http.StatusForbidden, fmt.Sprintf("ute proxy: refused at %s (%s)", re.Stage, re.Reason)
		default:
			return http.StatusBadGateway, fmt.Sprintf("ute proxy: refused at %s (%s)", re.Stage, re.Reason)
		}
	}
	return http.StatusBadGateway, "ute proxy: dial failed"
}
