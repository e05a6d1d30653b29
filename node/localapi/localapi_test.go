package localapi

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
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity/localsock"
)

func TestEndpointsRoundTrip(t *testing.T) {
	fb := &fakeBackend{}
	_, path := start(t, fb, Options{})
	c := dial(t, path)
	ctx := context.Background()

	st, err := c.Status(ctx)
	require.NoError(t, err)
	assert.Equal(t, testStat, st)

	w, err := c.WhoIs(ctx, netip.MustParseAddrPort("100.100.1.1:43512"))
	require.NoError(t, err)
	assert.Equal(t, testWhoIs, w)

	uid := uint32(1001)
	ag, err := c.AddAgent(ctx, AgentSpec{Name: "ledger", Zone: "payments", Exe: "/usr/bin/ledger", UID: &uid})
	require.NoError(t, err)
	assert.Equal(t, "100.100.1.2", ag.OverlayIP)
	require.NotNil(t, ag.UID)
	assert.Equal(t, uid, *ag.UID)

	require.NoError(t, c.RemoveAgent(ctx, "payments", "ledger"))

	rev, err := c.Revoke(ctx, "spiffe://acme.internal/zone/payments/agent/ledger", "drifted")
	require.NoError(t, err)
	assert.Equal(t, "drifted", rev.Reason)

	a, err := c.Audit(ctx, 2)
	require.NoError(t, err)
	assert.True(t, a.OK)
	assert.Len(t, a.Recent, 2)
	a, err = c.Audit(ctx, 0)
	require.NoError(t, err)
	assert.NotNil(t, a.Recent, "recent is [] rather than null")

	assert.Equal(t, []any{nil, netip.MustParseAddrPort("100.100.1.1:43512"),
		AgentSpec{Name: "ledger", Zone: "payments", Exe: "/usr/bin/ledger", UID: &uid}, "payments/ledger",
		RevokeRequest{Subject: "spiffe://acme.internal/zone/payments/agent/ledger", Reason: "drifted"},
		AuditQuery{Recent: 2}, AuditQuery{Recent: 0}}, fb.seen)
	assert.Equal(t, uint32(os.Getuid()), fb.caller.UID, "the Backend sees the kernel-attested caller")
	assert.Equal(t, int32(os.Getpid()), fb.caller.PID)
}

// The JSON field names are a contract with scripts and other languages.
func TestWireNames(t *testing.T) {
	_, path := start(t, &fakeBackend{}, Options{})
	hc := rawClient(path)
	resp, err := hc.Get("http://ute" + PathStatus)
	require.NoError(t, err)
	body, _ := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	for _, k := range []string{`"node":`, `"trust_domain":`, `"not_after":`, `"zones":`, `"peers":`, `"tunnel":"up"`,
		`"overlay_ip":"100.100.1.1"`, `"revocations":`, `"received_at":`, `"renewal":{"state":"ok"`, `"policy_version":3`, `"trust":[`} {
		assert.Contains(t, string(body), k)
	}
	assert.NotContains(t, string(body), `"since":"0001`, "zero times are omitted")
	resp, err = hc.Get("http://ute" + PathWhoIs + "?addr=100.100.1.1:43512")
	require.NoError(t, err)
	body, _ = io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	for _, k := range []string{`"agent":`, `"agent_name":"billing"`, `"source_ip":`, `"flow_id":12`, `"agent_serial":`, `"node_serial":`, `"drift":["region"]`} {
		assert.Contains(t, string(body), k)
	}
}

func TestErrorsCrossTheSocket(t *testing.T) {
	fb := &fakeBackend{}
	_, path := start(t, fb, Options{})
	c := dial(t, path)
	ctx := context.Background()

	_, err := c.WhoIs(ctx, netip.MustParseAddrPort("100.100.1.9:1"))
	require.ErrorIs(t, err, ErrNotFound)
	assert.Equal(t, "not found: no live flow from 100.100.1.9:1", err.Error())
	var re *RemoteError
	require.ErrorAs(t, err, &re)
	assert.Equal(t, CodeNotFound, re.Code)

	for _, sentinel := range []error{ErrBadRequest, ErrNotFound, ErrConflict, ErrForbidden, ErrUnavailable} {
		fb.mu.Lock()
		fb.err = fmt.Errorf("backend says: %w", sentinel)
		fb.mu.Unlock()
		_, err := c.Revoke(ctx, "serial:1", "r")
		require.ErrorIs(t, err, sentinel)
		for _, other := range []error{ErrBadRequest, ErrNotFound, ErrConflict, ErrForbidden, ErrUnavailable, ErrInternal} {
			if other != sentinel {
				assert.NotErrorIs(t, err, other)
			}
		}
		assert.Equal(t, "backend says: "+sentinel.Error(), err.Error())
	}
	fb.mu.Lock()
	fb.err = errors.New("disk on fire\nsecond line")
	fb.mu.Unlock()
	_, err = c.Status(ctx)
	require.ErrorIs(t, err, ErrInternal)
	oneLine(t, err)
}

