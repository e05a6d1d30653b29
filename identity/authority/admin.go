package authority

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
	"net/url"
	"os"
	"path/filepath"
	"time"

	"github.com/ute-project/ute/identity/localsock"
)

// The admin socket lets `ute token create`, `ute authority audit` and `ute revoke` reach a running authority:
// bbolt holds an exclusive lock on authority.db, so while the daemon runs only it can open the
// store. When no daemon runs, the CLI opens the store itself (OpenAdmin decides).

// FileSocket is the admin socket's name inside the authority directory.
const FileSocket = "authority.sock"

const (
	adminTimeout  = 10 * time.Second
	maxAdminBody  = 64 << 10
	pathTokens    = "/v1/tokens"
	pathAudit     = "/v1/audit"
	pathRevoke    = "/v1/revocations"
	pathRelease   = "/v1/releases"
	pathLineage   = "/v1/lineage"
	storeWaitTime = time.Second
)

// TokenSpec describes a token to create.
type TokenSpec struct {
	Zones   []string      `json:"zones"`
	Regions []string      `json:"regions,omitempty"`
	TTL     time.Duration `json:"ttl"`
}

// IssuedToken is a created token. Token is the only copy of the secret; it is shown once.
type IssuedToken struct {
	Token     string    `json:"token"`
	ID        string    `json:"id"`
	Zones     []string  `json:"zones"`
	Regions   []string  `json:"regions,omitempty"`
	ExpiresAt time.Time `json:"expires_at"`
}

// Admin is the administrative surface used by the CLI, reached either through the running
// daemon's socket or by opening the store directly.
type Admin interface {
	CreateToken(ctx context.Context, spec TokenSpec) (IssuedToken, error)
	Audit(ctx context.Context) ([]AuditRecord, error)
	// Revoke revokes a subject ("serial:N" or a node SPIFFE ID); see Authority.RevokeSubject.
	Revoke(ctx context.Context, subject, reason string) (Revocation, error)
	// ApplyPolicy replaces the policy (name: the file it came from); see Authority.ApplyPolicy.
	ApplyPolicy(ctx context.Context, name string, policy []byte) (PolicyApplied, error)
	// Release reopens a node name whose lineage was revoked; see Authority.ReleaseName.
	Release(ctx context.Context, name, reason string) (Released, error)
	// Lineage lists the certificates of a node name; see Authority.Lineage.
	Lineage(ctx context.Context, name string) ([]LineageEntry, error)
	Close() error
}

// OpenAdmin reaches the authority in dir: through its admin socket when the daemon runs, else by
// opening the store (waiting briefly for its lock).
func OpenAdmin(ctx context.Context, dir string, opts Options) (Admin, error) {
	sock := filepath.Join(dir, FileSocket)
	if _, err := os.Stat(sock); err == nil {
		c := &adminClient{sock: sock}
		if err := c.ping(ctx); err == nil {
			return c, nil
		}
		// A socket file nobody answers on is left over from a daemon killed with SIGKILL.
	}
	if opts.StoreTimeout == 0 {
		opts.StoreTimeout = storeWaitTime
	}
	a, err := Open(dir, opts)
	if errors.Is(err, ErrStoreLocked) {
		// A daemon holds the store: its socket was bound but not yet answering when we first
		// looked (it is starting), and Open's wait for the lock gave it time to come up.
		c := &adminClient{sock: sock}
		if perr := c.ping(ctx); perr == nil {
			return c, nil
		}
	}
	if err != nil {
		return nil, err
	}
	return localAdmin{a}, nil
}

type localAdmin struct{ a *Authority }

func (l localAdmin) CreateToken(ctx context.Context, spec TokenSpec) (IssuedToken, error) {
	return l.a.CreateToken(ctx, spec)
}
func (l localAdmin) Audit(context.Context) ([]AuditRecord, error) { return l.a.store.Audit() }
func (l localAdmin) Close() error                                 { return l.a.Close() }
func (l localAdmin) Revoke(ctx context.Context, subject, reason string) (Revocation, error) {
	return l.a.RevokeSubject(ctx, subject, reason)
}
func (l localAdmin) Release(ctx context.Context, name, reason string) (Released, error) {
	return l.a.ReleaseName(ctx, name, reason)
}
func (l localAdmin) Lineage(ctx context.Context, name string) ([]LineageEntry, error) {
	return l.a.Lineage(ctx, name)
}

// AdminServer is the admin API bound to dir/authority.sock, not yet serving.
type AdminServer struct {
	a    *Authority
	sock string
	ln   *localsock.Listener
}

