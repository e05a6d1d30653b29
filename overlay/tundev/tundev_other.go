//go:build !linux

package tundev

import (
	"context"
	"log/slog"
	"net/netip"

	"golang.zx2c4.com/wireguard/tun"
)

// Device is a kernel TUN interface; only built on Linux.
type Device struct{}

// Open returns ErrUnsupported outside Linux.
func Open(context.Context, Config, *slog.Logger) (*Device, error) { return nil, ErrUnsupported }

// Cleanup returns ErrUnsupported outside Linux.
func Cleanup(string) error { return ErrUnsupported }

func (d *Device) TUN() tun.Device               { return nil }
func (d *Device) Name() string                  { return "" }
func (d *Device) Index() int                    { return 0 }
func (d *Device) Addrs() []netip.Prefix         { return nil }
func (d *Device) AddAddr(netip.Prefix) error    { return ErrUnsupported }
func (d *Device) RemoveAddr(netip.Prefix) error { return ErrUnsupported }
func (d *Device) Close() error                  { return nil }
