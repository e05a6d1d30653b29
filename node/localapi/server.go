package localapi

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
	"unicode/utf8"

	"github.com/ute-project/ute/identity/localsock"
)

// Limits of the API. A request body is a few hundred bytes; responses are not limited by the
// server (status grows with agents and peers), only by the client.
const (
	MaxRequestBody  = 64 << 10
	MaxRecent       = 1000
	DefaultTimeout  = 10 * time.Second
	DefaultMaxConns = 32
	maxHeaderBytes  = 16 << 10
	maxNameLen      = 63
	maxExeLen       = 4096
	maxSubjectLen   = 2048
	maxReasonLen    = 1024
	maxLabels       = 32
)

// Options tunes a Server; the zero value is fine.
type Options struct {
	Logger *slog.Logger
	// AllowUIDs are allowed besides root, the daemon's own uid and the owner of the socket's
	// directory.
	AllowUIDs []uint32
	// Timeout bounds reading a request, the Backend call and writing the response.
	Timeout time.Duration
	// MaxConns caps concurrent connections; the rest wait in the kernel's backlog.
	MaxConns int
}

// Server serves the local API on a Unix socket.
type Server struct {
	ln  *localsock.Listener
	srv *http.Server
	b   Backend
	log *slog.Logger
	// allow decides on a caller; policy.Allows except in tests, which cannot change their uid.
	allow func(localsock.Cred) bool
	done  chan struct{}
	once  sync.Once
	err   error
}

// SocketPath is the socket's path in node directory dir.
func SocketPath(dir string) string { return filepath.Join(dir, FileSocket) }

// Start binds path (refusing with localsock.ErrInUse if another live daemon holds it; removing a
// stale socket) and serves b on it until Close. Once Start returns, clients reach the server.
func Start(path string, b Backend, opts Options) (*Server, error) {
	if b == nil {
		return nil, errors.New("localapi: nil Backend")
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Timeout <= 0 {
		opts.Timeout = DefaultTimeout
	}
	if opts.MaxConns <= 0 {
		opts.MaxConns = DefaultMaxConns
	}
	uids := append([]uint32{uint32(os.Getuid())}, opts.AllowUIDs...)
	// The owner of the node directory is the node's operator even when the daemon runs as root.
	var st syscall.Stat_t
	if err := syscall.Stat(filepath.Dir(path), &st); err != nil {
		return nil, fmt.Errorf("localapi: %s: %w", filepath.Dir(path), err)
	}
	uids = append(uids, st.Uid)
	ln, err := localsock.Listen(path)
	if err != nil {
		return nil, fmt.Errorf("localapi: %w", err)
	}
	policy := localsock.AllowRootAnd(uids...)
	return serve(ln, b, opts, func(c localsock.Cred) bool { return policy.Allows(c.UID) }), nil
}

func serve(ln *localsock.Listener, b Backend, opts Options, allow func(localsock.Cred) bool) *Server {
	s := &Server{ln: ln, b: b, log: opts.Logger, allow: allow, done: make(chan struct{})}
	s.srv = &http.Server{
		Handler:           s.handler(opts.Timeout),
		ReadHeaderTimeout: opts.Timeout,
		ReadTimeout:       opts.Timeout,
		WriteTimeout:      opts.Timeout + time.Second,
		IdleTimeout:       opts.Timeout,
		MaxHeaderBytes:    maxHeaderBytes,
		ErrorLog:          slog.NewLogLogger(opts.Logger.Handler(), slog.LevelWarn),
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			if cc, ok := c.(*credConn); ok {
				return context.WithValue(ctx, callerKey{}, cc.caller)
			}
			return ctx
		},
	}
	go func() {
		defer close(s.done)
		err := s.srv.Serve(&limitListener{Listener: ln, allow: allow, log: s.log,
			sem: make(chan struct{}, opts.MaxConns), refusedSem: make(chan struct{}, maxRefusedConns)})
		if !errors.Is(err, http.ErrServerClosed) {
			s.log.Error("local API stopped", "err", err)
		}
	}()
	return s
}

// handler is the whole API: the caller check, then the routes, under a deadline.
func (s *Server) handler(timeout time.Duration) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+PathStatus, s.handleStatus)
	mux.HandleFunc("GET "+PathWhoIs, s.handleWhoIs)
	mux.HandleFunc("POST "+PathAgents, s.handleAddAgent)
	mux.HandleFunc("DELETE "+PathAgents+"/{zone}/{name}", s.handleRemoveAgent)
	mux.HandleFunc("POST "+PathRevocations, s.handleRevoke)
	mux.HandleFunc("GET "+PathAudit, s.handleAudit)
	mux.HandleFunc("GET "+PathTrust, s.handleTrust)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, fmt.Errorf("%w: no endpoint %s %s", ErrNotFound, r.Method, truncate(r.URL.Path, 80)))
	})
	// ServeMux answers an unclean path ("/v1/../v1/status", ".") with a redirect; an API answers
	// with an error instead, so every reply is JSON and no client follows a redirect.
	clean := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if p := r.URL.Path; p == "" || p[0] != '/' || path.Clean(p) != p {
			writeError(w, fmt.Errorf("%w: path %q is not canonical", ErrNotFound, truncate(p, 80)))
			return
		}
		mux.ServeHTTP(w, r)
	})
	return http.TimeoutHandler(s.guard(clean), timeout, `{"error":"local API: request timed out","code":"unavailable"}`)
}

