//go:build linux

package daemon

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/pprof"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/tun"
	"golang.zx2c4.com/wireguard/tun/tuntest"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/identity/authority"
	"github.com/ute-project/ute/node"
	"github.com/ute-project/ute/node/attest"
	"github.com/ute-project/ute/node/config"
	"github.com/ute-project/ute/node/membership"
	"github.com/ute-project/ute/node/state"
	"github.com/ute-project/ute/overlay/tundev"
	"github.com/ute-project/ute/overlay/wireguard"
	"github.com/ute-project/ute/sim/netlab"
)

// nsBind opens wireguard-go's UDP sockets inside a lab host, whichever goroutine asks.
type nsBind struct {
	conn.Bind
	h *netlab.Host
}

func (b *nsBind) Open(port uint16) (fns []conn.ReceiveFunc, actual uint16, err error) {
	derr := b.h.Do(func() error {
		fns, actual, err = b.Bind.Open(port)
		return nil
	})
	if derr != nil {
		return nil, 0, derr
	}
	return fns, actual, err
}

// wgHost is one lab host running an in-process daemon in WireGuard mode on a kernel TUN in the
// host's namespace; its agents are real programs started in the namespace.
type wgHost struct {
	h    *netlab.Host
	d    *Daemon
	kdev *tundev.Device
	ips  map[string]netip.Addr
}

func realExe(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Skipf("skipping: %s is not installed", name)
	}
	if name == "python3" {
		out, err := exec.Command(p, "-c", "import sys; print(sys.executable)").Output()
		require.NoError(t, err)
		p = strings.TrimSpace(string(out))
	}
	p, err = filepath.EvalSymlinks(p)
	require.NoError(t, err)
	return p
}

func startWGHost(t *testing.T, ta *testAuthority, h *netlab.Host, zones []string, agents []state.AgentSpec) *wgHost {
	t.Helper()
	ctx := context.Background()
	tok, err := ta.CreateToken(ctx, authority.TokenSpec{Zones: zones, TTL: time.Minute})
	require.NoError(t, err)
	dir := filepath.Join(t.TempDir(), h.Name)
	fp := sha256.Sum256([]byte(h.Name))
	listen := netip.AddrPortFrom(h.Addr, config.DefaultPort)
	st, err := node.Join(ctx, node.JoinParams{Dir: dir, Authority: ta.addr, Token: tok.Token, Name: h.Name,
		HostFingerprint: fp[:], Advertise: listen.String()})
	require.NoError(t, err)
	w := &wgHost{h: h, ips: map[string]netip.Addr{}}
	var addrs []netip.Prefix
	routes := []netip.Prefix{netip.MustParsePrefix("100.100.1.0/24")}
	for _, as := range agents {
		a, err := st.AddAgent(as)
		require.NoError(t, err)
		w.ips[as.Name] = a.IP
		addrs = append(addrs, netip.PrefixFrom(a.IP, a.IP.BitLen()))
		if as.Zone == "payments6" {
			routes = append(routes, netip.MustParsePrefix(payments6CIDR))
		}
	}
	require.NoError(t, h.Do(func() error {
		var err error
		w.kdev, err = tundev.Open(ctx, tundev.Config{Name: "ute0", MTU: DefaultWireGuardMTU, Addrs: addrs,
			Routes: routes}, testLogger(h.Name))
		return err
	}))
	t.Cleanup(func() { _ = w.kdev.Close() })
	pc, err := h.ListenPacket("udp", listen.String())
	require.NoError(t, err)
	t.Cleanup(func() { _ = pc.Close() })
	att := attest.New(attest.Options{})
	cfg := config.Default()
	cfg.Transport, cfg.Interface = config.TransportWireGuard, config.InterfaceTUN
	ft := membership.FastTiming()
	w.d, err = Start(ctx, Options{Dir: dir, Config: cfg, Logger: testLogger(h.Name), PacketConn: pc, NoAuthority: true, Timing: &ft,
		WireGuard: WireGuardOptions{TUN: w.kdev.TUN(), Bind: &nsBind{Bind: conn.NewDefaultBind(), h: h},
			Attest: func(tp wireguard.Tuple, wl node.Workload) (p attest.Process, err error) {
				// The socket lives in the host's namespace: look it up from there.
				derr := h.Do(func() error {
					p, err = attestTuple(att, tp, wl)
					return nil
				})
				if derr != nil {
					return p, derr
				}
				return p, err
			}}})
	require.NoError(t, err)
	t.Cleanup(func() { _ = w.d.Close() })
	return w
}

