package authority

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/quic-go/quic-go"
)

// Timeouts of one request on the authority's endpoint. A join or renewal is one round trip; a peer
// that takes longer is gone or hostile.
const (
	requestTimeout   = 10 * time.Second
	handshakeTimeout = 5 * time.Second
	lingerTimeout    = 5 * time.Second
)

// QUIC application error codes used when the authority closes a connection.
const (
	closeOK       quic.ApplicationErrorCode = 0
	closeProtocol quic.ApplicationErrorCode = 1
	close0RTT     quic.ApplicationErrorCode = 2
	// closeBusy refuses a connection beyond the per-source or total connection limit; the client
	// maps it to ErrBusy.
	closeBusy quic.ApplicationErrorCode = 3
)

// Server is the authority's QUIC endpoint: one UDP socket, one quic.Transport, one listener.
type Server struct {
	a        *Authority
	udp      *net.UDPConn
	tr       *quic.Transport
	ln       *quic.Listener
	log      *slog.Logger
	conns    *connLimiter
	inFlight chan struct{} // a semaphore of Limits.MaxInFlight requests being processed

	// watchConns are the connections serving a watch: Serve closes them itself before the
	// transport, so their nodes learn at once that the authority went away (a closed transport
	// sends nothing, and they would wait out the idle timeout).
	wmu        sync.Mutex
	watchConns map[*quic.Conn]struct{}
	closing    bool
}

// Listen binds the authority's QUIC endpoint on addr (e.g. "127.0.0.1:7443", port 0 for an
// ephemeral port). Call Serve to accept and Close (or cancel Serve's context) to stop.
func (a *Authority) Listen(addr string) (*Server, error) {
	uaddr, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		return nil, fmt.Errorf("listen address %q: %w", addr, err)
	}
	udp, err := net.ListenUDP("udp", uaddr)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", addr, err)
	}
	tr := &quic.Transport{Conn: udp}
	ln, err := tr.Listen(a.serverTLS(), serverQUICConfig())
	if err != nil {
		_ = tr.Close()
		_ = udp.Close()
		return nil, fmt.Errorf("listen on %s: %w", addr, err)
	}
	return &Server{
		a: a, udp: udp, tr: tr, ln: ln, log: a.log,
		conns: newConnLimiter(a.opts.Limits), inFlight: make(chan struct{}, a.opts.Limits.MaxInFlight),
		watchConns: make(map[*quic.Conn]struct{}),
	}, nil
}

// Addr is the bound UDP address.
func (s *Server) Addr() net.Addr { return s.ln.Addr() }

func serverQUICConfig() *quic.Config {
	return &quic.Config{
		HandshakeIdleTimeout:  handshakeTimeout,
		MaxIdleTimeout:        requestTimeout,
		MaxIncomingStreams:    1,
		MaxIncomingUniStreams: -1,
		Allow0RTT:             false,
	}
}

// serverTLS presents the authority certificate. Client certificates are requested, not required:
// joining nodes have none yet; renewals present one and the renewal handler verifies it (the TLS
// 1.3 CertificateVerify already proved possession of its key).
func (a *Authority) serverTLS() *tls.Config {
	return &tls.Config{
		MinVersion:             tls.VersionTLS13,
		NextProtos:             []string{ALPN},
		Certificates:           []tls.Certificate{{Certificate: [][]byte{a.certDER}, PrivateKey: a.key}},
		ClientAuth:             tls.RequestClientCert,
		SessionTicketsDisabled: true,
	}
}

// Serve accepts connections until ctx is cancelled, then closes the endpoint, waits for every
// in-flight request handler to return and writes the pending summaries of suppressed refusals.
func (s *Server) Serve(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() {
		cancel()
		s.closeWatches()
		_ = s.Close()
		wg.Wait()
		s.a.FlushSuppressed()
	}()
	// Summaries are also written lazily on the next refusal; the ticker writes them when the
	// noise stops, so a summary lands within about a quarter interval of its interval's end.
	wg.Go(func() {
		t := time.NewTicker(max(s.a.opts.Limits.Interval/4, time.Second))
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				s.a.flushDueSuppressed()
			}
		}
	})
	s.log.Info("authority listening", "addr", s.Addr().String(), "alpn", ALPN, "trust_domain", s.a.trustDomain)
	for {
		conn, err := s.ln.Accept(ctx)
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, quic.ErrServerClosed) {
				return nil
			}
			return fmt.Errorf("accept: %w", err)
		}
		wg.Go(func() { s.handleConn(ctx, conn) })
	}
}

