package node

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/identity/authority"
	"github.com/ute-project/ute/identity/record"
	"github.com/ute-project/ute/node/state"
	"github.com/ute-project/ute/overlay/tunnel"
)

// The credential scheduler: one node-owned goroutine keeps the node certificate (with
// Config.Authority) and every local agent certificate (always: agents are issued by the node
// itself) inside their lifetimes. One loop rather than two so that a node renewal and an agent
// reissue never race for the same agent, the node certificate's cap on agent lifetimes is
// handled in one place, and an injected Config.After sees one deterministic sequence of waits.

// Audit events of agent certificate renewal.
const (
	eventAgentRenewed     = "agent-renewed"
	eventAgentRenewFailed = "agent-renew-failed"
)

// Causes recorded in agent-renewed entries.
const (
	causeHalfLife    = "half-life"    // the scheduler found the agent past half-life
	causeNodeRenewed = "node-renewed" // the node renewed; its new key signs its agents again
	causeOnDemand    = "on-demand"    // Node.Agent found the certificate due before the scheduler did
)

// Backoff bounds of the scheduler after a failed renewal or reissue (Config.RenewMinRetry,
// RenewMaxRetry override them).
const (
	defaultMinRetry = 5 * time.Second
	defaultMaxRetry = 5 * time.Minute
)

// errSwapRaced means the node certificate changed while an agent was reissued under the old one;
// the next pass reissues it under the new one.
var errSwapRaced = errors.New("node certificate changed while the agent was reissued")

// errStaleTunnel means a directory exchange was about to run on a tunnel whose handshake
// presented a node certificate this node has since replaced.
var errStaleTunnel = errors.New("tunnel presents a node certificate this node has replaced")

// credSched is the scheduler's published state, guarded by Node.mu: whether it sleeps and until
// when (zero: no deadline), and a generation bumped whenever the agent set changes outside the
// loop, so that a pass racing with such a change runs again instead of sleeping on stale data.
type credSched struct {
	sleeping bool
	until    time.Time
	gen      uint64
	wake     chan struct{}

	// The node certificate's renewals, for RenewalStatus.
	lastSuccess, lastFailure time.Time
	lastError                string
}

// RenewalStatus is the state of the node certificate's automatic renewal.
type RenewalStatus struct {
	Enabled bool // an authority address is configured
	// Retrying: the last attempt failed and none has succeeded since.
	Retrying bool
	// NextAt is when the scheduler next renews: the certificate's half-life, or the retry.
	NextAt                   time.Time
	LastSuccess, LastFailure time.Time
	LastError                string
}

// RenewalStatus reports the node certificate's renewal: when it runs next and how the last
// attempts went (since this process started).
func (n *Node) RenewalStatus() RenewalStatus {
	c := n.certificate()
	n.mu.Lock()
	defer n.mu.Unlock()
	st := RenewalStatus{Enabled: n.cfg.Authority != "", LastSuccess: n.sched.lastSuccess,
		LastFailure: n.sched.lastFailure, LastError: n.sched.lastError}
	if !st.Enabled {
		return st
	}
	st.Retrying = !st.LastFailure.IsZero() && st.LastFailure.After(st.LastSuccess)
	st.NextAt = c.RenewAt()
	if st.Retrying && n.sched.sleeping && !n.sched.until.IsZero() {
		// Backing off: the loop's deadline is the retry (or an agent due sooner).
		st.NextAt = n.sched.until
	}
	return st
}

// noteRenewal records the outcome of one renewal attempt of the node certificate.
func (n *Node) noteRenewal(err error) {
	now := n.now()
	n.mu.Lock()
	defer n.mu.Unlock()
	if err != nil {
		n.sched.lastFailure, n.sched.lastError = now, truncate(err.Error())
		return
	}
	n.sched.lastSuccess, n.sched.lastError = now, ""
}

// loadIssuer reads the node's issuing certificate (its key is derived from the node key and
// checked against it by the directory) and checks it under the trust anchor.
func (n *Node) loadIssuer(d *state.Dir) error {
	issuer, _, err := d.NodeIssuer()
	if err != nil {
		return err
	}
	if err := n.verif.VerifyIssuer(issuer, n.now()); err != nil {
		return fmt.Errorf("node: own issuing certificate does not verify (renew with `ute node renew --dir %s`): %w", n.cfg.Dir, err)
	}
	n.issuer = issuer
	return nil
}

// issuerCertificate is the issuing certificate in use now: the CA of this node's agents, swapped
// together with the node certificate at renewal.
func (n *Node) issuerCertificate() *identity.Certificate {
	n.credMu.RLock()
	defer n.credMu.RUnlock()
	return n.issuer
}

