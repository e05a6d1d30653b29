package main

import (
	"bufio"
	"context"
	"crypto/ecdh"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/sim/netlab"
)

// BenchmarkNetns measures agent-to-agent TCP between two network namespaces (sim/netlab), all in
// one run, each UTE path against same-run baselines:
//
//   - veth: iperf3 straight across the lab's veths and bridge (the ceiling);
//   - wireguard-go: iperf3 through two bare wireguard-go devices (sim/netlab/internal/wgbase),
//     one per namespace, MTU 1420 (what Tailscale and NetBird users get);
//   - proxy: two `ute node run --interface proxy` daemons; iperf3 cannot use a proxy, so its
//     client connects to a forwarder in this process, which is billing-api's enrolled workload
//     and opens one HTTP CONNECT flow per connection (one more loopback copy on the sending side
//     than a proxy-aware client makes);
//   - tun: the daemons restarted with --interface tun (QUIC carriage, its default MTU); iperf3
//     straight to ledger's overlay IP from billing-api's;
//   - tun-wireguard: the same with --transport wireguard (MTU 1420, as the baseline).
//
// Each UTE phase runs one untimed test of wireguard-go and itself (warm-up), then rounds of veth,
// wireguard-go and itself in rotating order; a ratio is the median of the per-round ratios, and
// each tunnel path also reports the CPU its carrying processes spent per GB. Then, per path and
// for a direct TCP connection across the
// veths: new connections per second (8 workers) and the connect time, measured until the
// destination's first byte arrives (so admission is included whatever the carriage). A phase the
// build cannot run is reported and skipped. Root only; skipped with a message otherwise.
func BenchmarkNetns(b *testing.B) {
	if err := netlab.Available(); err != nil {
		b.Skipf("skipping the network-namespace benchmark: %v (run `make bench` as root)", err)
	}
	iperf, err := exec.LookPath("iperf3")
	if err != nil {
		b.Skip("skipping the network-namespace benchmark: iperf3 is not installed (apt-get install iperf3)")
	}
	self, err := os.Executable()
	require.NoError(b, err)
	tmp := b.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()

	wgbase := filepath.Join(tmp, "wgbase")
	build := exec.CommandContext(ctx, "go", "build", "-o", wgbase, "../../sim/netlab/internal/wgbase")
	if out, err := build.CombinedOutput(); err != nil {
		b.Fatalf("building wgbase: %v: %s", err, out)
	}

	lab := netlab.New(b, netlab.Options{Hosts: []string{"auth", "a", "b"}})
	ha, hb := lab.Host("a"), lab.Host("b")
	// Every path starts its TCP connections alike: Linux otherwise saves each destination's
	// ssthresh, RTT and cwnd when a connection closes and starts the next one to that address
	// from them, and ledger's overlay IP is the destination of every UTE phase (a tun phase's
	// metrics slowed the first rounds of the WireGuard phase after it).
	for _, h := range []*netlab.Host{ha, hb} {
		out, err := h.Run(ctx, "sysctl", "-w", "net.ipv4.tcp_no_metrics_save=1")
		require.NoError(b, err, "%s", out)
	}

	// iperf3 server in b on every address: the veth, the wireguard device, loopback (the
	// forward target) and the agent's overlay IP in tun mode.
	srv, err := hb.Start(iperf, "-s", "-p", "5201", "--forceflush")
	require.NoError(b, err)
	wctx, wcancel := context.WithTimeout(ctx, time.Minute)
	defer wcancel()
	require.NoError(b, srv.WaitOutput(wctx, "Server listening"))

	// Bare wireguard-go between a and b.
	wgAddr := map[string]string{"a": "10.98.0.1", "b": "10.98.0.2"}
	priv, pub := map[string]string{}, map[string]string{}
	for _, n := range []string{"a", "b"} {
		k, err := ecdh.X25519().GenerateKey(rand.Reader)
		require.NoError(b, err)
		priv[n], pub[n] = hex.EncodeToString(k.Bytes()), hex.EncodeToString(k.PublicKey().Bytes())
	}
	var wgPids []int
	for _, p := range [][2]string{{"a", "b"}, {"b", "a"}} {
		me, peer := lab.Host(p[0]), lab.Host(p[1])
		wg, err := me.Start(wgbase, "-name", "wg0", "-mtu", "1420", "-key", priv[p[0]], "-peer", pub[p[1]],
			"-endpoint", peer.Addr.String()+":51820", "-allowed", wgAddr[p[1]]+"/32", "-addr", wgAddr[p[0]]+"/24")
		require.NoError(b, err)
		require.NoError(b, wg.WaitOutput(wctx, "ready"))
		wgPids = append(wgPids, wg.Pid())
	}

	// UTE: an authority, node a with billing-api (this benchmark binary), node b with ledger.
	authDir, authAddr, _ := netnsAuthority(b, ctx, lab.Host("auth"), tmp, netnsPolicy)
	na := netnsJoin(b, ctx, ha, tmp, authDir, authAddr, "payments")
	nb := netnsJoin(b, ctx, hb, tmp, authDir, authAddr, "payments")
	na.agents["billing-api"] = netnsUte(b, "agent", "add", "--dir", na.dir, "--name", "billing-api", "--zone", "payments", "--exe", self)
	// iperf3 itself is the workload of its own agent for the tun phases, where it dials directly.
	na.agents["billing-iperf"] = netnsUte(b, "agent", "add", "--dir", na.dir, "--name", "billing-iperf", "--zone", "payments", "--exe", iperf)
	nb.agents["ledger"] = netnsUte(b, "agent", "add", "--dir", nb.dir, "--name", "ledger", "--zone", "payments", "--exe", self)

	// A connection sink in b on every address (loopback behind ledger's forward, the underlay
	// for the direct baseline, ledger's overlay IP in tun mode): it sends one byte, then holds
	// the connection until the peer closes it.
	sinkLn, err := hb.Listen("tcp", "0.0.0.0:18080")
	require.NoError(b, err)
	b.Cleanup(func() { _ = sinkLn.Close() })
	go sink(sinkLn)

	// The forwarder: iperf3's client in a connects to 127.0.0.1:15201; each connection becomes
	// one flow of billing-api through its HTTP proxy.
	fwd, err := ha.Listen("tcp", "127.0.0.1:15201")
	require.NoError(b, err)
	b.Cleanup(func() { _ = fwd.Close() })
	go forwardThroughProxy(ha, fwd, "ledger.payments:5201")

	ledgerIP, billingIP, iperfIP := nb.agents["ledger"], na.agents["billing-api"], na.agents["billing-iperf"]
	veth := iperfPath{name: "veth", host: ha, args: []string{"-c", hb.Addr.String()}}
	wgPath := iperfPath{name: "wireguard-go", host: ha, args: []string{"-c", wgAddr["b"]}}
	direct := func(ctx context.Context) (time.Duration, error) {
		start := time.Now()
		c, err := ha.Dial(ctx, "tcp", hb.Addr.String()+":18080")
		return firstByte(c, err, start)
	}
	overlay := func(ctx context.Context) (time.Duration, error) {
		start := time.Now()
		c, err := ha.DialFrom(ctx, "tcp", billingIP+":0", ledgerIP+":18080")
		return firstByte(c, err, start)
	}
	phases := []netnsPhase{
		{"proxy", "interface: proxy\n", iperfPath{name: "ute-proxy", host: ha, args: []string{"-c", "127.0.0.1", "-p", "15201"}},
			func(ctx context.Context) (time.Duration, error) {
				start := time.Now()
				c, err := dialConnect(ctx, ha, "ledger.payments:18080")
				return firstByte(c, err, start)
			}},
		{"tun", "interface: tun\n", iperfPath{name: "ute-tun", host: ha, args: []string{"-c", ledgerIP, "-B", iperfIP}}, overlay},
		{"tun-wireguard", "interface: tun\ntransport: wireguard\n", iperfPath{name: "ute-tun-wireguard", host: ha, args: []string{"-c", ledgerIP, "-B", iperfIP}}, overlay},
		// What workload attestation costs per new flow: the same connection measures with it off.
		{"proxy-noattest", "interface: proxy\n", iperfPath{}, func(ctx context.Context) (time.Duration, error) {
			start := time.Now()
			c, err := dialConnect(ctx, ha, "ledger.payments:18080")
			return firstByte(c, err, start)
		}},
		{"tun-noattest", "interface: tun\nagents:\n  - name: billing-api\n    zone: payments\n    attest: false\n", iperfPath{}, overlay},
	}
	agentsCfg := map[string]string{
		"a": "agents:\n  - name: billing-api\n    zone: payments\n    http: " + netnsHTTP + "\n",
		"b": "agents:\n  - name: ledger\n    zone: payments\n    forward:\n      5201: 127.0.0.1:5201\n      18080: 127.0.0.1:18080\n",
	}

	// Each phase runs both daemons with its interface and transport, then rounds of the three
	// iperf3 paths in rotating order, then the connection measures. UTE_NETNS_PHASES (a comma
	// list of phase names) runs only those; UTE_NETNS_ROUNDS sets the rounds (default 2).
	rounds := 2
	if v := os.Getenv("UTE_NETNS_ROUNDS"); v != "" {
		rounds, err = strconv.Atoi(v)
		require.NoError(b, err, "UTE_NETNS_ROUNDS")
	}
	if v := os.Getenv("UTE_NETNS_PHASES"); v != "" {
		want := strings.Split(v, ",")
		phases = slices.DeleteFunc(phases, func(p netnsPhase) bool { return !slices.Contains(want, p.name) })
	}
	results := map[string][]float64{}
	// CPU per GB carried: the CPU time of the processes that carry a path (both wireguard-go
	// devices, or both daemons; iperf3 itself is the same on every path) over the bytes iperf3
	// sent, omitted first second included. Unlike the throughput it hardly depends on the load.
	cpuPerGB := map[string][]float64{}
	ratios := map[string][]float64{} // "ute-x/veth", "ute-x/wireguard-go", per round
	var notes []string
	directLat, err := connectLatencies(ctx, direct, 200)
	require.NoError(b, err)
	directRate, err := connRate(ctx, direct, 8, 2*time.Second)
	require.NoError(b, err)
	b.ReportMetric(directRate, "direct-conn/s")
	b.ReportMetric(float64(pct(directLat, 50).Microseconds()), "direct-connect-p50-µs")
	for _, ph := range phases {
		var startErr error
		for _, n := range []*netnsNode{na, nb} {
			if n.proc != nil {
				_ = n.proc.Stop()
			}
			cfg := ph.config
			if strings.HasPrefix(ph.name, "proxy") {
				cfg += agentsCfg[n.name]
				if ph.name == "proxy-noattest" && n.name == "a" {
					cfg += "    attest: false\n"
				}
			}
			if startErr = netnsRun(b, ctx, n, tmp, cfg); startErr != nil {
				break
			}
		}
		if errors.Is(startErr, errInterfaceMissing) {
			notes = append(notes, fmt.Sprintf("%s not measured: %v", ph.name, startErr))
			continue
		}
		require.NoError(b, startErr, "%s", ph.name)
		require.Eventually(b, func() bool {
			return slices.Contains(zonePeers(netnsStatus(b, na.dir), "payments"), "spiffe://"+netnsTD+"/node/b")
		}, 20*time.Second, 100*time.Millisecond)
		// The first flow of the phase (tunnel and directory exchange included) before timing.
		require.Eventually(b, func() bool {
			cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			defer cancel()
			_, err := ph.connect(cctx)
			return err == nil
		}, 20*time.Second, 200*time.Millisecond, "%s: no flow reaches ledger; node a: %s", ph.name, na.proc.Output())
		// The daemons' CPU while no test runs (2 s): background work after a start (gossip,
		// loops, whatever a node with history does at start) that the first rounds' CPU per GB
		// would otherwise be blamed on the data path for. UTE_NETNS_PERF records it too.
		idle0 := procCPU(b, na.proc.Pid()) + procCPU(b, nb.proc.Pid())
		if dir := os.Getenv("UTE_NETNS_PERF"); dir != "" {
			perf := exec.CommandContext(ctx, "perf", "record", "-F", "999", "-g", "-o", filepath.Join(dir, ph.name+"-idle.perf.data"),
				"-p", fmt.Sprintf("%d,%d", na.proc.Pid(), nb.proc.Pid()), "--", "sleep", "2")
			if out, err := perf.CombinedOutput(); err != nil {
				b.Logf("perf record: %v: %s", err, out)
			}
		} else {
			time.Sleep(2 * time.Second)
		}
		b.ReportMetric(float64((procCPU(b, na.proc.Pid())+procCPU(b, nb.proc.Pid())-idle0).Milliseconds())/2, ph.name+"-daemons-idle-cpu-ms/s")
		paths := []iperfPath{veth, wgPath, ph.path}
		// One untimed test of each tunnel path first: the daemons were just started, and their
		// first seconds of bulk traffic grow the heap and fault in wireguard-go's buffer pools,
		// while the wireguard-go devices run warm from the phase before. Without it the first
		// round after a phase switch measured that one-time cost against a warm baseline.
		// UTE_NETNS_COLD=1 skips it.
		if ph.path.name != "" && os.Getenv("UTE_NETNS_COLD") == "" {
			for _, p := range []iperfPath{wgPath, ph.path} {
				_, _, err := runIperf(ctx, iperf, p)
				require.NoError(b, err, "warm-up iperf3 over %s", p.name)
			}
		}
		for r := range rounds {
			if ph.path.name == "" {
				break
			}
			round := map[string]float64{}
			for i := range paths {
				p := paths[(i+r)%len(paths)]
				var pids []int
				switch p.name {
				case "veth":
				case "wireguard-go":
					pids = wgPids
				default:
					pids = []int{na.proc.Pid(), nb.proc.Pid()}
				}
				cpu := func() (d time.Duration) {
					for _, pid := range pids {
						d += procCPU(b, pid)
					}
					return d
				}
				cpu0 := cpu()
				// UTE_NETNS_PERF also records the path's processes during each round's test of the
				// phase's path (DIR/<phase>-iperf-<round>.perf.data).
				var perfDone chan error
				if dir := os.Getenv("UTE_NETNS_PERF"); dir != "" && p.name == ph.path.name {
					perfDone = make(chan error, 1)
					perf := exec.CommandContext(ctx, "perf", "record", "-F", "999", "-g", "-o", filepath.Join(dir, fmt.Sprintf("%s-iperf-%d.perf.data", ph.name, r)),
						"-p", fmt.Sprintf("%d,%d", pids[0], pids[1]), "--", "sleep", "3")
					go func() {
						out, err := perf.CombinedOutput()
						if err != nil {
							err = fmt.Errorf("perf record: %w: %s", err, out)
						}
						perfDone <- err
					}()
				}
				bps, sent, err := runIperf(ctx, iperf, p)
				if perfDone != nil {
					if err := <-perfDone; err != nil {
						b.Log(err)
					}
				}
				require.NoError(b, err, "iperf3 over %s; node a: %s\nnode b: %s", p.name, tail(na.proc.Output(), 30), tail(nb.proc.Output(), 30))
				if len(pids) > 0 && sent > 0 {
					cpuPerGB[p.name] = append(cpuPerGB[p.name], float64((cpu()-cpu0).Milliseconds())/(sent/1e9))
				}
				results[p.name] = append(results[p.name], bps)
				round[p.name] = bps
			}
			ratios[ph.path.name+"/veth"] = append(ratios[ph.path.name+"/veth"], round[ph.path.name]/round["veth"])
			ratios[ph.path.name+"/wg"] = append(ratios[ph.path.name+"/wg"], round[ph.path.name]/round["wireguard-go"])
		}
		lat, err := connectLatencies(ctx, ph.connect, 200)
		require.NoError(b, err, "%s connect", ph.name)
		cpu0 := procCPU(b, na.proc.Pid()) + procCPU(b, nb.proc.Pid())
		// UTE_NETNS_PERF=DIR records both daemons with perf during the connection-rate measure
		// (DIR/<phase>.perf.data; read it with perf report -i FILE --no-children).
		var perfDone chan error
		if dir := os.Getenv("UTE_NETNS_PERF"); dir != "" {
			perfDone = make(chan error, 1)
			perf := exec.CommandContext(ctx, "perf", "record", "-F", "999", "-g", "-o", filepath.Join(dir, ph.name+".perf.data"),
				"-p", fmt.Sprintf("%d,%d", na.proc.Pid(), nb.proc.Pid()), "--", "sleep", "2")
			go func() {
				if out, err := perf.CombinedOutput(); err != nil {
					perfDone <- fmt.Errorf("perf record: %w: %s", err, out)
					return
				}
				perfDone <- nil
			}()
		}
		rate, err := connRate(ctx, ph.connect, 8, 2*time.Second)
		if perfDone != nil {
			if err := <-perfDone; err != nil {
				b.Log(err)
			}
		}
		require.NoError(b, err, "%s connection rate", ph.name)
		if cpu := procCPU(b, na.proc.Pid()) + procCPU(b, nb.proc.Pid()) - cpu0; rate > 0 {
			// CPU of both daemons per connection: what load on the machine does not change.
			b.ReportMetric(float64(cpu.Microseconds())/(rate*2), ph.name+"-daemons-cpu-µs/conn")
		}
		if ph.path.name != "" {
			b.ReportMetric(median(results[ph.path.name])/1e9, ph.name+"-Gbit/s")
			b.ReportMetric(median(ratios[ph.path.name+"/veth"]), ph.name+"/veth")
			b.ReportMetric(median(ratios[ph.path.name+"/wg"]), ph.name+"/wg")
			b.ReportMetric(median(cpuPerGB[ph.path.name]), ph.name+"-cpu-ms/GB")
		}
		b.ReportMetric(rate, ph.name+"-conn/s")
		b.ReportMetric(float64(pct(lat, 50).Microseconds()), ph.name+"-connect-p50-µs")
		b.ReportMetric(float64(pct(lat, 99).Microseconds()), ph.name+"-connect-p99-µs")
	}
	for _, n := range notes {
		b.Log(n)
	}
	b.ReportMetric(median(results["veth"])/1e9, "veth-Gbit/s")
	b.ReportMetric(median(results["wireguard-go"])/1e9, "wg-Gbit/s")
	b.ReportMetric(median(cpuPerGB["wireguard-go"]), "wg-cpu-ms/GB")
	b.Logf("ratios per round: %v", ratios)
	b.Logf("CPU ms per GB per run: %v", cpuPerGB)
	b.Logf("iperf3 per run (Gbit/s): %s", func() string {
		var s []string
		for _, k := range []string{"veth", "wireguard-go", "ute-proxy", "ute-tun", "ute-tun-wireguard"} {
			if v := results[k]; len(v) > 0 {
				s = append(s, fmt.Sprintf("%s %.2f", k, scale(v, 1e-9)))
			}
		}
		return strings.Join(s, "; ")
	}())
	// b.N is not looped over: one call is one measurement (it takes longer than -benchtime, so
	// the framework calls it once).
}