// Close stops the endpoint. Safe to call more than once.
func (s *Server) Close() error {
	errL := s.ln.Close()
	errT := s.tr.Close()
	errU := s.udp.Close()
	if errL != nil && !errors.Is(errL, quic.ErrServerClosed) {
		return errL
	}
	if errT != nil && !errors.Is(errT, quic.ErrTransportClosed) {
		return errT
	}
	if errU != nil && !errors.Is(errU, net.ErrClosed) {
		return errU
	}
	return nil
}

func (s *Server) handleConn(ctx context.Context, conn *quic.Conn) {
	remote := conn.RemoteAddr().String()
	p := peer{remote: remote, src: sourceOf(conn.RemoteAddr())}
	if conn.ConnectionState().Used0RTT {
		_ = conn.CloseWithError(close0RTT, "0-RTT refused")
		return
	}
	release, why, ok := s.conns.acquire(p.src)
	if !ok {
		// Refused before any stream is read: this costs the authority no store access at all.
		s.a.noteBusy(p, "connections")
		_ = conn.CloseWithError(closeBusy, ErrBusy.Error()+": "+why)
		return
	}
	defer release()
	serveCtx := ctx
	ctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	str, err := conn.AcceptStream(ctx)
	if err != nil {
		_ = conn.CloseWithError(closeProtocol, "no request")
		return
	}
	_ = str.SetDeadline(time.Now().Add(requestTimeout))
	resp, watch := s.dispatch(ctx, str, conn.ConnectionState().TLS.PeerCertificates, p)
	if err := writeFrame(str, 0, resp); err != nil {
		s.log.Warn("write response", "remote", remote, "err", err)
		if watch != nil {
			s.a.watch.remove(watch.w)
		}
		_ = conn.CloseWithError(closeProtocol, "write failed")
		return
	}
	if watch != nil {
		// From here the watch limits count this connection, not the request limits: a watch
		// lives for hours, and must not starve joins of connection slots.
		release()
		s.serveWatch(serveCtx, conn, str, watch)
		return
	}
	_ = str.Close()
	// Let the client read the response and close first: closing the connection now could discard
	// the response still in flight.
	linger := time.NewTimer(lingerTimeout)
	defer linger.Stop()
	select {
	case <-conn.Context().Done():
	case <-linger.C:
	case <-ctx.Done():
	}
	_ = conn.CloseWithError(closeOK, "")
}

// dispatch reads and serves one request. For an accepted watch it also returns the session to
// serve once the response is written.
func (s *Server) dispatch(ctx context.Context, str *quic.Stream, certs []*x509.Certificate, p peer) (Response, *watchSession) {
	op, err := readOp(str)
	if err != nil {
		return s.a.refuseNoise("request", p, "", err), nil
	}
	body, err := readFrame(str, maxRequest)
	if err != nil {
		return s.a.refuseNoise("request", p, "", err), nil
	}
	select {
	case s.inFlight <- struct{}{}:
		defer func() { <-s.inFlight }()
	default:
		s.a.noteBusy(p, "requests")
		return Response{Code: CodeBusy, Message: fmt.Sprintf("%s: %d requests already being processed", ErrBusy, cap(s.inFlight))}, nil
	}
	switch op {
	case OpJoin:
		req, err := DecodeJoinRequest(body)
		if err != nil {
			return s.a.refuseNoise("join", p, "", err), nil
		}
		return s.a.join(ctx, req, p), nil
	case OpWatch:
		req, err := DecodeWatchRequest(body)
		if err != nil {
			return s.a.refuseNoise("watch", p, "", err), nil
		}
		return s.a.openWatch(req, certs, p)
	case OpEvidence: // evidence.go
		req, err := DecodeEvidenceRequest(body)
		if err != nil {
			return s.a.refuseNoise("evidence", p, "", err), nil
		}
		return s.a.submitEvidence(ctx, req, certs, p), nil
	default:
		req, err := DecodeRenewRequest(body)
		if err != nil {
			return s.a.refuseNoise("renew", p, "", err), nil
		}
		return s.a.renew(ctx, req, certs, p), nil
	}
}

// trackWatch registers a watch connection for closeWatches; false means the server is closing.
func (s *Server) trackWatch(conn *quic.Conn) bool {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	if s.closing {
		return false
	}
	s.watchConns[conn] = struct{}{}
	return true
}

func (s *Server) untrackWatch(conn *quic.Conn) {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	delete(s.watchConns, conn)
}

// closeWatches closes every watch connection with a close frame the node receives at once.
func (s *Server) closeWatches() {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	s.closing = true
	for c := range s.watchConns {
		_ = c.CloseWithError(closeOK, "authority shutting down")
	}
}
