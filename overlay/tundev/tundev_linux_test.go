package tundev

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

var (
	agentA  = netip.MustParsePrefix("100.80.1.2/32")
	agentB  = netip.MustParsePrefix("100.80.1.3/32")
	agent6  = netip.MustParsePrefix("fd7a:115c:a1e0::2/128")
	zone4   = netip.MustParsePrefix("100.80.0.0/16")
	zone6   = netip.MustParsePrefix("fd7a:115c:a1e0::/64")
	testCfg = Config{Name: "ute0", MTU: 1400, Addrs: []netip.Prefix{agentA, agent6}, Routes: []netip.Prefix{zone4, zone6}}
)

// ip runs iproute2 in the calling thread's namespace, an independent view of what the kernel holds.
func ip(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command("ip", args...).CombinedOutput()
	require.NoError(t, err, "ip %v: %s", args, out)
	return string(out)
}

func linkExists(name string) bool {
	_, err := net.InterfaceByName(name)
	return err == nil
}

// assertConfigured checks link, MTU, flags, addresses and routes as the kernel reports them.
func assertConfigured(t *testing.T, name string, mtu int, addrs, routes []netip.Prefix) {
	t.Helper()
	ifc, err := net.InterfaceByName(name)
	require.NoError(t, err)
	assert.Equal(t, mtu, ifc.MTU)
	assert.NotZero(t, ifc.Flags&net.FlagUp, "link is up")
	have, err := ifc.Addrs()
	require.NoError(t, err)
	var got []string
	for _, a := range have {
		got = append(got, a.String())
	}
	for _, p := range addrs {
		assert.Contains(t, got, p.String())
	}
	r4 := ip(t, "-4", "route", "show", "dev", name)
	r6 := ip(t, "-6", "route", "show", "dev", name)
	for _, p := range routes {
		assert.Contains(t, r4+r6, p.Masked().String()+" proto static")
	}
}

func TestOpenConfiguresAndCloseRemoves(t *testing.T) {
	inNetns(t, func() {
		d, err := Open(context.Background(), testCfg, nil)
		require.NoError(t, err)
		assert.Equal(t, "ute0", d.Name())
		assertConfigured(t, "ute0", 1400, testCfg.Addrs, testCfg.Routes)
		mtu, err := d.TUN().MTU()
		require.NoError(t, err)
		assert.Equal(t, 1400, mtu)

		// The kernel now sends packets for the zone into the device.
		out := ip(t, "-4", "route", "get", "100.80.9.9")
		assert.Contains(t, out, "dev ute0")
		assert.Contains(t, out, "src 100.80.1.2")

		require.NoError(t, d.Close())
		assert.False(t, linkExists("ute0"), "link removed by Close")
		assert.NotContains(t, ip(t, "-4", "route", "show"), "100.80.0.0/16")
		assert.NotContains(t, ip(t, "-6", "route", "show"), "fd7a:115c:a1e0::/64")
		assert.NotContains(t, ip(t, "addr", "show"), "100.80.1.2")
		require.NoError(t, d.Close(), "second Close is a no-op")
		require.ErrorIs(t, d.AddAddr(agentB), ErrClosed)
	})
}

func TestAddrAtRunTimeFromAnotherThread(t *testing.T) {
	inNetns(t, func() {
		d, err := Open(context.Background(), Config{Addrs: []netip.Prefix{agentA}, Routes: []netip.Prefix{zone4}}, nil)
		require.NoError(t, err)
		defer func() { require.NoError(t, d.Close()) }()
		assert.Equal(t, DefaultName, d.Name())

		// Agents are added by the local API's goroutines, which run on threads in the host's
		// namespace: the change must still land on this namespace's device.
		errc := make(chan error, 1)
		go func() { errc <- d.AddAddr(agentB) }()
		require.NoError(t, <-errc)
		require.NoError(t, d.AddAddr(agentB), "adding twice is a no-op")
		assertConfigured(t, "ute0", DefaultMTU, []netip.Prefix{agentA, agentB}, []netip.Prefix{zone4})
		assert.ElementsMatch(t, []netip.Prefix{agentA, agentB}, d.Addrs())

		go func() { errc <- d.RemoveAddr(agentB) }()
		require.NoError(t, <-errc)
		assert.NotContains(t, ip(t, "addr", "show", "dev", "ute0"), "100.80.1.3")
		assert.Contains(t, ip(t, "addr", "show", "dev", "ute0"), "100.80.1.2")
		require.NoError(t, d.RemoveAddr(agentB), "removing an address not held is a no-op")
	})
	assert.False(t, linkExists("ute0"), "the host namespace never saw the device")
}

func TestOpenRefusesBadConfig(t *testing.T) {
	for _, c := range []Config{
		{Name: "this-name-is-too-long"},
		{Name: "a/b"},
		{MTU: 100},
		{Addrs: []netip.Prefix{{}}},
		{Routes: []netip.Prefix{netip.MustParsePrefix("::ffff:1.2.3.4/128")}},
	} {
		_, err := Open(context.Background(), c, nil)
		require.ErrorIs(t, err, ErrBadConfig, "%+v", c)
	}
	require.ErrorIs(t, Cleanup("x/y"), ErrBadConfig)
}

func TestSecondOpenIsInUseAndLeavesFirstAlone(t *testing.T) {
	inNetns(t, func() {
		d, err := Open(context.Background(), testCfg, nil)
		require.NoError(t, err)
		defer func() { require.NoError(t, d.Close()) }()
		_, err = Open(context.Background(), testCfg, nil)
		require.ErrorIs(t, err, ErrInUse)
		require.ErrorIs(t, Cleanup("ute0"), ErrInUse)
		assertConfigured(t, "ute0", 1400, testCfg.Addrs, testCfg.Routes)
	})
}

