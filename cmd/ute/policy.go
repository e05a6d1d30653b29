package main

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"

	"github.com/spf13/cobra"

	"github.com/ute-project/ute/zones"
)

// newPolicyCmd groups the policy commands. extra lets other files attach subcommands (policy
// apply lives with the authority) without editing this one.
func newPolicyCmd(extra ...*cobra.Command) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "policy",
		Short: "Validate, explain and apply zone policy files",
	}
	cmd.AddCommand(newPolicyCheckCmd(), newPolicyExplainCmd(), newPolicyApplyCmd())
	cmd.AddCommand(extra...)
	return cmd
}

type policyView struct {
	File  string     `json:"file"`
	Valid bool       `json:"valid"`
	Zones []zoneView `json:"zones"`
}

type zoneView struct {
	Name            string     `json:"name"`
	Line            int        `json:"line"`
	CIDRs           []string   `json:"cidrs"`
	NodeSlices      []string   `json:"node_slices"` // per CIDR: the prefix length of each node's slice
	Regions         []string   `json:"regions"`
	MinTrust        int        `json:"min_trust"`
	IsolateBelow    int        `json:"isolate_below"`
	MaxCertLifetime string     `json:"max_cert_lifetime,omitempty"`
	Rules           []ruleView `json:"rules"`
}

type ruleView struct {
	Line  int      `json:"line"`
	From  string   `json:"from"`
	To    string   `json:"to"`
	Ports []string `json:"ports"`
}

