package daemon

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"sync"
	"time"

	"github.com/ute-project/ute/identity/authority"
	"github.com/ute-project/ute/identity/record"
	"github.com/ute-project/ute/node"
	"github.com/ute-project/ute/overlay/tunnel"
)

// Duplicate identity: revocation on evidence. While one node identity holds inbound tunnels from
// two addresses, this node challenges it on each tunnel (control channel channelPresence); the
// process behind each tunnel answers with a presence proof naming its own random instance and
// start time, signed with the node key. Two proofs of distinct instances whose lives overlap are
// evidence that two processes hold the key at once (record.CheckDuplicate); once the duplicate
// is confirmed, this node submits them to the authority (authority.SubmitEvidence), which checks
// them itself and revokes the identity for everyone. A restarted node is one instance after the
// other, so it never produces such a pair.

// channelPresence is the control channel of presence challenges on a zone tunnel.
const channelPresence byte = 8

// Presence challenge timing.
const (
	presenceEvery   = 400 * time.Millisecond
	presenceTimeout = 2 * time.Second
	// evidenceGiveUp bounds how long a confirmed duplicate is challenged for a usable pair.
	evidenceGiveUp = 10 * time.Second
	maxChallenge   = record.PresenceChallengeLen + 1 + 64
	// maxProofsPerSecond bounds the proofs this node signs: a peer asking in a loop must not
	// turn the node into a signing oracle that eats its CPU.
	maxProofsPerSecond = 50
)

// evidence is this process's instance (for the proofs it signs) and the collectors it runs.
type evidence struct {
	t        *trust
	instance []byte
	started  time.Time

	mu        sync.Mutex
	running   map[string]bool // subjects being challenged
	confirmed map[string]time.Time
	submitted map[string]uint64 // subject → the authority's record sequence
	// signed counts the proofs signed in the second that began at signedAt.
	signedAt time.Time
	signed   int
}

// allowProof spends one of this second's proofs.
func (e *evidence) allowProof() bool {
	now := time.Now()
	e.mu.Lock()
	defer e.mu.Unlock()
	if now.Sub(e.signedAt) >= time.Second {
		e.signedAt, e.signed = now, 0
	}
	if e.signed >= maxProofsPerSecond {
		return false
	}
	e.signed++
	return true
}

func newEvidence(t *trust) *evidence {
	inst := make([]byte, record.PresenceInstanceLen)
	_, _ = rand.Read(inst)
	return &evidence{t: t, instance: inst, started: t.d.now(), running: map[string]bool{},
		confirmed: map[string]time.Time{}, submitted: map[string]uint64{}}
}

// register installs the presence handler on the node's control mux.
func (e *evidence) register() {
	if err := e.t.d.mux.HandleStream(channelPresence, e.serve); err != nil {
		e.t.d.log.Warn("presence handler", "err", err)
	}
}

// serve answers one challenge: [16-byte challenge][1-byte length][address the challenger saw].
// The observer named in the proof is the tunnel's authenticated peer, never a claim.
func (e *evidence) serve(t *tunnel.Tunnel, c net.Conn) {
	defer func() { _ = c.Close() }()
	d := e.t.d
	_ = c.SetDeadline(time.Now().Add(presenceTimeout)) // a socket deadline: wall time, not the injected clock
	var hdr [record.PresenceChallengeLen + 1]byte
	if _, err := io.ReadFull(c, hdr[:]); err != nil {
		return
	}
	addr := make([]byte, min(int(hdr[record.PresenceChallengeLen]), maxChallenge))
	if _, err := io.ReadFull(c, addr); err != nil {
		return
	}
	if !e.allowProof() {
		return
	}
	cert, key, err := d.node.Credentials()
	if err != nil {
		return
	}
	raw, err := record.SignPresence(record.PresenceClaims{
		TrustDomain: cert.ID.TrustDomain, Node: cert.ID.String(), Instance: e.instance, StartedAt: e.started.Truncate(time.Millisecond),
		SignedAt: d.now().Truncate(time.Millisecond), Observer: t.Peer().NodeID, Challenge: hdr[:record.PresenceChallengeLen],
		NodeCert: cert.Raw(), Addr: record.FitTrustReason(string(addr)),
	}, key)
	if err != nil {
		d.log.Debug("presence not signed", "err", err)
		return
	}
	out := binary.BigEndian.AppendUint16(nil, uint16(len(raw)))
	_, _ = c.Write(append(out, raw...))
}

