package daemon

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"time"

	"github.com/ute-project/ute/identity/record"
	"github.com/ute-project/ute/node"
	"github.com/ute-project/ute/node/revstore"
	"github.com/ute-project/ute/node/state"
	"github.com/ute-project/ute/overlay/audit"
	"github.com/ute-project/ute/zones"
)

// Origin says where a record came from, for logs and metrics.
type Origin string

// Where records come from.
const (
	FromAuthority Origin = "authority" // the authority's watch connection
	FromGossip    Origin = "gossip"    // a gossip message, push/pull or direct push
	FromLocal     Origin = "local"     // signed here for the local API
)

// Accept is the one path of every signed record: the store verifies it and writes it durably,
// then the daemon acts on it (a revocation cuts its subject's tunnels and flows at once; a policy
// release is parsed and put in force with its reload plan), then spreads it through the zone
// pools unless gossip brought it (the pools re-broadcast what they receive themselves). It
// reports whether the record was new. Refusals wrap identity/record's and revstore's sentinels.
func (d *Daemon) Accept(ctx context.Context, raw []byte, from Origin) (bool, error) {
	return d.accept(ctx, raw, from)
}

// accept is Accept for a record that arrived on the pools of zones arrivedOn (gossip).
func (d *Daemon) accept(ctx context.Context, raw []byte, from Origin, arrivedOn ...string) (bool, error) {
	if record.IsTrustEvent(raw) {
		return d.acceptTrustEvent(ctx, raw, from, arrivedOn...) // soft state: trust_events.go
	}
	rev, changed, err := d.store.Add(raw)
	if err == nil {
		if changed {
			d.applyRevocation(ctx, rev, from)
			d.spread(raw, recordZone(rev), from, arrivedOn...)
			d.retireIfRevoked()
		}
		return changed, nil
	}
	if !isWrongKind(err) {
		d.recordDropped(from, err)
		return false, err
	}
	// Not a revocation: a policy release is the only other record there is.
	rel, changed, perr := d.store.SetPolicy(raw)
	if perr != nil {
		if isWrongKind(perr) {
			// Neither kind parses: report the revocation error, which names the first problem.
			d.recordDropped(from, err)
			return false, err
		}
		d.recordDropped(from, perr)
		return false, perr
	}
	if !changed {
		return false, nil
	}
	if err := d.applyPolicy(ctx, rel); err != nil {
		// Stored but not in force would be the worst of both: the node keeps the old policy and
		// says so loudly; a restart applies the stored release (or refuses to start).
		d.log.Error("policy release stored but not applied", "version", rel.Claims.PolicyVersion, "err", err)
		return true, err
	}
	d.spread(raw, "", from, arrivedOn...)
	return true, nil
}

// isWrongKind reports whether a record failed verification because of its shape (so it may be
// the other kind of record), as opposed to a bad signature, signer or time.
func isWrongKind(err error) bool {
	return errors.Is(err, record.ErrMalformed) || errors.Is(err, record.ErrUnknownField) ||
		errors.Is(err, record.ErrHeader) || errors.Is(err, record.ErrTooLarge)
}

func (d *Daemon) applyRevocation(ctx context.Context, rev *record.Revocation, from Origin) {
	cut, err := d.node.ApplyRevocation(ctx, rev.Keys(), rev.Claims.Reason)
	if err != nil {
		d.log.Error("revocation applied but not audited", "subject", rev.Claims.Subject, "err", err)
	}
	if e, ok := d.store.Lookup(rev.Key()); ok {
		d.metrics.RevocationArrived(e.AgeAtArrival())
	}
	d.metrics.SetRevocationsHeld(d.store.Len())
	d.log.Info("revocation accepted", "subject", rev.Claims.Subject, "key", rev.Key(), "signer", rev.Claims.Signer,
		"seq", rev.Claims.Seq, "from", string(from), "cut", cut)
}

// retireGrace is how long a node that learns of its own revocation keeps gossiping, so that the
// record (often its own, signed as it retires) reaches its peers before it stops.
const retireGrace = 2 * time.Second