// Path is the socket's path.
func (s *Server) Path() string { return s.ln.Path() }

// Close stops accepting, lets in-flight requests finish (up to five seconds), removes the socket
// and waits for the serving goroutine. It is idempotent.
func (s *Server) Close() error {
	s.once.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := s.srv.Shutdown(ctx); err != nil {
			_ = s.srv.Close()
		}
		<-s.done
		s.err = s.ln.Close()
	})
	return s.err
}

// Caller is who made a request, as the kernel reported it.
type Caller struct {
	Cred    localsock.Cred
	Allowed bool
	Err     error // why the credentials could not be read or were refused
}

type callerKey struct{}

// CallerFrom returns the checked caller of a request; Backends may log it (who revoked what).
func CallerFrom(ctx context.Context) (localsock.Cred, bool) {
	c, ok := ctx.Value(callerKey{}).(Caller)
	if !ok || !c.Allowed {
		return localsock.Cred{}, false
	}
	return c.Cred, true
}

// guard refuses every request of a caller the policy does not allow, before routing, so no
// Backend method ever runs for it. The refusal is an ordinary JSON error, so the CLI of a user
// who is not allowed prints one clear line instead of "connection reset".
func (s *Server) guard(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, ok := r.Context().Value(callerKey{}).(Caller)
		if !ok || !c.Allowed {
			s.log.Warn("local API: refused caller", "uid", c.Cred.UID, "pid", c.Cred.PID, "err", c.Err)
			writeError(w, fmt.Errorf("%w: uid %d may not use this socket; run as root or as the node directory's owner", ErrForbidden, c.Cred.UID))
			return
		}
		next.ServeHTTP(w, r)
	})
}

// limitListener reads each connection's credentials at accept (while it is still a
// *net.UnixConn) and caps concurrent connections: allowed callers share MaxConns slots, and
// callers that will only be told "forbidden" get a few slots of their own, beyond which they are
// hung up on at once. So a local user who is not allowed cannot starve root's CLI by holding
// connections open.
type limitListener struct {
	net.Listener
	allow      func(localsock.Cred) bool
	log        *slog.Logger
	sem        chan struct{}
	refusedSem chan struct{}
}

// maxRefusedConns is how many refused callers at once get their 403 answer.
const maxRefusedConns = 4

func (l *limitListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		cred, err := localsock.PeerCred(c)
		allowed := err == nil && l.allow(cred)
		if err == nil && !allowed {
			err = fmt.Errorf("%w: uid %d (pid %d)", localsock.ErrPeerRefused, cred.UID, cred.PID)
		}
		caller := Caller{Cred: cred, Allowed: allowed, Err: err}
		if allowed {
			l.sem <- struct{}{}
			return &credConn{Conn: c, caller: caller, release: func() { <-l.sem }}, nil
		}
		select {
		case l.refusedSem <- struct{}{}:
			return &credConn{Conn: c, caller: caller, release: func() { <-l.refusedSem }}, nil
		default:
			l.log.Warn("local API: refused caller hung up on (too many at once)", "uid", cred.UID, "pid", cred.PID)
			_ = c.Close()
		}
	}
}

type credConn struct {
	net.Conn
	caller  Caller
	once    sync.Once
	release func()
}

func (c *credConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.release)
	return err
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func writeError(w http.ResponseWriter, err error) {
	code, status := classify(err)
	msg := strings.ReplaceAll(err.Error(), "\n", " ")
	writeJSON(w, status, wireError{Error: msg, Code: code})
}

// decode reads one JSON object of type T from the body: bounded, no unknown fields, nothing
// after it.
func decode[T any](r *http.Request) (T, error) {
	var v T
	data, err := io.ReadAll(io.LimitReader(r.Body, MaxRequestBody+1))
	if err != nil {
		return v, fmt.Errorf("%w: read request: %v", ErrBadRequest, err)
	}
	if len(data) > MaxRequestBody {
		return v, fmt.Errorf("%w: request body larger than %d bytes", ErrBadRequest, MaxRequestBody)
	}
	// encoding/json would silently turn invalid UTF-8 into U+FFFD, so a subject or name could
	// differ from what the caller sent.
	if !utf8.Valid(data) {
		return v, fmt.Errorf("%w: request body is not UTF-8", ErrBadRequest)
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&v); err != nil {
		return v, fmt.Errorf("%w: decode request: %v", ErrBadRequest, err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return v, fmt.Errorf("%w: decode request: data after the JSON object", ErrBadRequest)
	}
	return v, nil
}

// text checks a string field: present, bounded, printable UTF-8 on one line.
func text(field, v string, limit int) error {
	switch {
	case v == "":
		return fmt.Errorf("%w: %s is required", ErrBadRequest, field)
	case len(v) > limit:
		return fmt.Errorf("%w: %s is longer than %d bytes", ErrBadRequest, field, limit)
	case !utf8.ValidString(v):
		return fmt.Errorf("%w: %s is not UTF-8", ErrBadRequest, field)
	}
	for _, r := range v {
		if r < 0x20 || r == 0x7f {
			return fmt.Errorf("%w: %s contains a control character", ErrBadRequest, field)
		}
	}
	return nil
}

func (s *Server) handleStatus(w http.ResponseWriter, r *http.Request) {
	st, err := s.b.Status(r.Context())
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, st)
}