// ListenAdmin binds the admin socket (mode 0600) now, so that once it returns a CLI call reaches
// the daemon instead of finding the store locked. Serve answers on it.
func (a *Authority) ListenAdmin() (*AdminServer, error) {
	sock := filepath.Join(a.dir, FileSocket)
	// localsock removes a stale socket left by a killed daemon, refuses one a live process
	// answers on, and removes the file again when the listener closes.
	ln, err := localsock.Listen(sock)
	if err != nil {
		return nil, fmt.Errorf("admin socket: %w", err)
	}
	return &AdminServer{a: a, sock: sock, ln: ln}, nil
}

// ServeAdmin binds the admin socket and serves it until ctx is cancelled.
func (a *Authority) ServeAdmin(ctx context.Context) error {
	s, err := a.ListenAdmin()
	if err != nil {
		return err
	}
	return s.Serve(ctx)
}

// Serve answers admin calls until ctx is cancelled, then removes the socket.
func (s *AdminServer) Serve(ctx context.Context) error {
	a, sock, ln := s.a, s.sock, s.ln
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+pathTokens, a.handleCreateToken)
	mux.HandleFunc("GET "+pathAudit, a.handleAudit)
	mux.HandleFunc("POST "+pathRevoke, a.handleRevoke)
	mux.HandleFunc("POST "+pathPolicy, a.handleApplyPolicy)
	mux.HandleFunc("POST "+pathRelease, a.handleRelease)
	mux.HandleFunc("GET "+pathLineage, a.handleLineage)
	srv := &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: adminTimeout,
		ReadTimeout:       adminTimeout,
		WriteTimeout:      adminTimeout,
		ErrorLog:          slog.NewLogLogger(a.log.Handler(), slog.LevelWarn),
		ConnContext:       func(ctx context.Context, _ net.Conn) context.Context { return ctx },
	}
	// Only root and the daemon's own user get through: the socket's mode is the first gate, this
	// is the second, for a mode or directory loosened by mistake.
	allowed := localsock.AllowRootAnd(uint32(os.Getuid())).CheckedListener(ln, func(c localsock.Cred, err error) {
		a.log.Warn("admin socket: refused connection", "peer_uid", c.UID, "peer_pid", c.PID, "err", err)
	})
	done := make(chan error, 1)
	go func() { done <- srv.Serve(allowed) }()
	// Closing the listener (Shutdown, or Serve on its way out) removes the socket file.
	select {
	case <-ctx.Done():
		shutCtx, cancel := context.WithTimeout(context.Background(), adminTimeout)
		defer cancel()
		_ = srv.Shutdown(shutCtx)
		<-done
		_ = ln.Close()
		return nil
	case err := <-done:
		_ = ln.Close()
		return fmt.Errorf("admin socket %s: %w", sock, err)
	}
}

type adminError struct {
	Error string `json:"error"`
}

func (a *Authority) handleCreateToken(w http.ResponseWriter, r *http.Request) {
	var spec TokenSpec
	dec := json.NewDecoder(io.LimitReader(r.Body, maxAdminBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&spec); err != nil {
		writeJSON(w, http.StatusBadRequest, adminError{"decode token request: " + err.Error()})
		return
	}
	tok, err := a.CreateToken(r.Context(), spec)
	if err != nil {
		status := http.StatusInternalServerError
		if errors.Is(err, ErrZoneUnknown) || errors.Is(err, ErrRegionUnknown) {
			status = http.StatusBadRequest
		}
		writeJSON(w, status, adminError{err.Error()})
		return
	}
	writeJSON(w, http.StatusOK, tok)
}

func (a *Authority) handleRevoke(w http.ResponseWriter, r *http.Request) {
	var req RevokeRequest
	dec := json.NewDecoder(io.LimitReader(r.Body, maxAdminBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		writeJSON(w, http.StatusBadRequest, adminError{"decode revocation request: " + err.Error()})
		return
	}
	rev, err := a.RevokeSubject(r.Context(), req.Subject, req.Reason)
	if err != nil {
		status := http.StatusInternalServerError
		switch {
		case errors.Is(err, ErrRevocationMalformed), errors.Is(err, ErrAgentRevocation):
			status = http.StatusBadRequest
		case errors.Is(err, ErrSubjectUnknown):
			status = http.StatusNotFound
		}
		writeJSON(w, status, adminError{err.Error()})
		return
	}
	writeJSON(w, http.StatusOK, rev)
}

func (a *Authority) handleAudit(w http.ResponseWriter, _ *http.Request) {
	recs, err := a.store.Audit()
	if err != nil {
		writeJSON(w, http.StatusInternalServerError, adminError{err.Error()})
		return
	}
	if recs == nil {
		recs = []AuditRecord{}
	}
	writeJSON(w, http.StatusOK, recs)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// adminClient talks to a running daemon over its socket.
type adminClient struct{ sock string }

func (c *adminClient) httpClient() *http.Client {
	return &http.Client{
		Timeout: adminTimeout,
		Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", c.sock)
			},
			DisableKeepAlives: true,
		},
	}
}

func (c *adminClient) ping(ctx context.Context) error {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", c.sock)
	if err != nil {
		return err
	}
	return conn.Close()
}

func (c *adminClient) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://authority"+path, body)
	if err != nil {
		return err
	}
	resp, err := c.httpClient().Do(req)
	if err != nil {
		return fmt.Errorf("authority admin socket %s: %w", c.sock, err)
	}
	defer func() { _ = resp.Body.Close() }()
	dec := json.NewDecoder(io.LimitReader(resp.Body, maxResponse))
	if resp.StatusCode != http.StatusOK {
		var ae adminError
		if err := dec.Decode(&ae); err != nil || ae.Error == "" {
			return fmt.Errorf("authority admin socket: HTTP %d", resp.StatusCode)
		}
		return remoteAdminError(ae.Error)
	}
	if err := dec.Decode(out); err != nil {
		return fmt.Errorf("authority admin socket: decode response: %w", err)
	}
	return nil
}