// netnsPhase is one configuration of the daemons BenchmarkNetns measures.
type netnsPhase struct {
	name, config string
	path         iperfPath // empty name: connection measures only
	connect      func(context.Context) (time.Duration, error)
}

// firstByte completes a connect measure: it reads the sink's first byte (so that a flow held
// for admission, or a handshake terminated locally, is timed until the destination answered),
// closes the connection and returns the time since start.
func firstByte(c net.Conn, err error, start time.Time) (time.Duration, error) {
	if err != nil {
		return 0, err
	}
	defer func() { _ = c.Close() }()
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	one := make([]byte, 1)
	if _, err := io.ReadFull(c, one); err != nil {
		return 0, fmt.Errorf("first byte: %w", err)
	}
	return time.Since(start), nil
}

type iperfPath struct {
	name string
	host *netlab.Host
	args []string
}

// runIperf runs a 3 s iperf3 TCP test (first second omitted: slow start) and returns the
// receiver's bits per second and the bytes the client sent, omitted second included.
func runIperf(ctx context.Context, iperf string, p iperfPath) (bps, sent float64, err error) {
	bps, sent, err = runIperfOnce(ctx, iperf, p)
	if err != nil {
		// Once more: the server may still be closing the previous test on a loaded machine.
		time.Sleep(time.Second)
		bps, sent, err = runIperfOnce(ctx, iperf, p)
	}
	return bps, sent, err
}

