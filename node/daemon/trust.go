package daemon

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unicode"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/identity/record"
	"github.com/ute-project/ute/node"
	"github.com/ute-project/ute/node/localapi"
	"github.com/ute-project/ute/node/trustflow"
	"github.com/ute-project/ute/zones"
)

// TrustFlow in the daemon: the node's events become signals (trustflow.Engine), scores feed
// back into what the node attests and admits (node.Config.TrustView), and a score below a
// zone's thresholds is acted on: below min_trust flows from the subject are denied with reason
// "trust" (by admission, through the view); below isolate_below the subject is isolated: this
// node revokes itself or its own agent (a signed record, stored, applied, gossiped), or cuts a
// remote subject locally (node.Revoke: its tunnels and flows here, until restart).

// FileRegion is the optional region file in the node directory. When present, its first line is
// where the node runs now (a provisioning hook or the cloud's metadata agent writes it); the
// daemon checks it every trust tick (a stat; it re-reads the file when the stat changes), so a
// change is noticed within trustRestTick (500 ms) by default. Absent, the region is the one
// recorded at join.
const FileRegion = "region"

// Tuning of the daemon's TrustFlow wiring.
const (
	// trustTick is the trust loop's default period (Options.TrustTick) while it holds something:
	// a score, a trust event, an action taken. trustRestTick is its period while it holds
	// nothing, which is a node's normal state: the loop then only checks the region file, the
	// inbound tunnels for a duplicate (every dupEvery) and the certificate's expiry, and a region
	// drift must still be acted on within a second (docs/architecture.md). Four wake-ups a second
	// at rest were one of the main costs of an idle node (docs/benchmarks.md, "A node at rest").
	trustTick       = 250 * time.Millisecond
	trustRestTick   = 500 * time.Millisecond
	trustQueue      = 4096
	nodeShare       = 5                // a node takes 1/nodeShare of the weight its agent's signal carries
	renewalCooldown = 30 * time.Minute // at most one renewal-failure signal per subject in this time
	// A workload mismatch seen by an interface or by an SDK agent's Dial: see trust.fingerprint.
	proxyMismatchWeight = 25
	mismatchCooldown    = time.Minute
)

// trust is the daemon's TrustFlow state. The engine is safe for concurrent use; everything else
// is touched only by the trust loop.
type trust struct {
	d   *Daemon
	eng *trustflow.Engine
	// in holds pointers: a channel reserves its whole buffer up front, and trustQueue inputs by
	// value were 384 KiB per node whether anything was ever queued (the 1,000-node simulation).
	in      chan *trustInput
	dropped atomic.Uint64

	burst      *trustflow.BurstDetector
	dup        trustflow.DuplicateDetector
	agentDup   trustflow.AgentDuplicateDetector // one agent identity issued by two live nodes
	acted      map[string]zones.Action
	renewedAt  map[string]time.Time // last renewal-failure signal per subject
	mismatchAt map[string]time.Time // last workload-mismatch signal per agent
	expiring   string               // serial already signalled as expiring
	region     string               // region already signalled as drifted
	placed     placement            // the last region found inside every zone's placement
	dupAt      time.Time            // last duplicate check (see dupEvery)
	tick       time.Duration        // the loop's period while something is held (Options.TrustTick)

	// Trust events (trust_events.go): the verified events held, their counters, and what this
	// node emitted per subject and kind in the current minute.
	events  *eventStore
	counts  *eventCounters
	emitted map[string]emitWindow
	pruneAt time.Time
	// Duplicate evidence (trust_evidence.go).
	ev *evidence
}

// placement is a region checked against the zones' placement, with what it was checked under:
// the policy and the certificate (which names the zones). checkRegion skips the check while all
// three are unchanged.
type placement struct {
	region string
	pol    *zones.Policy
	cert   *identity.Certificate
}

// dupEvery is how often the trust loop compares inbound tunnels for a duplicated identity: an
// eighth of the confirmation time, between the tick and 2 s. The comparison walks every tunnel,
// which at 100 tunnels four times a second was the trust loop's main cost at rest; a sighting
// must persist for the whole confirmation time anyway (45 s by default), so checking every 2 s
// instead adds at most 2 s to it. The region file is still checked every tick.
func (t *trust) dupEvery() time.Duration {
	confirm := t.d.opts.DuplicateConfirm
	if confirm <= 0 {
		confirm = 45 * time.Second // trustflow.DuplicateDetector's default
	}
	return min(max(confirm/8, t.tick), max(2*time.Second, t.tick))
}