func rawClient(path string) *http.Client {
	return &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
	}}
}

// Malformed requests over the real socket: each gets its code, none reaches the Backend, and the
// server keeps serving.
func TestMalformedRequests(t *testing.T) {
	fb := &fakeBackend{}
	_, path := start(t, fb, Options{})
	hc := rawClient(path)
	big := `{"subject":"` + strings.Repeat("a", MaxRequestBody) + `","reason":"r"}`
	for _, tc := range []struct {
		name, method, path, body string
		status                   int
		code                     string
	}{
		{"bad json", "POST", PathRevocations, `{"subject":`, 400, CodeBadRequest},
		{"not an object", "POST", PathRevocations, `[1,2]`, 400, CodeBadRequest},
		{"unknown field", "POST", PathRevocations, `{"subject":"s","reason":"r","admin":true}`, 400, CodeBadRequest},
		{"trailing data", "POST", PathRevocations, `{"subject":"s","reason":"r"} {"subject":"t","reason":"r"}`, 400, CodeBadRequest},
		{"oversized body", "POST", PathRevocations, big, 400, CodeBadRequest},
		{"empty body", "POST", PathRevocations, ``, 400, CodeBadRequest},
		{"missing reason", "POST", PathRevocations, `{"subject":"s"}`, 400, CodeBadRequest},
		{"control char", "POST", PathRevocations, `{"subject":"s","reason":"a\u0000b"}`, 400, CodeBadRequest},
		{"newline in reason", "POST", PathRevocations, `{"subject":"s","reason":"a\nb"}`, 400, CodeBadRequest},
		{"invalid utf8", "POST", PathRevocations, "{\"subject\":\"s\xff\",\"reason\":\"r\"}", 400, CodeBadRequest},
		{"relative exe", "POST", PathAgents, `{"name":"a","zone":"z","exe":"bin/a"}`, 400, CodeBadRequest},
		{"agent no name", "POST", PathAgents, `{"zone":"z","exe":"/bin/a"}`, 400, CodeBadRequest},
		{"agent long name", "POST", PathAgents, `{"name":"` + strings.Repeat("a", 64) + `","zone":"z","exe":"/bin/a"}`, 400, CodeBadRequest},
		{"agent negative uid", "POST", PathAgents, `{"name":"a","zone":"z","exe":"/bin/a","uid":-1}`, 400, CodeBadRequest},
		{"whois no addr", "GET", PathWhoIs, ``, 400, CodeBadRequest},
		{"whois bad addr", "GET", PathWhoIs + "?addr=nope", ``, 400, CodeBadRequest},
		{"whois port 0", "GET", PathWhoIs + "?addr=100.100.1.1:0", ``, 400, CodeBadRequest},
		{"whois two addrs", "GET", PathWhoIs + "?addr=100.100.1.1:1&addr=100.100.1.1:2", ``, 400, CodeBadRequest},
		{"whois extra param", "GET", PathWhoIs + "?addr=100.100.1.1:1&x=1", ``, 400, CodeBadRequest},
		{"whois bad escape", "GET", PathWhoIs + "?addr=%zz", ``, 400, CodeBadRequest},
		{"audit negative", "GET", PathAudit + "?recent=-1", ``, 400, CodeBadRequest},
		{"audit huge", "GET", PathAudit + "?recent=1001", ``, 400, CodeBadRequest},
		{"audit text", "GET", PathAudit + "?recent=all", ``, 400, CodeBadRequest},
		{"audit unknown param", "GET", PathAudit + "?since=1", ``, 400, CodeBadRequest},
		{"unknown path", "GET", "/v1/secrets", ``, 404, CodeNotFound},
		{"wrong method", "DELETE", PathStatus, ``, 404, CodeNotFound},
		{"remove agent missing name", "DELETE", PathAgents + "/payments", ``, 404, CodeNotFound},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req, err := http.NewRequest(tc.method, "http://ute"+tc.path, strings.NewReader(tc.body))
			require.NoError(t, err)
			resp, err := hc.Do(req)
			require.NoError(t, err)
			body, _ := io.ReadAll(resp.Body)
			_ = resp.Body.Close()
			assert.Equal(t, tc.status, resp.StatusCode, string(body))
			if tc.code != "" {
				assert.Contains(t, string(body), `"code":"`+tc.code+`"`)
				assert.Equal(t, 1, strings.Count(string(body), "\n"), "one JSON line: %q", body)
			}
		})
	}
	assert.Zero(t, fb.calls.Load(), "no malformed request reached the Backend")
	c := dial(t, path)
	_, err := c.Status(context.Background())
	require.NoError(t, err, "still serving")
}

