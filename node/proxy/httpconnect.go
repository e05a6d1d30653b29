package proxy

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"strings"
)

// ErrHTTPProxy: the request is not one this proxy serves.
var ErrHTTPProxy = errors.New("proxy: bad HTTP proxy request")

// maxHeader bounds the request head of an HTTP proxy request.
const maxHeader = 16 << 10

// HTTPRequest is a parsed HTTP proxy request: a CONNECT (Tunnel), or an absolute-form
// http:// request (Forward, with Req rewritten to origin form).
type HTTPRequest struct {
	Target string // host:port
	Tunnel bool
	Req    *http.Request // the request to forward when !Tunnel
}

// ReadHTTPProxyRequest reads one proxy request head from br. CONNECT needs an authority-form
// target with a port; other methods need an absolute http:// URL (https:// goes through
// CONNECT). The caller bounds how much br may read (maxHeader).
func ReadHTTPProxyRequest(br *bufio.Reader) (HTTPRequest, error) {
	req, err := http.ReadRequest(br)
	if err != nil {
		return HTTPRequest{}, fmt.Errorf("%w: %w", ErrHTTPProxy, err)
	}
	if req.Method == http.MethodConnect {
		host, port, err := net.SplitHostPort(req.RequestURI)
		if err != nil || host == "" {
			return HTTPRequest{}, fmt.Errorf("%w: CONNECT target %q is not host:port", ErrHTTPProxy, req.RequestURI)
		}
		if err := checkPort(port); err != nil {
			return HTTPRequest{}, err
		}
		return HTTPRequest{Target: net.JoinHostPort(host, port), Tunnel: true}, nil
	}
	u := req.URL
	if u == nil || !u.IsAbs() || u.Host == "" {
		return HTTPRequest{}, fmt.Errorf("%w: %s %q is not a proxy request; send CONNECT host:port or an absolute http:// URL", ErrHTTPProxy, req.Method, req.RequestURI)
	}
	if u.Scheme != "http" {
		return HTTPRequest{}, fmt.Errorf("%w: scheme %q; use CONNECT for %s (set HTTPS_PROXY)", ErrHTTPProxy, u.Scheme, u.Scheme)
	}
	if u.User != nil {
		return HTTPRequest{}, fmt.Errorf("%w: credentials in the URL are not forwarded", ErrHTTPProxy)
	}
	host, port := u.Hostname(), u.Port()
	if port == "" {
		port = "80"
	}
	if host == "" {
		return HTTPRequest{}, fmt.Errorf("%w: URL %q has no host", ErrHTTPProxy, u.String())
	}
	if err := checkPort(port); err != nil {
		return HTTPRequest{}, err
	}
	// Hop-by-hop headers addressed to the proxy go no further.
	for _, h := range []string{"Proxy-Connection", "Proxy-Authorization", "Proxy-Authenticate"} {
		req.Header.Del(h)
	}
	req.RequestURI = ""
	return HTTPRequest{Target: net.JoinHostPort(host, port), Req: req}, nil
}

func checkPort(p string) error {
	n, err := strconv.ParseUint(p, 10, 16)
	if err != nil || n == 0 || strings.HasPrefix(p, "+") {
		return fmt.Errorf("%w: port %q must be 1..65535", ErrHTTPProxy, p)
	}
	return nil
}

// httpStatus writes a minimal response that closes the connection.
func httpStatus(w *bufio.Writer, code int, msg string) error {
	body := msg + "\n"
	fmt.Fprintf(w, "HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s",
		code, http.StatusText(code), len(body), body)
	return w.Flush()
}
