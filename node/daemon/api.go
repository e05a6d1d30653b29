package daemon

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"strings"
	"time"

	"github.com/ute-project/ute/identity/record"
	"github.com/ute-project/ute/node"
	"github.com/ute-project/ute/node/localapi"
	"github.com/ute-project/ute/node/state"
	"github.com/ute-project/ute/overlay/audit"
)

// startAPI serves the local API on the node directory's socket.
func (d *Daemon) startAPI() error {
	srv, err := localapi.Start(localapi.SocketPath(d.opts.Dir), backend{d}, localapi.Options{Logger: d.log})
	if err != nil {
		return fmt.Errorf("daemon: local API: %w", err)
	}
	d.mu.Lock()
	d.api = srv
	d.mu.Unlock()
	return nil
}

// backend implements localapi.Backend over the daemon.
type backend struct{ d *Daemon }

var _ localapi.Backend = backend{}

func (b backend) Status(context.Context) (localapi.Status, error) {
	d := b.d
	n := d.node
	snap := n.Snapshot()
	cert := n.Certificate()
	d.mu.Lock()
	cfg := d.cfg
	d.mu.Unlock()
	st := localapi.Status{
		Node: snap.ID, Name: cert.ID.Name, Version: d.opts.Version, TrustDomain: cert.ID.TrustDomain, Region: snap.Region,
		Serial: record.SerialKey(cert.Serial()), NotAfter: cert.X509.NotAfter.UTC(), StartedAt: d.started,
		Interface: string(cfg.Interface), Transport: string(cfg.Transport), Listen: snap.Addr,
		Authority: d.authority,
	}
	if adv, ok := cfg.AdvertiseAddr(n.Addr()); ok {
		st.Advertise = adv.String()
	}
	if cfg.Metrics.IsValid() {
		st.Metrics = cfg.Metrics.String()
	}
	if rel := d.store.PolicyRelease(); rel != nil {
		st.PolicyVersion = rel.Claims.PolicyVersion
	}
	st.Renewal = renewalStatus(n.RenewalStatus(), d.authority != "")
	pol := n.Policy()
	for _, z := range snap.Zones {
		zs := localapi.ZoneStatus{Name: z, Peers: []localapi.Peer{}}
		if pz, ok := pol.Zone(z); ok {
			for _, c := range pz.CIDRs {
				zs.CIDRs = append(zs.CIDRs, c.String())
			}
		}
		up := map[string]node.TunnelInfo{}
		for _, t := range snap.Tunnels {
			if t.Zone == z {
				up[t.Peer] = t
			}
		}
		members := d.members(z)
		zs.Members = len(members)
		seen := map[string]bool{}
		for _, m := range members {
			if m.NodeID == snap.ID {
				continue
			}
			seen[m.NodeID] = true
			p := localapi.Peer{Node: m.NodeID, Addr: m.Addr.String(), Tunnel: localapi.TunnelDown}
			if t, ok := up[m.NodeID]; ok {
				p.Tunnel = localapi.TunnelUp
				p.Addr = t.Remote
			}
			zs.Peers = append(zs.Peers, p)
		}
		for id, t := range up {
			if !seen[id] {
				zs.Peers = append(zs.Peers, localapi.Peer{Node: id, Addr: t.Remote, Tunnel: localapi.TunnelUp})
			}
		}
		st.Zones = append(st.Zones, zs)
	}
	st.Agents = []localapi.Agent{}
	for _, a := range snap.Agents {
		st.Agents = append(st.Agents, localapi.Agent{Name: a.Name, Zone: a.Zone, ID: a.SPIFFEID, OverlayIP: a.IP.String(), Serial: a.Serial, Revoked: a.Revoked})
	}
	st.Revocations = []localapi.Revocation{}
	for _, e := range d.store.All() {
		c := e.Record.Claims
		st.Revocations = append(st.Revocations, localapi.Revocation{Subject: c.Subject, Reason: c.Reason, Issuer: c.Signer,
			IssuedAt: c.IssuedAt.UTC(), ReceivedAt: e.Arrived.UTC()})
	}
	st.Trust = d.trust.trustScores()
	return st, nil
}

func (b backend) WhoIs(_ context.Context, addr netip.AddrPort) (localapi.WhoIs, error) {
	p, ok := b.d.node.WhoIsAddr(addr)
	if !ok {
		p, ok = b.d.proxyWhoIs(addr) // a flow the proxy interface forwarded to a local server
	}
	if !ok {
		p, ok = b.d.tunWhoIs(addr) // a flow the TUN interface originated to a local program
	}
	if !ok {
		return localapi.WhoIs{}, fmt.Errorf("%w: no admitted flow from %s on this node", localapi.ErrNotFound, addr)
	}
	w := localapi.WhoIs{
		Agent: p.Agent, AgentName: p.AgentName, Zone: p.Zone, Node: p.Node, Region: p.Region, Trust: int(p.Trust),
		Drift: driftNames(p), Fingerprint: hex.EncodeToString(p.Fingerprint), SourceIP: p.SourceIP.String(),
		Source: addr.String(), Destination: p.Destination.String(), FlowID: p.FlowID, IssuedAt: p.IssuedAt.UTC(),
		AgentSerial: p.AgentSerial, NodeSerial: p.NodeSerial, Local: p.Local,
	}
	return w, nil
}