// Garbage that is not HTTP at all: the server answers 400 or hangs up, and keeps serving.
func TestGarbageBytes(t *testing.T) {
	fb := &fakeBackend{}
	_, path := start(t, fb, Options{Timeout: time.Second})
	for _, g := range [][]byte{
		{0, 1, 2, 3, 0xff, 0xfe}, []byte("\r\n\r\n\r\n"), []byte("GET /v1/status HTTP/9.9\r\n\r\n"),
		[]byte("POST /v1/revocations HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n"),
		[]byte("POST /v1/revocations HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
		[]byte("GET /" + strings.Repeat("a", 2*maxHeaderBytes) + " HTTP/1.1\r\nHost: x\r\n\r\n"),
		[]byte("GET /v1/status HTTP/1.1\r\nHost: x\r\nX: " + strings.Repeat("b", 2*maxHeaderBytes) + "\r\n\r\n"),
	} {
		conn, err := net.Dial("unix", path)
		require.NoError(t, err)
		_ = conn.SetDeadline(time.Now().Add(3 * time.Second))
		_, _ = conn.Write(g)
		line, _ := bufio.NewReader(conn).ReadString('\n')
		_ = conn.Close()
		if line != "" {
			ok := strings.HasPrefix(line, "HTTP/1.1 4") || strings.HasPrefix(line, "HTTP/1.1 505 ")
			assert.True(t, ok, "%q → %q", g[:min(len(g), 20)], line)
		}
	}
	assert.Zero(t, fb.calls.Load())
	_, err := dial(t, path).Status(context.Background())
	require.NoError(t, err)
}

func TestTimeout(t *testing.T) {
	fb := &fakeBackend{block: true}
	_, path := start(t, fb, Options{Timeout: 200 * time.Millisecond})
	begin := time.Now()
	_, err := dial(t, path).Status(context.Background())
	require.ErrorIs(t, err, ErrUnavailable)
	assert.Less(t, time.Since(begin), 3*time.Second)
}

func TestSecondServerRefusedAndStaleReplaced(t *testing.T) {
	s, path := start(t, &fakeBackend{}, Options{})
	_, err := Start(path, &fakeBackend{}, Options{})
	require.ErrorIs(t, err, localsock.ErrInUse)
	_, err = dial(t, path).Status(context.Background())
	require.NoError(t, err, "the first server is untouched")

	require.NoError(t, s.Close())
	_, err = Dial(context.Background(), path)
	require.ErrorIs(t, err, ErrNotRunning, "Close removed the socket")

	// A stale socket file (daemon killed with SIGKILL): the client says no daemon runs, and
	// the next daemon takes the path over.
	fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	require.NoError(t, err)
	require.NoError(t, syscall.Bind(fd, &syscall.SockaddrUnix{Name: path}))
	require.NoError(t, syscall.Close(fd))
	_, err = Dial(context.Background(), path)
	require.ErrorIs(t, err, ErrNotRunning)
	s2, err := Start(path, &fakeBackend{}, Options{})
	require.NoError(t, err)
	t.Cleanup(func() { _ = s2.Close() })
	fi, err := os.Stat(path)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm())
	_, err = dial(t, path).Status(context.Background())
	require.NoError(t, err)
}

