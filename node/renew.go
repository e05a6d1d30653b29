package node

import (
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/identity/authority"
	"github.com/ute-project/ute/identity/record"
	"github.com/ute-project/ute/node/state"
	"github.com/ute-project/ute/overlay/audit"
)

// ErrCertificateExpired means the node certificate is past its NotAfter: renewal did not succeed
// in time, and the authority renews only a certificate that is still valid, so the node must
// rejoin with a new token. An expired node opens no flows.
var ErrCertificateExpired = errors.New("node: certificate expired")

// Audit events of renewal.
const (
	eventRenewed     = "renewed"
	eventRenewFailed = "renew-failed"
)

// defaultRenewTimeout bounds one renewal attempt, so that an authority that accepts the
// connection and then stalls costs one retry interval, not the loop.
const defaultRenewTimeout = 30 * time.Second

// Renewed is a node renewal installed in a node directory: the authority's answer and the key
// the new certificate is for.
type Renewed struct {
	*authority.Joined
	Key ed25519.PrivateKey
}

// RenewDir renews the node certificate of d with the authority at addr and installs the result
// in d. It proves possession of the current key in the mutual TLS handshake and asks for a
// certificate for the key staged by d.RenewalKey, so it is safe to repeat after any failure: a
// retry after the authority committed a renewal whose answer was lost asks for the same key and
// gets the same certificate. The old certificate is dead once this returns (the authority
// refuses to renew it again, authority.ErrSuperseded). Agents still carry certificates issued
// with the old key; ReissueAgents replaces them.
func RenewDir(ctx context.Context, d *state.Dir, addr string, now func() time.Time) (*Renewed, error) {
	return renewDir(ctx, d, addr, "", now)
}

// renewDir is RenewDir telling the authority the node's advertised address (empty keeps the one
// it recorded), and keeping the bootstrap members and policy release the answer carries.
func renewDir(ctx context.Context, d *state.Dir, addr, advertise string, now func() time.Time) (*Renewed, error) {
	if addr == "" {
		return nil, fmt.Errorf("%w: no authority address to renew with; pass --authority", ErrConfig)
	}
	cur, err := d.NodeCert()
	if err != nil {
		return nil, err
	}
	key, err := d.NodeKey()
	if err != nil {
		return nil, err
	}
	ca, err := d.AuthorityCert()
	if err != nil {
		return nil, err
	}
	// The new key is staged on disk before the request leaves: if the answer is lost, the next
	// attempt asks for the same key and the authority sends the same certificate again.
	newKey, err := d.RenewalKey()
	if err != nil {
		return nil, err
	}
	j, err := authority.Renew(ctx, authority.RenewParams{Addr: addr, Authority: ca, Current: cur, Key: key, NewKey: newKey, Now: now, Advertise: advertise})
	if err != nil {
		return nil, err
	}
	if err := d.InstallRenewal(newKey, j.NodeCertDER, j.IssuerCertDER); err != nil {
		return nil, err
	}
	if err := SaveBootstrap(d, j); err != nil {
		return nil, fmt.Errorf("renewed, but %w", err)
	}
	return &Renewed{Joined: j, Key: newKey}, nil
}

// ReissueAgents re-signs every agent of d with the node key installed now (same agent key, IP,
// fingerprint and labels). It carries on past a failing agent and returns the agents it reissued
// with one error naming every failure.
func ReissueAgents(d *state.Dir) ([]*state.Agent, error) { return reissueAgents(d, nil) }

// reissueAgents is ReissueAgents leaving out the agents skip names.
func reissueAgents(d *state.Dir, skip func(*state.Agent) bool) ([]*state.Agent, error) {
	list, err := d.Agents()
	if err != nil {
		return nil, fmt.Errorf("node: list agents to reissue: %w", err)
	}
	var (
		out  []*state.Agent
		errs []error
	)
	for _, ag := range list {
		if skip != nil && skip(ag) {
			continue
		}
		st, err := d.ReissueAgent(ag.Zone, ag.Name)
		if err != nil {
			errs = append(errs, fmt.Errorf("reissuing agent %s/%s failed: %w", ag.Zone, ag.Name, err))
			continue
		}
		out = append(out, st)
	}
	return out, joinErrors(errs)
}

// reissueUnrevoked is ReissueAgents for a running node: an agent revoked here (by SPIFFE ID or
// by the serial in service) is left as it is, since a new serial would escape a serial
// revocation. It keeps its old chain, which the node's scheduler never reissues either.
func (n *Node) reissueUnrevoked() ([]*state.Agent, error) {
	return reissueAgents(n.dir, func(ag *state.Agent) bool {
		return ag.Cert != nil && n.isRevoked(record.ChainKeys(n.issuerCertificate(), ag.Cert)...)
	})
}

