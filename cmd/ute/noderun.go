package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/ute-project/ute/node/config"
	nodedaemon "github.com/ute-project/ute/node/daemon"
)

// shutdownBudget is how long SIGTERM may take: flows closed, gossip left, state flushed.
const shutdownBudget = 5 * time.Second

func newNodeRunCmd() *cobra.Command {
	var (
		dir, cfgPath string
		ov           config.Overrides
		tunName      string
		tunMTU       int
	)
	flags := map[string]**string{}
	cmd := &cobra.Command{
		Use:   "run --dir N [--config FILE] [--listen ADDR] [--advertise ADDR] [--metrics ADDR] [--log-format text|json]",
		Short: "Run this node: tunnels, gossip, revocations, the local API (SIGTERM stops, SIGHUP reloads the config)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if dir == "" {
				return usagef("node run needs --dir (the directory `ute node join` created)")
			}
			for name, p := range flags {
				if cmd.Flags().Changed(name) {
					v, _ := cmd.Flags().GetString(name)
					*p = &v
				}
			}
			load := func() (config.Config, error) {
				c := config.Default()
				if cfgPath != "" {
					var err error
					if c, err = config.Load(cfgPath); err != nil {
						return config.Config{}, err
					}
				}
				return c.Apply(ov)
			}
			cfg, err := load()
			if err != nil {
				return err
			}
			if cfg.Interface == config.InterfaceTUN && os.Geteuid() != 0 {
				return errors.New("--interface tun needs root (CAP_NET_ADMIN) to create the kernel interface; without root run --interface proxy")
			}
			if cfg.Transport == config.TransportWireGuard && cfg.Interface != config.InterfaceTUN {
				return fmt.Errorf("transport wireguard carries the kernel interface's packets: run with --interface tun --transport wireguard (root)")
			}
			level := new(slog.LevelVar)
			level.Set(cfg.Log.Level)
			log := slog.New(cfg.Log.Handler(cmd.ErrOrStderr(), level))
			opts := nodedaemon.Options{Version: versionString(), Dir: dir, Config: cfg, Logger: log, LogLevel: level,
				TUN: nodedaemon.TUNOptions{Name: tunName, MTU: tunMTU}}
			opts.WireGuard.Interface = tunName
			return runNode(cmd.Context(), opts, load, cmd)
		},
	}
	f := cmd.Flags()
	f.StringVar(&dir, "dir", "", "node directory (created by ute node join)")
	f.StringVar(&cfgPath, "config", "", "YAML config file (docs/operations.md lists every key)")
	f.StringVar(&tunName, "tun-name", "", "with --interface tun: the kernel interface's name (default ute0)")
	f.IntVar(&tunMTU, "tun-mtu", 0, "with --interface tun: the kernel interface's MTU (default 65520: TCP and UDP are terminated on this host)")
	for name, usage := range map[string]struct {
		p     **string
		usage string
	}{
		"listen":     {&ov.Listen, "UDP address to listen on (default 0.0.0.0:7444)"},
		"advertise":  {&ov.Advertise, "address other nodes reach this one at (default: the listen address when it is specific)"},
		"metrics":    {&ov.Metrics, "loopback address for Prometheus metrics (empty: off)"},
		"log-format": {&ov.LogFormat, "log format: text or json"},
		"log-level":  {&ov.LogLevel, "log level: debug, info, warn or error"},
		"interface":  {&ov.Interface, "agent interface: proxy (the default: a SOCKS5 and an HTTP proxy per agent on loopback, no root), netstack (agents embedded in this process), or tun (the kernel interface ute0 with every agent's overlay IP, root)"},
		"transport":  {&ov.Transport, "data plane between nodes: quic (the default) or wireguard (needs --interface tun; every node of a zone must run the same one)"},
		"authority":  {&ov.Authority, "authority address (default: the one joined, from node.json)"},
	} {
		f.String(name, "", usage.usage)
		flags[name] = usage.p
	}
	return cmd
}

// runNode runs the daemon until ctx ends (SIGINT, SIGTERM), reloading the config on SIGHUP.
func runNode(ctx context.Context, opts nodedaemon.Options, load func() (config.Config, error), cmd *cobra.Command) error {
	d, err := nodedaemon.Start(ctx, opts)
	if err != nil {
		return err
	}
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	fmt.Fprintf(cmd.OutOrStdout(), "node %s up on %s\n", d.Node().ID(), d.Addr())
	for _, p := range d.Proxies() {
		fmt.Fprintf(cmd.OutOrStdout(), "agent %s.%s  socks5 %s  http %s%s\n", p.Agent, p.Zone, p.SOCKS, p.HTTP, forwardsText(p.Forward))
	}
	for {
		select {
		case <-ctx.Done():
			done := make(chan error, 1)
			go func() { done <- d.Close() }()
			select {
			case err := <-done:
				if err != nil {
					opts.Logger.Warn("shutdown", "err", err)
				}
				return nil
			case <-time.After(shutdownBudget):
				return errors.New("node did not stop within 5 s; state written so far is durable, check the log for what hung")
			}
		case <-hup:
			next, err := load()
			if err != nil {
				opts.Logger.Error("config reload refused; the running config stays", "err", err)
				continue
			}
			if _, err := d.Reload(next); err != nil {
				opts.Logger.Error("config reload refused; the running config stays", "err", err)
			}
		}
	}
}

// forwardsText lists an agent's inbound forwards for the startup lines.
func forwardsText(fs []config.Forward) string {
	var b strings.Builder
	for _, f := range fs {
		fmt.Fprintf(&b, "  forward %d -> %s", f.Port, f.Target)
	}
	return b.String()
}
