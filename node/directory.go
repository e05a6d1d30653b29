package node

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/fxamacker/cbor/v2"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/identity/record"
	"github.com/ute-project/ute/overlay/audit"
	"github.com/ute-project/ute/overlay/dtl"
	"github.com/ute-project/ute/overlay/tunnel"
)

// Directory exchange limits. A message is [u32 length][CBOR array of certificate DER]: the
// sender's issuing certificate first, then its agent certificates.
const (
	MaxDirectorySize    = 1 << 20
	MaxDirectoryEntries = 1024
	directoryTimeout    = 5 * time.Second
	// refreshInterval debounces directory refreshes of one (peer, zone) caused by resolution misses.
	refreshInterval = time.Second
)

// viewEntry is a remote agent as a verified directory entry describes it.
type viewEntry struct {
	agent  string // SPIFFE ID
	serial string // "serial:N" of the agent certificate last announced, so Revoke can match it
	node   string // SPIFFE ID of the node that issued the certificate (= the tunnel peer)
	ip     netip.Addr
	at     time.Time // when the entry was last announced, for the duplicate check
	keys   []string  // the chain's revocation keys (record.ChainKeys), re-checked on a late install
}

// DirectoryDuplicate is one agent name two other nodes of a zone announce at once: the holder,
// whose entry this node installed first, and the claimant, whose verified entry for the same name
// was refused as already served. A peer announcing the name of one of this node's own agents is
// refused and audited but not reported: this node knows its own agent is genuine, and a single
// rogue peer must not be able to turn a node against its own agent (docs/trustflow.md).
type DirectoryDuplicate struct {
	Zone  string
	Agent string // SPIFFE ID of the agent both announce
	// Holder and Claimant are node SPIFFE IDs.
	Holder, Claimant string
}

// dirConflict is a name refused as already served by another node, kept until the holder's entry
// is re-checked.
type dirConflict struct {
	name, holder string
	entry        viewEntry // the claimant's verified entry; entry.at is when it was seen
}

// maxConflictChecks bounds the names of one exchange that are checked and reported as duplicates;
// the rest are refused as before. A peer announcing hundreds of taken names is already flagged by
// the first few.
const maxConflictChecks = 16

// directoryFlow marks an admitted flow addressed to the reserved directory destination.
type directoryFlow struct {
	zone, peer string
	prov       *Provenance
}

var directoryDec = func() cbor.DecMode {
	m, err := cbor.DecOptions{
		DupMapKey:        cbor.DupMapKeyEnforcedAPF,
		IndefLength:      cbor.IndefLengthForbidden,
		TagsMd:           cbor.TagsForbidden,
		MaxArrayElements: MaxDirectoryEntries,
		MaxNestedLevels:  4,
	}.DecMode()
	if err != nil {
		panic(err) // constant options; unreachable
	}
	return m
}()

var directoryEnc = func() cbor.EncMode {
	m, err := cbor.CoreDetEncOptions().EncMode()
	if err != nil {
		panic(err) // constant options; unreachable
	}
	return m
}()

// EncodeDirectory frames a list of agent certificates (DER) as one directory message.
func EncodeDirectory(certs [][]byte) ([]byte, error) {
	if len(certs) > MaxDirectoryEntries {
		return nil, fmt.Errorf("%w: %d entries, limit %d", ErrBadDirectory, len(certs), MaxDirectoryEntries)
	}
	if certs == nil {
		certs = [][]byte{}
	}
	body, err := directoryEnc.Marshal(certs)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadDirectory, err)
	}
	if len(body) > MaxDirectorySize {
		return nil, fmt.Errorf("%w: %d bytes, limit %d", ErrBadDirectory, len(body), MaxDirectorySize)
	}
	out := binary.BigEndian.AppendUint32(make([]byte, 0, 4+len(body)), uint32(len(body)))
	return append(out, body...), nil
}