// retireIfRevoked retires this node after retireGrace when it is itself revoked.
func (d *Daemon) retireIfRevoked() {
	self := d.node.Certificate()
	if !d.node.Revoked(self.ID.String(), record.SerialKey(self.Serial())) {
		return
	}
	d.mu.Lock()
	if d.retiring || d.closed {
		d.mu.Unlock()
		return
	}
	d.retiring = true
	d.mu.Unlock()
	d.wg.Go(func() {
		select {
		case <-d.ctx.Done():
		case <-time.After(retireGrace):
			d.retire()
		}
	})
}

// retire stops what a revoked node would only keep retrying — gossip and the authority watch —
// and says so once. The local API stays up so that `ute status` shows why.
func (d *Daemon) retire() {
	d.mu.Lock()
	p, done := d.pools, d.retired
	d.pools, d.retired = nil, true
	d.mu.Unlock()
	if done {
		return
	}
	d.log.Error("this node is revoked: gossip and the authority watch are stopped; rejoin with a new token (`ute node join`)")
	if d.stopWatch != nil {
		d.stopWatch()
	}
	if p != nil {
		// Not on the caller's goroutine: a record can arrive on a pool's own worker.
		d.wg.Go(func() { _ = p.close() })
	}
}

// applyPolicy parses a verified release and puts it in force with its reload plan.
func (d *Daemon) applyPolicy(ctx context.Context, rel *record.PolicyRelease) error {
	pol, err := parseRelease(rel)
	if err != nil {
		return err
	}
	res, err := d.node.SetPolicy(ctx, pol, rel.Claims.PolicyVersion)
	if err != nil {
		return err
	}
	d.log.Info("policy release applied", "version", rel.Claims.PolicyVersion, "zones", res.Zones,
		"tunnels_closed", res.TunnelsClosed, "flows_cut", res.FlowsCut)
	d.syncPools(res.Zones)
	d.wireguardPolicyApplied()
	return nil
}

func parseRelease(rel *record.PolicyRelease) (*zones.Policy, error) {
	pol, err := zones.Parse(fmt.Sprintf("policy release v%d", rel.Claims.PolicyVersion), rel.Claims.Policy)
	if err != nil {
		return nil, fmt.Errorf("daemon: policy release %d does not parse: %w", rel.Claims.PolicyVersion, err)
	}
	return pol, nil
}

func (d *Daemon) recordDropped(from Origin, err error) {
	reason := "invalid"
	switch {
	case errors.Is(err, record.ErrSignature):
		reason = "signature"
	case errors.Is(err, record.ErrSigner), errors.Is(err, record.ErrNotAllowed):
		reason = "signer"
	case errors.Is(err, record.ErrExpired):
		reason = "expired"
	case errors.Is(err, revstore.ErrStalePolicy):
		reason = "stale_policy"
	case isWrongKind(err):
		reason = "malformed"
	}
	d.metrics.GossipDropped(reason)
	d.log.Warn("record refused", "from", string(from), "reason", reason, "err", err)
}

// storePath is the revocation store's file in the node directory.
func storePath(dir string) string { return filepath.Join(dir, FileRevocations) }

// FileRevocations is the node's durable revocation and policy store, in the node directory.
const FileRevocations = "revocations.db"

// OpenStore opens a node directory's revocation store with the node's trust anchor; `ute node
// join` uses it to store the policy release the authority returned.
func OpenStore(d *state.Dir, opts revstore.Options) (*revstore.Store, revstore.OpenReport, error) {
	anchor, err := d.AuthorityCert()
	if err != nil {
		return nil, revstore.OpenReport{}, err
	}
	opts.Verifier.Certs.Authority = anchor
	return revstore.Open(storePath(d.Path()), opts)
}

// auditAsideMetric publishes what the node's audit log set aside when it opened: a forged append
// or a cut tail is then visible in a metric as well as in one entry of the log.
func (d *Daemon) auditAsideMetric() {
	parts, err := audit.ListAside(filepath.Join(d.opts.Dir, node.DirAudit))
	if err != nil {
		d.log.Warn("cannot list the audit log's set-aside parts", "err", err)
	}
	entries := 0
	for _, p := range parts {
		entries += p.Entries
	}
	d.metrics.SetAuditSetAside(len(parts), entries)
}