// nextTick is the wait until the loop's next periodic check: the tick while something is held
// (a score whose decay may change the action, an action to re-decide, trust events to prune, an
// emission window to expire), trustRestTick (or the tick, if longer) while nothing is.
func (t *trust) nextTick() time.Duration {
	if len(t.acted) > 0 || len(t.emitted) > 0 || t.events.len() > 0 || len(t.eng.Scores()) > 0 {
		return t.tick
	}
	return max(t.tick, trustRestTick)
}

type trustInput struct {
	signal  *trustflow.Signal // a signal from another source (observe)
	verdict *node.FlowVerdict
	cred    string // subject of a credential failure
	credErr error
	// mismatch is NAME.ZONE of an agent whose proxy refused a process that is not its enrolled
	// workload, for the reason mismatchWhy.
	mismatch, mismatchWhy string
	// act is a subject whose score a gossiped trust event changed.
	act string
}

func newTrust(d *Daemon) (*trust, error) {
	t := &trust{d: d, in: make(chan *trustInput, trustQueue), burst: trustflow.NewBurstDetector(trustflow.BurstConfig{}),
		dup: trustflow.DuplicateDetector{Confirm: d.opts.DuplicateConfirm}, acted: map[string]zones.Action{},
		renewedAt: map[string]time.Time{}, mismatchAt: map[string]time.Time{},
		events: newEventStore(), counts: newEventCounters(d.metrics), emitted: map[string]emitWindow{},
		tick: d.opts.TrustTick}
	if t.tick <= 0 {
		t.tick = trustTick
	}
	eng, err := trustflow.New(trustflow.Config{Clock: d.now, Tuning: t.tuning()})
	if err != nil {
		return nil, err
	}
	t.eng = eng
	t.ev = newEvidence(t)
	return t, nil
}

// hook wires the node's TrustFlow hooks into cfg, and workload attestation (the interfaces'
// Options.OnMismatch, still called for its own subscriber, and the SDK's own-process check)
// into the engine.
func (t *trust) hook(cfg *node.Config) {
	prev := t.d.opts.OnMismatch
	t.d.opts.OnMismatch = func(agent, reason string) {
		t.push(trustInput{mismatch: agent, mismatchWhy: reason})
		if prev != nil {
			prev(agent, reason)
		}
	}
	cfg.TrustView = t.eng.Score
	cfg.OnFlowVerdict = func(v node.FlowVerdict) { t.push(trustInput{verdict: &v}) }
	cfg.OnCredentialFailure = func(subject string, err error) { t.push(trustInput{cred: subject, credErr: err}) }
	// An SDK agent's Dial from a process that is not its enrolled workload (node/selfattest.go):
	// the same signal, weight and rate limit as the interfaces' refusals, and the same
	// Options.OnMismatch subscriber.
	onMismatch := t.d.opts.OnMismatch
	cfg.OnWorkloadMismatch = func(agent identity.ID, reason string) { onMismatch(agent.Name+"."+agent.Zone, reason) }
	cfg.OnDirectoryDuplicate = newDirectoryDuplicates(t).report // trust_directory.go
}

// push queues an event without blocking the node; a full queue drops and counts.
func (t *trust) push(in trustInput) {
	select {
	case t.in <- &in:
	default:
		t.dropped.Add(1)
	}
}

// observe queues a signal from a source other than the node's own hooks, to be recorded and
// acted on by the trust loop like any other (the entry point for evidence other members send).
func (t *trust) observe(s trustflow.Signal) { t.push(trustInput{signal: &s}) }

// loop turns queued events and periodic checks into signals and actions until ctx ends. The
// checks run every nextTick: an event that makes the loop hold something is acted on at once
// (handle), and the faster pace starts from the next check.
func (t *trust) loop(ctx context.Context) {
	t.ev.register()
	t.check(ctx)
	tick := time.NewTimer(t.nextTick())
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case in := <-t.in:
			t.handle(ctx, *in)
		case <-tick.C:
			t.check(ctx)
			tick.Reset(t.nextTick())
		}
	}
}