// ParseWhoIsAddr parses the addr of a whois query: an overlay IP and port.
func ParseWhoIsAddr(s string) (netip.AddrPort, error) {
	ap, err := netip.ParseAddrPort(s)
	if err != nil || ap.Addr().Zone() != "" || ap.Port() == 0 || ap.Addr().IsUnspecified() {
		return netip.AddrPort{}, fmt.Errorf("%w: addr %q is not an overlay IP and port such as 100.100.1.5:43512", ErrBadRequest, truncate(s, 80))
	}
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), nil
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}

func (s *Server) handleWhoIs(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	if len(q) != 1 || len(q["addr"]) != 1 {
		writeError(w, fmt.Errorf("%w: whois takes exactly one query parameter, addr=IP:PORT", ErrBadRequest))
		return
	}
	ap, err := ParseWhoIsAddr(q.Get("addr"))
	if err != nil {
		writeError(w, err)
		return
	}
	res, err := s.b.WhoIs(r.Context(), ap)
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, res)
}

func (s *Server) handleAddAgent(w http.ResponseWriter, r *http.Request) {
	spec, err := decode[AgentSpec](r)
	if err == nil {
		err = errors.Join(text("name", spec.Name, maxNameLen), text("zone", spec.Zone, maxNameLen), text("exe", spec.Exe, maxExeLen))
		if err == nil && !filepath.IsAbs(spec.Exe) {
			err = fmt.Errorf("%w: exe %q is not an absolute path", ErrBadRequest, spec.Exe)
		}
		if err == nil && (len(spec.Labels) > maxLabels || spec.Lifetime < 0) {
			err = fmt.Errorf("%w: at most %d labels and a lifetime of 0 or more seconds", ErrBadRequest, maxLabels)
		}
		for k, v := range spec.Labels {
			if err == nil {
				err = errors.Join(text("label key", k, maxNameLen), text("label value", v, maxNameLen))
			}
		}
	}
	if err != nil {
		writeError(w, firstLine(err))
		return
	}
	ag, err := s.b.AddAgent(r.Context(), spec)
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, ag)
}

// firstLine keeps the first of several joined errors, so the reply stays one line and still
// wraps its sentinel.
func firstLine(err error) error {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		for _, e := range j.Unwrap() {
			if e != nil {
				return e
			}
		}
	}
	return err
}

func (s *Server) handleRemoveAgent(w http.ResponseWriter, r *http.Request) {
	zone, name := r.PathValue("zone"), r.PathValue("name")
	if err := errors.Join(text("zone", zone, maxNameLen), text("name", name, maxNameLen)); err != nil {
		writeError(w, firstLine(err))
		return
	}
	if err := s.b.RemoveAgent(r.Context(), zone, name); err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, struct{}{})
}

func (s *Server) handleRevoke(w http.ResponseWriter, r *http.Request) {
	req, err := decode[RevokeRequest](r)
	if err == nil {
		err = firstLine(errors.Join(text("subject", req.Subject, maxSubjectLen), text("reason", req.Reason, maxReasonLen)))
	}
	if err != nil {
		writeError(w, err)
		return
	}
	rev, err := s.b.Revoke(r.Context(), req)
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, rev)
}

func (s *Server) handleAudit(w http.ResponseWriter, r *http.Request) {
	q := AuditQuery{}
	vals := r.URL.Query()
	for k := range vals {
		if k != "recent" {
			writeError(w, fmt.Errorf("%w: unknown query parameter %q; audit takes recent=N", ErrBadRequest, truncate(k, 40)))
			return
		}
	}
	if v := vals["recent"]; len(v) > 0 {
		n, err := strconv.Atoi(v[0])
		if len(v) != 1 || err != nil || n < 0 || n > MaxRecent {
			writeError(w, fmt.Errorf("%w: recent must be one integer 0..%d", ErrBadRequest, MaxRecent))
			return
		}
		q.Recent = n
	}
	a, err := s.b.Audit(r.Context(), q)
	if err != nil {
		writeError(w, err)
		return
	}
	if a.Recent == nil {
		a.Recent = []AuditEntry{}
	}
	writeJSON(w, http.StatusOK, a)
}

func (s *Server) handleTrust(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	if len(q) != 1 || len(q["subject"]) != 1 {
		writeError(w, fmt.Errorf("%w: trust takes exactly one query parameter, subject=SPIFFE-ID or NAME.ZONE", ErrBadRequest))
		return
	}
	subject := q.Get("subject")
	if err := text("subject", subject, maxSubjectLen); err != nil {
		writeError(w, err)
		return
	}
	x, err := s.b.TrustExplain(r.Context(), subject)
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, x)
}