// challenge asks the process behind tunnel t for a presence proof and verifies it.
func (e *evidence) challenge(ctx context.Context, t *tunnel.Tunnel) (*record.Presence, error) {
	d := e.t.d
	ctx, cancel := context.WithTimeout(ctx, presenceTimeout)
	defer cancel()
	c, err := t.OpenControl(ctx, channelPresence)
	if err != nil {
		return nil, err
	}
	defer func() { _ = c.Close() }()
	_ = c.SetDeadline(time.Now().Add(presenceTimeout)) // a socket deadline: wall time, not the injected clock
	ch := make([]byte, record.PresenceChallengeLen)
	_, _ = rand.Read(ch)
	addr := t.RemoteAddr().String()
	if len(addr) > 64 {
		addr = addr[:64]
	}
	if _, err := c.Write(append(append(slices.Clone(ch), byte(len(addr))), addr...)); err != nil {
		return nil, err
	}
	var n [2]byte
	if _, err := io.ReadFull(c, n[:]); err != nil {
		return nil, err
	}
	if int(binary.BigEndian.Uint16(n[:])) > record.MaxPresenceSize {
		return nil, fmt.Errorf("%w: presence proof of %d bytes", record.ErrTooLarge, binary.BigEndian.Uint16(n[:]))
	}
	raw := make([]byte, binary.BigEndian.Uint16(n[:]))
	if _, err := io.ReadFull(c, raw); err != nil {
		return nil, err
	}
	p, err := d.verif.VerifyPresence(raw, d.now())
	if err != nil {
		return nil, err
	}
	self := d.node.ID()
	switch {
	case p.NodeID.String() != t.Peer().NodeID:
		return nil, fmt.Errorf("presence of %s on a tunnel of %s", p.NodeID, t.Peer().NodeID)
	case p.ObserverID != self || !slices.Equal(p.Claims.Challenge, ch):
		return nil, errors.New("presence answers another challenge")
	}
	return p, nil
}

// candidate starts challenging subject while it holds inbound tunnels from two addresses (a
// possible duplicate, not yet confirmed), so that the proofs exist before isolation closes the
// tunnels.
func (e *evidence) candidate(subject string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.running[subject] || e.submitted[subject] != 0 {
		return
	}
	e.running[subject] = true
	d := e.t.d
	d.wg.Go(func() { e.collect(d.ctx, subject) })
}

// start marks subject as a confirmed duplicate: its collector submits the evidence.
func (e *evidence) start(subject string) {
	e.mu.Lock()
	if _, ok := e.confirmed[subject]; !ok {
		e.confirmed[subject] = e.t.d.now()
	}
	e.mu.Unlock()
	e.candidate(subject)
}

// pending reports whether subject is a confirmed duplicate whose evidence is still being
// collected: its tunnels must stay up until both processes have answered.
func (e *evidence) pending(subject string) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	_, confirmed := e.confirmed[subject]
	return confirmed && e.running[subject] && e.submitted[subject] == 0
}

func (e *evidence) state(subject string) (confirmed time.Time, ok bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	c, ok := e.confirmed[subject]
	return c, ok
}

// inbound is subject's live inbound tunnels, one per source address.
func (e *evidence) inbound(subject string) []*tunnel.Tunnel {
	var out []*tunnel.Tunnel
	seen := map[string]bool{}
	for _, t := range e.t.d.node.Endpoint().Tunnels() {
		if t.Outbound() || !t.Alive() || t.Peer().NodeID != subject {
			continue
		}
		if a := t.RemoteAddr().String(); !seen[a] {
			seen[a] = true
			out = append(out, t)
		}
	}
	return out
}