func (t *trust) handle(ctx context.Context, in trustInput) {
	if in.act != "" {
		t.act(ctx, in.act)
		return
	}
	if in.signal != nil {
		t.signal(ctx, *in.signal)
		return
	}
	if in.verdict != nil {
		t.verdict(ctx, *in.verdict)
		return
	}
	now := t.d.now()
	if in.mismatch != "" {
		t.fingerprint(ctx, in.mismatch, in.mismatchWhy, now)
		return
	}
	if last, ok := t.renewedAt[in.cred]; ok && now.Sub(last) < renewalCooldown {
		return
	}
	t.renewedAt[in.cred] = now
	t.signal(ctx, trustflow.Signal{Subject: in.cred, Kind: trustflow.KindRenewalFailure, Reason: oneLine(in.credErr.Error())})
}

// fingerprint charges an agent for a process that tried to use its identity. Any local process
// can connect to a proxy port, so one refused connection is not proof the agent is compromised:
// it is charged proxyMismatchWeight, at most once per agent per mismatchCooldown (four such
// minutes isolate it), instead of the engine's full weight for a changed fingerprint. An SDK
// agent's own-process refusal is charged the same: the program that trips it is most often the
// agent's own binary upgraded without re-enrolling, which must not revoke the agent at once,
// while a program written to misuse the key never calls the check (docs/threat-model.md).
func (t *trust) fingerprint(ctx context.Context, nameZone, why string, now time.Time) {
	name, zone, ok := strings.Cut(nameZone, ".")
	if !ok {
		return
	}
	id := identity.AgentID(t.d.node.ID().TrustDomain, zone, name).String()
	if last, ok := t.mismatchAt[id]; ok && now.Sub(last) < mismatchCooldown {
		return
	}
	t.mismatchAt[id] = now
	t.signal(ctx, trustflow.Signal{Subject: id, Kind: trustflow.KindFingerprintMismatch, Weight: proxyMismatchWeight,
		Reason: oneLine(why), At: now})
}

// verdict attributes one flow verdict. Refusals after the signature check (dtl's order) name a
// verified source agent; earlier ones prove only that the tunnel's peer node sent the bytes, so
// they are held against that node alone: an attacker cannot lower a victim's score by sending
// records in its name.
func (t *trust) verdict(ctx context.Context, v node.FlowVerdict) {
	now := t.d.now()
	agentAndNode := func(k trustflow.Kind, why string) {
		w := t.eng.WeightIn(v.Zone, k)
		if v.Agent != "" {
			t.signal(ctx, trustflow.Signal{Subject: v.Agent, Kind: k, Reason: why, At: now})
		}
		t.signal(ctx, trustflow.Signal{Subject: v.Peer, Kind: k, Weight: max(1, w/nodeShare), Reason: "its agent " + v.Agent + ": " + why, At: now, Zone: v.Zone})
	}
	switch v.Reason {
	case "", "policy", "zone", "unreachable":
		// Past the signature check: the record's chain proves which node issued the agent.
		if dup, ok := t.agentDup.Observe(v.Agent, v.Node, now); ok {
			t.signal(ctx, trustflow.Signal{Subject: dup.Subject, Kind: trustflow.KindDuplicateIdentity, Zone: v.Zone, At: now,
				Reason: fmt.Sprintf("issued by %s at once: their flows alternate since %s", strings.Join(dup.Addrs, " and "),
					dup.Since.UTC().Format(time.RFC3339))})
		}
	}
	switch v.Reason {
	case "":
		if v.Agent == "" || strings.HasPrefix(v.Destination, "_") {
			return
		}
		if b, ok := t.burst.Observe(v.Agent, v.Destination, now); ok {
			t.signal(ctx, trustflow.Signal{Subject: v.Agent, Kind: trustflow.KindDestinationBurst, Reason: b.String(), At: now})
		}
	case "policy", "zone":
		agentAndNode(trustflow.KindPolicyDenial, fmt.Sprintf("flow to %s in zone %s refused (%s)", v.Destination, v.Zone, v.Reason))
	case "replay":
		agentAndNode(trustflow.KindSignerMismatch, fmt.Sprintf("record to %s refused (%s)", v.Destination, v.Reason))
	case "signature", "chain", "peer", "claim-mismatch":
		// claim-mismatch too: the record claims an agent other than its chain's, so the name in
		// it is exactly what must not be trusted.
		t.signal(ctx, trustflow.Signal{Subject: v.Peer, Kind: trustflow.KindSignerMismatch, At: now, Zone: v.Zone,
			Reason: fmt.Sprintf("sent a record naming %s that failed the %s check", orNone(v.Agent), v.Reason)})
	}
}