func driftNames(p *node.Provenance) []string {
	if p.Drift == 0 {
		return []string{}
	}
	return strings.Split(p.Drift.String(), "|")
}

func (b backend) AddAgent(_ context.Context, spec localapi.AgentSpec) (localapi.Agent, error) {
	d := b.d
	as := state.AgentSpec{Name: spec.Name, Zone: spec.Zone, Exe: spec.Exe, Labels: spec.Labels,
		Lifetime: time.Duration(spec.Lifetime) * time.Second}
	if spec.UID != nil {
		as.UID = *spec.UID
	}
	if spec.GID != nil {
		as.GID = *spec.GID
	}
	ag, err := d.dir.AddAgent(as)
	if err != nil {
		return localapi.Agent{}, fmt.Errorf("%w: %w", localapi.ErrBadRequest, err)
	}
	if err := d.node.ReloadAgents(); err != nil {
		return localapi.Agent{}, err
	}
	d.log.Info("agent added", "agent", ag.Cert.ID.String(), "ip", ag.IP.String())
	d.proxyAgentAdded(ag) // interface proxy: its proxies start now (proxy.go)
	d.tunAgentAdded(ag)   // interface tun: its address and inbound flows now (tun.go)
	d.wgAgentAdded(ag)    // transport wireguard: its address on the interface now (wireguard.go)
	return localapi.Agent{Name: ag.Name, Zone: ag.Zone, ID: ag.Cert.ID.String(), OverlayIP: ag.IP.String(),
		Serial: record.SerialKey(ag.Cert.Serial()), NotAfter: ag.Cert.X509.NotAfter.UTC(),
		Fingerprint: hex.EncodeToString(ag.Cert.Claims.Fingerprint), Exe: spec.Exe, UID: spec.UID}, nil
}

func (b backend) RemoveAgent(context.Context, string, string) error {
	return fmt.Errorf("%w: removing an agent is revoking it: run `ute revoke --dir NODE_DIR NAME.ZONE --reason TEXT`", localapi.ErrBadRequest)
}

func (b backend) Revoke(ctx context.Context, req localapi.RevokeRequest) (localapi.Revocation, error) {
	raw, err := b.d.Revoke(ctx, req.Subject, req.Reason)
	if err != nil {
		if errors.Is(err, node.ErrNotMine) || errors.Is(err, record.ErrMalformed) {
			return localapi.Revocation{}, fmt.Errorf("%w: %w", localapi.ErrBadRequest, err)
		}
		return localapi.Revocation{}, err
	}
	rev, err := b.d.verif.VerifyRevocation(raw, b.d.now())
	if err != nil {
		return localapi.Revocation{}, err
	}
	c := rev.Claims
	return localapi.Revocation{Subject: c.Subject, Reason: c.Reason, Issuer: c.Signer, IssuedAt: c.IssuedAt.UTC(), ReceivedAt: b.d.now().UTC()}, nil
}

func (b backend) Audit(_ context.Context, q localapi.AuditQuery) (localapi.Audit, error) {
	d := b.d
	pub := d.node.Certificate().PublicKey()
	rep, err := audit.VerifyWithKey(filepath.Join(d.opts.Dir, node.DirAudit), pub)
	if err != nil && rep.Entries == 0 {
		return localapi.Audit{}, err
	}
	out := localapi.Audit{Entries: rep.Entries, Anchored: rep.Anchored, Unanchored: rep.Unanchored, LastHash: rep.LastHash,
		Signed: rep.Signed, OK: rep.OK && err == nil, FirstBad: rep.FirstBad, Problem: rep.Problem, Recent: []localapi.AuditEntry{}}
	_ = q
	return out, nil
}

// renewalStatus is the node's renewal state as `ute status` shows it. Renewal needs both the
// daemon's authority address and the node's.
func renewalStatus(r node.RenewalStatus, authority bool) localapi.Renewal {
	if !authority || !r.Enabled {
		return localapi.Renewal{State: localapi.RenewalDisabled}
	}
	out := localapi.Renewal{State: localapi.RenewalOK, NextAt: r.NextAt.UTC(), LastSuccess: r.LastSuccess.UTC(),
		LastFailure: r.LastFailure.UTC(), LastError: r.LastError}
	if r.Retrying {
		out.State = localapi.RenewalRetrying
	}
	return out
}