// startCredentials runs the scheduler until Close.
func (n *Node) startCredentials() {
	n.wg.Go(func() { n.runCredentials(n.ctx) })
}

// runCredentials is the scheduler loop. Each pass renews what is due and computes the earliest
// next deadline; it then sleeps on Config.After until that deadline, or until an agent with an
// earlier one is registered. A pass with a failure waits the backoff (doubling from
// RenewMinRetry to RenewMaxRetry) instead, and the next pass retries everything still due.
func (n *Node) runCredentials(ctx context.Context) {
	after := n.cfg.After
	if after == nil {
		after = time.After
	}
	minRetry, maxRetry := n.cfg.RenewMinRetry, n.cfg.RenewMaxRetry
	if minRetry <= 0 {
		minRetry = defaultMinRetry
	}
	if maxRetry < minRetry {
		maxRetry = max(defaultMaxRetry, minRetry)
	}
	backoff := minRetry
	for {
		gen := n.credGen()
		next, failed := n.maintainCredentials(ctx)
		if ctx.Err() != nil {
			return
		}
		now := n.now()
		wait, until := time.Duration(-1), next // no deadline: sleep until woken
		if !next.IsZero() {
			wait = max(next.Sub(now), 0)
		}
		if failed {
			if wait < 0 || backoff < wait {
				wait, until = backoff, now.Add(backoff)
			}
			backoff = min(2*backoff, maxRetry)
		} else {
			backoff = minRetry
			if wait == 0 {
				continue // a deadline passed while the pass ran
			}
		}
		timer, ok := n.credSleep(gen, until, wait, after)
		if !ok {
			continue // the agent set changed during the pass
		}
		select {
		case <-ctx.Done():
			return
		case <-timer:
		case <-n.sched.wake:
		}
		n.credAwake()
	}
}

func (n *Node) credGen() uint64 {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.sched.gen
}

// credSleep publishes that the loop sleeps until until (zero: no deadline) and starts its timer
// (none for a negative wait), unless the agent set changed since generation gen. The timer is
// started under the lock, so whoever sees the loop asleep knows which timer it waits for.
func (n *Node) credSleep(gen uint64, until time.Time, wait time.Duration, after func(time.Duration) <-chan time.Time) (<-chan time.Time, bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.sched.gen != gen {
		return nil, false
	}
	n.sched.sleeping, n.sched.until = true, until
	if wait < 0 {
		return nil, true
	}
	return after(wait), true
}

// credAwake marks the loop busy. A wake-up signalled while it slept is dropped: the pass about to
// run reads the agent table after this, so it sees whatever the signal was about.
func (n *Node) credAwake() {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.sched.sleeping = false
	select {
	case <-n.sched.wake:
	default:
	}
}