// payments6 is an IPv6-only zone the netns tests add to testPolicy for agents with IPv6
// overlay addresses.
const (
	payments6CIDR = "fd00:100:1::/64"
	payments6     = `  - name: payments6
    cidr: ` + payments6CIDR + `
    regions: [eu-west-1]
    min_trust: 50
    isolate_below: 20
    rules:
      - from: billing-*
        to: ledger6
        ports: [udp/9000]
`
)

func curlArgs(src netip.Addr, url string, maxTime int) []string {
	return []string{"-sS", "--max-time", fmt.Sprint(maxTime), "--interface", src.String(), url}
}

// TestWireGuardNetns is the virtual-interface suite in WireGuard mode: two hosts (network
// namespaces on a bridge) with kernel TUNs and in-process daemons, curl and python's http.server
// as agents. Root only.
func TestWireGuardNetns(t *testing.T) {
	if testing.Short() {
		t.Skip("network-namespace test: not in -short")
	}
	lab := netlab.New(t, netlab.Options{Hosts: []string{"a", "b", "f"}})
	curl, python := realExe(t, "curl"), realExe(t, "python3")
	ta := startAuthority(t)
	a := startWGHost(t, ta, lab.Host("a"), []string{"payments"}, []state.AgentSpec{{Name: "billing-api", Zone: "payments", Exe: curl}})
	b := startWGHost(t, ta, lab.Host("b"), []string{"payments"}, []state.AgentSpec{{Name: "ledger", Zone: "payments", Exe: python}})
	billing, ledger := a.ips["billing-api"], b.ips["ledger"]

	www := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(www, "hello.txt"), []byte("ledger here\n"), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(www, "big.bin"), nil, 0o644))
	require.NoError(t, os.Truncate(filepath.Join(www, "big.bin"), 1<<30))
	srv, err := b.h.Start(python, "-u", "-m", "http.server", "8080", "--bind", ledger.String(), "--directory", www)
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	require.NoError(t, srv.WaitOutput(ctx, "Serving HTTP"))
	requests := func() int { return strings.Count(srv.Output(), "GET /") }

	// Same zone: reached by overlay IP, through the kernel TUN and wireguard-go.
	url := fmt.Sprintf("http://%s:8080/hello.txt", ledger)
	require.Eventually(t, func() bool {
		out, err := a.h.Run(ctx, curl, curlArgs(billing, url, 3)...)
		return err == nil && out == "ledger here\n"
	}, 30*time.Second, 200*time.Millisecond, "billing-api never reached ledger")
	infoA, _ := a.d.WireGuard()
	require.Len(t, infoA.Peers, 1)
	// On a kernel TUN the filter reads the kernel straight into the device's buffers, and the
	// first packets, held for admission, were still released while the reader waited.
	require.True(t, a.d.wgt.filter.DirectRead(), "the filter reads the kernel TUN directly")
	require.True(t, b.d.wgt.filter.DirectRead())

	// Cross zone: an address of zone support is not routed into the overlay for billing-api
	// (and would be refused at resolve): nothing leaves.
	_, err = a.h.Run(ctx, curl, curlArgs(billing, "http://100.100.2.5:8080/", 2)...)
	require.Error(t, err)

	// Another executable on billing-api's address: python3 is not the enrolled curl.
	before := requests()
	out, err := a.h.Run(ctx, python, "-c", fmt.Sprintf(
		"import socket,sys\ns=socket.socket(); s.settimeout(2); s.bind(('%s',0))\ntry:\n s.connect(('%s',8080)); print('connected')\nexcept Exception as e:\n print('refused', e)", billing, ledger))
	require.NoError(t, err)
	require.Contains(t, out, "refused")
	require.Equal(t, before, requests(), "ledger's server saw no request")
	infoA, _ = a.d.WireGuard()
	// At least once: a SYN the kernel retransmits while the first is being attested is refused again.
	require.GreaterOrEqual(t, infoA.Refused["workload"], uint64(1), "refused by workload attestation: %v", infoA.Refused)

	// A foreign WireGuard key pointed at b from host f: its handshake is never answered.
	infoB, _ := b.d.WireGuard()
	foreign, err := wireguard.GenerateKeyPair()
	require.NoError(t, err)
	fch := tuntest.NewChannelTUN()
	fdev := device.NewDevice(fch.TUN(), &nsBind{Bind: conn.NewDefaultBind(), h: lab.Host("f")}, device.NewLogger(device.LogLevelSilent, ""))
	t.Cleanup(fdev.Close)
	require.NoError(t, fdev.IpcSet(fmt.Sprintf("private_key=%x\nlisten_port=0\npublic_key=%x\nendpoint=%s\nallowed_ip=0.0.0.0/0\npersistent_keepalive_interval=1\n",
		foreign.Private[:], infoB.Key[:], infoB.Endpoint)))
	require.NoError(t, fdev.Up())
	unadmitted := infoB.Filter.Unadmitted
	for range 5 {
		fch.Outbound <- tuntest.Ping(ledger, billing)
	}
	time.Sleep(1500 * time.Millisecond)
	fcfg, err := fdev.IpcGet()
	require.NoError(t, err)
	require.Contains(t, fcfg, "last_handshake_time_sec=0\n")
	infoB, _ = b.d.WireGuard()
	require.Equal(t, unadmitted, infoB.Filter.Unadmitted, "nothing of the foreign device reached b's filter")

	// Partition and heal: with a's link cut no flow passes; restored, a new flow succeeds.
	require.NoError(t, a.h.Cut(ctx))
	_, err = a.h.Run(ctx, curl, curlArgs(billing, url, 2)...)
	require.Error(t, err, "no flow while a's link is cut")
	require.NoError(t, a.h.Restore(ctx))
	restored := time.Now()
	require.Eventually(t, func() bool {
		out, err := a.h.Run(ctx, curl, curlArgs(billing, url, 3)...)
		return err == nil && out == "ledger here\n"
	}, 30*time.Second, 200*time.Millisecond, "no flow after a's link was restored")
	t.Logf("a new flow succeeded %v after a's link was restored", time.Since(restored).Round(time.Millisecond))

	// Revocation: a live download; billing-api is revoked at its own node; within 1 s no byte
	// moves any more.
	dl := filepath.Join(t.TempDir(), "dl.bin")
	live, err := a.h.Start(curl, "-sS", "--interface", billing.String(), "--limit-rate", "16M", "-o", dl, fmt.Sprintf("http://%s:8080/big.bin", ledger))
	require.NoError(t, err)
	require.Eventually(t, func() bool { st, err := os.Stat(dl); return err == nil && st.Size() > 1<<20 }, 20*time.Second, 20*time.Millisecond,
		"the download is flowing; curl: %s", live.Output())
	_, err = a.d.Revoke(ctx, "billing-api.payments", "revoked by test")
	require.NoError(t, err)
	returned := time.Now()
	size := func() int64 { st, err := os.Stat(dl); require.NoError(t, err); return st.Size() }
	// What the kernel had buffered for curl drains first; then the size must stand still.
	time.Sleep(time.Second)
	frozen := size()
	time.Sleep(2 * time.Second)
	require.Equal(t, frozen, size(), "bytes still arrived 1 s after the revocation returned (%v ago)", time.Since(returned))
	require.Eventually(t, func() bool { return b.d.Store().Len() == 1 }, 10*time.Second, 20*time.Millisecond,
		"the revocation reached b by gossip")
	_, err = a.h.Run(ctx, curl, curlArgs(billing, url, 2)...)
	require.Error(t, err, "a new flow of the revoked agent fails")
}

