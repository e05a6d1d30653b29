package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/spf13/cobra"

	"github.com/ute-project/ute/identity/authority"
	"github.com/ute-project/ute/node"
	"github.com/ute-project/ute/node/config"
	nodedaemon "github.com/ute-project/ute/node/daemon"
	"github.com/ute-project/ute/node/state"
	"github.com/ute-project/ute/overlay/dtl"
	"github.com/ute-project/ute/overlay/tunnel"
	"github.com/ute-project/ute/sim/attack"
)

const demoPolicy = `zones:
  - name: payments
    cidr: 100.100.1.0/24
    regions: [eu-west-1]
    min_trust: 50
    isolate_below: 20
    rules:
      - from: billing-*
        to: ledger
        ports: [tcp/8080]
  - name: support
    cidr: 100.100.2.0/24
    regions: [eu-west-1]
    min_trust: 50
    isolate_below: 20
    rules:
      - from: helpdesk
        to: tickets
        ports: [tcp/8080]
`

func newDemoCmd() *cobra.Command {
	var keep bool
	var htmlPath string
	cmd := &cobra.Command{
		Use:   "demo",
		Short: "Run the whole story in one process: authority, three nodes, two zones, agents, and attacks UTE refuses",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			dir, err := os.MkdirTemp("", "ute-demo-")
			if err != nil {
				return fmt.Errorf("demo: temporary directory: %w", err)
			}
			if !keep {
				defer func() { _ = os.RemoveAll(dir) }()
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), time.Minute)
			defer cancel()
			d := &demo{out: cmd.OutOrStdout(), dir: dir, html: htmlPath}
			err = d.run(ctx)
			if keep {
				fmt.Fprintf(d.out, "\nstate kept in %s (node audit logs: %s/<node>/audit)\n", dir, dir)
			}
			return err
		},
	}
	cmd.Flags().BoolVar(&keep, "keep", false, "keep the demo's directories (authority, nodes, audit logs) for inspection")
	cmd.Flags().StringVar(&htmlPath, "html", defaultDemoHTML(), "write the results as a self-contained HTML page to this file")
	return cmd
}

type demo struct {
	out      io.Writer
	html     string        // the HTML report's path (demo_html.go)
	report   *bytes.Buffer // a copy of the output, for the report
	dir      string
	failures []string
	auth     *authority.Authority
	authAddr string
	tokens   map[string]string
	nodes    map[string]*node.Node
	daemons  map[string]*nodedaemon.Daemon
	servers  map[string]*demoServer
	sockets  []net.PacketConn
	// stopAuthority stops the authority's server and closes its store.
	stopAuthority func()
}

// demoServer is an agent's HTTP server; received counts the bytes that reached the agent.
type demoServer struct {
	received atomic.Int64
	srv      *http.Server
}

func (d *demo) failf(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	d.failures = append(d.failures, msg)
	fmt.Fprintf(d.out, "  FAIL     %s\n", msg)
}