// signal records one signal and acts on the subject's new score. A signal about a subject of
// this node's zones becomes a signed trust event spread in the zone's pool (trust_events.go);
// any other is scored here only.
func (t *trust) signal(ctx context.Context, s trustflow.Signal) {
	if s.Subject == "" {
		return
	}
	if s.ID == "" && t.emit(ctx, s) {
		t.d.log.Info("trust signal", "subject", s.Subject, "kind", string(s.Kind), "reason", s.Reason, "score", t.eng.Score(s.Subject))
		t.act(ctx, s.Subject)
		return
	}
	if _, err := t.eng.Observe(s); err != nil {
		t.d.log.Warn("trust signal refused", "subject", s.Subject, "kind", string(s.Kind), "err", err)
		return
	}
	t.d.log.Info("trust signal", "subject", s.Subject, "kind", string(s.Kind), "reason", s.Reason, "score", t.eng.Score(s.Subject))
	t.act(ctx, s.Subject)
}

// check runs the periodic signals (region, duplicates, expiry) and re-decides every held subject,
// so that a subject recovering by decay is audited too.
func (t *trust) check(ctx context.Context) {
	t.checkRegion(ctx)
	if now := t.d.now(); now.Sub(t.dupAt) >= t.dupEvery() || now.Before(t.dupAt) {
		t.dupAt = now
		t.checkDuplicates(ctx)
	}
	t.checkExpiry(ctx)
	if now := t.d.now(); now.Sub(t.pruneAt) >= time.Second || now.Before(t.pruneAt) {
		t.pruneAt = now
		t.events.prune(now)
		t.checkObservers(ctx)
		for k, w := range t.emitted {
			if now.Sub(w.start) >= time.Minute {
				delete(t.emitted, k)
			}
		}
	}
	for _, sc := range t.eng.Scores() {
		t.act(ctx, sc.Subject)
	}
	t.eng.Prune()
}

// Region is where the node runs now: the region file when there is one, else the region
// recorded at join.
func (d *Daemon) Region() string {
	if r := d.region.read(filepath.Join(d.opts.Dir, FileRegion)); r != "" {
		return r
	}
	return d.node.Region()
}

// regionFile caches the region file's first line. The trust loop asks for the region every tick
// (so that a drift is acted on within a second); a stat is one system call where reading the
// file was four, and the file is read again only when its identity (inode, size, modification
// and change times) differs from the one read last.
type regionFile struct {
	mu     sync.Mutex
	stamp  fileStamp // zero: nothing read yet, or no file
	region string
}

type fileStamp struct {
	ino          uint64
	size         int64
	mtime, ctime int64
}

func stampOf(fi os.FileInfo) fileStamp {
	s := fileStamp{size: fi.Size(), mtime: fi.ModTime().UnixNano()}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		s.ino, s.ctime = st.Ino, st.Ctim.Nano()
	}
	return s
}

// read returns the file's trimmed first line, "" when there is no file or it is empty.
func (r *regionFile) read(path string) string {
	r.mu.Lock()
	defer r.mu.Unlock()
	fi, err := os.Stat(path)
	if err != nil {
		r.stamp, r.region = fileStamp{}, ""
		return ""
	}
	// File times tick with the kernel's coarse clock (milliseconds), so an in-place rewrite of the
	// same length right after a read can keep the stamp: a file changed in the last second is
	// read every time (git's "racily clean" rule).
	if st := stampOf(fi); st != r.stamp || st == (fileStamp{}) || time.Since(fi.ModTime()) < time.Second {
		b, err := os.ReadFile(path)
		if err != nil {
			r.stamp, r.region = fileStamp{}, ""
			return ""
		}
		line, _, _ := strings.Cut(string(b), "\n")
		// Stamped before the read: a write racing the read changes the stamp again, so the
		// next tick reads the file anew.
		r.stamp, r.region = st, strings.TrimSpace(line)
	}
	return r.region
}