// iperf3Gbps runs `iperf3 -c server -B bind -t secs -J` in h and returns the received rate.
func iperf3Gbps(t *testing.T, ctx context.Context, h *netlab.Host, iperf string, bind, server netip.Addr, secs int) float64 {
	t.Helper()
	out, err := h.Run(ctx, iperf, "-c", server.String(), "-p", "8080", "-B", bind.String(), "-t", fmt.Sprint(secs), "-J")
	require.NoError(t, err)
	var res struct {
		End struct {
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
	}
	require.NoError(t, json.Unmarshal([]byte(out), &res), out)
	return res.End.SumReceived.BitsPerSecond / 1e9
}

// TestWireGuardIperf compares iperf3 TCP agent to agent in WireGuard mode with bare wireguard-go
// devices between two other namespaces of the same lab, same MTU, same process. Root only, and
// only with UTE_BENCH=1 (it takes about 30 s).
func TestWireGuardIperf(t *testing.T) {
	if os.Getenv("UTE_BENCH") == "" {
		t.Skip("iperf3 comparison: set UTE_BENCH=1 (root)")
	}
	lab := netlab.New(t, netlab.Options{Hosts: []string{"a", "b", "c", "d"}})
	iperf := realExe(t, "iperf3")
	ta := startAuthority(t)
	// Profile labels (go test -cpuprofile, pprof -tagfocus path=ute|bare) tell the two paths'
	// goroutines apart: every goroutine inherits its creator's labels.
	var a, b *wgHost
	pprof.Do(context.Background(), pprof.Labels("path", "ute"), func(context.Context) {
		a = startWGHost(t, ta, lab.Host("a"), []string{"payments"}, []state.AgentSpec{{Name: "billing-api", Zone: "payments", Exe: iperf}})
		b = startWGHost(t, ta, lab.Host("b"), []string{"payments"}, []state.AgentSpec{{Name: "ledger", Zone: "payments", Exe: iperf}})
	})
	billing, ledger := a.ips["billing-api"], b.ips["ledger"]
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	srv, err := b.h.Start(iperf, "-s", "-p", "8080", "--forceflush", "-B", ledger.String())
	require.NoError(t, err)
	require.NoError(t, srv.WaitOutput(ctx, "Server listening"))
	// Warm-up: peers configured, first flows admitted.
	require.Eventually(t, func() bool {
		_, err := a.h.Run(ctx, iperf, "-c", ledger.String(), "-p", "8080", "-B", billing.String(), "-t", "1")
		return err == nil
	}, 30*time.Second, 500*time.Millisecond, "iperf3 through UTE never ran; refusals %v", func() map[string]uint64 { i, _ := a.d.WireGuard(); return i.Refused }())
	ute := iperf3Gbps(t, ctx, a.h, iperf, billing, ledger, 5)

	// Bare wireguard-go between c and d: kernel TUNs, same MTU, peers configured by hand.
	c, d := lab.Host("c"), lab.Host("d")
	type bare struct {
		dev  *device.Device
		kp   wireguard.KeyPair
		ip   netip.Addr
		port uint16
	}
	mk := func(h *netlab.Host, ip string) *bare {
		kp, err := wireguard.GenerateKeyPair()
		require.NoError(t, err)
		var td tun.Device
		require.NoError(t, h.Do(func() error { var err error; td, err = tun.CreateTUN("wg0", DefaultWireGuardMTU); return err }))
		_, err = h.Run(ctx, "ip", "addr", "add", ip+"/24", "dev", "wg0")
		require.NoError(t, err)
		_, err = h.Run(ctx, "ip", "link", "set", "wg0", "up")
		require.NoError(t, err)
		dev := device.NewDevice(td, &nsBind{Bind: conn.NewDefaultBind(), h: h}, device.NewLogger(device.LogLevelSilent, ""))
		t.Cleanup(dev.Close)
		require.NoError(t, dev.IpcSet(fmt.Sprintf("private_key=%x\nlisten_port=51820\n", kp.Private[:])))
		return &bare{dev: dev, kp: kp, ip: netip.MustParseAddr(ip), port: 51820}
	}
	var bc, bd *bare
	pprof.Do(context.Background(), pprof.Labels("path", "bare"), func(context.Context) {
		bc, bd = mk(c, "10.200.0.1"), mk(d, "10.200.0.2")
		for _, p := range []struct {
			from, to *bare
			h        *netlab.Host
		}{{bc, bd, d}, {bd, bc, c}} {
			require.NoError(t, p.from.dev.IpcSet(fmt.Sprintf("public_key=%x\nendpoint=%s\nallowed_ip=%s/32\n",
				p.to.kp.Public[:], netip.AddrPortFrom(p.h.Addr, p.to.port), p.to.ip)))
			require.NoError(t, p.from.dev.Up())
		}
	})
	bsrv, err := d.Start(iperf, "-s", "-p", "8080", "--forceflush", "-B", bd.ip.String())
	require.NoError(t, err)
	require.NoError(t, bsrv.WaitOutput(ctx, "Server listening"))
	require.Eventually(t, func() bool {
		_, err := c.Run(ctx, iperf, "-c", bd.ip.String(), "-p", "8080", "-B", bc.ip.String(), "-t", "1")
		return err == nil
	}, 30*time.Second, 500*time.Millisecond)
	bareGbps := iperf3Gbps(t, ctx, c, iperf, bc.ip, bd.ip, 5)
	t.Logf("iperf3 TCP, 5 s, MTU %d: UTE WireGuard mode %.2f Gbit/s, bare wireguard-go %.2f Gbit/s, ratio %.2f",
		DefaultWireGuardMTU, ute, bareGbps, ute/bareGbps)
}

// TestWireGuardNetnsResetAndUDP runs real sockets of the test process as agents (the agents are
// enrolled with the test binary) across two namespaces in WireGuard mode. A cut TCP flow is
// reset, not starved: when a revokes ledger (the remote agent of billing-api's established
// connection), billing-api's blocked read fails with ECONNRESET within 1 s and nothing more
// reaches ledger; a's cut notice makes b reset ledger's end too, though b never learns of the
// revocation. And a UDP flow is attested:
// a datagram from python3 on billing-api's address is refused before ledger sees it, while the
// enrolled binary's pass; datagrams over the MTU arrive whole, as IPv4 fragments and, between
// agents of an IPv6 zone, as IPv6 fragments. Root only.
func TestWireGuardNetnsResetAndUDP(t *testing.T) {
	if testing.Short() {
		t.Skip("network-namespace test: not in -short")
	}
	lab := netlab.New(t, netlab.Options{Hosts: []string{"a", "b"}})
	python := realExe(t, "python3")
	self, err := os.Executable()
	require.NoError(t, err)
	self, err = filepath.EvalSymlinks(self)
	require.NoError(t, err)
	ta := startAuthority(t)
	_, err = ta.ApplyPolicy(context.Background(), "udp.yaml", []byte(strings.Replace(testPolicy, "ports: [tcp/8080]", "ports: [tcp/8080, udp/9000]", 1)+payments6))
	require.NoError(t, err)
	a := startWGHost(t, ta, lab.Host("a"), []string{"payments", "payments6"}, []state.AgentSpec{
		{Name: "billing-api", Zone: "payments", Exe: self}, {Name: "billing-v6", Zone: "payments6", Exe: self}})
	b := startWGHost(t, ta, lab.Host("b"), []string{"payments", "payments6"}, []state.AgentSpec{
		{Name: "ledger", Zone: "payments", Exe: self}, {Name: "ledger6", Zone: "payments6", Exe: self}})
	billing, ledger := a.ips["billing-api"], b.ips["ledger"]
	billing6, ledger6 := a.ips["billing-v6"], b.ips["ledger6"]
	require.True(t, billing6.Is6() && ledger6.Is6(), "payments6 gives IPv6 addresses: %s, %s", billing6, ledger6)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	// UDP first: ledger's socket, the enrolled binary's datagram passes.
	pc, err := b.h.ListenPacket("udp", netip.AddrPortFrom(ledger, 9000).String())
	require.NoError(t, err)
	t.Cleanup(func() { _ = pc.Close() })
	got := make(chan string, 16)
	go func() {
		buf := make([]byte, 65536)
		for {
			n, _, err := pc.ReadFrom(buf)
			if err != nil {
				close(got)
				return
			}
			got <- string(buf[:n])
		}
	}()
	cpc, err := a.h.ListenPacket("udp", netip.AddrPortFrom(billing, 0).String())
	require.NoError(t, err)
	t.Cleanup(func() { _ = cpc.Close() })
	ldst := net.UDPAddrFromAddrPort(netip.AddrPortFrom(ledger, 9000))
	require.Eventually(t, func() bool {
		_, err := cpc.WriteTo([]byte("enrolled"), ldst)
		require.NoError(t, err)
		select {
		case m := <-got:
			return m == "enrolled"
		case <-time.After(300 * time.Millisecond):
			return false
		}
	}, 30*time.Second, 10*time.Millisecond, "the enrolled binary's datagram never reached ledger")
	// Over the interface's MTU (1,420) a datagram leaves as IP fragments: the later ones follow
	// the admitted tuple and ledger reads it whole.
	big := strings.Repeat("0123456789", 400)
	require.Eventually(t, func() bool {
		_, err := cpc.WriteTo([]byte(big), ldst)
		require.NoError(t, err)
		for {
			select {
			case m := <-got:
				if m == big {
					return true
				}
			case <-time.After(300 * time.Millisecond):
				return false
			}
		}
	}, 10*time.Second, 10*time.Millisecond, "a 4,000-byte datagram never reached ledger whole")
	for len(got) > 0 {
		<-got
	}
	// The same between IPv6 agents: the kernel writes a Fragment header after the IPv6 header,
	// and the later fragments follow the first's tuple (without frag.go's IPv6 part, the small
	// datagram passes and the large one never does).
	pc6, err := b.h.ListenPacket("udp", netip.AddrPortFrom(ledger6, 9000).String())
	require.NoError(t, err)
	t.Cleanup(func() { _ = pc6.Close() })
	cpc6, err := a.h.ListenPacket("udp", netip.AddrPortFrom(billing6, 0).String())
	require.NoError(t, err)
	t.Cleanup(func() { _ = cpc6.Close() })
	ldst6 := net.UDPAddrFromAddrPort(netip.AddrPortFrom(ledger6, 9000))
	fragsBefore := func() uint64 { i, _ := b.d.WireGuard(); return i.Filter.Fragments }()
	got6 := func(want string) bool {
		buf := make([]byte, 65536)
		for {
			require.NoError(t, pc6.SetReadDeadline(time.Now().Add(300*time.Millisecond)))
			n, _, err := pc6.ReadFrom(buf)
			if err != nil {
				return false
			}
			if string(buf[:n]) == want {
				return true
			}
		}
	}
	require.Eventually(t, func() bool {
		_, err := cpc6.WriteTo([]byte("enrolled"), ldst6)
		require.NoError(t, err)
		return got6("enrolled")
	}, 30*time.Second, 10*time.Millisecond, "the enrolled binary's IPv6 datagram never reached ledger6")
	require.Eventually(t, func() bool {
		_, err := cpc6.WriteTo([]byte(big), ldst6)
		require.NoError(t, err)
		return got6(big)
	}, 10*time.Second, 10*time.Millisecond, "a 4,000-byte IPv6 datagram never reached ledger6 whole")
	infoB6, _ := b.d.WireGuard()
	require.Greater(t, infoB6.Filter.Fragments, fragsBefore, "b's filter followed IPv6 fragments")
	// python3 on billing-api's address: refused by attestation of its UDP socket.
	before := func() uint64 { i, _ := a.d.WireGuard(); return i.Refused["workload"] }()
	out, err := a.h.Run(ctx, python, "-c", fmt.Sprintf(
		"import socket,time\ns=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('%s',0))\nfor i in range(5):\n s.sendto(b'intruder', ('%s',9000)); time.sleep(0.2)\nprint('sent')", billing, ledger))
	require.NoError(t, err, out)
	select {
	case m := <-got:
		t.Fatalf("ledger received %q from another executable", m)
	case <-time.After(time.Second):
	}
	infoA, _ := a.d.WireGuard()
	require.Greater(t, infoA.Refused["workload"], before, "refused by workload attestation: %v", infoA.Refused)

	// TCP: an established connection, then ledger revoked at a.
	ln, err := b.h.Listen("tcp", netip.AddrPortFrom(ledger, 8080).String())
	require.NoError(t, err)
	t.Cleanup(func() { _ = ln.Close() })
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			accepted <- c
		}
	}()
	var c net.Conn
	require.Eventually(t, func() bool {
		dctx, dcancel := context.WithTimeout(ctx, 3*time.Second)
		defer dcancel()
		c, err = a.h.DialFrom(dctx, "tcp", netip.AddrPortFrom(billing, 0).String(), netip.AddrPortFrom(ledger, 8080).String())
		return err == nil
	}, 30*time.Second, 100*time.Millisecond, "billing-api never connected: %v", err)
	t.Cleanup(func() { _ = c.Close() })
	var sc net.Conn
	select {
	case sc = <-accepted:
	case <-time.After(10 * time.Second):
		t.Fatal("ledger accepted nothing")
	}
	t.Cleanup(func() { _ = sc.Close() })
	_, err = c.Write([]byte("ping"))
	require.NoError(t, err)
	buf := make([]byte, 64)
	n, err := io.ReadFull(sc, buf[:4])
	require.NoError(t, err)
	require.Equal(t, "ping", string(buf[:n]))
	_, err = sc.Write(make([]byte, 3000))
	require.NoError(t, err)
	_, err = io.ReadFull(c, make([]byte, 3000))
	require.NoError(t, err)

	readErr := func(c net.Conn) chan error {
		ch := make(chan error, 1)
		go func() {
			b := make([]byte, 64)
			for {
				if _, err := c.Read(b); err != nil {
					ch <- err
					return
				}
			}
		}()
		return ch
	}
	clientErr, serverErr := readErr(c), readErr(sc)
	ledgerID := identity.AgentID("acme.internal", "payments", "ledger").String()
	require.NoError(t, a.d.Node().Revoke(ctx, ledgerID, "remote agent revoked by test"))
	returned := time.Now()
	select {
	case err := <-clientErr:
		require.True(t, errors.Is(err, syscall.ECONNRESET), "billing-api's read failed with %v, want ECONNRESET", err)
		t.Logf("billing-api reset %v after the revocation returned", time.Since(returned).Round(time.Millisecond))
	case <-time.After(time.Second):
		t.Fatal("billing-api's connection was not reset within 1 s of the revocation")
	}
	// b never applies the revocation: a's cut notice (control channel 18) makes b reset
	// ledger's end too.
	select {
	case err := <-serverErr:
		require.True(t, errors.Is(err, syscall.ECONNRESET), "ledger's read failed with %v, want ECONNRESET", err)
		t.Logf("ledger reset %v after a's revocation returned, by a's cut notice", time.Since(returned).Round(time.Millisecond))
	case <-time.After(time.Second):
		t.Fatal("ledger's connection was not reset within 1 s of a's revocation")
	}
	require.False(t, b.d.Node().Revoked(ledgerID), "b reset ledger's end without learning of the revocation")
	require.Eventually(t, func() bool { i, _ := b.d.WireGuard(); return i.Cuts.Applied >= 1 }, time.Second, 5*time.Millisecond,
		"b counts the applied cut notice")
}