// collect challenges subject's tunnels until it has two overlapping instances and the duplicate
// is confirmed (then submits), the candidate goes away unconfirmed (a restart), or it gives up.
func (e *evidence) collect(ctx context.Context, subject string) {
	d := e.t.d
	defer func() {
		e.mu.Lock()
		delete(e.running, subject)
		e.mu.Unlock()
	}()
	latest := map[string]*record.Presence{} // instance → its newest proof
	tick := time.NewTicker(presenceEvery)
	defer tick.Stop()
	for {
		for _, t := range e.inbound(subject) {
			p, err := e.challenge(ctx, t)
			if err != nil {
				d.log.Debug("presence challenge", "subject", subject, "addr", t.RemoteAddr().String(), "err", err)
				continue
			}
			d.log.Debug("presence proof", "subject", subject, "addr", t.RemoteAddr().String(), "instance", hex.EncodeToString(p.Claims.Instance[:4]),
				"started", p.Claims.StartedAt, "signed", p.Claims.SignedAt)
			k := hex.EncodeToString(p.Claims.Instance)
			if old, ok := latest[k]; !ok || p.Claims.SignedAt.After(old.Claims.SignedAt) {
				latest[k] = p
			}
		}
		confirmedAt, confirmed := e.state(subject)
		if confirmed {
			if a, b, ok := overlapping(latest); ok {
				e.submit(ctx, subject, a, b)
				return
			}
			if d.now().Sub(confirmedAt) > evidenceGiveUp {
				d.log.Warn("duplicate identity: no presence proofs of two live instances; not reported to the authority", "subject", subject, "instances", len(latest))
				return
			}
		} else if len(e.inbound(subject)) < 2 {
			return // one address again: a restart, or the copy is gone
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// overlapping finds two proofs of distinct instances that CheckDuplicate accepts.
func overlapping(latest map[string]*record.Presence) (a, b *record.Presence, ok bool) {
	keys := make([]string, 0, len(latest))
	for k := range latest {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for i := range keys {
		for j := i + 1; j < len(keys); j++ {
			if record.CheckDuplicate(latest[keys[i]], latest[keys[j]], authority.EvidenceOverlap) == nil {
				return latest[keys[i]], latest[keys[j]], true
			}
		}
	}
	return nil, nil, false
}

// submit sends the evidence to the authority and audits the outcome.
func (e *evidence) submit(ctx context.Context, subject string, a, b *record.Presence) {
	d := e.t.d
	fields := map[string]string{"subject": subject, "action": "duplicate_evidence",
		"reasons": fmt.Sprintf("instances %x (since %s) and %x (since %s) live at once", a.Claims.Instance[:4],
			a.Claims.StartedAt.UTC().Format(time.RFC3339), b.Claims.Instance[:4], b.Claims.StartedAt.UTC().Format(time.RFC3339))}
	if d.authority == "" {
		fields["revocation"] = "not submitted: this node runs without an authority"
	} else if anchor, err := d.dir.AuthorityCert(); err != nil {
		fields["revocation"] = "not submitted: " + err.Error()
	} else if cert, key, err := d.node.Credentials(); err != nil {
		fields["revocation"] = "not submitted: " + err.Error()
	} else {
		sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		seq, err := authority.SubmitEvidence(sctx, authority.EvidenceParams{Addr: d.authority, Authority: anchor, Current: cert, Key: key,
			A: a.Raw(), B: b.Raw()})
		cancel()
		if err != nil {
			fields["revocation"] = "refused by the authority: " + err.Error()
			d.log.Warn("duplicate identity evidence refused", "subject", subject, "err", err)
		} else {
			e.mu.Lock()
			e.submitted[subject] = seq
			e.mu.Unlock()
			fields["revocation"] = fmt.Sprintf("revoked by the authority on this node's evidence (record %d)", seq)
			d.log.Warn("duplicate identity revoked by the authority on evidence", "subject", subject, "seq", seq)
		}
	}
	if err := d.node.AppendAudit(context.WithoutCancel(ctx), node.EventTrust, fields); err != nil {
		d.log.Error("duplicate evidence not audited", "subject", subject, "err", err)
	}
}

// EvidenceSubmitted is the authority's record sequence of the duplicate-identity revocation this
// node obtained for subject (0: none).
func (d *Daemon) EvidenceSubmitted(subject string) uint64 {
	d.trust.ev.mu.Lock()
	defer d.trust.ev.mu.Unlock()
	return d.trust.ev.submitted[subject]
}
