package main

import (
	"bufio"
	"context"
	"crypto/sha256"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity/authority"
	"github.com/ute-project/ute/node"
	"github.com/ute-project/ute/node/config"
	nodedaemon "github.com/ute-project/ute/node/daemon"
	"github.com/ute-project/ute/node/localapi"
	"github.com/ute-project/ute/node/membership"
)

// BenchmarkNodeAtRest measures one `ute node run` process at rest in a zone of 100 nodes: the
// other 99 run in this process as real daemons (QUIC on loopback, memberlist's LAN timings), the
// measured one is a subprocess so that its RSS and CPU are its own. After every member has joined,
// it samples the process for 10 s: resident memory at the end (rss-MiB) and CPU over the window as
// a percentage of one core (cpu-%). Targets (docs/design.md (performance targets)): ≤ 60 MiB and ≤ 1 %.
//
// The measured node runs the production defaults (config.Default()). The 99 peers share the
// benchmark's cores, so they run memberlist with slower probes and gossip (peerTiming): with
// production timings 99 daemons kept 1.8 of the 2 cores of the reference machine busy, timed each
// other out, and the member count the measured node saw fell back while joining (86 to 75) and
// was 96 at the end of a window: that suspicion and refutation traffic (and the handshakes of
// re-opened tunnels), not the node's own work, was most of what the benchmark measured. The
// peers still probe, gossip and push/pull, and their tunnels to the measured node keep QUIC's
// production keep-alive.
func BenchmarkNodeAtRest(b *testing.B) {
	const peers = 99
	tmp := b.TempDir()
	pol := filepath.Join(tmp, "policy.yaml")
	// A /16 zone: each node gets its own /24 slice of it.
	const wide = "zones:\n  - name: payments\n    cidr: 100.64.0.0/16\n    regions: [eu-west-1]\n    min_trust: 50\n    isolate_below: 20\n"
	require.NoError(b, os.WriteFile(pol, []byte(wide), 0o644))
	adir := filepath.Join(tmp, "auth")
	require.NoError(b, authority.Init(adir, "acme.internal", pol, authority.Options{}))
	a, err := authority.Open(adir, authority.Options{})
	require.NoError(b, err)
	srv, err := a.Listen("127.0.0.1:0")
	require.NoError(b, err)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { _ = srv.Serve(ctx) }()
	defer func() { _ = a.Close() }()

	join := func(name string) (string, net.PacketConn) {
		pc, err := net.ListenPacket("udp", "127.0.0.1:0")
		require.NoError(b, err)
		tok, err := a.CreateToken(ctx, authority.TokenSpec{Zones: []string{"payments"}, TTL: time.Hour})
		require.NoError(b, err)
		fp := sha256.Sum256([]byte(name))
		dir := filepath.Join(tmp, name)
		_, err = node.Join(ctx, node.JoinParams{Dir: dir, Authority: srv.Addr().String(), Token: tok.Token, Name: name,
			HostFingerprint: fp[:], Advertise: pc.LocalAddr().String()})
		require.NoError(b, err)
		return dir, pc
	}
	// Every node joins first, so that the joins do not compete with the running daemons.
	quiet := slog.New(slog.DiscardHandler)
	// peerTiming: see the comment above; only the 99 in-process peers use it.
	peerTiming := membership.LANTiming()
	peerTiming.GossipInterval = time.Second
	peerTiming.ProbeInterval = 5 * time.Second
	peerTiming.ProbeTimeout = 2 * time.Second
	peerTiming.PushPullInterval = 60 * time.Second
	dirs, pcs := make([]string, peers), make([]net.PacketConn, peers)
	for i := range peers {
		dirs[i], pcs[i] = join(fmt.Sprintf("peer%03d", i))
	}
	dir, pc := join("measured")
	for i := range peers {
		d, err := nodedaemon.Start(ctx, nodedaemon.Options{Dir: dirs[i], Config: config.Default(), PacketConn: pcs[i], Logger: quiet, NoAuthority: true,
			Timing: &peerTiming})
		require.NoError(b, err)
		defer func() { _ = d.Close(); _ = pcs[i].Close() }()
	}
	listen := pc.LocalAddr().String()
	require.NoError(b, pc.Close())
	cmd := exec.Command(uteBin, "node", "run", "--dir", dir, "--listen", listen, "--log-level", "error")
	out, err := cmd.StdoutPipe()
	require.NoError(b, err)
	require.NoError(b, cmd.Start())
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	_, err = bufio.NewReader(out).ReadString('\n')
	require.NoError(b, err)

	c, err := localapi.Dial(ctx, localapi.SocketPath(dir))
	require.NoError(b, err)
	defer func() { _ = c.Close() }()
	// At rest means every member seen and the tunnels built: the node opens a tunnel to a
	// member when it first probes or gossips to it (about one a second), and a window that
	// still holds those handshakes measures the joining, not the rest. Members must all be
	// seen within 2 minutes; tunnels get a minute more, after which the window starts anyway
	// (the tunnels metric shows how many were up).
	start := time.Now()
	for {
		st, err := c.Status(ctx)
		require.NoError(b, err)
		members := 0
		if len(st.Zones) == 1 {
			members = st.Zones[0].Members
		}
		if members == peers+1 && (tunnelsUp(st) >= peers || time.Since(start) > 3*time.Minute) {
			break
		}
		require.True(b, members == peers+1 || time.Since(start) < 2*time.Minute, "the measured node never saw all %d members", peers+1)
		time.Sleep(200 * time.Millisecond)
	}

	b.ResetTimer()
	for range b.N {
		cpu0 := procCPU(b, cmd.Process.Pid)
		t0 := time.Now()
		time.Sleep(10 * time.Second)
		cpu := procCPU(b, cmd.Process.Pid) - cpu0
		b.ReportMetric(100*cpu.Seconds()/time.Since(t0).Seconds(), "cpu-%")
		b.ReportMetric(float64(procRSS(b, cmd.Process.Pid))/(1<<20), "rss-MiB")
	}
	b.StopTimer() // closing the 99 daemons is not part of the measurement
	st, err := c.Status(ctx)
	require.NoError(b, err)
	up := tunnelsUp(st)
	b.ReportMetric(float64(up), "tunnels")
	b.ReportMetric(float64(st.Zones[0].Members), "members")
}

// tunnelsUp counts the peers the node holds a live tunnel with.
func tunnelsUp(st localapi.Status) int {
	up := 0
	for _, z := range st.Zones {
		for _, p := range z.Peers {
			if p.Tunnel == localapi.TunnelUp {
				up++
			}
		}
	}
	return up
}

// procCPU is a process's user plus system CPU time (/proc/PID/stat fields 14 and 15).
func procCPU(b *testing.B, pid int) time.Duration {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	require.NoError(b, err)
	s := string(raw)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	ut, err := strconv.ParseInt(f[11], 10, 64)
	require.NoError(b, err)
	st, err := strconv.ParseInt(f[12], 10, 64)
	require.NoError(b, err)
	const hz = 100 // USER_HZ on Linux
	return time.Duration(ut+st) * time.Second / hz
}

// procRSS is a process's resident set in bytes (/proc/PID/status VmRSS).
func procRSS(b *testing.B, pid int) int64 {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	require.NoError(b, err)
	for line := range strings.SplitSeq(string(raw), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			require.NoError(b, err)
			return kb << 10
		}
	}
	b.Fatal("no VmRSS")
	return 0
}