// ReadDirectory reads one directory message from r, refusing oversized, truncated or malformed
// input before trusting any of it. The certificates still have to be verified.
func ReadDirectory(r io.Reader) ([][]byte, error) {
	var hdr [4]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, fmt.Errorf("%w: header: %w", ErrBadDirectory, err)
	}
	size := binary.BigEndian.Uint32(hdr[:])
	if size > MaxDirectorySize {
		return nil, fmt.Errorf("%w: %d bytes, limit %d", ErrBadDirectory, size, MaxDirectorySize)
	}
	body := make([]byte, size)
	if _, err := io.ReadFull(r, body); err != nil {
		return nil, fmt.Errorf("%w: body: %w", ErrBadDirectory, err)
	}
	return DecodeDirectory(body)
}

// DecodeDirectory decodes a directory message body strictly.
func DecodeDirectory(body []byte) ([][]byte, error) {
	var certs [][]byte
	if err := directoryDec.Unmarshal(body, &certs); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadDirectory, err)
	}
	for i, c := range certs {
		if len(c) == 0 || len(c) > identity.MaxCertificateSize {
			return nil, fmt.Errorf("%w: entry %d is %d bytes", ErrBadDirectory, i, len(c))
		}
	}
	return certs, nil
}

// localCerts lists the certificates of this node's agents in zone: its directory entries. It
// refuses when t's handshake presented another node certificate than the one in service: the node
// renewed since (or is renewing now), the peer checks every entry against the certificate it
// verified on t, and would drop all of this node's agents from its view. The certificates and the
// node certificate are read together under n.mu, which a renewal holds while it swaps both.
func (n *Node) localCerts(t *tunnel.Tunnel, zone string) ([][]byte, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if lc := t.LocalCertificate(); lc == nil || !bytes.Equal(lc.Raw, n.certificate().Raw()) {
		return nil, fmt.Errorf("node: directory exchange with %s zone %s: %w", t.Peer().NodeID, zone, errStaleTunnel)
	}
	// The issuing certificate goes first: the peer verifies each agent certificate under it,
	// and it under the trust anchor, and checks it is the one issued with the node certificate
	// this tunnel presented.
	out := [][]byte{n.issuerCertificate().Raw()}
	for k, a := range n.agents {
		if k.zone == zone && a.Cert != nil {
			out = append(out, a.Cert.Raw())
		}
	}
	return out, nil
}

// directoryIssuers picks out of a peer's directory message the issuing certificates that belong
// to the node certificate pc the peer presented on the tunnel (same node, pc's serial) and
// verify under the trust anchor; the other entries are returned as agent candidates. An issuing
// certificate that does not belong is an error: a node announces only its own.
func (n *Node) directoryIssuers(pc *identity.Certificate, ders [][]byte, now time.Time) (issuers []*identity.Certificate, agents []*identity.Certificate, errs []error) {
	for _, der := range ders {
		c, err := identity.ParseCertificate(der)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if !c.Issuing {
			agents = append(agents, c)
			continue
		}
		if err := n.verif.VerifyIssuer(c, now); err != nil {
			errs = append(errs, err)
			continue
		}
		if c.ID != pc.ID || c.NodeSerial().Cmp(pc.Serial()) != 0 {
			errs = append(errs, fmt.Errorf("%w: issuing certificate of %s serial %s announced on a tunnel with %s serial %s",
				dtl.ErrPeer, c.ID, c.NodeSerial(), pc.ID, pc.Serial()))
			continue
		}
		issuers = append(issuers, c)
	}
	return issuers, agents, errs
}

// verifyDirectoryAgent verifies ac under one of the peer's issuing certificates.
func (n *Node) verifyDirectoryAgent(issuers []*identity.Certificate, ac *identity.Certificate, now time.Time) (*identity.Certificate, error) {
	if len(issuers) == 0 {
		return nil, fmt.Errorf("%w: %s: the peer announced no issuing certificate of its own", dtl.ErrChain, ac.ID)
	}
	var err error
	for _, is := range issuers {
		if err = n.verif.VerifyAgent(is, ac, now); err == nil {
			return is, nil
		}
	}
	return nil, err
}

// installDirectory verifies every entry sent by peer over a tunnel of zone and replaces the peer's
// entries of that zone with the ones that verify: chain authority → the peer's issuing
// certificate → agent, where the issuing certificate is the one issued with the node certificate
// the peer presented on this tunnel (so the issuing node is the tunnel's peer), the zone, and
// revocation.
func (n *Node) installDirectory(ctx context.Context, peer tunnel.Peer, zone string, ders [][]byte) (accepted, refused int) {
	accepted, refused, _ = n.installDirectoryConflicts(ctx, peer, zone, ders)
	return accepted, refused
}