func (t *trust) checkRegion(ctx context.Context) {
	d := t.d
	region := d.Region()
	if region == t.region {
		return
	}
	pol, cert := d.node.Policy(), d.node.Certificate()
	if (t.placed == placement{region, pol, cert}) {
		return // checked already and inside: neither the region, the policy nor the zones changed
	}
	var outside []string
	for _, z := range cert.Claims.ZoneNames() {
		if pz, ok := pol.Zone(z); ok && !pz.AllowsRegion(region) {
			outside = append(outside, fmt.Sprintf("%s %v", z, pz.Regions))
		}
	}
	if len(outside) == 0 {
		t.placed = placement{region, pol, cert}
		return
	}
	t.region = region
	why := fmt.Sprintf("node runs in %q, outside the placement of zone %s", region, strings.Join(outside, ", zone "))
	self := d.node.ID().String()
	// The agents first, so that the node's own revocation (which covers them) is the action.
	for _, a := range d.node.Snapshot().Agents {
		if a.SPIFFEID != "" && !a.Revoked {
			s := trustflow.Signal{Subject: a.SPIFFEID, Kind: trustflow.KindRegionDrift, Reason: why}
			if t.emit(ctx, s) {
				continue
			}
			if _, err := t.eng.Observe(s); err != nil {
				d.log.Warn("trust signal refused", "subject", a.SPIFFEID, "err", err)
			}
		}
	}
	t.signal(ctx, trustflow.Signal{Subject: self, Kind: trustflow.KindRegionDrift, Reason: why})
}

// checkDuplicates compares the source addresses of inbound tunnels only: a node sends every
// handshake from its one socket, so its tunnels to this node arrive from one address, even
// through NAT. An outbound tunnel's address is only where this node dialed (an advertised
// address, which may differ from the source address behind NAT), so it is no evidence.
//
// It reads the endpoint's tunnels directly: a node snapshot also formats every agent and sorts,
// which this check, at rest the trust loop's largest periodic cost, never uses.
func (t *trust) checkDuplicates(ctx context.Context) {
	var live []trustflow.Sighting
	zoneOf := map[string]string{}
	for _, tn := range t.d.node.Endpoint().Tunnels() {
		if tn.Outbound() || !tn.Alive() {
			continue
		}
		peer, zone := tn.Peer().NodeID, tn.Zone()
		live = append(live, trustflow.Sighting{Subject: peer, Addr: tn.RemoteAddr().String()})
		if z, ok := zoneOf[peer]; !ok || zone < z {
			zoneOf[peer] = zone
		}
	}
	addrs := map[string]map[string]bool{}
	for _, s := range live {
		if addrs[s.Subject] == nil {
			addrs[s.Subject] = map[string]bool{}
		}
		addrs[s.Subject][s.Addr] = true
	}
	for subject, as := range addrs {
		if len(as) >= 2 {
			t.ev.candidate(subject) // proofs are collected before isolation closes the tunnels
		}
	}
	for _, dup := range t.dup.Check(t.d.now(), live) {
		// Confirmed for the evidence collector first: the signal acts at once, and while the
		// evidence is pending the subject is denied but its tunnels stay up (mayIsolate), so that
		// both processes can still sign fresh proofs. Marked after the signal, the subject was
		// cut at once and only the candidate phase's proofs were left, which under load could
		// all predate the overlap the authority requires.
		t.ev.start(dup.Subject)
		t.signal(ctx, trustflow.Signal{Subject: dup.Subject, Kind: trustflow.KindDuplicateIdentity, Zone: zoneOf[dup.Subject],
			Reason: fmt.Sprintf("live at %s at once since %s", strings.Join(dup.Addrs, " and "), dup.Since.UTC().Format(time.RFC3339))})
	}
}

// checkExpiry signals a node certificate in its last quarter: renewal is due at half-life, so
// a certificate this close to its end has missed several renewals.
func (t *trust) checkExpiry(ctx context.Context) {
	c := t.d.node.Certificate()
	now := t.d.now()
	life := c.X509.NotAfter.Sub(c.X509.NotBefore)
	if c.X509.NotAfter.Sub(now) >= life/4 {
		return
	}
	serial := c.Serial().String()
	if serial == t.expiring {
		return
	}
	t.expiring = serial
	t.signal(ctx, trustflow.Signal{Subject: c.ID.String(), Kind: trustflow.KindExpiringCertificate,
		Reason: fmt.Sprintf("certificate serial %s ends at %s without renewal", serial, c.X509.NotAfter.UTC().Format(time.RFC3339))})
}

