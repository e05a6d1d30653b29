package main

import (
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"syscall"

	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/tun"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "wgbase:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	fs := flag.NewFlagSet("wgbase", flag.ContinueOnError)
	name := fs.String("name", "wg0", "interface name")
	mtu := fs.Int("mtu", 1420, "interface MTU")
	key := fs.String("key", "", "this device's private key, hex")
	port := fs.Int("port", 51820, "UDP listen port")
	peer := fs.String("peer", "", "the peer's public key, hex")
	endpoint := fs.String("endpoint", "", "the peer's IP:port")
	allowed := fs.String("allowed", "", "the peer's allowed IPs, CIDR")
	addr := fs.String("addr", "", "this interface's address, CIDR")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *key == "" || *peer == "" || *endpoint == "" || *allowed == "" || *addr == "" {
		return fmt.Errorf("-key, -peer, -endpoint, -allowed and -addr are required")
	}
	td, err := tun.CreateTUN(*name, *mtu)
	if err != nil {
		return fmt.Errorf("creating TUN %s: %w", *name, err)
	}
	dev := device.NewDevice(td, conn.NewDefaultBind(), device.NewLogger(device.LogLevelError, "wgbase: "))
	defer dev.Close()
	cfg := fmt.Sprintf("private_key=%s\nlisten_port=%d\nreplace_peers=true\npublic_key=%s\nendpoint=%s\nreplace_allowed_ips=true\nallowed_ip=%s\n",
		*key, *port, *peer, *endpoint, *allowed)
	if err := dev.IpcSet(cfg); err != nil {
		return fmt.Errorf("configuring the device: %w", err)
	}
	if err := dev.Up(); err != nil {
		return fmt.Errorf("device up: %w", err)
	}
	for _, a := range [][]string{{"addr", "add", *addr, "dev", *name}, {"link", "set", *name, "up"}} {
		if out, err := exec.Command("ip", a...).CombinedOutput(); err != nil {
			return fmt.Errorf("ip %s: %w: %s", strings.Join(a, " "), err, out)
		}
	}
	fmt.Println("ready")
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	select {
	case <-sig:
	case <-dev.Wait():
	}
	return nil
}