func runIperfOnce(ctx context.Context, iperf string, p iperfPath) (bps, sent float64, err error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	out, err := p.host.Run(ctx, iperf, append(slices.Clone(p.args), "-t", "3", "-O", "1", "-J")...)
	if err != nil {
		return 0, 0, err
	}
	var r struct {
		Intervals []struct {
			Sum struct {
				Bytes float64 `json:"bytes"`
			} `json:"sum"`
		} `json:"intervals"`
		End struct {
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
		Error string `json:"error"`
	}
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		return 0, 0, fmt.Errorf("iperf3 JSON: %w", err)
	}
	if r.Error != "" || r.End.SumReceived.BitsPerSecond == 0 {
		return 0, 0, fmt.Errorf("iperf3: %q", r.Error)
	}
	for _, iv := range r.Intervals {
		sent += iv.Sum.Bytes
	}
	return r.End.SumReceived.BitsPerSecond, sent, nil
}

// sink accepts connections and holds each until the peer closes it.
func sink(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer func() { _ = c.Close() }()
			if _, err := c.Write([]byte{'u'}); err == nil {
				_, _ = io.Copy(io.Discard, c)
			}
		}()
	}
}

// dialConnect opens a flow of billing-api to target through its HTTP proxy in host h, returning
// once the proxy answered 200 (the flow admitted by the destination's node).
func dialConnect(ctx context.Context, h *netlab.Host, target string) (net.Conn, error) {
	c, err := h.Dial(ctx, "tcp", netnsHTTP)
	if err != nil {
		return nil, err
	}
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	if _, err := fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", target, target); err != nil {
		_ = c.Close()
		return nil, err
	}
	// Read the answer's head byte by byte: nothing of the tunnel's own bytes may be consumed.
	var head []byte
	one := make([]byte, 1)
	for !strings.HasSuffix(string(head), "\r\n\r\n") {
		if _, err := c.Read(one); err != nil {
			_ = c.Close()
			return nil, fmt.Errorf("CONNECT %s: %w (read %q)", target, err, head)
		}
		head = append(head, one[0])
		if len(head) > 4096 {
			_ = c.Close()
			return nil, errors.New("CONNECT answer head too long")
		}
	}
	if !strings.Contains(strings.SplitN(string(head), "\r\n", 2)[0], " 200") {
		_ = c.Close()
		return nil, fmt.Errorf("CONNECT %s answered %q", target, strings.SplitN(string(head), "\r\n", 2)[0])
	}
	_ = c.SetDeadline(time.Time{})
	return c, nil
}