// noteAgents tells the scheduler about agent certificates registered outside it: a running pass
// starts again, and a sleeping loop is woken only when one of them is due before its deadline
// (waking it needlessly would cost a wake-up per Node.Agent call).
func (n *Node) noteAgents(certs ...*identity.Certificate) {
	self, now := n.issuerCertificate(), n.now()
	var earliest time.Time
	for _, c := range certs {
		if at, ok := n.agentRenewAt(self, c, now); ok && (earliest.IsZero() || at.Before(earliest)) {
			earliest = at
		}
	}
	if len(certs) == 0 {
		return
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	n.sched.gen++
	if !earliest.IsZero() && n.sched.sleeping && (n.sched.until.IsZero() || earliest.Before(n.sched.until)) {
		// Sent under the lock, so that credAwake's drain cannot miss a signal sent for a sleep
		// that has already ended.
		select {
		case n.sched.wake <- struct{}{}:
		default:
		}
	}
}

// agentRenewAt is when the node must reissue agent certificate c while self is its own issuing
// certificate (which ends with the node certificate); ok is false when there is nothing the node
// can or may do:
//   - the agent is revoked (by SPIFFE ID or this serial): reissuing would hand it a serial the
//     revocation does not name;
//   - the node certificate has expired: it can no longer issue (the node must rejoin);
//   - c's lifetime is capped by self's NotAfter: a new certificate would end at the same moment,
//     so reissuing at its half-life would only repeat itself ever faster as the node's expiry
//     nears. The node's own renewal (at self's half-life, before c ends) reissues it instead.
//
// c is due at once when it does not verify under self (issued under a node key the node no
// longer holds, expired, or not yet valid); otherwise at its half-life.
func (n *Node) agentRenewAt(self, c *identity.Certificate, now time.Time) (time.Time, bool) {
	if n.isRevoked(record.ChainKeys(self, c)...) || !now.Before(self.X509.NotAfter) {
		return time.Time{}, false
	}
	if n.verif.VerifyAgent(self, c, now) != nil {
		return now, true
	}
	if !c.X509.NotAfter.Before(self.X509.NotAfter) {
		return time.Time{}, false
	}
	return c.RenewAt(), true
}

// maintainCredentials is one pass of the scheduler: renew the node certificate if due, reissue
// every agent certificate that is due, re-announce what changed to the peers, and return the
// earliest deadline still ahead (zero: none) and whether anything due failed.
func (n *Node) maintainCredentials(ctx context.Context) (next time.Time, failed bool) {
	var changed []string // zones whose directory entries changed
	if n.cfg.Authority != "" {
		cur := n.certificate()
		if authority.NeedsRenewal(cur, n.now()) {
			err := n.renew(ctx)
			if ctx.Err() == nil {
				n.noteRenewal(err)
			}
			if err != nil {
				if ctx.Err() != nil {
					return time.Time{}, false
				}
				n.log.Warn("renewal failed; retrying", "node", cur.ID.String(), "not_after", cur.X509.NotAfter, "err", err)
				failed = true
			} else {
				n.log.Info("certificate renewed", "node", cur.ID.String())
				changed = n.certificate().Claims.ZoneNames()
				// A certificate due again at once (a lifetime under the authority's backdate, or
				// NotAfter capped by a root about to expire) would make the loop renew without
				// pause, each pass costing the authority a signature and an audit record: back off.
				if now, c := n.now(), n.certificate(); authority.NeedsRenewal(c, now) {
					n.log.Warn("renewed certificate is due for renewal again at once; backing off", "node", c.ID.String(),
						"serial", c.Serial().String(), "not_before", c.X509.NotBefore, "not_after", c.X509.NotAfter)
					failed = true
				}
			}
		}
		if !failed {
			next = n.certificate().RenewAt()
		}
	}
	agentNext, zones, agentFailed := n.reissueDueAgents(ctx)
	failed = failed || agentFailed
	if !agentNext.IsZero() && (next.IsZero() || agentNext.Before(next)) {
		next = agentNext
	}
	for _, z := range zones {
		if !slices.Contains(changed, z) {
			changed = append(changed, z)
		}
	}
	if len(changed) > 0 && ctx.Err() == nil {
		n.announce(ctx, changed)
	}
	return next, failed
}

// reissueDueAgents reissues every local agent certificate that is due, returning the earliest
// deadline ahead, the zones of the agents it reissued, and whether a due agent failed.
func (n *Node) reissueDueAgents(ctx context.Context) (next time.Time, zones []string, failed bool) {
	self, now := n.issuerCertificate(), n.now()
	n.mu.Lock()
	type item struct {
		k    agentKey
		cert *identity.Certificate
	}
	items := make([]item, 0, len(n.agents))
	for k, st := range n.agents {
		if st.Cert != nil {
			items = append(items, item{k, st.Cert})
		}
	}
	n.mu.Unlock()
	slices.SortFunc(items, func(a, b item) int {
		return strings.Compare(a.k.zone+"/"+a.k.name, b.k.zone+"/"+b.k.name)
	})
	earliest := func(t time.Time) {
		if next.IsZero() || t.Before(next) {
			next = t
		}
	}
	for _, it := range items {
		if ctx.Err() != nil {
			return next, zones, false
		}
		at, ok := n.agentRenewAt(self, it.cert, now)
		if !ok {
			continue
		}
		if now.Before(at) {
			earliest(at)
			continue
		}
		st, err := n.reissueAgent(it.k, it.cert, self, causeHalfLife)
		if err == nil {
			// A fresh certificate that is due again at once would make the loop spin: treat it as
			// a failure so the backoff applies.
			if at, ok := n.agentRenewAt(self, st.Cert, now); ok {
				if !now.Before(at) {
					err = fmt.Errorf("reissued certificate serial %s is due again at once (not before %s, not after %s)",
						st.Cert.Serial(), st.Cert.X509.NotBefore.UTC().Format(time.RFC3339), st.Cert.X509.NotAfter.UTC().Format(time.RFC3339))
				} else {
					earliest(at)
				}
			}
			if !slices.Contains(zones, it.k.zone) {
				zones = append(zones, it.k.zone)
			}
		}
		if err != nil {
			failed = true
			n.log.Warn("agent certificate reissue failed; retrying", "agent", it.cert.ID.String(),
				"serial", it.cert.Serial().String(), "not_after", it.cert.X509.NotAfter, "err", err)
			n.credentialFailed(it.cert.ID.String(), err)
			n.appendAudit(eventAgentRenewFailed, map[string]string{
				"agent": truncate(it.cert.ID.String()), "serial": it.cert.Serial().String(), "error": truncate(err.Error()),
			})
		}
	}
	return next, zones, failed
}

// reissueAgent reissues agent k (whose certificate in service is old) under self (the issuing
// certificate in service), and swaps the
// new certificate into the node's agent table and the handle given out, under the credential
// lock, so that a record is signed either with the whole old chain or the whole new one. The
// agent keeps its key (docs/sdk.md, "Agent certificate renewal").
func (n *Node) reissueAgent(k agentKey, old *identity.Certificate, self *identity.Certificate, cause string) (*state.Agent, error) {
	st, err := n.dir.ReissueAgent(k.zone, k.name)
	if err != nil {
		return nil, fmt.Errorf("node: reissue agent %s.%s: %w", k.name, k.zone, err)
	}
	if err := n.verif.VerifyAgent(self, st.Cert, n.now()); err != nil {
		// The directory's node key is not the one in service: the node was renewed offline
		// (`ute node renew`) while it ran. Agents must be issued by the certificate it presents.
		return nil, fmt.Errorf("node: agent %s.%s was reissued under a node certificate this node does not run with (restart the node after an offline renewal): %w", k.name, k.zone, err)
	}
	n.mu.Lock()
	n.credMu.Lock()
	swapped := n.issuer == self
	if swapped {
		n.agents[k] = st
		if a := n.open[k]; a != nil {
			a.setCreds(st.Cert, nil, self)
		}
	}
	n.credMu.Unlock()
	n.mu.Unlock()
	if !swapped {
		return nil, fmt.Errorf("node: agent %s.%s: %w", k.name, k.zone, errSwapRaced)
	}
	n.auditAgentRenewed(old, st, cause)
	return st, nil
}

// auditAgentRenewed appends one agent-renewed entry and logs it.
func (n *Node) auditAgentRenewed(old *identity.Certificate, st *state.Agent, cause string) {
	f := map[string]string{
		"agent": truncate(st.Cert.ID.String()), "serial": st.Cert.Serial().String(),
		"not_after": st.Cert.X509.NotAfter.UTC().Format(time.RFC3339), "ip": st.IP.String(), "cause": cause,
	}
	if old != nil {
		f["old_serial"] = old.Serial().String()
	}
	n.appendAudit(eventAgentRenewed, f)
	n.log.Info("agent certificate renewed", "agent", st.Cert.ID.String(), "serial", st.Cert.Serial().String(),
		"not_after", st.Cert.X509.NotAfter, "cause", cause)
}

// announce re-runs the zone directory exchange with every peer holding a live tunnel in one of
// zones, so that their view carries this node's current agent certificates. The exchange goes
// over a tunnel that presents the current node certificate: after a node renewal every existing
// tunnel is stale (the peer verified the old certificate, under which the new agent certificates
// would not verify, and would drop them), so tunnelTo handshakes a fresh one. Failures are logged;
// a peer that missed the announcement still verifies every record on admission, and its lookups
// fall back to a directory refresh.
func (n *Node) announce(ctx context.Context, zones []string) {
	ctx, cancel := context.WithTimeout(ctx, directoryTimeout)
	defer cancel()
	self := n.certificate().ID.String()
	n.mu.Lock()
	keys := map[refreshKey]struct{}{}
	for t := range n.tunnels {
		if z := t.Zone(); t.Alive() && slices.Contains(zones, z) && t.Peer().NodeID != self {
			keys[refreshKey{t.Peer().NodeID, z}] = struct{}{}
		}
	}
	n.mu.Unlock()
	signers := map[string]*Agent{}
	for k := range keys {
		if _, ok := signers[k.zone]; !ok {
			signers[k.zone] = n.directorySigner(k.zone)
		}
	}
	var wg sync.WaitGroup
	for k := range keys {
		a := signers[k.zone]
		if a == nil {
			continue // no local agent of the zone left: nothing to announce
		}
		wg.Go(func() {
			err := n.exchangeRefresh(ctx, k, true, a, func(ctx context.Context) (*tunnel.Tunnel, error) {
				return n.tunnelTo(ctx, k.node, k.zone)
			})
			if err != nil && n.ctx.Err() == nil {
				n.log.Warn("directory announcement failed", "peer", k.node, "zone", k.zone, "err", err)
			}
		})
	}
	wg.Wait()
}