func (d *demo) run(ctx context.Context) error {
	start := time.Now()
	d.report = &bytes.Buffer{}
	d.out = io.MultiWriter(d.out, d.report)
	if err := d.startAuthority(); err != nil {
		return err
	}
	fmt.Fprintf(d.out, "UTE demo: trust domain demo.internal, authority on %s (QUIC, 127.0.0.1)\n\n", d.authAddr)
	if err := d.startNodes(ctx); err != nil {
		return err
	}
	defer d.stop()

	fmt.Fprintln(d.out, "\nAllowed flows (HTTP over admitted QUIC streams; the server answers with what WhoIs verified)")
	d.allowed(ctx, "payments", "billing-api", "a", "ledger", "b")
	d.allowed(ctx, "support", "helpdesk", "c", "tickets", "b")

	fmt.Fprintln(d.out, "\nAttacks (each must be refused with 0 bytes delivered)")
	d.crossZoneSDK(ctx)
	d.crossZoneSharedNode(ctx)
	d.replay(ctx)
	d.tokenReuse(ctx)
	d.forgedAgent(ctx)

	d.workloadSwap(ctx)
	d.trustDenied(ctx)

	fmt.Fprintln(d.out, "\nRevocation (signed record: authority watch, then gossip; cuts live flows)")
	d.revocation(ctx)

	fmt.Fprintln(d.out, "\nTrustFlow (drift isolates: no human in the loop)")
	d.drift(ctx)

	fmt.Fprintln(d.out, "\nSaved credentials exposed by a misconfigured toolchain, used elsewhere (duplicate identity: the authority revokes on a member's evidence)")
	d.stolenCredentials(ctx)

	fmt.Fprintf(d.out, "\n%d node(s), %d zone(s), finished in %s\n", len(d.nodes), 2, time.Since(start).Round(time.Millisecond))
	if len(d.failures) > 0 {
		d.writeReport(start)
		return fmt.Errorf("demo: %d expectation(s) failed: %s", len(d.failures), strings.Join(d.failures, "; "))
	}
	fmt.Fprintln(d.out, "every expectation held")
	return d.writeReport(start)
}

func (d *demo) startAuthority() error {
	pol := filepath.Join(d.dir, "policy.yaml")
	if err := os.WriteFile(pol, []byte(demoPolicy), 0o600); err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	adir := filepath.Join(d.dir, "authority")
	if err := authority.Init(adir, "demo.internal", pol, authority.Options{}); err != nil {
		return fmt.Errorf("demo: authority init: %w", err)
	}
	a, err := authority.Open(adir, authority.Options{})
	if err != nil {
		return fmt.Errorf("demo: authority: %w", err)
	}
	srv, err := a.Listen("127.0.0.1:0")
	if err != nil {
		_ = a.Close()
		return fmt.Errorf("demo: authority listen: %w", err)
	}
	d.auth, d.authAddr = a, srv.Addr().String()
	sctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(sctx) }()
	d.stopAuthority = func() { cancel(); <-done; _ = a.Close() }
	return nil
}

func (d *demo) startNodes(ctx context.Context) error {
	exe, err := os.Executable()
	if err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	plan := []struct {
		name   string
		zones  []string
		agents [][2]string // zone, name
	}{
		{"a", []string{"payments"}, [][2]string{{"payments", "billing-api"}, {"payments", "billing-batch"}}},
		{"b", []string{"payments", "support"}, [][2]string{{"payments", "ledger"}, {"support", "tickets"}}},
		{"c", []string{"support"}, [][2]string{{"support", "helpdesk"}}},
	}
	d.tokens, d.nodes, d.servers = map[string]string{}, map[string]*node.Node{}, map[string]*demoServer{}
	d.daemons = map[string]*nodedaemon.Daemon{}
	for _, p := range plan {
		t0 := time.Now()
		tok, err := d.auth.CreateToken(ctx, authority.TokenSpec{Zones: p.zones, TTL: 5 * time.Minute})
		if err != nil {
			return fmt.Errorf("demo: token for %s: %w", p.name, err)
		}
		d.tokens[p.name] = tok.Token
		fp := sha256.Sum256([]byte("demo host " + p.name))
		// The node's UDP socket is bound before the join, so that the authority can hand its
		// address to the nodes that join after it: the only bootstrap gossip needs.
		pc, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			return fmt.Errorf("demo: node %s socket: %w", p.name, err)
		}
		d.sockets = append(d.sockets, pc)
		sd, err := node.Join(ctx, node.JoinParams{Dir: filepath.Join(d.dir, p.name), Authority: d.authAddr, Token: tok.Token, Name: p.name,
			HostFingerprint: fp[:], Advertise: pc.LocalAddr().String()})
		if err != nil {
			return fmt.Errorf("demo: node %s join: %w", p.name, err)
		}
		var names []string
		for _, ag := range p.agents {
			a, err := sd.AddAgent(state.AgentSpec{Name: ag[1], Zone: ag[0], Exe: exe, UID: uint32(os.Getuid()), GID: uint32(os.Getgid())})
			if err != nil {
				return fmt.Errorf("demo: agent %s: %w", ag[1], err)
			}
			names = append(names, fmt.Sprintf("%s.%s=%s", ag[1], ag[0], a.IP))
		}
		cfg := config.Default()
		if p.name == "a" {
			// Node a also gives its agents local proxies, for programs outside this process; each
			// connection's process must be the agent's enrolled workload (workloadSwap below).
			cfg.Interface = config.InterfaceProxy
		}
		dm, err := nodedaemon.Start(ctx, nodedaemon.Options{Dir: sd.Path(), Config: cfg, PacketConn: pc,
			Logger: slog.New(slog.DiscardHandler), DuplicateConfirm: demoDuplicateConfirm})
		if err != nil {
			return fmt.Errorf("demo: node %s: %w", p.name, err)
		}
		n := dm.Node()
		d.daemons[p.name], d.nodes[p.name] = dm, n
		fmt.Fprintf(d.out, "  node %s  joined with a one-time token in %-6s zones %-17s udp %s  agents %s\n",
			p.name, time.Since(t0).Round(time.Millisecond), strings.Join(p.zones, ","), n.Addr(), strings.Join(names, " "))
	}
	if err := d.awaitGossip(ctx); err != nil {
		return err
	}
	for _, s := range []struct{ node, zone, name string }{{"b", "payments", "ledger"}, {"b", "support", "tickets"}, {"a", "payments", "billing-api"}} {
		if err := d.serve(s.node, s.zone, s.name); err != nil {
			return err
		}
	}
	return nil
}

