package localapi

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strconv"
	"syscall"
	"time"
)

// MaxResponse caps what the client reads of one response (a status with thousands of agents and
// peers fits easily).
const MaxResponse = 16 << 20

// Client calls a running node daemon over its socket. It is safe for concurrent use.
type Client struct {
	path string
	hc   *http.Client
}

// Dial checks that a daemon answers on the socket at path and returns a client for it. When
// none does (no socket file, or a stale one) the error wraps ErrNotRunning.
func Dial(ctx context.Context, path string) (*Client, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ENOENT) {
			return nil, fmt.Errorf("%w: nothing answers on %s; start it with `ute node run`", ErrNotRunning, path)
		}
		if errors.Is(err, fs.ErrPermission) {
			return nil, &RemoteError{Code: CodeForbidden, Message: fmt.Sprintf("forbidden: no permission to reach %s; run as root or as the node directory's owner", path)}
		}
		return nil, fmt.Errorf("local API %s: %w", path, err)
	}
	_ = c.Close()
	return &Client{path: path, hc: &http.Client{
		Timeout: DefaultTimeout + 2*time.Second,
		Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", path)
			},
			MaxIdleConns:       1,
			DisableCompression: true,
		},
	}}, nil
}

// Close releases idle connections.
func (c *Client) Close() error {
	c.hc.CloseIdleConnections()
	return nil
}

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://ute"+path, body)
	if err != nil {
		return err
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return fmt.Errorf("%w: local API %s: %w", ErrUnavailable, c.path, err)
	}
	defer func() { _ = resp.Body.Close() }()
	data, err := io.ReadAll(io.LimitReader(resp.Body, MaxResponse+1))
	if err != nil {
		return fmt.Errorf("%w: local API: read response: %w", ErrUnavailable, err)
	}
	if len(data) > MaxResponse {
		return fmt.Errorf("%w: local API: response larger than %d bytes", ErrInternal, MaxResponse)
	}
	if resp.StatusCode != http.StatusOK {
		var we wireError
		if err := json.Unmarshal(data, &we); err != nil || we.Error == "" {
			return &RemoteError{Code: codeForStatus(resp.StatusCode), Message: fmt.Sprintf("local API: HTTP %d", resp.StatusCode)}
		}
		if we.Code == "" {
			we.Code = codeForStatus(resp.StatusCode)
		}
		return &RemoteError{Code: we.Code, Message: we.Error}
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(data, out); err != nil {
		return fmt.Errorf("%w: local API: decode response: %w", ErrInternal, err)
	}
	return nil
}

// Status returns the node's status.
func (c *Client) Status(ctx context.Context) (Status, error) {
	var st Status
	err := c.do(ctx, http.MethodGet, PathStatus, nil, &st)
	return st, err
}

// WhoIs returns the verified provenance of the flow from addr (overlay IP and port).
func (c *Client) WhoIs(ctx context.Context, addr netip.AddrPort) (WhoIs, error) {
	var w WhoIs
	err := c.do(ctx, http.MethodGet, PathWhoIs+"?addr="+url.QueryEscape(addr.String()), nil, &w)
	return w, err
}

// AddAgent registers an agent with the running daemon.
func (c *Client) AddAgent(ctx context.Context, spec AgentSpec) (Agent, error) {
	var a Agent
	err := c.do(ctx, http.MethodPost, PathAgents, spec, &a)
	return a, err
}

// RemoveAgent removes an agent.
func (c *Client) RemoveAgent(ctx context.Context, zone, name string) error {
	return c.do(ctx, http.MethodDelete, PathAgents+"/"+url.PathEscape(zone)+"/"+url.PathEscape(name), nil, nil)
}

// Revoke asks the node to revoke subject; it returns once the record is durable.
func (c *Client) Revoke(ctx context.Context, subject, reason string) (Revocation, error) {
	var r Revocation
	err := c.do(ctx, http.MethodPost, PathRevocations, RevokeRequest{Subject: subject, Reason: reason}, &r)
	return r, err
}

// Audit returns the audit log's verification summary and its recent newest entries.
func (c *Client) Audit(ctx context.Context, recent int) (Audit, error) {
	var a Audit
	err := c.do(ctx, http.MethodGet, PathAudit+"?recent="+strconv.Itoa(recent), nil, &a)
	return a, err
}

// TrustExplain returns TrustFlow's view of subject with the signals and the arithmetic.
func (c *Client) TrustExplain(ctx context.Context, subject string) (TrustExplanation, error) {
	var x TrustExplanation
	err := c.do(ctx, http.MethodGet, PathTrust+"?subject="+url.QueryEscape(subject), nil, &x)
	return x, err
}