// installDirectoryConflicts is installDirectory that also returns the names refused because
// another node (or this one) already serves them, for checkConflicts.
func (n *Node) installDirectoryConflicts(ctx context.Context, peer tunnel.Peer, zone string, ders [][]byte) (accepted, refused int, conflicts []dirConflict) {
	pc, ok := peer.Info.(*identity.Certificate)
	if !ok {
		return 0, len(ders), nil
	}
	now := n.now()
	fresh := map[string]viewEntry{}
	var firstErr error
	issuers, agents, errs := n.directoryIssuers(pc, ders, now)
	if len(errs) > 0 {
		refused += len(errs)
		firstErr = errs[0]
	}
	for _, ac := range agents {
		_, err := n.verifyDirectoryAgent(issuers, ac, now)
		if err == nil && ac.ID.Zone != zone {
			err = fmt.Errorf("%w: agent %s is in zone %s, tunnel carries %s", dtl.ErrZone, ac.ID, ac.ID.Zone, zone)
		}
		keys := record.ChainKeys(pc, ac)
		if err == nil && n.isRevoked(keys...) {
			err = fmt.Errorf("%w: %s", dtl.ErrRevoked, ac.ID)
		}
		if err != nil {
			refused++
			if firstErr == nil {
				firstErr = err
			}
			continue
		}
		fresh[ac.ID.Name] = viewEntry{agent: ac.ID.String(), serial: serialKey(ac), node: peer.NodeID, ip: ac.Claims.OverlayIPs[0], at: now, keys: keys}
		accepted++
	}
	n.mu.Lock()
	m := n.view[zone]
	if m == nil {
		m = map[string]viewEntry{}
		n.view[zone] = m
	}
	for name, e := range m {
		if e.node == peer.NodeID {
			delete(m, name)
		}
	}
	for name, e := range fresh {
		// A name another node already serves keeps its first owner: two nodes cannot both host
		// agent.zone, and a later claimant does not get to take the name over. A name this node
		// hosts itself is never shadowed: lookups would turn ambiguous and fail, so any peer of
		// the zone could otherwise make a local agent unreachable by announcing its name.
		_, local := n.agents[agentKey{zone, name}]
		if old, taken := m[name]; local || (taken && old.node != peer.NodeID) {
			refused++
			accepted--
			if !local && len(conflicts) < maxConflictChecks {
				conflicts = append(conflicts, dirConflict{name: name, holder: old.node, entry: e})
			}
			if firstErr == nil {
				firstErr = fmt.Errorf("%w: %s.%s is already served by another node", ErrNameTaken, name, zone)
			}
			continue
		}
		m[name] = e
	}
	n.mu.Unlock()
	f := map[string]string{"peer": peer.NodeID, "zone": zone, "accepted": fmt.Sprint(accepted), "refused": fmt.Sprint(refused)}
	if firstErr != nil {
		f["error"] = truncate(firstErr.Error())
	}
	if err := n.audit.Append(ctx, audit.Entry{Event: eventDirectory, Fields: f}); err != nil {
		n.log.Error("audit append failed", "event", eventDirectory, "err", err)
	}
	return accepted, refused, conflicts
}

