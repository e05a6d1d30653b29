package proxy

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/node"
)

// echoServer answers every connection by echoing it; the proxies below dial it through a
// loopback-only dialer that stands in for an agent (the daemon tests use real agents).
func echoServer(t *testing.T) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { _ = ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { defer func() { _ = c.Close() }(); _, _ = io.Copy(c, c) }()
		}
	}()
	return netip.MustParseAddrPort(ln.Addr().String())
}

// routeDialer maps "name.zone:port" targets to loopback addresses and refuses others the way
// node.Agent does, with a *node.RefusedError.
type routeDialer struct {
	routes map[string]netip.AddrPort
	mu     sync.Mutex
	dialed []string
}

func (d *routeDialer) Dial(ctx context.Context, network, addr string) (net.Conn, error) {
	d.mu.Lock()
	d.dialed = append(d.dialed, addr)
	d.mu.Unlock()
	to, ok := d.routes[addr]
	if !ok {
		return nil, &node.RefusedError{Addr: addr, Stage: "resolve", Reason: "cross_zone", Err: node.ErrCrossZone}
	}
	var nd net.Dialer
	return nd.DialContext(ctx, network, to.String())
}

func (d *routeDialer) count() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.dialed)
}

var errNotEnrolled = errors.New("not the enrolled workload")

func startServer(t *testing.T, attest func(client, server netip.AddrPort) error) (*Server, *routeDialer, chan Refusal) {
	t.Helper()
	d := &routeDialer{routes: map[string]netip.AddrPort{"ledger.payments:8080": echoServer(t)}}
	refusals := make(chan Refusal, 16)
	lo := netip.MustParseAddrPort("127.0.0.1:0")
	s, err := Start(Config{Agent: "billing-api.payments", Dialer: d, SOCKS: lo, HTTP: lo, Attest: attest,
		OnRefused: func(r Refusal) { refusals <- r }})
	require.NoError(t, err)
	t.Cleanup(func() { _ = s.Close() })
	return s, d, refusals
}

func socksHandshake(t *testing.T, addr netip.AddrPort, req []byte) (net.Conn, []byte) {
	t.Helper()
	c, err := net.Dial("tcp", addr.String())
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Close() })
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	_, err = c.Write(append([]byte{5, 1, 0}, req...))
	require.NoError(t, err)
	var m [2]byte
	_, err = io.ReadFull(c, m[:])
	require.NoError(t, err)
	require.Equal(t, []byte{5, 0}, m[:])
	rep := make([]byte, 10)
	_, err = io.ReadFull(c, rep)
	require.NoError(t, err)
	return c, rep
}

func domainReq(cmd byte, host string, port uint16) []byte {
	b := []byte{5, cmd, 0, 3, byte(len(host))}
	b = append(b, host...)
	return append(b, byte(port>>8), byte(port))
}

func TestSOCKSConnectAndRelay(t *testing.T) {
	s, _, _ := startServer(t, nil)
	c, rep := socksHandshake(t, s.SOCKSAddr(), domainReq(CmdConnect, "ledger.payments", 8080))
	assert.Equal(t, ReplySucceeded, rep[1])
	_, err := c.Write([]byte("hello"))
	require.NoError(t, err)
	buf := make([]byte, 5)
	_, err = io.ReadFull(c, buf)
	require.NoError(t, err)
	assert.Equal(t, "hello", string(buf))
	assert.Equal(t, uint64(1), s.Stats().Flows)
}