// forwardThroughProxy turns every connection accepted on ln into a CONNECT flow to target.
func forwardThroughProxy(h *netlab.Host, ln net.Listener, target string) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer func() { _ = c.Close() }()
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			up, err := dialConnect(ctx, h, target)
			cancel()
			if err != nil {
				return
			}
			defer func() { _ = up.Close() }()
			var wg sync.WaitGroup
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, _ = io.Copy(up, c)
				_ = up.(*net.TCPConn).CloseWrite()
			}()
			_, _ = io.Copy(c, bufio.NewReaderSize(up, 256<<10))
			_ = c.(*net.TCPConn).CloseWrite()
			wg.Wait()
		}()
	}
}

// connectLatencies times n connects one after another.
func connectLatencies(ctx context.Context, connect func(context.Context) (time.Duration, error), n int) ([]time.Duration, error) {
	out := make([]time.Duration, 0, n)
	for range n {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		d, err := connect(cctx)
		cancel()
		if err != nil {
			return nil, err
		}
		out = append(out, d)
	}
	return out, nil
}

// connRate runs workers connecting in a loop for d and returns completed connections per second.
func connRate(ctx context.Context, connect func(context.Context) (time.Duration, error), workers int, d time.Duration) (float64, error) {
	var (
		mu    sync.Mutex
		count int
		first error
		wg    sync.WaitGroup
	)
	start := time.Now()
	end := start.Add(d)
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(end) {
				cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
				_, err := connect(cctx)
				cancel()
				mu.Lock()
				if err != nil {
					if first == nil {
						first = err
					}
					mu.Unlock()
					return
				}
				count++
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if first != nil {
		return 0, first
	}
	return float64(count) / time.Since(start).Seconds(), nil
}

func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func pct(ds []time.Duration, p int) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[min(len(s)-1, len(s)*p/100)]
}

func scale(xs []float64, f float64) []float64 {
	out := make([]float64, len(xs))
	for i, x := range xs {
		out[i] = x * f
	}
	return out
}

// tail returns the last n lines of s.
func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}