// checkConflicts decides whether the names a claimant announced that another node already serves
// are one identity live at two endpoints at once ("two directory entries"). The holder's entry
// may be stale (view entries outlive tunnels, and a holder may have crashed a moment ago), so the
// holder's directory is read again after the claimant's: if it still announces the name, both
// were live at once and the duplicate is reported (Config.OnDirectoryDuplicate); if it no longer does, the claimant's
// verified entry takes the name, as it would have had the holder's entry been gone. It runs after
// the claimant's exchange has finished, so the check never delays the claimant's answer.
func (n *Node) checkConflicts(ctx context.Context, zone, claimant string, conflicts []dirConflict) {
	checked := map[string]error{}
	for _, c := range conflicts {
		err, done := checked[c.holder]
		if !done {
			err = n.rereadHolder(ctx, zone, c.holder)
			checked[c.holder] = err
		}
		if err != nil {
			// Unreachable or refusing: its entry cannot be shown live, so nothing is reported
			// and the name stays with the first owner, as before.
			n.log.Debug("directory conflict not checked: holder unreachable", "zone", zone, "name", c.name, "holder", c.holder, "err", err)
			continue
		}
		n.mu.Lock()
		m := n.view[zone]
		e, held := m[c.name]
		_, local := n.agents[agentKey{zone, c.name}]
		live := !local && held && e.node == c.holder && !e.at.Before(c.entry.at)
		if !local && !held && m != nil {
			// The holder no longer announces it: the claimant's entry is the only live one,
			// unless it was revoked since it was verified.
			if !n.revokedLocked(c.entry.keys...) {
				m[c.name] = c.entry
			}
		}
		n.mu.Unlock()
		if !live {
			continue
		}
		n.log.Warn("one agent name announced by two nodes at once", "zone", zone, "agent", c.entry.agent, "holder", c.holder, "claimant", claimant)
		if n.cfg.OnDirectoryDuplicate != nil {
			n.cfg.OnDirectoryDuplicate(DirectoryDuplicate{Zone: zone, Agent: c.entry.agent, Holder: c.holder, Claimant: claimant})
		}
	}
}

// rereadHolder reads the directory of holder in zone again, so that its entries say what it
// announces now. Forced: a read from before the claimant's proves nothing about the holder after
// it. Concurrent checks of one holder share one exchange (refresh), so a claimant repeating its
// announcement costs at most one exchange with the holder per announcement.
func (n *Node) rereadHolder(ctx context.Context, zone, holder string) error {
	return n.refresh(ctx, refreshKey{holder, zone}, true, func(ctx context.Context) error {
		a := n.directorySigner(zone)
		if a == nil {
			return fmt.Errorf("no local agent of zone %s to sign the exchange", zone)
		}
		ctx, cancel := context.WithTimeout(ctx, directoryTimeout)
		defer cancel()
		t, err := n.tunnelTo(ctx, holder, zone)
		if err != nil {
			return err
		}
		_, err = n.exchange(ctx, a, t)
		return err
	})
}

// refreshCall is one directory exchange under way with a (peer, zone); others wait for it.
type refreshCall struct {
	done chan struct{}
	err  error
}