// thresholds are the thresholds that apply to subject, or ok=false when none do (an agent of a
// zone the policy no longer has: the policy already refuses its flows).
func (t *trust) thresholds(subject string) (trustflow.Thresholds, bool) {
	id, err := identity.ParseID(subject)
	if err != nil {
		return trustflow.Thresholds{}, false
	}
	pol := t.d.node.Policy()
	if id.Kind == identity.KindAgent {
		z, ok := pol.Zone(id.Zone)
		if !ok {
			return trustflow.Thresholds{}, false
		}
		return trustflow.ThresholdsOf(z), true
	}
	var zs []*zones.Zone
	for _, name := range t.d.node.Zones() {
		if z, ok := pol.Zone(name); ok {
			zs = append(zs, z)
		}
	}
	if len(zs) == 0 {
		return trustflow.Thresholds{}, false
	}
	return trustflow.ThresholdsOf(zs...), true
}

// act compares subject's score with its thresholds and carries out a change of action: each
// change is audited (event "trust") with the score and its newest reasons; isolation revokes.
func (t *trust) act(ctx context.Context, subject string) {
	d := t.d
	th, ok := t.thresholds(subject)
	if !ok {
		return
	}
	action := th.Action(t.eng.Score(subject))
	prev := t.acted[subject]
	if action == prev || (prev == zones.ActionIsolateAndRevoke) {
		return // an isolated subject stays isolated: recovery needs a new identity
	}
	x := t.eng.Explain(subject)
	action = th.Action(x.Score)
	held := action == zones.ActionIsolateAndRevoke && !t.mayIsolate(x, t.own(subject), th)
	if held {
		// One remote member's word: deny, but do not cut or revoke (see corroborated).
		action = zones.ActionDenyFlows
		if prev == action {
			return
		}
	}
	if action == zones.ActionAllow {
		delete(t.acted, subject)
	} else {
		t.acted[subject] = action
	}
	reasons := explainReasons(x)
	fields := map[string]string{
		"subject": subject, "score": strconv.Itoa(x.Score), "action": action.String(), "previous": prev.String(),
		"min_trust": strconv.Itoa(th.MinTrust), "isolate_below": strconv.Itoa(th.IsolateBelow), "reasons": reasons,
	}
	if held {
		fields["held"] = "isolation held: the evidence comes from other members only (see docs/trustflow.md)"
	}
	d.log.Warn("trust action", "subject", subject, "score", x.Score, "action", action.String(), "reasons", reasons)
	if action == zones.ActionIsolateAndRevoke {
		fields["revocation"] = t.isolate(ctx, subject, x.Score, th, reasons)
	}
	// Not cancelled by a stop: an action taken is always recorded.
	if err := d.node.AppendAudit(context.WithoutCancel(ctx), node.EventTrust, fields); err != nil {
		d.log.Error("trust action not audited", "subject", subject, "err", err)
	}
}

// own reports whether subject is this node or one of its agents.
func (t *trust) own(subject string) bool {
	if subject == t.d.node.ID().String() {
		return true
	}
	for _, a := range t.d.node.Snapshot().Agents {
		if a.SPIFFEID == subject {
			return true
		}
	}
	return false
}

// isolate revokes subject: a signed record for this node or one of its agents, a local cut for
// anyone else. It returns what it did, for the audit entry.
func (t *trust) isolate(ctx context.Context, subject string, score int, th trustflow.Thresholds, reasons string) string {
	d := t.d
	reason := recordReason(fmt.Sprintf("trustflow: score %d below isolate_below %d: %s", score, th.IsolateBelow, reasons))
	self := d.node.ID().String()
	own := subject == self
	if !own {
		for _, a := range d.node.Snapshot().Agents {
			own = own || a.SPIFFEID == subject
		}
	}
	if d.node.Revoked(subject) {
		return "already revoked"
	}
	cert := d.node.Certificate()
	if subject != self && d.node.Revoked(self, record.SerialKey(cert.Serial())) {
		return "covered by this node's own revocation"
	}
	if subject == self {
		if err := t.revokeSelf(ctx, reason); err != nil {
			d.log.Error("trust: self-revocation failed", "err", err)
			return "signed revocation failed: " + err.Error()
		}
		return "signed self-revocation stored, spread and applied"
	}
	if own {
		if _, err := d.Revoke(ctx, subject, reason); err != nil {
			d.log.Error("trust: revocation failed", "subject", subject, "err", err)
			return "signed revocation failed: " + err.Error()
		}
		return "signed revocation stored and spread"
	}
	if err := d.node.Revoke(ctx, subject, reason); err != nil {
		if errors.Is(err, node.ErrBadRevocation) {
			return "not a revocable subject"
		}
		d.log.Error("trust: local isolation not audited", "subject", subject, "err", err)
	}
	return "isolated locally (another node's subject: its tunnels and flows here are cut)"
}