func TestSOCKSRefusals(t *testing.T) {
	s, d, refusals := startServer(t, nil)
	// Another zone: the dialer refuses, the client gets "not allowed by ruleset".
	_, rep := socksHandshake(t, s.SOCKSAddr(), domainReq(CmdConnect, "tickets.support", 8080))
	assert.Equal(t, ReplyNotAllowed, rep[1])
	r := <-refusals
	var re *node.RefusedError
	require.ErrorAs(t, r.Err, &re)
	require.ErrorIs(t, r.Err, node.ErrCrossZone)
	assert.Equal(t, "tickets.support:8080", r.Target)

	// UDP ASSOCIATE and BIND are refused with "command not supported", nothing dialed.
	n := d.count()
	for _, cmd := range []byte{CmdUDPAssociate, CmdBind} {
		_, rep = socksHandshake(t, s.SOCKSAddr(), domainReq(cmd, "ledger.payments", 8080))
		assert.Equal(t, ReplyCommandUnsupported, rep[1])
		require.ErrorIs(t, (<-refusals).Err, ErrSOCKSCommand)
	}
	assert.Equal(t, n, d.count())

	// A client that offers only username/password gets "no acceptable methods".
	c, err := net.Dial("tcp", s.SOCKSAddr().String())
	require.NoError(t, err)
	defer func() { _ = c.Close() }()
	_, err = c.Write([]byte{5, 1, 2})
	require.NoError(t, err)
	var m [2]byte
	_, err = io.ReadFull(c, m[:])
	require.NoError(t, err)
	assert.Equal(t, []byte{5, 0xff}, m[:])
	require.ErrorIs(t, (<-refusals).Err, ErrSOCKSNoAuth)
}

// Attacker side: a process that fails attestation is refused before the dialer is called.
func TestAttestationRefusesBeforeDial(t *testing.T) {
	var seen []netip.AddrPort
	var mu sync.Mutex
	s, d, refusals := startServer(t, func(client, server netip.AddrPort) error {
		mu.Lock()
		seen = append(seen, client, server)
		mu.Unlock()
		return errNotEnrolled
	})
	c, rep := socksHandshake(t, s.SOCKSAddr(), domainReq(CmdConnect, "ledger.payments", 8080))
	assert.Equal(t, ReplyNotAllowed, rep[1])
	r := <-refusals
	require.ErrorIs(t, r.Err, ErrAttestation)
	require.ErrorIs(t, r.Err, errNotEnrolled)
	assert.Zero(t, d.count(), "nothing dialed")
	mu.Lock()
	assert.Equal(t, netip.MustParseAddrPort(c.LocalAddr().String()), seen[0], "attested the client's socket")
	assert.Equal(t, s.SOCKSAddr(), seen[1])
	mu.Unlock()

	resp := httpConnect(t, s.HTTPAddr(), "ledger.payments:8080")
	assert.Equal(t, http.StatusForbidden, resp.StatusCode)
	require.ErrorIs(t, (<-refusals).Err, ErrAttestation)
	assert.Zero(t, d.count())
	assert.Equal(t, uint64(2), s.Stats().AttestFailed)
}

func httpConnect(t *testing.T, addr netip.AddrPort, target string) *http.Response {
	t.Helper()
	c, err := net.Dial("tcp", addr.String())
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Close() })
	fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", target, target)
	resp, err := http.ReadResponse(bufio.NewReader(c), &http.Request{Method: http.MethodConnect})
	require.NoError(t, err)
	return resp
}

func TestHTTPConnectAndRefusals(t *testing.T) {
	s, _, refusals := startServer(t, nil)
	c, err := net.Dial("tcp", s.HTTPAddr().String())
	require.NoError(t, err)
	defer func() { _ = c.Close() }()
	// The client's first bytes arrive with the CONNECT head: they must be relayed, not lost.
	fmt.Fprintf(c, "CONNECT ledger.payments:8080 HTTP/1.1\r\nHost: ledger.payments:8080\r\n\r\nearly")
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	buf := make([]byte, 5)
	_, err = io.ReadFull(br, buf)
	require.NoError(t, err)
	assert.Equal(t, "early", string(buf))

	resp = httpConnect(t, s.HTTPAddr(), "tickets.support:8080")
	assert.Equal(t, http.StatusForbidden, resp.StatusCode)
	require.ErrorIs(t, (<-refusals).Err, node.ErrCrossZone)

	// An oversized head is refused with 400, not read forever.
	c2, err := net.Dial("tcp", s.HTTPAddr().String())
	require.NoError(t, err)
	defer func() { _ = c2.Close() }()
	go func() {
		_, _ = fmt.Fprintf(c2, "CONNECT ledger.payments:8080 HTTP/1.1\r\nX: %s\r\n\r\n", strings.Repeat("a", 2*maxHeader))
	}()
	resp, err = http.ReadResponse(bufio.NewReader(c2), nil)
	require.NoError(t, err)
	assert.Equal(t, http.StatusBadRequest, resp.StatusCode)
	require.ErrorIs(t, (<-refusals).Err, ErrHTTPProxy)
}