func TestOtherKindOfLinkIsNeverRemoved(t *testing.T) {
	inNetns(t, func() {
		ip(t, "link", "add", "ute0", "type", "veth", "peer", "name", "ute0peer")
		_, err := Open(context.Background(), testCfg, nil)
		require.ErrorIs(t, err, ErrNotTUN)
		require.ErrorIs(t, Cleanup("ute0"), ErrNotTUN)
		assert.Contains(t, ip(t, "-d", "link", "show", "ute0"), "veth")
	})
}

// makePersistentTUN leaves a TUN device no process holds, with an address and a route: what a
// hand-made `ip tuntap add` or a persistent device from another tool looks like.
func makePersistentTUN(t *testing.T, name string) {
	t.Helper()
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	require.NoError(t, err)
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq(name)
	require.NoError(t, err)
	ifr.SetUint16(unix.IFF_TUN | unix.IFF_NO_PI)
	require.NoError(t, unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr))
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.TUNSETPERSIST, 1)
	require.Zero(t, errno)
	ip(t, "addr", "add", "100.80.7.7/32", "dev", name)
	ip(t, "link", "set", name, "up")
	ip(t, "route", "add", "100.81.0.0/16", "dev", name)
}

func TestLeftoverIsCleanedUp(t *testing.T) {
	inNetns(t, func() {
		makePersistentTUN(t, "ute0")
		require.True(t, linkExists("ute0"))
		require.NoError(t, Cleanup("ute0"))
		assert.False(t, linkExists("ute0"))
		assert.NotContains(t, ip(t, "route", "show"), "100.81.0.0/16")
		require.NoError(t, Cleanup("ute0"), "idempotent")

		// Open does the same before creating its own.
		makePersistentTUN(t, "ute0")
		d, err := Open(context.Background(), testCfg, nil)
		require.NoError(t, err)
		assert.NotContains(t, ip(t, "addr", "show", "dev", "ute0"), "100.80.7.7")
		require.NoError(t, d.Close())
		assert.False(t, linkExists("ute0"))
	})
}

// TestCrashLeavesNothing kills a process holding a configured device with SIGKILL: the kernel
// removes the device with its addresses and routes, and the next Open succeeds.
func TestCrashLeavesNothing(t *testing.T) {
	inNetns(t, func() {
		cmd := exec.Command(os.Args[0], "-test.run=^TestHelperHoldDevice$")
		cmd.Env = append(os.Environ(), "UTE_TUNDEV_HELPER=1")
		cmd.Stderr = os.Stderr
		out, err := cmd.StdoutPipe()
		require.NoError(t, err)
		require.NoError(t, cmd.Start())
		ready := make(chan string, 1)
		go func() {
			line, _ := bufio.NewReader(out).ReadString('\n')
			ready <- line
		}()
		select {
		case line := <-ready:
			require.Equal(t, "ready\n", line)
		case <-time.After(20 * time.Second):
			_ = cmd.Process.Kill()
			t.Fatal("helper did not open the device")
		}
		assertConfigured(t, "ute0", 1400, testCfg.Addrs, testCfg.Routes)
		require.NoError(t, cmd.Process.Signal(syscall.SIGKILL))
		_ = cmd.Wait()

		require.Eventually(t, func() bool { return !linkExists("ute0") }, 5*time.Second, 20*time.Millisecond)
		assert.NotContains(t, ip(t, "route", "show"), "100.80.0.0/16")
		require.NoError(t, Cleanup("ute0"))
		d, err := Open(context.Background(), testCfg, nil)
		require.NoError(t, err)
		require.NoError(t, d.Close())
	})
}

// TestHelperHoldDevice is the process TestCrashLeavesNothing kills.
func TestHelperHoldDevice(t *testing.T) {
	if os.Getenv("UTE_TUNDEV_HELPER") != "1" {
		t.Skip("helper process for TestCrashLeavesNothing")
	}
	if _, err := Open(context.Background(), testCfg, nil); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	fmt.Println("ready")
	time.Sleep(time.Minute)
	os.Exit(3)
}

// TestOpenUnprivilegedIsErrPermission runs Open as user nobody: the refusal is ErrPermission,
// which the daemon turns into "needs root ... run --interface proxy".
func TestOpenUnprivilegedIsErrPermission(t *testing.T) {
	if os.Getenv("UTE_TUNDEV_NOBODY") == "1" {
		_, err := Open(context.Background(), Config{Name: "ute9"}, nil)
		fmt.Println(errors.Is(err, ErrPermission), err)
		return
	}
	inNetns(t, func() {
		// A copy of the test binary that user nobody can run.
		dir := t.TempDir()
		for d := dir; d != "/" && d != os.TempDir(); d = filepath.Dir(d) {
			require.NoError(t, os.Chmod(d, 0o755))
		}
		exe, err := os.Executable()
		require.NoError(t, err)
		b, err := os.ReadFile(exe)
		require.NoError(t, err)
		bin := filepath.Join(dir, "tundev.test")
		require.NoError(t, os.WriteFile(bin, b, 0o755))
		cmd := exec.Command(bin, "-test.run=^TestOpenUnprivilegedIsErrPermission$")
		cmd.Env = append(os.Environ(), "UTE_TUNDEV_NOBODY=1")
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
		out, err := cmd.CombinedOutput()
		require.NoError(t, err, "%s", out)
		assert.Contains(t, string(out), "true tundev: operation needs root")
		assert.False(t, linkExists("ute9"))
	})
}
