package netlab

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Prefix starts the name of every namespace a lab creates: Prefix + PID of the creating process +
// "-" + a random run id + "-" + the host name. The PID lets the next run tell a crashed run's
// leftovers (PID gone) from a run still in progress (PID alive).
const Prefix = "utl-"

// netnsDir is where `ip netns` keeps its named namespaces.
const netnsDir = "/run/netns"

// ErrNotRoot is returned by Available when the process cannot create namespaces.
var ErrNotRoot = errors.New("netlab: network namespaces need root")

// ErrNoIP is returned by Available when iproute2's ip is not installed.
var ErrNoIP = errors.New("netlab: iproute2 (ip) is not installed")

// Options shape a lab.
type Options struct {
	// Hosts names the hosts, in order; each becomes a namespace. Names are short words
	// ([a-z0-9]{1,8}); "br" is reserved for the bridge.
	Hosts []string
	// Subnet is the underlay; host i gets address i+1 in it. Default 10.99.0.0/24.
	Subnet netip.Prefix
	// MTU of every veth and the bridge. Default 1500.
	MTU int
}

// Lab is a set of hosts on one bridge. Its methods are safe for concurrent use.
type Lab struct {
	tb     testing.TB
	id     string // Prefix + pid + "-" + run id + "-"
	bridge string // the bridge's namespace
	subnet netip.Prefix
	logDir string

	mu     sync.Mutex
	hosts  []*Host
	procs  []*Proc
	closed bool
}

// Available reports why a lab cannot be built here (nil when it can).
func Available() error {
	if os.Geteuid() != 0 {
		return ErrNotRoot
	}
	if _, err := exec.LookPath("ip"); err != nil {
		return ErrNoIP
	}
	return nil
}

var hostName = regexp.MustCompile(`^[a-z0-9]{1,8}$`)

// New builds the lab, or skips the test with a message when it is not run as root or ip is
// missing. Leftovers of crashed runs are removed first. Everything is removed by t.Cleanup.
func New(tb testing.TB, opts Options) *Lab {
	tb.Helper()
	if err := Available(); err != nil {
		tb.Skipf("skipping the network-namespace lab: %v (run as root with iproute2 installed, as `make test` does in CI)", err)
	}
	if len(opts.Hosts) == 0 {
		tb.Fatal("netlab: Options.Hosts is empty")
	}
	if !opts.Subnet.IsValid() {
		opts.Subnet = netip.MustParsePrefix("10.99.0.0/24")
	}
	if opts.MTU == 0 {
		opts.MTU = 1500
	}
	if hosts := 1<<(opts.Subnet.Addr().BitLen()-opts.Subnet.Bits()) - 2; len(opts.Hosts) > hosts {
		tb.Fatalf("netlab: %d hosts do not fit %s", len(opts.Hosts), opts.Subnet)
	}
	if err := Sweep(context.Background()); err != nil {
		tb.Logf("netlab: sweeping leftovers of earlier runs: %v", err)
	}
	rid := make([]byte, 3)
	_, _ = rand.Read(rid)
	l := &Lab{
		tb:     tb,
		id:     fmt.Sprintf("%s%d-%s-", Prefix, os.Getpid(), hex.EncodeToString(rid)),
		subnet: opts.Subnet.Masked(),
		logDir: tb.TempDir(),
	}
	l.bridge = l.id + "br"
	tb.Cleanup(func() {
		if err := l.Close(); err != nil {
			tb.Errorf("netlab: cleanup: %v", err)
		}
	})
	if err := l.build(opts); err != nil {
		tb.Fatalf("netlab: building the lab: %v", err)
	}
	return l
}

func (l *Lab) build(opts Options) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	mtu := strconv.Itoa(opts.MTU)
	if err := l.addNS(ctx, l.bridge); err != nil {
		return err
	}
	if err := ipCmd(ctx, "-n", l.bridge, "link", "add", "br0", "mtu", mtu, "type", "bridge"); err != nil {
		return err
	}
	if err := ipCmd(ctx, "-n", l.bridge, "link", "set", "br0", "up"); err != nil {
		return err
	}
	addr := l.subnet.Addr()
	seen := map[string]bool{}
	for i, name := range opts.Hosts {
		if !hostName.MatchString(name) || name == "br" || seen[name] {
			return fmt.Errorf("host name %q: use a unique short word of a-z and 0-9 (at most 8), not br", name)
		}
		seen[name] = true
		addr = addr.Next()
		h := &Host{lab: l, Name: name, NS: l.id + name, Addr: addr, Prefix: netip.PrefixFrom(addr, l.subnet.Bits()), port: fmt.Sprintf("p%d", i)}
		if err := l.addNS(ctx, h.NS); err != nil {
			return err
		}
		l.mu.Lock()
		l.hosts = append(l.hosts, h)
		l.mu.Unlock()
		// Both ends are created directly in their namespaces: nothing ever exists in the root one.
		steps := [][]string{
			{"-n", l.bridge, "link", "add", h.port, "mtu", mtu, "type", "veth", "peer", "name", "eth0", "mtu", mtu, "netns", h.NS},
			{"-n", l.bridge, "link", "set", h.port, "master", "br0"},
			{"-n", l.bridge, "link", "set", h.port, "up"},
			{"-n", h.NS, "link", "set", "lo", "up"},
			{"-n", h.NS, "addr", "add", h.Prefix.String(), "dev", "eth0"},
			{"-n", h.NS, "link", "set", "eth0", "up"},
		}
		for _, s := range steps {
			if err := ipCmd(ctx, s...); err != nil {
				return err
			}
		}
	}
	return nil
}