// renew performs one renewal attempt and, when it succeeds, puts the new identity in service.
func (n *Node) renew(ctx context.Context) error {
	timeout := n.cfg.RenewTimeout
	if timeout <= 0 {
		timeout = defaultRenewTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	old := n.certificate()
	r, err := renewDir(ctx, n.dir, n.cfg.Authority, n.cfg.Advertise, n.now)
	if err != nil {
		if n.ctx.Err() != nil {
			return err
		}
		if !n.now().Before(old.X509.NotAfter) {
			n.log.Error("node certificate expired without renewal; flows stop until the node rejoins",
				"node", old.ID.String(), "not_after", old.X509.NotAfter, "authority", n.cfg.Authority, "err", err)
		}
		n.credentialFailed(old.ID.String(), err)
		n.appendAudit(eventRenewFailed, map[string]string{
			"serial": old.Serial().String(), "authority": truncate(n.cfg.Authority), "error": truncate(err.Error()),
		})
		return err
	}
	return n.install(r, old)
}

// install swaps the renewed certificate in: node directory first (RenewDir did that), then the
// agents' certificates, then the in-memory identity, the endpoint and the audit log's key.
//
// Records signed after the swap carry the new chain. Tunnels established before it stay up: their
// peers verified the old certificate, which is still valid, and records with the new chain are
// admitted on them too (admission matches the chain's node by identity, not by serial). This
// node no longer opens flows on them (tunnel.Endpoint.SetCertificate marks them stale); they end
// when the peer closes them or when the old certificate expires.
func (n *Node) install(r *Renewed, old *identity.Certificate) error {
	if err := n.verif.VerifyNode(r.Node, n.now()); err != nil {
		return fmt.Errorf("node: renewed certificate does not verify under the trust anchor: %w", err)
	}
	if err := n.verif.VerifyIssuer(r.Issuer, n.now()); err != nil {
		return fmt.Errorf("node: renewed issuing certificate does not verify under the trust anchor: %w", err)
	}
	tlsCert, err := identity.TLSCertificate(r.Key, r.Node)
	if err != nil {
		return fmt.Errorf("node: renewed certificate: %w", err)
	}
	agents, agentErr := n.reissueUnrevoked()

	olds := make([]*identity.Certificate, len(agents))
	n.mu.Lock()
	n.credMu.Lock()
	n.cert, n.issuer, n.key = r.Node, r.Issuer, tlsCert
	for i, st := range agents {
		k := agentKey{st.Zone, st.Name}
		if prev := n.agents[k]; prev != nil {
			olds[i] = prev.Cert
		}
		n.agents[k] = st
		if a := n.open[k]; a != nil {
			a.setCreds(st.Cert, nil, r.Issuer)
		}
	}
	n.credMu.Unlock()
	n.mu.Unlock()

	if err := n.ep.SetCertificate(tlsCert); err != nil {
		// Unreachable for a certificate TLSCertificate built; new handshakes would present the
		// superseded certificate, which peers still accept until it expires.
		n.log.Error("endpoint kept the old certificate", "err", err)
	}
	if zs := r.Node.Claims.ZoneNames(); !slices.Equal(zs, old.Claims.ZoneNames()) {
		// The authority re-derives the grant from the current policy at renewal.
		n.ep.SetZones(zs)
	}
	if err := n.audit.rekey(r.Key); err != nil {
		n.log.Error("audit log could not switch to the renewed key", "err", err)
	}
	f := map[string]string{
		"old_serial": old.Serial().String(), "serial": r.Node.Serial().String(),
		"not_after": r.Node.X509.NotAfter.UTC().Format(time.RFC3339), "zones": strings.Join(r.Node.Claims.ZoneNames(), ","),
		"agents_reissued": strconv.Itoa(len(agents)),
	}
	if agentErr != nil {
		// The node is renewed either way; retrying would renew it again. An agent left behind
		// keeps its old, consistent chain; it no longer verifies under the new certificate, so the
		// scheduler's agent pass, which runs right after this, reissues it (with backoff).
		f["agent_error"] = truncate(agentErr.Error())
		n.log.Warn("node renewed, but some agents were not reissued", "err", agentErr)
	}
	n.appendAudit(eventRenewed, f)
	for i, st := range agents {
		n.auditAgentRenewed(olds[i], st, causeNodeRenewed)
	}
	n.log.Info("node certificate renewed", "node", r.Node.ID.String(), "old_serial", old.Serial().String(),
		"serial", r.Node.Serial().String(), "not_after", r.Node.X509.NotAfter, "agents_reissued", len(agents))
	return nil
}

func (n *Node) appendAudit(event string, fields map[string]string) {
	// Not n.ctx: a renewal that completes while the node closes is installed, so it is recorded.
	if err := n.audit.Append(context.Background(), audit.Entry{Event: event, Fields: fields}); err != nil {
		n.log.Error("audit append failed", "event", event, "err", err)
	}
}

// usable refuses to open flows once the node certificate has expired.
func (n *Node) usable() error {
	c := n.certificate()
	if now := n.now(); now.Before(c.X509.NotAfter) {
		return nil
	}
	hint := "the authority renews only valid certificates; rejoin with `ute node join` and a new token"
	if n.cfg.Authority != "" {
		hint = fmt.Sprintf("renewal with the authority at %s did not succeed in time; %s", n.cfg.Authority, hint)
	}
	return fmt.Errorf("%w at %s (%s): %s", ErrCertificateExpired, c.X509.NotAfter.UTC().Format(time.RFC3339), c.ID, hint)
}