// serve starts an HTTP server for an agent that answers with the caller's verified identity.
func (d *demo) serve(nodeName, zone, name string) error {
	a, err := d.nodes[nodeName].Agent(zone, name)
	if err != nil {
		return err
	}
	l, err := a.Listen("tcp", ":8080")
	if err != nil {
		return err
	}
	ds := &demoServer{}
	ds.srv = &http.Server{
		ReadHeaderTimeout: 5 * time.Second,
		ConnContext:       node.ConnContext,
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			p, err := node.WhoIsRequest(r)
			if err != nil {
				http.Error(w, err.Error(), http.StatusForbidden)
				return
			}
			fmt.Fprintf(w, "%s here; you are %s on %s (region %s, trust %d, workload %x…)", name, p.Agent, p.Node, p.Region, p.Trust, p.Fingerprint[:4])
		}),
	}
	go func() { _ = ds.srv.Serve(&countingListener{Listener: l, n: &ds.received}) }()
	d.servers[name] = ds
	return nil
}

func (d *demo) stop() {
	for _, s := range d.servers {
		_ = s.srv.Close()
	}
	for _, dm := range d.daemons {
		_ = dm.Close()
	}
	for _, pc := range d.sockets {
		_ = pc.Close()
	}
	if d.stopAuthority != nil {
		d.stopAuthority()
	}
}

func (d *demo) allowed(ctx context.Context, zone, from, fromNode, to, toNode string) {
	a, err := d.nodes[fromNode].Agent(zone, from)
	if err != nil {
		d.failf("%s: %v", from, err)
		return
	}
	hc := a.HTTPClient()
	defer hc.CloseIdleConnections()
	u := fmt.Sprintf("http://%s.%s:8080/", to, zone)
	t0 := time.Now()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	resp, err := hc.Do(req)
	if err != nil {
		d.failf("%s.%s (node %s) → GET %s: %v", from, zone, fromNode, u, err)
		return
	}
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	_ = resp.Body.Close()
	el := time.Since(t0)
	want := a.ID().String()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), "you are "+want+" on "+d.nodes[fromNode].ID().String()) {
		d.failf("%s → %s answered %d %q, want the caller's identity %s", from, u, resp.StatusCode, body, want)
		return
	}
	fmt.Fprintf(d.out, "  ok       %s.%s (node %s) → GET %s  %d in %s (first flow includes tunnel + directory exchange)\n", from, zone, fromNode, u, resp.StatusCode, el.Round(10*time.Microsecond))
	fmt.Fprintf(d.out, "           %s.%s (node %s) answered: %s\n", to, zone, toNode, body)
}

