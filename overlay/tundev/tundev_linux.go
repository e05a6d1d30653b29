//go:build linux

package tundev

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"slices"
	"sync"

	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/tun"
)

// Device is a kernel TUN interface created by Open. Its methods may be called from any
// goroutine: every change goes through the rtnetlink socket opened in the network namespace the
// device was created in.
type Device struct {
	name  string
	index int32
	log   *slog.Logger
	nl    *rtnl
	dev   *eventTUN

	mu     sync.Mutex
	addrs  []netip.Prefix
	closed bool

	drained chan struct{} // closed when the event drainer has stopped
}

// Open removes a leftover interface of that name (see Cleanup), creates the TUN device, sets
// its MTU, assigns cfg.Addrs, brings the link up and routes cfg.Routes into it. On any error
// everything it created is removed again. It acts in the calling thread's network namespace.
func Open(ctx context.Context, cfg Config, log *slog.Logger) (*Device, error) {
	cfg = cfg.withDefaults()
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if !validName(cfg.Name) {
		return nil, fmt.Errorf("%w: interface name %q (1-15 printable bytes, no '/' or ':')", ErrBadConfig, cfg.Name)
	}
	if cfg.MTU < 576 || cfg.MTU > 65535 {
		return nil, fmt.Errorf("%w: MTU %d (576-65535)", ErrBadConfig, cfg.MTU)
	}
	for _, p := range append(slices.Clone(cfg.Addrs), cfg.Routes...) {
		if !p.IsValid() || p.Addr().Zone() != "" || p.Addr().Is4In6() {
			return nil, fmt.Errorf("%w: prefix %v", ErrBadConfig, p)
		}
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	nl, err := openRTNL()
	if err != nil {
		return nil, permission(err)
	}
	if err := cleanup(nl, cfg.Name, log); err != nil {
		_ = nl.close()
		return nil, err
	}
	raw, err := tun.CreateTUN(cfg.Name, cfg.MTU)
	if err != nil {
		_ = nl.close()
		return nil, permission(fmt.Errorf("tundev: create %s: %w", cfg.Name, err))
	}
	d := &Device{name: cfg.Name, log: log, nl: nl, drained: make(chan struct{})}
	d.dev = newEventTUN(raw)
	go func() {
		defer close(d.drained)
		d.dev.pump()
	}()
	li, err := nl.linkByName(cfg.Name)
	if err != nil {
		return nil, d.fail(fmt.Errorf("tundev: find %s after creating it: %w", cfg.Name, err))
	}
	d.index = li.index
	for _, p := range cfg.Addrs {
		if err := d.AddAddr(p); err != nil {
			return nil, d.fail(err)
		}
	}
	if err := nl.setUp(d.index); err != nil {
		return nil, d.fail(fmt.Errorf("tundev: set %s up: %w", cfg.Name, err))
	}
	for _, p := range cfg.Routes {
		if err := nl.route(true, d.index, p); err != nil {
			return nil, d.fail(fmt.Errorf("tundev: route %v dev %s: %w", p.Masked(), cfg.Name, err))
		}
	}
	log.Info("tun interface up", "name", cfg.Name, "index", d.index, "mtu", cfg.MTU,
		"addrs", fmt.Sprint(cfg.Addrs), "routes", fmt.Sprint(cfg.Routes))
	return d, nil
}

func (d *Device) fail(err error) error {
	if cerr := d.Close(); cerr != nil {
		err = errors.Join(err, cerr)
	}
	return permission(err)
}

// permission adds ErrPermission to an EPERM or EACCES so that callers can tell "not root" from a
// real failure.
func permission(err error) error {
	if errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES) {
		return fmt.Errorf("%w: %w", ErrPermission, err)
	}
	return err
}

// TUN returns the device to read and write packets on. Its Events channel is fed by the
// device's own drainer: events nobody reads are dropped rather than blocking wireguard-go's
// listeners.
func (d *Device) TUN() tun.Device { return d.dev }

// Name returns the interface name.
func (d *Device) Name() string { return d.name }

// Index returns the interface index.
func (d *Device) Index() int { return int(d.index) }

// Addrs returns the addresses currently assigned by this Device.
func (d *Device) Addrs() []netip.Prefix {
	d.mu.Lock()
	defer d.mu.Unlock()
	return slices.Clone(d.addrs)
}

// AddAddr assigns one more address (an agent added at run time). Adding an address already
// assigned by this Device is a no-op.
func (d *Device) AddAddr(p netip.Prefix) error {
	if !p.IsValid() || p.Addr().Zone() != "" {
		return fmt.Errorf("%w: address %v", ErrBadConfig, p)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return ErrClosed
	}
	if slices.Contains(d.addrs, p) {
		return nil
	}
	if err := d.nl.addr(true, d.index, p); err != nil {
		return permission(fmt.Errorf("tundev: add address %v to %s: %w", p, d.name, err))
	}
	d.addrs = append(d.addrs, p)
	return nil
}