func viewPolicy(file string, p *zones.Policy) policyView {
	v := policyView{File: file, Valid: true, Zones: []zoneView{}}
	for _, z := range p.Zones {
		zv := zoneView{Name: z.Name, Line: z.Line, Regions: z.Regions, MinTrust: z.MinTrust,
			IsolateBelow: z.IsolateBelow, Rules: []ruleView{}}
		for _, c := range z.CIDRs {
			zv.CIDRs = append(zv.CIDRs, c.String())
			zv.NodeSlices = append(zv.NodeSlices, fmt.Sprintf("/%d", z.NodePrefixFor(c)))
		}
		if z.MaxCertLifetime > 0 {
			zv.MaxCertLifetime = z.MaxCertLifetime.String()
		}
		for _, r := range z.Rules {
			rv := ruleView{Line: r.Line, From: r.From.String(), To: r.To.String()}
			for _, pr := range r.Ports {
				rv.Ports = append(rv.Ports, pr.String())
			}
			zv.Rules = append(zv.Rules, rv)
		}
		v.Zones = append(v.Zones, zv)
	}
	return v
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func newPolicyCheckCmd() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "check FILE",
		Short: "Validate a policy file and print its zones and rules",
		Long: "Validate a policy file strictly (see docs/zones.md) and print its zones and rules.\n" +
			"Exit 0 when valid; exit 1 with the file, line and field of the first problem otherwise.",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			p, err := zones.Load(args[0])
			if err != nil {
				return err
			}
			v := viewPolicy(args[0], p)
			out := cmd.OutOrStdout()
			if asJSON {
				return writeJSON(out, v)
			}
			rules := 0
			for _, z := range v.Zones {
				rules += len(z.Rules)
			}
			fmt.Fprintf(out, "%s: valid, %d zone(s), %d rule(s)\n", args[0], len(v.Zones), rules)
			for _, z := range v.Zones {
				fmt.Fprintf(out, "\nzone %s (line %d)\n", z.Name, z.Line)
				fmt.Fprintf(out, "  cidr           %s\n", strings.Join(z.CIDRs, ", "))
				fmt.Fprintf(out, "  node slices    %s (each node's share of each CIDR)\n", strings.Join(z.NodeSlices, ", "))
				fmt.Fprintf(out, "  regions        %s\n", strings.Join(z.Regions, ", "))
				fmt.Fprintf(out, "  min_trust      %d (flows denied below)\n", z.MinTrust)
				fmt.Fprintf(out, "  isolate_below  %d (isolated and revoked below)\n", z.IsolateBelow)
				if z.MaxCertLifetime != "" {
					fmt.Fprintf(out, "  max_cert_life  %s\n", z.MaxCertLifetime)
				}
				if len(z.Rules) == 0 {
					fmt.Fprintln(out, "  rules          none: every flow in this zone is denied")
				}
				for i, r := range z.Rules {
					fmt.Fprintf(out, "  rule %d (line %d): %s -> %s on %s\n", i+1, r.Line, r.From, r.To, strings.Join(r.Ports, ", "))
				}
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the policy as JSON")
	return cmd
}

type explainView struct {
	Allow    bool   `json:"allow"`
	Reason   string `json:"reason"`
	Message  string `json:"message"`
	RuleLine int    `json:"rule_line,omitempty"`
	Zone     string `json:"zone"`
	From     string `json:"from"`
	To       string `json:"to"`
	Port     uint16 `json:"port"`
	Proto    string `json:"proto"`
}

func newPolicyExplainCmd() *cobra.Command {
	var (
		from, to, protoName, region string
		fromLabels, toLabels        []string
		port, trust                 int
		asJSON                      bool
	)
	cmd := &cobra.Command{
		Use:   "explain FILE --from A --to B --port P",
		Short: "Decide whether agent A may open a flow to agent B, and say why",
		Long: "Decide one flow with the policy in FILE and print the decision, its reason code and why.\n" +
			"Agents are written ZONE/NAME (or as SPIFFE IDs); a bare NAME works when the policy has one zone.\n" +
			"The caller is assumed healthy unless flags say otherwise: unrevoked, trust 100, in the zone's\n" +
			"first region. A deny is an answer, not a failure: the exit code is 0 either way.",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if from == "" || to == "" {
				return usagef("--from and --to are required, e.g. --from payments/billing-1 --to payments/ledger")
			}
			proto, err := zones.ParseProto(protoName)
			if err != nil {
				return usagef("--proto %q: use tcp, udp or icmp", protoName)
			}
			if proto != zones.ProtoICMP && (port < 1 || port > 65535) {
				return usagef("--port must be 1..65535 for %s flows", proto)
			}
			if proto == zones.ProtoICMP {
				port = 0
			}
			if trust < -1 || trust > 100 {
				return usagef("--trust must be 0..100, or -1 for an absent score")
			}
			p, err := zones.Load(args[0])
			if err != nil {
				return err
			}
			src, err := explainAgent(p, "--from", from, fromLabels)
			if err != nil {
				return err
			}
			dst, err := explainAgent(p, "--to", to, toLabels)
			if err != nil {
				return err
			}
			src.Trust = zones.Score{Value: trust, Known: trust >= 0}
			if region != "" {
				src.Region = region
			}
			d := p.Flow(src, dst, uint16(port), proto)
			v := explainView{Allow: d.Allow, Reason: string(d.Reason), Message: d.Message, Zone: src.Zone,
				From: src.Zone + "/" + src.Name, To: dst.Zone + "/" + dst.Name, Port: uint16(port), Proto: proto.String()}
			if d.Rule != nil {
				v.RuleLine = d.Rule.Line
			}
			out := cmd.OutOrStdout()
			if asJSON {
				return writeJSON(out, v)
			}
			verdict := "deny"
			if d.Allow {
				verdict = "allow"
			}
			fmt.Fprintf(out, "%s  %s\n", verdict, d.Reason)
			fmt.Fprintf(out, "  %s\n", d.Message)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&from, "from", "", "source agent: ZONE/NAME or spiffe://TD/zone/ZONE/agent/NAME")
	f.StringVar(&to, "to", "", "destination agent, same forms as --from")
	f.IntVar(&port, "port", 0, "destination port (not needed for icmp)")
	f.StringVar(&protoName, "proto", "tcp", "protocol: tcp, udp or icmp")
	f.StringArrayVar(&fromLabels, "from-label", nil, "a label of the source agent, KEY=VALUE (repeatable)")
	f.StringArrayVar(&toLabels, "to-label", nil, "a label of the destination agent, KEY=VALUE (repeatable)")
	f.StringVar(&region, "region", "", "the source agent's region (default: its zone's first region)")
	f.IntVar(&trust, "trust", 100, "the source agent's trust score 0..100, or -1 for an absent score")
	f.BoolVar(&asJSON, "json", false, "print the decision as JSON")
	return cmd
}

// explainAgent turns a command-line agent reference into the subject struct a decision takes.
func explainAgent(p *zones.Policy, flag, ref string, labels []string) (zones.Agent, error) {
	zone, name := "", ref
	if rest, ok := strings.CutPrefix(ref, "spiffe://"); ok {
		// spiffe://TD/zone/Z/agent/N
		parts := strings.Split(rest, "/")
		if len(parts) != 5 || parts[1] != "zone" || parts[3] != "agent" {
			return zones.Agent{}, usagef("%s %q: a SPIFFE agent ID reads spiffe://TD/zone/ZONE/agent/NAME", flag, ref)
		}
		zone, name = parts[2], parts[4]
	} else if z, n, ok := strings.Cut(ref, "/"); ok {
		zone, name = z, n
	} else if len(p.Zones) == 1 {
		zone = p.Zones[0].Name
	} else {
		return zones.Agent{}, usagef("%s %q: the policy has %d zones; write ZONE/NAME", flag, ref, len(p.Zones))
	}
	if zone == "" || name == "" {
		return zones.Agent{}, usagef("%s %q: write ZONE/NAME", flag, ref)
	}
	a := zones.Agent{Name: name, Zone: zone}
	if z, ok := p.Zone(zone); ok {
		a.Region = z.Regions[0]
	}
	for _, l := range labels {
		k, v, ok := strings.Cut(l, "=")
		if !ok || k == "" {
			return zones.Agent{}, usagef("%s-label %q: write KEY=VALUE", flag, l)
		}
		if a.Labels == nil {
			a.Labels = map[string]string{}
		}
		a.Labels[k] = v
	}
	return a, nil
}