// expectRefused runs attempt and prints one line: what was tried, what UTE did, how long it took
// and how many bytes reached target; it records a failure unless the attempt was refused with
// want and 0 bytes were delivered.
func (d *demo) expectRefused(what string, target *atomic.Int64, want error, attempt func() error) {
	var before int64
	if target != nil {
		before = target.Load()
	}
	t0 := time.Now()
	err := attempt()
	el := time.Since(t0)
	time.Sleep(20 * time.Millisecond) // let anything wrongly admitted arrive before counting
	var delivered int64
	if target != nil {
		delivered = target.Load() - before
	}
	reason := "accepted"
	if err != nil {
		reason = refusalReason(err)
	}
	fmt.Fprintf(d.out, "  REFUSED  %-66s → %-30s %9s  delivered %d B\n", what, reason, el.Round(time.Microsecond), delivered)
	switch {
	case err == nil:
		d.failf("%s: UTE accepted it", what)
	case !errors.Is(err, want):
		d.failf("%s: refused for the wrong reason: %v", what, err)
	case delivered != 0:
		d.failf("%s: %d bytes reached the agent", what, delivered)
	}
}

func refusalReason(err error) string {
	var re *node.RefusedError
	var rj *tunnel.RejectedError
	var vr *authority.RefusalError
	switch {
	case errors.As(err, &rj):
		msg := rj.Message
		if i := strings.LastIndex(msg, ": "); i >= 0 && strings.Contains(rj.Reason, "chain") {
			msg = msg[i+2:]
		}
		if len(msg) > 40 {
			msg = msg[:40] + "…"
		}
		if rj.Reason == "chain" {
			return "peer rejected: chain (" + msg + ")"
		}
		return "peer rejected: " + rj.Reason
	case errors.As(err, &re):
		return "refused locally: " + re.Reason
	case errors.Is(err, authority.ErrTokenUsed):
		return "authority: token already used"
	case errors.As(err, &vr):
		return "authority: " + vr.Message
	}
	return err.Error()
}

// crossZoneSDK: an agent of support asks for an agent of payments by name.
func (d *demo) crossZoneSDK(ctx context.Context) {
	a, err := d.nodes["c"].Agent("support", "helpdesk")
	if err != nil {
		d.failf("helpdesk: %v", err)
		return
	}
	d.expectRefused("cross-zone dial: helpdesk.support → ledger.payments:8080", &d.servers["ledger"].received, node.ErrCrossZone, func() error {
		c, err := a.Dial(ctx, "tcp", "ledger.payments:8080")
		if err == nil {
			_, _ = c.Write([]byte("GET / HTTP/1.0\r\n\r\n"))
			_ = c.Close()
		}
		return err
	})
}

// crossZoneSharedNode: node b holds payments and support; its support agent signs a flow to a
// payments agent and sends it over the payments tunnel b shares with a.
func (d *demo) crossZoneSharedNode(ctx context.Context) {
	tickets, err := d.nodes["b"].Agent("support", "tickets")
	if err != nil {
		d.failf("tickets: %v", err)
		return
	}
	d.expectRefused("cross-zone via shared node b: tickets.support → billing-api.payments", &d.servers["billing-api"].received, dtl.ErrZone, func() error {
		t, err := d.nodes["b"].Tunnel(ctx, "a", "payments")
		if err != nil {
			return err
		}
		rec, err := tickets.Record(t, dtl.Destination{Agent: "billing-api", Port: 8080, Proto: dtl.ProtoTCP})
		if err != nil {
			return err
		}
		return openAndSend(ctx, t, rec)
	})
}