func (l *Lab) addNS(ctx context.Context, name string) error {
	return ipCmd(ctx, "netns", "add", name)
}

// ID is the prefix of every namespace of this lab.
func (l *Lab) ID() string { return l.id }

// Subnet is the underlay subnet.
func (l *Lab) Subnet() netip.Prefix { return l.subnet }

// LogDir is the directory (a t.TempDir) where processes' output files are kept.
func (l *Lab) LogDir() string { return l.logDir }

// Hosts returns the hosts in the order of Options.Hosts.
func (l *Lab) Hosts() []*Host {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.hosts)
}

// Host returns the host named name, failing the test if there is none.
func (l *Lab) Host(name string) *Host {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, h := range l.hosts {
		if h.Name == name {
			return h
		}
	}
	l.tb.Fatalf("netlab: no host %q", name)
	return nil
}

// Close stops every process started through the lab (SIGTERM, then SIGKILL after 5 s), kills any
// other process left in its namespaces, and deletes the namespaces, which deletes every veth and
// the bridge with them. It is idempotent; t.Cleanup calls it.
func (l *Lab) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil
	}
	l.closed = true
	procs := slices.Clone(l.procs)
	hosts := slices.Clone(l.hosts)
	l.mu.Unlock()

	var errs []error
	for _, p := range slices.Backward(procs) {
		_ = p.Stop()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	names := []string{l.bridge}
	for _, h := range hosts {
		names = append(names, h.NS)
	}
	for _, ns := range names {
		if err := removeNS(ctx, ns); err != nil {
			errs = append(errs, err)
		}
	}
	if left := l.Leftovers(); len(left) > 0 {
		errs = append(errs, fmt.Errorf("namespaces left after close: %s", strings.Join(left, ", ")))
	}
	return errors.Join(errs...)
}

// Leftovers lists the namespaces of this lab that exist (none after Close).
func (l *Lab) Leftovers() []string {
	names, _ := listNS()
	var out []string
	for _, n := range names {
		if strings.HasPrefix(n, l.id) {
			out = append(out, n)
		}
	}
	return out
}

// listNS returns the names of the named network namespaces.
func listNS() ([]string, error) {
	ents, err := os.ReadDir(netnsDir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("listing %s: %w", netnsDir, err)
	}
	out := make([]string, 0, len(ents))
	for _, e := range ents {
		out = append(out, e.Name())
	}
	return out, nil
}

var leftoverName = regexp.MustCompile(`^` + regexp.QuoteMeta(Prefix) + `(\d+)-[0-9a-f]+-`)

// Sweep removes the namespaces (and the processes in them) of labs whose creating process no
// longer exists: what a run killed before its cleanup ran (a test timeout, SIGKILL) left behind.
// Namespaces of live processes are never touched.
func Sweep(ctx context.Context) error {
	names, err := listNS()
	if err != nil {
		return err
	}
	var errs []error
	for _, n := range names {
		m := leftoverName.FindStringSubmatch(n)
		if m == nil {
			continue
		}
		pid, err := strconv.Atoi(m[1])
		if err != nil || pid <= 0 || processAlive(pid) {
			continue
		}
		if err := removeNS(ctx, n); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func processAlive(pid int) bool {
	err := syscall.Kill(pid, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}

// removeNS kills every process inside the namespace, then deletes it. A namespace with a process
// left in it would outlive `ip netns del` (the process holds it), with its links.
func removeNS(ctx context.Context, ns string) error {
	if _, err := os.Stat(filepath.Join(netnsDir, ns)); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	for try := 0; try < 50; try++ {
		out, err := exec.CommandContext(ctx, "ip", "netns", "pids", ns).Output()
		if err != nil {
			break
		}
		pids := strings.Fields(string(out))
		if len(pids) == 0 {
			break
		}
		for _, s := range pids {
			if pid, err := strconv.Atoi(s); err == nil {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := ipCmd(ctx, "netns", "del", ns); err != nil {
		if _, serr := os.Stat(filepath.Join(netnsDir, ns)); errors.Is(serr, os.ErrNotExist) {
			return nil
		}
		return err
	}
	return nil
}

// ipCmd runs ip with args and returns its error with its output.
func ipCmd(ctx context.Context, args ...string) error {
	cmd := exec.CommandContext(ctx, "ip", args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("ip %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(out.String()))
	}
	return nil
}
