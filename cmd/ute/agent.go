package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/ute-project/ute/node/localapi"
	"github.com/ute-project/ute/node/state"
)

func newAgentCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "agent",
		Short: "Register agents on this node",
	}
	cmd.AddCommand(newAgentAddCmd())
	return cmd
}

type agentView struct {
	Name     string            `json:"name"`
	Zone     string            `json:"zone"`
	IP       string            `json:"ip"`
	SPIFFEID string            `json:"spiffe_id"`
	Serial   string            `json:"serial"`
	NotAfter time.Time         `json:"not_after"`
	Labels   map[string]string `json:"labels,omitempty"`
}

func newAgentAddCmd() *cobra.Command {
	var (
		dir, name, zone, exe string
		uid, gid             int
		labels               []string
		lifetime             time.Duration
		asJSON               bool
	)
	cmd := &cobra.Command{
		Use:   "add --dir N --name A --zone Z --exe PATH [--uid U] [--gid G] [--label k=v]",
		Short: "Issue an agent certificate from this node's key and print its overlay IP",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if dir == "" || name == "" || zone == "" || exe == "" {
				return usagef("agent add needs --dir, --name, --zone and --exe")
			}
			if uid < 0 || gid < 0 || uid > 1<<32-1 || gid > 1<<32-1 {
				return usagef("--uid and --gid must be between 0 and 4294967295")
			}
			lm := map[string]string{}
			for _, l := range labels {
				k, v, ok := strings.Cut(l, "=")
				if !ok || k == "" {
					return usagef("--label %q is not key=value", l)
				}
				lm[k] = v
			}
			if len(lm) == 0 {
				lm = nil
			}
			spec := state.AgentSpec{Name: name, Zone: zone, Exe: exe, UID: uint32(uid), GID: uint32(gid), Labels: lm, Lifetime: lifetime}
			if c, err := localapi.Dial(cmd.Context(), localapi.SocketPath(dir)); err == nil {
				// A running daemon registers the agent itself, so that it is live at once.
				defer func() { _ = c.Close() }()
				return addAgentLive(cmd, c, spec, asJSON)
			} else if !errors.Is(err, localapi.ErrNotRunning) {
				return err
			}
			d, err := state.Open(dir)
			if err != nil {
				return err
			}
			ag, err := d.AddAgent(spec)
			if err != nil {
				return err
			}
			if asJSON {
				return json.NewEncoder(cmd.OutOrStdout()).Encode(agentView{
					Name: ag.Name, Zone: ag.Zone, IP: ag.IP.String(), SPIFFEID: ag.Cert.ID.String(),
					Serial: ag.Cert.Serial().String(), NotAfter: ag.Cert.X509.NotAfter.UTC(), Labels: ag.Labels,
				})
			}
			_, err = fmt.Fprintln(cmd.OutOrStdout(), ag.IP)
			return err
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "node directory")
	cmd.Flags().StringVar(&name, "name", "", "agent name")
	cmd.Flags().StringVar(&zone, "zone", "", "zone (one of the node's zones)")
	cmd.Flags().StringVar(&exe, "exe", "", "executable the agent runs (its digest enters the workload fingerprint)")
	cmd.Flags().IntVar(&uid, "uid", os.Getuid(), "uid the agent runs as")
	cmd.Flags().IntVar(&gid, "gid", os.Getgid(), "gid the agent runs as")
	cmd.Flags().StringArrayVar(&labels, "label", nil, "label key=value for policy selectors (repeatable)")
	cmd.Flags().DurationVar(&lifetime, "lifetime", state.DefaultAgentLifetime, "certificate lifetime (capped by the node certificate)")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the agent as JSON")
	return cmd
}

// addAgentLive registers an agent through the running daemon's local API.
func addAgentLive(cmd *cobra.Command, c *localapi.Client, spec state.AgentSpec, asJSON bool) error {
	exe, err := filepath.Abs(spec.Exe)
	if err != nil {
		return err
	}
	uid, gid := spec.UID, spec.GID
	ag, err := c.AddAgent(cmd.Context(), localapi.AgentSpec{Name: spec.Name, Zone: spec.Zone, Exe: exe, UID: &uid, GID: &gid,
		Labels: spec.Labels, Lifetime: int64(spec.Lifetime / time.Second)})
	if err != nil {
		return err
	}
	if asJSON {
		return json.NewEncoder(cmd.OutOrStdout()).Encode(agentView{Name: ag.Name, Zone: ag.Zone, IP: ag.OverlayIP, SPIFFEID: ag.ID,
			Serial: strings.TrimPrefix(ag.Serial, "serial:"), NotAfter: ag.NotAfter, Labels: spec.Labels})
	}
	_, err = fmt.Fprintln(cmd.OutOrStdout(), ag.OverlayIP)
	return err
}
