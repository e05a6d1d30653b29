package tundev

import (
	"errors"
	"net/netip"
)

// DefaultName is the interface name used when Config.Name is empty.
const DefaultName = "ute0"

// DefaultMTU is the MTU used when Config.MTU is zero; the carriage that reads the device picks
// its own (tunstack.DefaultMTU, the WireGuard transport's 1,420).
const DefaultMTU = 1500

// Sentinel errors, checked with errors.Is.
var (
	// ErrInUse: an interface of that name is a TUN device that some process holds open (another
	// daemon, or a previous one that is still running). It is never removed.
	ErrInUse = errors.New("tundev: interface is in use by a running process")
	// ErrNotTUN: an interface of that name exists and is not a TUN device. It is never removed.
	ErrNotTUN = errors.New("tundev: interface exists and is not a TUN device")
	// ErrBadConfig: a name, MTU, address or route that cannot be used.
	ErrBadConfig = errors.New("tundev: bad configuration")
	// ErrClosed: the device was closed.
	ErrClosed = errors.New("tundev: device closed")
	// ErrUnsupported: kernel TUN interfaces are only built on Linux.
	ErrUnsupported = errors.New("tundev: kernel TUN is supported on Linux only")
	// ErrPermission: creating or configuring the interface needs root (CAP_NET_ADMIN).
	ErrPermission = errors.New("tundev: operation needs root (CAP_NET_ADMIN)")
)

// Config describes the interface to create.
type Config struct {
	// Name of the interface; DefaultName when empty. At most 15 bytes (IFNAMSIZ-1).
	Name string
	// MTU of the interface; DefaultMTU when zero.
	MTU int
	// Addrs are the local agents' overlay addresses, normally each a /32 (or /128).
	Addrs []netip.Prefix
	// Routes are the zone CIDRs routed into the interface.
	Routes []netip.Prefix
}

func (c Config) withDefaults() Config {
	if c.Name == "" {
		c.Name = DefaultName
	}
	if c.MTU == 0 {
		c.MTU = DefaultMTU
	}
	return c
}

func validName(name string) bool {
	if name == "" || len(name) > 15 || name == "." || name == ".." {
		return false
	}
	for _, r := range name {
		if r <= ' ' || r == '/' || r == ':' || r > '~' {
			return false
		}
	}
	return true
}