// revokeSelf revokes this node with a record it signs, through the one record path (Accept):
// stored, applied, spread, and the node keeps gossiping for retireGrace before it retires.
func (t *trust) revokeSelf(ctx context.Context, reason string) error {
	d := t.d
	raw, err := d.node.SignRevocation(d.node.ID().String(), reason)
	if err != nil {
		return err
	}
	// The one record path: stored, applied, spread; the node keeps gossiping for retireGrace so
	// that its own record reaches its peers before it retires.
	_, err = d.Accept(ctx, raw, FromLocal)
	return err
}

// explainReasons is the newest reasons of an explanation on one line.
func explainReasons(x trustflow.Explanation) string {
	var parts []string
	for i := len(x.Events) - 1; i >= 0 && len(parts) < 3; i-- {
		ev := x.Events[i]
		parts = append(parts, fmt.Sprintf("%s −%d (%s)", ev.Kind, ev.Weight, ev.Reason))
	}
	return strings.Join(parts, "; ")
}

// recordReason fits a reason into a revocation record: printable, at most record.MaxReasonLen.
func recordReason(s string) string {
	s = strings.Map(func(r rune) rune {
		if unicode.IsPrint(r) {
			return r
		}
		return ' '
	}, s)
	if len(s) <= record.MaxReasonLen {
		return s
	}
	n := record.MaxReasonLen
	for n > 0 && (s[n]&0xC0) == 0x80 {
		n--
	}
	return s[:n]
}

func oneLine(s string) string {
	s, _, _ = strings.Cut(s, "\n")
	return s
}

func orNone(s string) string {
	if s == "" {
		return "no readable agent"
	}
	return s
}

// trustScores is every held score for `ute status`.
func (t *trust) trustScores() []localapi.TrustScore {
	out := []localapi.TrustScore{}
	for _, sc := range t.eng.Scores() {
		ts := localapi.TrustScore{Subject: sc.Subject, Score: sc.Score, Reasons: sc.Reasons}
		if th, ok := t.thresholds(sc.Subject); ok {
			ts.Action = th.Action(sc.Score).String()
		}
		out = append(out, ts)
	}
	return out
}

// TrustScore is this node's TrustFlow view of subject (100 when nothing is held).
func (d *Daemon) TrustScore(subject string) int { return d.trust.eng.Score(subject) }

// TrustExplain implements localapi.Backend: the signals and the arithmetic behind a subject's
// score. subject is a SPIFFE ID, or NAME.ZONE of an agent this node hosts.
func (b backend) TrustExplain(_ context.Context, subject string) (localapi.TrustExplanation, error) {
	d := b.d
	id, err := identity.ParseID(subject)
	if err != nil {
		found := false
		for _, a := range d.node.Snapshot().Agents {
			if a.Name+"."+a.Zone == subject && a.SPIFFEID != "" {
				id, _ = identity.ParseID(a.SPIFFEID)
				found = true
			}
		}
		if !found {
			return localapi.TrustExplanation{}, fmt.Errorf("%w: %q is neither a SPIFFE ID nor NAME.ZONE of an agent on this node", localapi.ErrBadRequest, subject)
		}
	}
	x := d.trust.eng.Explain(id.String())
	out := localapi.TrustExplanation{Subject: x.Subject, Score: x.Score, Penalty: x.Penalty, DecayPerHour: x.DecayPerHour,
		Now: x.Now, Full: x.Full, Folded: x.Folded, Steps: x.Steps, Events: []localapi.TrustEvent{}}
	if th, ok := d.trust.thresholds(x.Subject); ok {
		out.Action, out.MinTrust, out.IsolateBelow = th.Action(x.Score).String(), th.MinTrust, th.IsolateBelow
	}
	for _, ev := range x.Events {
		out.Events = append(out.Events, localapi.TrustEvent{Kind: string(ev.Kind), Weight: ev.Weight, Reason: ev.Reason, At: ev.At,
			Recovered: ev.Recovered, PenaltyAfter: ev.PenaltyAfter, ScoreBefore: ev.ScoreBefore, ScoreAfter: ev.ScoreAfter})
	}
	return out, nil
}