// Close waits for in-flight requests and its goroutine; afterwards nothing answers.
func TestCloseIsCleanAndIdempotent(t *testing.T) {
	path := sockDir(t) + "/" + FileSocket
	s, err := Start(path, &fakeBackend{}, Options{})
	require.NoError(t, err)
	c := dial(t, path)
	_, err = c.Status(context.Background())
	require.NoError(t, err)
	require.NoError(t, s.Close())
	require.NoError(t, s.Close())
	_, err = c.Status(context.Background())
	require.ErrorIs(t, err, ErrUnavailable)
	assert.False(t, localsock.Alive(path))
}

// More concurrent connections than MaxConns: the extra ones wait, none fails.
func TestConnectionCap(t *testing.T) {
	_, path := start(t, &fakeBackend{}, Options{MaxConns: 2})
	// Two idle connections hold both slots until the server's idle timeout or until closed.
	var idle []net.Conn
	for range 2 {
		conn, err := net.Dial("unix", path)
		require.NoError(t, err)
		idle = append(idle, conn)
	}
	done := make(chan error, 1)
	go func() {
		c, err := Dial(context.Background(), path)
		if err == nil {
			_, err = c.Status(context.Background())
		}
		done <- err
	}()
	select {
	case err := <-done:
		t.Fatalf("a third connection was served while two held the cap: %v", err)
	case <-time.After(300 * time.Millisecond):
	}
	_ = idle[0].Close()
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(5 * time.Second):
		t.Fatal("the waiting request was not served after a slot freed")
	}
	_ = idle[1].Close()
}

func TestDialNotRunning(t *testing.T) {
	_, err := Dial(context.Background(), sockDir(t)+"/"+FileSocket)
	require.ErrorIs(t, err, ErrNotRunning)
	oneLine(t, err)
}

func TestParseWhoIsAddr(t *testing.T) {
	ap, err := ParseWhoIsAddr("[::ffff:100.100.1.1]:80")
	require.NoError(t, err)
	assert.Equal(t, netip.MustParseAddrPort("100.100.1.1:80"), ap, "v4-mapped addresses are unmapped")
	for _, s := range []string{"", "x", "100.100.1.1", "0.0.0.0:1", "[fe80::1%eth0]:1", "100.100.1.1:70000"} {
		_, err := ParseWhoIsAddr(s)
		require.ErrorIs(t, err, ErrBadRequest, s)
	}
}

// Callers who are refused cannot starve allowed ones by holding connections open: they have a
// few slots of their own and beyond that are hung up on. The test flips who is allowed, since it
// cannot change its own uid (TestOtherUserIsForbidden does that as root).
func TestRefusedCallersCannotStarveAllowed(t *testing.T) {
	fb := &fakeBackend{}
	path := filepath.Join(sockDir(t), FileSocket)
	ln, err := localsock.Listen(path)
	require.NoError(t, err)
	var open atomic.Bool
	s := serve(ln, fb, Options{Logger: slog.New(slog.DiscardHandler), Timeout: 5 * time.Second, MaxConns: 2},
		func(localsock.Cred) bool { return open.Load() })
	t.Cleanup(func() { _ = s.Close() })

	// Twenty connections from a refused caller, all held open without a request.
	var held []net.Conn
	for range 20 {
		conn, err := net.Dial("unix", path)
		require.NoError(t, err)
		held = append(held, conn)
	}
	t.Cleanup(func() {
		for _, c := range held {
			_ = c.Close()
		}
	})
	// All but maxRefusedConns are hung up on at once.
	var holding []net.Conn
	for _, c := range held {
		_ = c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		if _, err := c.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
			holding = append(holding, c)
		}
	}
	assert.Len(t, holding, maxRefusedConns)

	// While they hold their slots, allowed callers are still served.
	open.Store(true)
	_, err = dial(t, path).Status(context.Background())
	require.NoError(t, err, "an allowed caller is served while refused ones hold their slots")
	assert.Equal(t, int64(1), fb.calls.Load())

	// Once a slot is free, a refused caller that sends a request gets the JSON refusal, and the
	// Backend never sees it.
	open.Store(false)
	for _, c := range holding {
		_ = c.Close()
	}
	c := dial(t, path)
	require.Eventually(t, func() bool {
		_, err := c.Status(context.Background())
		return errors.Is(err, ErrForbidden)
	}, 5*time.Second, 20*time.Millisecond)
	assert.Equal(t, int64(1), fb.calls.Load())
}