// replay: a record admitted on one a↔b session is replayed on the same session and on a new one.
func (d *demo) replay(ctx context.Context) {
	billing, err := d.nodes["a"].Agent("payments", "billing-api")
	if err != nil {
		d.failf("billing-api: %v", err)
		return
	}
	t1, err := d.nodes["a"].Tunnel(ctx, "b", "payments")
	if err != nil {
		d.failf("tunnel a→b: %v", err)
		return
	}
	rec, err := billing.Record(t1, dtl.Destination{Agent: "ledger", Port: 8080, Proto: dtl.ProtoTCP})
	if err != nil {
		d.failf("record: %v", err)
		return
	}
	fc, err := t1.OpenFlow(ctx, rec, nil, nil)
	if err != nil {
		d.failf("the original flow was refused: %v", err)
		return
	}
	_ = fc.Close()
	ledger := &d.servers["ledger"].received
	d.expectRefused("replay of an admitted DTL record on its own session", ledger, dtl.ErrReplay, func() error {
		return openAndSend(ctx, t1, rec)
	})
	_ = t1.Close()
	<-t1.Done()
	d.expectRefused("replay of that record on a new a↔b session", ledger, dtl.ErrSignature, func() error {
		t2, err := d.nodes["a"].Tunnel(ctx, "b", "payments")
		if err != nil {
			return err
		}
		return openAndSend(ctx, t2, rec)
	})
}

// tokenReuse: node a's join token is presented a second time.
func (d *demo) tokenReuse(ctx context.Context) {
	d.expectRefused("reuse of node a's join token by another host", nil, authority.ErrTokenUsed, func() error {
		fp := sha256.Sum256([]byte("demo host mallory"))
		_, err := node.Join(ctx, node.JoinParams{Dir: filepath.Join(d.dir, "mallory"), Authority: d.authAddr, Token: d.tokens["a"], Name: "mallory", HostFingerprint: fp[:]})
		return err
	})
}

// forgedAgent: node c (support only) signs a certificate for a payments agent and uses it on its
// support tunnel to b.
func (d *demo) forgedAgent(ctx context.Context) {
	c := d.nodes["c"]
	sd, err := state.Open(filepath.Join(d.dir, "c"))
	if err != nil {
		d.failf("node c state: %v", err)
		return
	}
	issuer, key, err := sd.NodeIssuer()
	if err != nil {
		d.failf("node c issuing key: %v", err)
		return
	}
	forged, agentKey, err := attack.ForgeAgentCert(issuer, key, "payments", "mallory", netip.MustParseAddr("100.100.1.77"))
	if err != nil {
		d.failf("forging: %v", err)
		return
	}
	d.expectRefused("payments agent certificate forged by node c (not in payments)", &d.servers["ledger"].received, dtl.ErrChain, func() error {
		t, err := c.Tunnel(ctx, "b", "support")
		if err != nil {
			return err
		}
		rec, err := dtl.Sign(&dtl.Claims{
			Zone: "payments", Agent: forged.ID.String(), Chain: &dtl.CertChain{Node: issuer.Raw(), Agent: forged.Raw()},
			Node: c.ID().String(), Fingerprint: forged.Claims.Fingerprint, Region: c.Region(), Trust: 100,
			Destination: dtl.Destination{Agent: "ledger", Port: 8080, Proto: dtl.ProtoTCP}, FlowID: t.NewFlowID(), Seq: 1 << 40, IssuedAt: time.Now(),
		}, agentKey, t.Exporter())
		if err != nil {
			return err
		}
		return openAndSend(ctx, t, rec)
	})
}

// openAndSend opens a flow with record and, were it admitted, sends an HTTP request on it.
func openAndSend(ctx context.Context, t *tunnel.Tunnel, rec []byte) error {
	fc, err := t.OpenFlow(ctx, rec, nil, nil)
	if err != nil {
		return err
	}
	_, _ = fc.Write([]byte("GET / HTTP/1.0\r\n\r\n"))
	_ = fc.Close()
	return nil
}

// countingListener counts the bytes read from its conns: what reached the agent. It forwards
// NetConn so node.WhoIs sees through it.
type countingListener struct {
	net.Listener
	n *atomic.Int64
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &countingConn{Conn: c, n: l.n}, nil
}

