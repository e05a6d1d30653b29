package node

import (
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"path/filepath"
	"sync"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/node/state"
	"github.com/ute-project/ute/overlay/audit"
)

// errAuditUnavailable is returned by appends after the log could not be reopened with a renewed key.
var errAuditUnavailable = errors.New("node: audit log unavailable")

// auditLog is the node's audit log, re-keyable at run time. The log signs its head with the node
// key, and `ute audit verify` checks that head against node.crt and the key handovers recorded
// at each renewal (state.FileKeyHistory). The node opens the log with audit.Options.SetAside: it
// never signs over entries it cannot verify against its own last signed head (a forged append, a
// cut or edited log); it moves them aside, kept and named, and records that in the log. After a
// renewal installs a new key, the log is closed (its head signed by the old key) and reopened
// with the new one, which accepts the old key's head through its handover and records the change.
type auditLog struct {
	dir  string
	opts audit.Options
	// refusals writes denials and refused handshakes through audit.Flood, so that a flood of
	// them is collapsed and budgeted (docs/protocol.md §8); every other entry goes to the log as is.
	refusals *audit.Flood

	mu  sync.RWMutex
	log *audit.Log
	err error // why log is nil after a failed rekey
}

func openAuditLog(dir string, opts audit.Options, refusals audit.FloodOptions) (*auditLog, error) {
	opts.SetAside = opts.Key != nil
	opts.RecordKeyChange = opts.Key == nil
	var err error
	if opts.TrustedKeys, err = earlierKeys(dir, opts.Key); err != nil {
		return nil, err
	}
	l, err := audit.Open(dir, opts)
	if err != nil {
		return nil, err
	}
	a := &auditLog{dir: dir, opts: opts, log: l}
	if refusals.Now == nil {
		refusals.Now = opts.Now
	}
	if refusals.Logger == nil {
		refusals.Logger = opts.Logger
	}
	// The flood appends through a, so it keeps writing across a rekey.
	a.refusals = audit.NewFlood(a, refusals)
	return a, nil
}

// Refuse appends a refusal through the flood control (audit.Flood.Refuse): key names the fields
// that make two refusals identical.
func (a *auditLog) Refuse(ctx context.Context, e audit.Entry, key ...string) error {
	return a.refusals.Refuse(ctx, e, key...)
}

// flushRefusals writes the pending refusal summaries now (audit.Flood.Flush).
func (a *auditLog) flushRefusals() error { return a.refusals.Flush(context.Background()) }

// Append appends one entry (audit.Log.Append).
func (a *auditLog) Append(ctx context.Context, e audit.Entry) error {
	a.mu.RLock()
	defer a.mu.RUnlock()
	if a.log == nil {
		return fmt.Errorf("%w: %w", errAuditUnavailable, a.err)
	}
	return a.log.Append(ctx, e)
}

// Sync flushes buffered entries and the head.
func (a *auditLog) Sync() error {
	a.mu.RLock()
	defer a.mu.RUnlock()
	if a.log == nil {
		return fmt.Errorf("%w: %w", errAuditUnavailable, a.err)
	}
	return a.log.Sync()
}

// Close writes the pending refusal summaries and closes the log.
func (a *auditLog) Close() error {
	ferr := a.refusals.Close() // before a.mu: it appends through a
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.log == nil {
		return nil
	}
	err := a.log.Close()
	a.log = nil
	a.err = ErrClosed
	return errors.Join(ferr, err)
}

// AuditRefusals reports how the audit log's flood control handled refusals: written one by one,
// collapsed into summaries, or dropped over the hourly budget (each counted exactly in the log).
func (n *Node) AuditRefusals() audit.FloodStats { return n.audit.refusals.Stats() }

// rekey reopens the log so that its head is signed with key from now on. Appends wait for it.
func (a *auditLog) rekey(key ed25519.PrivateKey) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.log == nil {
		return fmt.Errorf("%w: %w", errAuditUnavailable, a.err)
	}
	if err := a.log.Close(); err != nil {
		a.log, a.err = nil, err
		return fmt.Errorf("node: audit log: close before rekey: %w", err)
	}
	opts := a.opts
	opts.Key = key
	var err error
	if opts.TrustedKeys, err = earlierKeys(a.dir, key); err != nil {
		a.log, a.err = nil, err
		return fmt.Errorf("node: audit log: %w", err)
	}
	l, err := audit.Open(a.dir, opts)
	if err != nil {
		a.log, a.err = nil, err
		return fmt.Errorf("node: audit log: reopen with the renewed key: %w", err)
	}
	a.log, a.opts = l, opts
	return nil
}

// earlierKeys returns the node keys that handed over, directly or not, to key: the audit log in
// dir (the node directory's audit/) accepts a head they signed.
func earlierKeys(dir string, key ed25519.PrivateKey) ([]ed25519.PublicKey, error) {
	if key == nil {
		return nil, nil
	}
	hist, err := state.ReadKeyHistory(filepath.Dir(dir))
	if err != nil {
		return nil, fmt.Errorf("node: audit log: key history: %w", err)
	}
	return identity.Predecessors(key.Public().(ed25519.PublicKey), hist)[1:], nil
}