// remoteAdminError restores the sentinel of an error the daemon reported, so the CLI's errors.Is
// works the same whether it went through the socket or opened the store.
func remoteAdminError(msg string) error {
	for _, s := range []error{ErrZoneUnknown, ErrRegionUnknown, ErrNotInitialized, ErrRevocationMalformed, ErrSubjectUnknown, ErrAgentRevocation, ErrPolicyInvalid, ErrReleaseRefused} {
		if len(msg) >= len(s.Error()) && msg[:len(s.Error())] == s.Error() {
			return fmt.Errorf("%w%s", s, msg[len(s.Error()):])
		}
	}
	return errors.New(msg)
}

func (c *adminClient) CreateToken(ctx context.Context, spec TokenSpec) (IssuedToken, error) {
	var tok IssuedToken
	err := c.do(ctx, http.MethodPost, pathTokens, spec, &tok)
	return tok, err
}

func (c *adminClient) Audit(ctx context.Context) ([]AuditRecord, error) {
	var recs []AuditRecord
	err := c.do(ctx, http.MethodGet, pathAudit, nil, &recs)
	return recs, err
}

func (c *adminClient) Revoke(ctx context.Context, subject, reason string) (Revocation, error) {
	var rev Revocation
	err := c.do(ctx, http.MethodPost, pathRevoke, RevokeRequest{Subject: subject, Reason: reason}, &rev)
	return rev, err
}

func (c *adminClient) Release(ctx context.Context, name, reason string) (Released, error) {
	var rel Released
	err := c.do(ctx, http.MethodPost, pathRelease, ReleaseRequest{Name: name, Reason: reason}, &rel)
	return rel, err
}

func (c *adminClient) Lineage(ctx context.Context, name string) ([]LineageEntry, error) {
	var out []LineageEntry
	err := c.do(ctx, http.MethodGet, pathLineage+"?name="+url.QueryEscape(name), nil, &out)
	return out, err
}

func (a *Authority) handleRelease(w http.ResponseWriter, r *http.Request) {
	var req ReleaseRequest
	dec := json.NewDecoder(io.LimitReader(r.Body, maxAdminBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		writeJSON(w, http.StatusBadRequest, adminError{"decode release request: " + err.Error()})
		return
	}
	rel, err := a.ReleaseName(r.Context(), req.Name, req.Reason)
	if err != nil {
		status := http.StatusInternalServerError
		switch {
		case errors.Is(err, ErrRevocationMalformed):
			status = http.StatusBadRequest
		case errors.Is(err, ErrReleaseRefused):
			status = http.StatusConflict
		}
		writeJSON(w, status, adminError{err.Error()})
		return
	}
	writeJSON(w, http.StatusOK, rel)
}

func (a *Authority) handleLineage(w http.ResponseWriter, r *http.Request) {
	out, err := a.Lineage(r.Context(), r.URL.Query().Get("name"))
	if err != nil {
		status := http.StatusInternalServerError
		if errors.Is(err, ErrSubjectUnknown) {
			status = http.StatusNotFound
		}
		writeJSON(w, status, adminError{err.Error()})
		return
	}
	writeJSON(w, http.StatusOK, out)
}

func (c *adminClient) Close() error { return nil }