// RemoveAddr removes an address this Device assigned. Removing one it does not hold is a no-op.
func (d *Device) RemoveAddr(p netip.Prefix) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return ErrClosed
	}
	i := slices.Index(d.addrs, p)
	if i < 0 {
		return nil
	}
	if err := d.nl.addr(false, d.index, p); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) {
		return fmt.Errorf("tundev: remove address %v from %s: %w", p, d.name, err)
	}
	d.addrs = slices.Delete(d.addrs, i, i+1)
	return nil
}

// Close closes the TUN device, which makes the kernel delete the link together with its
// addresses and routes, then checks that it is gone and deletes it if someone made it
// persistent meanwhile. It is safe to call more than once.
//
// Closing first, rather than deleting routes and addresses one by one, leaves no window in which
// the link is up with part of its routes, and sends wireguard-go's netlink listener no events
// while it is being shut down (it can race on its cancel pipe then, which surfaces as EPIPE).
func (d *Device) Close() error {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return nil
	}
	d.closed = true
	d.addrs = nil
	d.mu.Unlock()

	var errs []error
	if err := d.dev.Close(); err != nil && !errors.Is(err, os.ErrClosed) && !errors.Is(err, unix.EPIPE) {
		errs = append(errs, fmt.Errorf("tundev: close %s: %w", d.name, err))
	}
	<-d.drained
	if d.index != 0 {
		if li, err := d.nl.linkByIndex(d.index); err == nil && li.name == d.name && li.kind == "tun" {
			if err := d.nl.delLink(d.index); err != nil && !gone(err) {
				errs = append(errs, fmt.Errorf("tundev: delete link %s: %w", d.name, err))
			}
		}
	}
	if err := d.nl.close(); err != nil {
		errs = append(errs, err)
	}
	d.log.Info("tun interface removed", "name", d.name)
	return errors.Join(errs...)
}

// gone: the object to remove no longer exists (the link went first, taking its routes and
// addresses with it).
func gone(err error) bool {
	return errors.Is(err, unix.ENODEV) || errors.Is(err, unix.ESRCH) ||
		errors.Is(err, unix.EADDRNOTAVAIL) || errors.Is(err, unix.ENOENT) || errors.Is(err, errNoLink)
}

// Cleanup removes a leftover interface of that name in the calling thread's network namespace:
// a TUN device no process holds open (a persistent one from an earlier run or made by hand).
// Its addresses and routes go with it. No interface of that name is not an error. A TUN device
// in use is ErrInUse and any other kind of link ErrNotTUN; neither is touched.
//
// A daemon killed with SIGKILL leaves nothing behind: the kernel deletes a non-persistent TUN
// device, with its addresses and routes, when its last descriptor closes. Cleanup is for what
// that does not cover.
func Cleanup(name string) error {
	if !validName(name) {
		return fmt.Errorf("%w: interface name %q", ErrBadConfig, name)
	}
	nl, err := openRTNL()
	if err != nil {
		return permission(err)
	}
	defer func() { _ = nl.close() }()
	return cleanup(nl, name, slog.New(slog.DiscardHandler))
}

func cleanup(nl *rtnl, name string, log *slog.Logger) error {
	li, err := nl.linkByName(name)
	if errors.Is(err, errNoLink) {
		return nil
	}
	if err != nil {
		return permission(fmt.Errorf("tundev: %w", err))
	}
	if li.kind != "tun" {
		return fmt.Errorf("%w: %s (kind %q); choose another --tun-name or remove it", ErrNotTUN, name, li.kind)
	}
	if li.inUse() {
		return fmt.Errorf("%w: %s (another daemon, or a previous one still running?)", ErrInUse, name)
	}
	if err := nl.delLink(li.index); err != nil && !gone(err) {
		return permission(fmt.Errorf("tundev: delete leftover %s: %w", name, err))
	}
	log.Warn("removed a leftover tun interface", "name", name, "persistent", li.persist)
	return nil
}

// eventTUN wraps the kernel device so that its event channel never blocks wireguard-go's
// listener goroutines (they send Up/Down/MTU events unbuffered past 5): a drainer forwards them
// to a buffered channel and drops what nobody reads.
type eventTUN struct {
	tun.Device
	events chan tun.Event
}

func newEventTUN(d tun.Device) *eventTUN {
	return &eventTUN{Device: d, events: make(chan tun.Event, 16)}
}

// pump runs until the underlying device closes its event channel (on Close).
func (e *eventTUN) pump() {
	defer close(e.events)
	for ev := range e.Device.Events() {
		select {
		case e.events <- ev:
		default:
		}
	}
}

func (e *eventTUN) Events() <-chan tun.Event { return e.events }
