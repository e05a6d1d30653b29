package netlab

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Host is one namespace of the lab with its link eth0 on the bridge.
type Host struct {
	lab    *Lab
	Name   string       // as in Options.Hosts
	NS     string       // the namespace's name (`ip netns exec NS ...`)
	Addr   netip.Addr   // eth0's address on the underlay
	Prefix netip.Prefix // Addr with the subnet's length
	port   string       // the veth end in the bridge's namespace

	mu      sync.Mutex
	cut     bool
	dropped bool
}

// ErrClosed is returned when the lab was closed.
var ErrClosed = errors.New("netlab: lab closed")

// Command returns `ip netns exec NS name args...`, not started. It runs in the host's network
// namespace and nowhere else: same file system, same PID namespace, same users.
func (h *Host) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", h.NS, name}, args...)...)
}

// Run runs a command in the host and returns its combined output; the error carries the output.
func (h *Host) Run(ctx context.Context, name string, args ...string) (string, error) {
	cmd := h.Command(ctx, name, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	if err != nil {
		return out.String(), fmt.Errorf("%s %s in %s: %w: %s", name, strings.Join(args, " "), h.Name, err, strings.TrimSpace(out.String()))
	}
	return out.String(), nil
}

// Start starts a long-running process in the host, with stdout and stderr captured to a file in
// the lab's log directory. The lab stops it at Close (SIGTERM to its process group, then
// SIGKILL); it is also killed if the goroutine-owning thread of the test process dies (Pdeathsig).
func (h *Host) Start(name string, args ...string) (*Proc, error) {
	return h.StartEnv(nil, name, args...)
}

// StartEnv is Start with extra environment variables ("K=V") on top of the test's own.
func (h *Host) StartEnv(env []string, name string, args ...string) (*Proc, error) {
	l := h.lab
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return nil, ErrClosed
	}
	path := filepath.Join(l.logDir, fmt.Sprintf("%02d-%s-%s.log", len(l.procs), h.Name, filepath.Base(name)))
	f, err := os.Create(path)
	if err != nil {
		return nil, fmt.Errorf("netlab: output file: %w", err)
	}
	cmd := exec.Command("ip", append([]string{"netns", "exec", h.NS, name}, args...)...)
	cmd.Env = append(os.Environ(), env...)
	// A file, not a pipe: the process may outlive the reader, and Wait must not block on its
	// children holding the pipe.
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("netlab: starting %s in %s: %w", name, h.Name, err)
	}
	p := &Proc{Host: h, Name: name, Args: args, LogPath: path, cmd: cmd, out: f, done: make(chan struct{})}
	go p.wait()
	l.procs = append(l.procs, p)
	return p, nil
}

// Cut takes the host's link down at both ends, as if its cable were pulled: its sends fail at
// once (no route) and nothing reaches it.
func (h *Host) Cut(ctx context.Context) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if err := ipCmd(ctx, "-n", h.NS, "link", "set", "eth0", "down"); err != nil {
		return err
	}
	if err := ipCmd(ctx, "-n", h.lab.bridge, "link", "set", h.port, "down"); err != nil {
		return err
	}
	h.cut = true
	return nil
}

// Drop takes the host's port off the bridge while its link stays up: every packet it sends and
// every packet for it is silently lost, as on a partition that no interface notices.
func (h *Host) Drop(ctx context.Context) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if err := ipCmd(ctx, "-n", h.lab.bridge, "link", "set", h.port, "nomaster"); err != nil {
		return err
	}
	h.dropped = true
	return nil
}

// Restore undoes Cut and Drop. The host's address and its subnet route come back with the link.
func (h *Host) Restore(ctx context.Context) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.dropped {
		if err := ipCmd(ctx, "-n", h.lab.bridge, "link", "set", h.port, "master", "br0"); err != nil {
			return err
		}
		h.dropped = false
	}
	if h.cut {
		if err := ipCmd(ctx, "-n", h.lab.bridge, "link", "set", h.port, "up"); err != nil {
			return err
		}
		if err := ipCmd(ctx, "-n", h.NS, "link", "set", "eth0", "up"); err != nil {
			return err
		}
		h.cut = false
	}
	return nil
}

// Do runs fn on an OS thread switched into the host's network namespace. Sockets fn creates stay
// in that namespace for their whole life, whatever thread later uses them; fn must not start
// goroutines that create sockets. If the thread cannot be switched back, it is left locked, so
// the runtime discards it when the goroutine ends.
func (h *Host) Do(fn func() error) error {
	target, err := os.Open(filepath.Join(netnsDir, h.NS))
	if err != nil {
		return fmt.Errorf("netlab: opening namespace %s: %w", h.NS, err)
	}
	defer func() { _ = target.Close() }()
	errc := make(chan error, 1)
	// A goroutine of its own, so a thread that cannot be restored dies with it, never with the
	// caller's goroutine.
	go func() {
		runtime.LockOSThread()
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("netlab: opening this thread's namespace: %w", err)
			return
		}
		defer func() { _ = orig.Close() }()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("netlab: entering %s: %w", h.NS, err)
			return
		}
		ferr := fn()
		if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- errors.Join(ferr, fmt.Errorf("netlab: leaving %s: %w", h.NS, err))
			return // the thread stays locked and is destroyed with this goroutine
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// Listen opens a listener inside the host (net.Listen semantics).
func (h *Host) Listen(network, addr string) (net.Listener, error) {
	var ln net.Listener
	err := h.Do(func() error {
		var err error
		ln, err = net.Listen(network, addr)
		return err
	})
	return ln, err
}

// ListenPacket opens a packet socket inside the host (net.ListenPacket semantics).
func (h *Host) ListenPacket(network, addr string) (net.PacketConn, error) {
	var pc net.PacketConn
	err := h.Do(func() error {
		var err error
		pc, err = net.ListenPacket(network, addr)
		return err
	})
	return pc, err
}

// Dial connects from inside the host. addr must be an IP literal and port: a name would be
// resolved on other threads.
func (h *Host) Dial(ctx context.Context, network, addr string) (net.Conn, error) {
	var c net.Conn
	err := h.Do(func() error {
		var d net.Dialer
		var err error
		c, err = d.DialContext(ctx, network, addr)
		return err
	})
	return c, err
}

// DialFrom is Dial with the local address laddr (an IP literal and port, port 0 for any), e.g.
// an agent's overlay IP.
func (h *Host) DialFrom(ctx context.Context, network, laddr, raddr string) (net.Conn, error) {
	var c net.Conn
	err := h.Do(func() error {
		la, err := net.ResolveTCPAddr(network, laddr)
		if err != nil {
			return err
		}
		d := net.Dialer{LocalAddr: la}
		c, err = d.DialContext(ctx, network, raddr)
		return err
	})
	return c, err
}

// Ping sends one ICMP echo request from the host to dst and waits for the reply until ctx ends.
func (h *Host) Ping(ctx context.Context, dst netip.Addr) (time.Duration, error) {
	pc, err := h.ListenPacket("ip4:icmp", "0.0.0.0")
	if err != nil {
		return 0, fmt.Errorf("netlab: icmp socket in %s: %w", h.Name, err)
	}
	defer func() { _ = pc.Close() }()
	return ping(ctx, pc, dst)
}