// refresh runs do as the directory exchange of k unless one is under way (then it waits for that
// one) or, when !force, one started less than refreshInterval ago (then it does nothing).
func (n *Node) refresh(ctx context.Context, k refreshKey, force bool, do func(context.Context) error) error {
	n.mu.Lock()
	if c := n.inflight[k]; c != nil {
		n.mu.Unlock()
		select {
		case <-c.done:
			return c.err
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	now := n.now()
	if !force && now.Sub(n.refreshed[k]) < refreshInterval {
		n.mu.Unlock()
		return nil
	}
	c := &refreshCall{done: make(chan struct{})}
	n.inflight[k] = c
	n.refreshed[k] = now
	n.mu.Unlock()
	c.err = do(ctx)
	n.mu.Lock()
	delete(n.inflight, k)
	if c.err != nil && n.refreshed[k].Equal(now) {
		// A failed exchange taught us nothing: the next lookup miss must try again rather than
		// be told the directory is fresh.
		delete(n.refreshed, k)
	}
	n.mu.Unlock()
	close(c.done)
	return c.err
}

// exchangeRefresh runs a directory exchange with k's peer as refresh k (dial gives the tunnel,
// within directoryTimeout), then, once the refresh is over, checks the names it found taken
// (checkConflictsLater: the caller's deadline may be mostly spent by the exchange, and a re-read
// of the holder that runs out of time reports no duplicate, for good). Callers that only waited
// for someone else's exchange check nothing: that caller does.
func (n *Node) exchangeRefresh(ctx context.Context, k refreshKey, force bool, a *Agent, dial func(context.Context) (*tunnel.Tunnel, error)) error {
	var conflicts []dirConflict
	err := n.refresh(ctx, k, force, func(ctx context.Context) error {
		ctx, cancel := context.WithTimeout(ctx, directoryTimeout)
		defer cancel()
		t, err := dial(ctx)
		if err != nil {
			return err
		}
		conflicts, err = n.exchange(ctx, a, t)
		return err
	})
	if err == nil && len(conflicts) > 0 {
		n.checkConflictsLater(k.zone, k.node, conflicts)
	}
	return err
}

// checkConflictsLater runs checkConflicts on a goroutine of the node's, with a deadline of its
// own (directoryTimeout), for both ends of an exchange: what is left of the exchange's deadline
// may be too little for the holder's re-read, and neither the claimant's answer nor a lookup
// waits for it.
func (n *Node) checkConflictsLater(zone, claimant string, conflicts []dirConflict) {
	n.spawn(func() {
		ctx, cancel := context.WithTimeout(n.ctx, directoryTimeout)
		defer cancel()
		n.checkConflicts(ctx, zone, claimant, conflicts)
	})
}

// refreshZone exchanges directories with every configured peer serving the agent's zone. It is
// the fallback for names the tunnel-up exchange has not taught us (a peer with no live tunnel yet,
// or an agent added since). Peers that do not serve the zone, refuse us, or are down are skipped;
// their errors are returned so that an unresolved name says why.
func (n *Node) refreshZone(ctx context.Context, a *Agent) error {
	zone := a.id.Zone
	n.mu.Lock()
	var todo []string
	for node := range n.peers {
		if node != n.certificate().ID.String() {
			todo = append(todo, node)
		}
	}
	n.mu.Unlock()
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		errs []error
	)
	for _, node := range todo {
		wg.Go(func() {
			err := n.exchangeRefresh(ctx, refreshKey{node, zone}, false, a, func(ctx context.Context) (*tunnel.Tunnel, error) {
				return n.tunnelTo(ctx, node, zone)
			})
			if err != nil {
				n.log.Debug("directory refresh failed", "peer", node, "zone", zone, "err", err)
				mu.Lock()
				errs = append(errs, fmt.Errorf("peer %s: %w", node, err))
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return joinErrors(errs)
}

// onTunnel runs for every established tunnel (tunnel.Config.OnTunnel, its own goroutine). It
// closes a tunnel whose peer was revoked while the handshake was finishing, registers the tunnel
// for revocation and sequence numbers, tells Config.TunnelUp, and on the dialing side runs the zone directory exchange,
// so that names resolve before the first lookup misses. The dialer needs a local agent of the
// zone to sign the exchange; a node without one has no agent that could resolve names in the zone
// and nothing to announce, so it skips the exchange.
func (n *Node) onTunnel(t *tunnel.Tunnel) {
	if n.peerRevoked(t.Peer()) {
		_ = t.Close()
		return
	}
	n.track(t)
	if n.cfg.TunnelUp != nil {
		n.cfg.TunnelUp(t)
	}
	if !t.Outbound() {
		return
	}
	a := n.directorySigner(t.Zone())
	if a == nil {
		return
	}
	ctx, cancel := context.WithTimeout(n.ctx, directoryTimeout)
	defer cancel()
	err := n.exchangeRefresh(ctx, refreshKey{t.Peer().NodeID, t.Zone()}, true, a, func(context.Context) (*tunnel.Tunnel, error) {
		return t, nil
	})
	// A tunnel that went stale during its handshake is expected to fail here: Dial handshakes
	// again with the renewed certificate, and that tunnel's exchange runs instead.
	if err != nil && t.Alive() && n.ctx.Err() == nil && !errors.Is(err, errStaleTunnel) {
		n.log.Warn("directory exchange on tunnel up failed", "peer", t.Peer().NodeID, "zone", t.Zone(), "err", err)
	}
}

// directorySigner picks the local agent of zone that signs directory exchanges: the first by name
// whose certificate loads.
func (n *Node) directorySigner(zone string) *Agent {
	n.mu.Lock()
	var names []string
	for k := range n.agents {
		if k.zone == zone {
			names = append(names, k.name)
		}
	}
	n.mu.Unlock()
	slices.Sort(names)
	for _, name := range names {
		if a, err := n.Agent(zone, name); err == nil {
			return a
		}
	}
	return nil
}

// exchange opens a directory flow on t, signed by agent a of t's zone: we send our entries, the
// peer answers with its own, and both sides install what verifies.
//
// It returns the names the peer announced that another node already serves, for checkConflicts;
// callers run the check after their refresh has finished (exchangeRefresh), so a holder's re-read
// never runs inside another exchange's refresh and one conflict never leads to a chain of them.
func (n *Node) exchange(ctx context.Context, a *Agent, t *tunnel.Tunnel) ([]dirConflict, error) {
	certs, err := n.localCerts(t, t.Zone())
	if err != nil {
		return nil, err
	}
	fc, err := a.openStream(ctx, t, dtl.Destination{Agent: directoryAgent, Port: 0, Proto: dtl.ProtoTCP}, nil, nil)
	if err != nil {
		return nil, err
	}
	defer func() { _ = fc.Close() }()
	if d, ok := ctx.Deadline(); ok {
		_ = fc.SetDeadline(d)
	}
	msg, err := EncodeDirectory(certs)
	if err != nil {
		return nil, err
	}
	if _, err := fc.Write(msg); err != nil {
		return nil, fmt.Errorf("directory send: %w", err)
	}
	ders, err := ReadDirectory(fc)
	if err != nil {
		return nil, err
	}
	_, _, conflicts := n.installDirectoryConflicts(ctx, t.Peer(), t.Zone(), ders)
	return conflicts, nil
}

// serveDirectory answers a peer's directory flow: read its entries, install them, send ours.
func (n *Node) serveDirectory(fc *tunnel.FlowConn, df *directoryFlow) {
	defer func() { _ = fc.Close() }()
	if fc.Tunnel().Stale() {
		// This node renewed since the tunnel's handshake: the peer verified the old certificate,
		// and our agents' certificates are now signed by the new key, so every entry we sent
		// would fail its check and the peer would drop our agents from its view. Refusing the
		// exchange leaves the peer's view as it is (its refresh fails), and its next tunnel to us
		// verifies the new certificate and exchanges afresh.
		n.log.Debug("directory exchange refused on a tunnel from before the renewal", "peer", df.peer, "zone", df.zone)
		fc.Abort()
		return
	}
	ctx, cancel := context.WithTimeout(n.ctx, directoryTimeout)
	defer cancel()
	_ = fc.SetDeadline(time.Now().Add(directoryTimeout))
	ders, err := ReadDirectory(fc)
	if err != nil {
		n.log.Warn("directory from peer refused", "peer", df.peer, "zone", df.zone, "err", err)
		return
	}
	_, _, conflicts := n.installDirectoryConflicts(ctx, fc.Tunnel().Peer(), df.zone, ders)
	if len(conflicts) > 0 {
		// Started after the reply, which must not wait for the holder's re-read.
		defer n.checkConflictsLater(df.zone, fc.Tunnel().Peer().NodeID, conflicts)
	}
	certs, err := n.localCerts(fc.Tunnel(), df.zone)
	if err != nil {
		// The renewal landed after the check above; same answer.
		n.log.Debug("directory exchange refused on a tunnel from before the renewal", "peer", df.peer, "zone", df.zone)
		fc.Abort()
		return
	}
	msg, err := EncodeDirectory(certs)
	if err != nil {
		n.log.Error("directory encode failed", "zone", df.zone, "err", err)
		return
	}
	if _, err := fc.Write(msg); err != nil && !errors.Is(err, context.Canceled) {
		n.log.Debug("directory reply failed", "peer", df.peer, "err", err)
		return
	}
	_ = fc.CloseWrite()
	// Wait for the opener to finish reading (it closes), so the reply is not cut short.
	_, _ = io.Copy(io.Discard, io.LimitReader(fc, 1))
}

// multiError joins errors on one line (errors.Join uses newlines; CLI errors are one line).
type multiError []error

func (m multiError) Error() string {
	parts := make([]string, len(m))
	for i, e := range m {
		parts[i] = e.Error()
	}
	return strings.Join(parts, "; ")
}

func (m multiError) Unwrap() []error { return m }

func joinErrors(errs []error) error {
	if len(errs) == 0 {
		return nil
	}
	return multiError(errs)
}