func TestParseHTTPProxyRequest(t *testing.T) {
	for _, tc := range []struct {
		in     string
		target string
		tunnel bool
		err    string
	}{
		{"CONNECT ledger.payments:443 HTTP/1.1\r\n\r\n", "ledger.payments:443", true, ""},
		{"CONNECT [::1]:443 HTTP/1.1\r\n\r\n", "[::1]:443", true, ""},
		{"GET http://ledger.payments/x HTTP/1.1\r\nHost: ledger.payments\r\n\r\n", "ledger.payments:80", false, ""},
		{"CONNECT ledger.payments HTTP/1.1\r\n\r\n", "", false, "not host:port"},
		{"CONNECT ledger.payments:0 HTTP/1.1\r\n\r\n", "", false, "1..65535"},
		{"GET /x HTTP/1.1\r\nHost: a\r\n\r\n", "", false, "not a proxy request"},
		{"GET https://ledger.payments/ HTTP/1.1\r\n\r\n", "", false, "use CONNECT"},
		{"GET http://u:p@ledger.payments/ HTTP/1.1\r\n\r\n", "", false, "credentials"},
	} {
		r, err := ReadHTTPProxyRequest(bufio.NewReader(strings.NewReader(tc.in)))
		if tc.err != "" {
			require.ErrorIs(t, err, ErrHTTPProxy, tc.in)
			assert.Contains(t, err.Error(), tc.err)
			continue
		}
		require.NoError(t, err, tc.in)
		assert.Equal(t, tc.target, r.Target)
		assert.Equal(t, tc.tunnel, r.Tunnel)
	}
}

func TestParseSOCKSRequest(t *testing.T) {
	r, err := ReadSOCKSRequest(bytes.NewReader([]byte{5, 1, 0, 1, 100, 100, 1, 17, 0x1f, 0x90}))
	require.NoError(t, err)
	assert.Equal(t, "100.100.1.17:8080", r.Target())
	r, err = ReadSOCKSRequest(bytes.NewReader(append([]byte{5, 1, 0, 4}, append(make([]byte, 15), 1, 0, 80)...)))
	require.NoError(t, err)
	assert.Equal(t, "[::1]:80", r.Target())
	for _, bad := range [][]byte{
		{5, 1, 1, 1, 1, 2, 3, 4, 0, 80}, // reserved byte
		{5, 1, 0, 9},                    // address type
		{5, 1, 0, 3, 0, 0, 80},          // empty domain
		{5, 1, 0, 3, 3, 'a', ' ', 'b', 0, 80},
		{5, 1, 0, 1, 1, 2, 3, 4, 0, 0}, // port 0
		{5, 1, 0, 1, 1, 2},             // short
	} {
		_, err := ReadSOCKSRequest(bytes.NewReader(bad))
		require.ErrorIs(t, err, ErrSOCKS, "%v", bad)
	}
}

func TestListenersAreLoopbackOnly(t *testing.T) {
	_, err := Start(Config{Dialer: &routeDialer{}, SOCKS: netip.MustParseAddrPort("0.0.0.0:0")})
	require.ErrorIs(t, err, ErrNotLoopback)
	_, err = StartForwarder(ForwarderConfig{Listener: &net.TCPListener{}, Target: netip.MustParseAddrPort("192.0.2.1:80")})
	require.ErrorIs(t, err, ErrNotLoopback)
}

