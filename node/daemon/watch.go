package daemon

import (
	"context"
	"crypto/ed25519"
	"errors"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/identity/authority"
)

// watchAuthority keeps the authority's watch connection open until the daemon stops: every
// revocation the authority commits and every policy release it signs reach this node without a
// gossip round, and this node then spreads them through its pools. It starts from sequence 0 on
// every run: records already held are idempotent no-ops, and a record that gossip brought out of
// order (seq 5 before 4) must not make the watch skip the one in between.
func (d *Daemon) watchAuthority(ctx context.Context, addr string) {
	anchor, err := d.dir.AuthorityCert()
	if err != nil {
		d.log.Error("authority watch not started", "err", err)
		return
	}
	var policyVersion uint64
	if rel := d.store.PolicyRelease(); rel != nil {
		policyVersion = rel.Claims.PolicyVersion
	}
	_, err = authority.Watch(ctx, authority.WatchParams{
		Addr:   addr,
		Anchor: anchor,
		Credentials: func() (*identity.Certificate, ed25519.PrivateKey, error) {
			return d.node.Credentials()
		},
		PolicyVersion: policyVersion,
		OnRecord: func(raw []byte) error {
			_, err := d.Accept(d.ctx, raw, FromAuthority)
			return err
		},
		OnPolicy: func(raw []byte) error {
			_, err := d.Accept(d.ctx, raw, FromAuthority)
			return err
		},
		OnError: func(err error) {
			if !errors.Is(err, context.Canceled) {
				d.log.Debug("authority watch", "err", err)
			}
		},
		Logger: d.log,
		Now:    d.now,
	})
	if err != nil && ctx.Err() == nil {
		d.log.Error("authority watch stopped", "err", err)
	}
}