type countingConn struct {
	net.Conn
	n *atomic.Int64
}

func (c *countingConn) Read(p []byte) (int, error) {
	k, err := c.Conn.Read(p)
	c.n.Add(int64(k))
	return k, err
}

func (c *countingConn) NetConn() net.Conn { return c.Conn }

// awaitGossip waits until every node's zone pools hold the zone's other nodes: no node was given
// a peer; each learned the others from the authority's join response and gossip.
func (d *demo) awaitGossip(ctx context.Context) error {
	t0 := time.Now()
	want := map[string]map[string]int{"a": {"payments": 1}, "b": {"payments": 1, "support": 1}, "c": {"support": 1}}
	for {
		done := true
		var seen []string
		for name, zones := range want {
			for z, n := range zones {
				got := len(d.daemons[name].Members(z)) - 1
				if got < n {
					done = false
				}
				seen = append(seen, fmt.Sprintf("%s/%s:%d", name, z, got))
			}
		}
		if done {
			fmt.Fprintf(d.out, "  gossip   every node found its zone peers by itself in %s (no static peers; join gave each a bootstrap member)\n",
				time.Since(t0).Round(time.Millisecond))
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("demo: gossip did not converge: %s", strings.Join(seen, " "))
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// revocation revokes an agent at the authority while it holds a live flow, and shows the record
// reaching every node of its zone and the flow being cut.
func (d *demo) revocation(ctx context.Context) {
	// billing-batch, not billing-api: TrustFlow already denies billing-api (trustDenied).
	a, err := d.nodes["a"].Agent("payments", "billing-batch")
	if err != nil {
		d.failf("billing-batch: %v", err)
		return
	}
	conn, err := a.Dial(ctx, "tcp", "ledger.payments:8080")
	if err != nil {
		d.failf("billing-batch → ledger before revocation: %v", err)
		return
	}
	defer func() { _ = conn.Close() }()
	subject := a.ID().String()
	t0 := time.Now()
	rev, err := d.auth.RevokeSubject(ctx, subject, "token stolen from the agent's browser session")
	if err != nil {
		d.failf("revoke %s: %v", subject, err)
		return
	}
	for _, name := range []string{"a", "b"} {
		for !d.daemons[name].Store().Revoked(subject) {
			if time.Since(t0) > 5*time.Second {
				d.failf("node %s never held the revocation of %s", name, subject)
				return
			}
			time.Sleep(time.Millisecond)
		}
	}
	held := time.Since(t0)
	_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, rerr := conn.Read(make([]byte, 1))
	cut := time.Since(t0)
	if rerr == nil || errors.Is(rerr, os.ErrDeadlineExceeded) {
		d.failf("the revoked agent's live flow was not cut: %v", rerr)
		return
	}
	fmt.Fprintf(d.out, "  ok       authority revoked %s (record seq %d, signed, durable)\n", subject, rev.Seq)
	fmt.Fprintf(d.out, "           nodes a and b held the record %s later (watch + gossip); the live flow was cut after %s\n",
		held.Round(10*time.Microsecond), cut.Round(10*time.Microsecond))
	d.expectRefused("revoked billing-batch.payments → ledger.payments:8080 (new flow)", &d.servers["ledger"].received, dtl.ErrRevoked, func() error {
		c, err := a.Dial(ctx, "tcp", "ledger.payments:8080")
		if err == nil {
			_ = c.Close()
		}
		return err
	})
}

// drift moves node c into a region its zone does not allow (the region file a provisioning hook or
// a cloud metadata agent writes): TrustFlow takes c's trust to 0, c revokes itself with a signed
// record, node b cuts c's live flow and refuses c's new ones. No human in the loop.
func (d *demo) drift(ctx context.Context) {
	c, err := d.nodes["c"].Agent("support", "helpdesk")
	if err != nil {
		d.failf("helpdesk: %v", err)
		return
	}
	conn, err := c.Dial(ctx, "tcp", "tickets.support:8080")
	if err != nil {
		d.failf("helpdesk → tickets before the drift: %v", err)
		return
	}
	defer func() { _ = conn.Close() }()
	cID := d.nodes["c"].ID().String()
	t0 := time.Now()
	if err := os.WriteFile(filepath.Join(d.dir, "c", nodedaemon.FileRegion), []byte("us-east-1\n"), 0o600); err != nil {
		d.failf("move node c: %v", err)
		return
	}
	for !d.daemons["b"].Store().Revoked(cID) {
		if time.Since(t0) > 10*time.Second {
			d.failf("node c drifted to us-east-1 but node b never held its revocation")
			return
		}
		time.Sleep(time.Millisecond)
	}
	held := time.Since(t0)
	_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, rerr := conn.Read(make([]byte, 1))
	if rerr == nil || errors.Is(rerr, os.ErrDeadlineExceeded) {
		d.failf("node c's live flow was not cut after its drift: %v", rerr)
		return
	}
	score := d.daemons["c"].TrustScore(cID)
	fmt.Fprintf(d.out, "  ok       node c moved to us-east-1 (zone support allows eu-west-1): trust %d, c revoked itself\n", score)
	fmt.Fprintf(d.out, "           node b held c's signed revocation %s after the move and cut helpdesk's live flow\n", held.Round(time.Millisecond))
	d.expectRefused("helpdesk.support (node c, drifted) → tickets.support:8080 (new flow)", &d.servers["tickets"].received, dtl.ErrRevoked, func() error {
		cc, err := c.Dial(ctx, "tcp", "tickets.support:8080")
		if err == nil {
			_ = cc.Close()
			return nil
		}
		return err
	})
}

// workloadSwap is the compromised service account: another program (bash, not the executable
// billing-api was enrolled with) uses billing-api's local proxy on node a to reach ledger. Node a
// finds the process behind the connection, compares it with the agent's enrolled workload and
// refuses before any record is signed; TrustFlow lowers billing-api's trust.
func (d *demo) workloadSwap(ctx context.Context) {
	var proxyAddr string
	for _, p := range d.daemons["a"].Proxies() {
		if p.Agent == "billing-api" {
			proxyAddr = p.HTTP.String()
		}
	}
	bash, err := exec.LookPath("bash")
	if proxyAddr == "" || err != nil {
		fmt.Fprintf(d.out, "  skipped  another executable using billing-api's identity (needs bash and node a's proxy)\n")
		return
	}
	host, port, _ := net.SplitHostPort(proxyAddr)
	script := fmt.Sprintf(`exec 3<>/dev/tcp/%s/%s; printf 'CONNECT ledger.payments:8080 HTTP/1.1\r\nHost: ledger.payments:8080\r\n\r\nstolen-session-data' >&3; head -c 12 <&3`, host, port)
	before := d.daemons["a"].TrustScore("spiffe://demo.internal/zone/payments/agent/billing-api")
	d.expectRefused("bash uses billing-api's proxy (not its enrolled executable)", &d.servers["ledger"].received, errWorkload, func() error {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		out, err := exec.CommandContext(cctx, bash, "-c", script).Output()
		if err != nil && len(out) == 0 {
			return fmt.Errorf("bash: %w", err)
		}
		if strings.Contains(string(out), " 403") {
			return errWorkload
		}
		return fmt.Errorf("proxy answered %q", out)
	})
	time.Sleep(300 * time.Millisecond) // the trust engine runs on its own tick
	after := d.daemons["a"].TrustScore("spiffe://demo.internal/zone/payments/agent/billing-api")
	fmt.Fprintf(d.out, "           node a attested the connection's process (bash) against billing-api's enrolled workload; trust %d → %d\n", before, after)
	if after >= before {
		d.failf("the refused workload did not lower billing-api's trust (%d → %d)", before, after)
	}
}

// errWorkload is the proxy's refusal of a process that is not the agent's enrolled workload.
var errWorkload = errors.New("workload mismatch")