func TestConnectionLimit(t *testing.T) {
	d := &routeDialer{routes: map[string]netip.AddrPort{"ledger.payments:8080": echoServer(t)}}
	s, err := Start(Config{Dialer: d, SOCKS: netip.MustParseAddrPort("127.0.0.1:0"), MaxConns: 1})
	require.NoError(t, err)
	defer func() { _ = s.Close() }()
	c1, rep := socksHandshake(t, s.SOCKSAddr(), domainReq(CmdConnect, "ledger.payments", 8080))
	require.Equal(t, ReplySucceeded, rep[1])
	c2, err := net.Dial("tcp", s.SOCKSAddr().String())
	require.NoError(t, err)
	defer func() { _ = c2.Close() }()
	_ = c2.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err = c2.Read(make([]byte, 1))
	require.ErrorIs(t, err, io.EOF, "the second connection is closed at once")
	_ = c1.Close()
}

// Close ends live relays and returns only when every connection goroutine has stopped.
func TestCloseEndsRelays(t *testing.T) {
	d := &routeDialer{routes: map[string]netip.AddrPort{"ledger.payments:8080": echoServer(t)}}
	s, err := Start(Config{Dialer: d, SOCKS: netip.MustParseAddrPort("127.0.0.1:0"), HTTP: netip.MustParseAddrPort("127.0.0.1:0")})
	require.NoError(t, err)
	c, rep := socksHandshake(t, s.SOCKSAddr(), domainReq(CmdConnect, "ledger.payments", 8080))
	require.Equal(t, ReplySucceeded, rep[1])
	done := make(chan error, 1)
	go func() { done <- s.Close() }()
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not return")
	}
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err = c.Read(make([]byte, 1))
	require.ErrorIs(t, err, io.EOF)
	_, err = net.Dial("tcp", s.SOCKSAddr().String())
	require.Error(t, err, "listener closed")
	require.NoError(t, s.Close(), "Close twice")
}

func TestProxyV2Header(t *testing.T) {
	p := &node.Provenance{Agent: "spiffe://td/zone/z/agent/a", Node: "spiffe://td/node/n"}
	h, err := proxyV2Header(netip.MustParseAddrPort("100.100.1.1:0"), netip.MustParseAddrPort("100.100.1.17:8080"), p)
	require.NoError(t, err)
	assert.Equal(t, "\r\n\r\n\x00\r\nQUIT\n\x21\x11", string(h[:14]))
	assert.Equal(t, len(h)-16, int(h[14])<<8|int(h[15]))
	assert.Equal(t, []byte{100, 100, 1, 1, 100, 100, 1, 17, 0, 0, 0x1f, 0x90}, h[16:28])
	assert.Equal(t, append([]byte{TLVAgent, 0, byte(len(p.Agent))}, p.Agent...), h[28:28+3+len(p.Agent)])

	h6, err := proxyV2Header(netip.MustParseAddrPort("[fd00::1]:0"), netip.MustParseAddrPort("[fd00::2]:80"), p)
	require.NoError(t, err)
	assert.Equal(t, byte(0x21), h6[13])

	_, err = proxyV2Header(netip.MustParseAddrPort("100.100.1.1:0"), netip.MustParseAddrPort("[fd00::2]:80"), p)
	require.Error(t, err)
	_, err = proxyV2Header(netip.AddrPort{}, netip.MustParseAddrPort("100.100.1.17:8080"), p)
	require.Error(t, err)
	_, err = proxyV2Header(netip.MustParseAddrPort("100.100.1.1:0"), netip.MustParseAddrPort("100.100.1.17:8080"),
		&node.Provenance{Agent: strings.Repeat("a", maxTLV+1)})
	require.Error(t, err)
}
