package authority

import (
	"context"
	"crypto/ed25519"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"sync"
	"time"

	"github.com/quic-go/quic-go"
	bolt "go.etcd.io/bbolt"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/identity/record"
)

// The watch connection: a node opens it with its node certificate (mutual TLS, as for renewal),
// sends the highest authority revocation sequence number it holds and the policy version it
// holds, and receives, on the same stream, every revocation record above that sequence, the
// current policy release if it is newer, and from then on each new record and release as soon as
// it is committed. Docs: docs/identity.md, "Watch".

// Watch frame kinds.
const (
	FrameRevocation uint8 = 1 // Seq: the record's sequence number; Body: the signed record
	FramePolicy     uint8 = 2 // Seq: the policy version; Body: the signed policy release
	FrameClose      uint8 = 3 // Code, Message: why the authority ends the watch
)

// Watch tuning.
const (
	// watchBatch bounds the records read from the store per transaction.
	watchBatch = 64
	// watchWriteTimeout bounds one frame's write: a watcher that stops reading (flow control
	// exhausted) is dropped instead of holding a goroutine and a connection forever.
	watchWriteTimeout = 10 * time.Second
	// watchKeepAlive is the client's QUIC keep-alive period: well inside the authority's idle
	// timeout (requestTimeout), so a live watcher stays connected and a dead one, which stops
	// sending, is reaped by the idle timeout on both sides.
	watchKeepAlive = 3 * time.Second
	// Reconnection backoff of Watch.
	watchMinBackoff = 250 * time.Millisecond
	watchMaxBackoff = 30 * time.Second
)

// WatchRequest opens a watch. Encoding: deterministic CBOR, integer keys (docs/identity.md).
type WatchRequest struct {
	// SinceSeq is the highest authority revocation sequence number below which the node holds
	// every record (0: none).
	SinceSeq uint64 `cbor:"1,keyasint,omitempty"`
	// PolicyVersion is the policy version the node holds (0: none).
	PolicyVersion uint64 `cbor:"2,keyasint,omitempty"`
}

// WatchFrame is one message the authority sends on a watch stream after its Response.
type WatchFrame struct {
	Kind    uint8  `cbor:"1,keyasint"`
	Seq     uint64 `cbor:"2,keyasint,omitempty"`
	Body    []byte `cbor:"3,keyasint,omitempty"`
	Code    Code   `cbor:"4,keyasint,omitempty"`
	Message string `cbor:"5,keyasint,omitempty"`
}

// DecodeWatchRequest strictly decodes a watch request body.
func DecodeWatchRequest(b []byte) (WatchRequest, error) {
	var req WatchRequest
	if len(b) > maxRequest {
		return req, fmt.Errorf("%w: watch request of %d bytes exceeds %d", ErrProtocol, len(b), maxRequest)
	}
	if err := wireDec.Unmarshal(b, &req); err != nil {
		return WatchRequest{}, fmt.Errorf("%w: watch request: %w", ErrProtocol, err)
	}
	return req, nil
}

// DecodeWatchFrame strictly decodes and checks one watch frame body: a known kind with exactly the
// fields that kind carries, bodies within the record package's caps.
func DecodeWatchFrame(b []byte) (WatchFrame, error) {
	var f WatchFrame
	if len(b) > maxResponse {
		return f, fmt.Errorf("%w: watch frame of %d bytes exceeds %d", ErrProtocol, len(b), maxResponse)
	}
	if err := wireDec.Unmarshal(b, &f); err != nil {
		return WatchFrame{}, fmt.Errorf("%w: watch frame: %w", ErrProtocol, err)
	}
	bad := func(why string) (WatchFrame, error) {
		return WatchFrame{}, fmt.Errorf("%w: watch frame of kind %d: %s", ErrProtocol, f.Kind, why)
	}
	switch f.Kind {
	case FrameRevocation, FramePolicy:
		limit := record.MaxRevocationSize
		if f.Kind == FramePolicy {
			limit = record.MaxPolicyReleaseSize
		}
		switch {
		case f.Seq == 0:
			return bad("sequence number or version 0")
		case len(f.Body) == 0 || len(f.Body) > limit:
			return bad(fmt.Sprintf("body of %d bytes, want 1 to %d", len(f.Body), limit))
		case f.Code != CodeOK || f.Message != "":
			return bad("carries a refusal")
		}
	case FrameClose:
		switch {
		case f.Code == CodeOK:
			return bad("close without a code")
		case f.Seq != 0 || f.Body != nil:
			return bad("close with a body")
		case len(f.Message) > 1024:
			return bad("message too long")
		}
	default:
		return bad("unknown kind")
	}
	return f, nil
}

// watchHub tracks the open watchers and wakes them when a record or release is committed. A
// watcher reads what it has not sent from the store, so the hub holds no queue: a slow watcher
// costs its own stream's flow-control window, never the authority's memory.
type watchHub struct {
	mu         sync.Mutex
	perNode    map[string][]*watcher
	total      int
	maxTotal   int
	maxPerNode int
}

type watcher struct {
	node    string
	wake    chan struct{} // capacity 1: a pending wake-up absorbs any number of commits
	evicted chan struct{} // closed when a newer watcher of the same node replaced this one
}

func newWatchHub(lim Limits) *watchHub {
	lim = lim.withDefaults()
	return &watchHub{perNode: make(map[string][]*watcher), maxTotal: lim.MaxWatchers, maxPerNode: lim.MaxWatchersPerNode}
}

// add registers a watcher of node, replacing the node's oldest when it already has maxPerNode.
func (h *watchHub) add(node string) (*watcher, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	ws := h.perNode[node]
	if len(ws) >= h.maxPerNode {
		close(ws[0].evicted)
		ws = ws[1:]
		h.total--
	}
	if h.total >= h.maxTotal {
		h.perNode[node] = ws
		if len(ws) == 0 {
			delete(h.perNode, node)
		}
		return nil, fmt.Errorf("%w: %d watch connections already open", ErrBusy, h.maxTotal)
	}
	w := &watcher{node: node, wake: make(chan struct{}, 1), evicted: make(chan struct{})}
	h.perNode[node] = append(ws, w)
	h.total++
	return w, nil
}

// remove unregisters w (a no-op once it was evicted).
func (h *watchHub) remove(w *watcher) {
	h.mu.Lock()
	defer h.mu.Unlock()
	ws := h.perNode[w.node]
	for i, x := range ws {
		if x == w {
			ws = append(ws[:i:i], ws[i+1:]...)
			h.total--
			break
		}
	}
	if len(ws) == 0 {
		delete(h.perNode, w.node)
	} else {
		h.perNode[w.node] = ws
	}
}

// notify wakes every watcher; it never blocks.
func (h *watchHub) notify() {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, ws := range h.perNode {
		for _, w := range ws {
			select {
			case w.wake <- struct{}{}:
			default:
			}
		}
	}
}

// count is the number of registered watchers.
func (h *watchHub) count() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.total
}

// Watchers is the number of watch connections being served.
func (a *Authority) Watchers() int { return a.watch.count() }

// watchSession is an authenticated watch about to be served.
type watchSession struct {
	w        *watcher
	id       identity.ID
	serial   uint64
	notAfter time.Time
	since    uint64
	policy   uint64
}

// openWatch authenticates a watch request like a renewal: the presented certificate must be a
// current node certificate of this authority, its lineage unrevoked and not renewed since (the
// node watches with its newest certificate). Every refusal goes through the noise limiter: a
// revoked node's daemon retries for as long as it runs, and must not cost an fsync per attempt.
func (a *Authority) openWatch(req WatchRequest, certs []*x509.Certificate, p peer) (Response, *watchSession) {
	now := a.opts.Now()
	if len(certs) == 0 {
		return a.refuseNoise("watch", p, "", fmt.Errorf("%w: no client certificate presented", ErrWatchRefused)), nil
	}
	cur, err := identity.ParseCertificate(certs[0].Raw)
	if err != nil {
		return a.refuseNoise("watch", p, "", fmt.Errorf("%w: %w", ErrWatchRefused, err)), nil
	}
	if err := (identity.Verifier{Authority: a.cert}).VerifyNode(cur, now); err != nil {
		return a.refuseNoise("watch", p, "", fmt.Errorf("%w: %w", ErrWatchRefused, err)), nil
	}
	serial, ok := serialUint64(cur.Serial())
	if !ok {
		return a.refuseNoise("watch", p, "", fmt.Errorf("%w: serial %s was never issued by this authority", ErrWatchRefused, cur.Serial())), nil
	}
	if err := a.store.watchable(serial, cur.ID); err != nil {
		return a.refuseNoise("watch", p, "", err), nil
	}
	last, err := a.store.LastRevocationSeq()
	if err != nil {
		return a.refuseNoise("watch", p, "", err), nil
	}
	if req.SinceSeq > last {
		// The node is ahead of this store (restored from a backup?): resending everything is
		// harmless (records are idempotent), missing the next ones is not.
		a.log.Warn("watcher holds a revocation sequence above the authority's; resending every record",
			"node", cur.ID.String(), "since", req.SinceSeq, "last", last)
		req.SinceSeq = 0
	}
	w, err := a.watch.add(cur.ID.Name)
	if err != nil {
		a.noteBusy(p, "watchers")
		return refusal(CodeBusy, err), nil
	}
	a.log.Info("watch opened", "remote", p.remote, "node", cur.ID.String(), "serial", serial, "since", req.SinceSeq, "policy_version", req.PolicyVersion)
	return Response{Code: CodeOK, Head: last}, &watchSession{w: w, id: cur.ID, serial: serial, notAfter: cur.X509.NotAfter, since: req.SinceSeq, policy: req.PolicyVersion}
}

// watchable refuses a watch by serial when its lineage is revoked or it was renewed since.
func (s *Store) watchable(serial uint64, id identity.ID) error {
	return s.db.View(func(tx *bolt.Tx) error { return watchableTx(tx, serial, id) })
}

func watchableTx(tx *bolt.Tx, serial uint64, id identity.ID) error {
	if r := lineageRevoked(tx, serial); r != 0 {
		return fmt.Errorf("%w: serial %d of %s (revoked serial %d); the node must rejoin with a new token", ErrRevoked, serial, id, r)
	}
	if v := tx.Bucket(bucketRenewed).Get(u64(serial)); v != nil {
		next, _ := getU64(v)
		return fmt.Errorf("%w: serial %d of %s was renewed as serial %d; watch with the newest certificate", ErrSuperseded, serial, id, next)
	}
	return nil
}

// serveWatch streams records and releases to an accepted watcher until the connection dies, the
// server stops, the watcher is replaced, its certificate expires or its lineage is revoked (it
// still receives the record that revokes it first).
func (s *Server) serveWatch(ctx context.Context, conn *quic.Conn, str *quic.Stream, ws *watchSession) {
	a := s.a
	defer a.watch.remove(ws.w)
	defer func() { _ = conn.CloseWithError(closeOK, "") }()
	if !s.trackWatch(conn) {
		return
	}
	defer s.untrackWatch(conn)
	_ = str.SetReadDeadline(time.Time{})
	until := ws.notAfter.Sub(a.opts.Now())
	expiry := time.NewTimer(max(until, 0))
	defer expiry.Stop()
	log := s.log.With("node", ws.id.String(), "remote", conn.RemoteAddr().String())
	closeWith := func(code Code, msg string) {
		if s.writeWatch(str, WatchFrame{Kind: FrameClose, Code: code, Message: msg}) != nil {
			return
		}
		_ = str.Close()
		// Closing the connection now could discard the frame still in flight: let the node read
		// it and close first, as a request's response lingers.
		linger := time.NewTimer(lingerTimeout)
		defer linger.Stop()
		select {
		case <-conn.Context().Done():
		case <-linger.C:
		case <-ctx.Done():
		}
	}
	sent, policy := ws.since, ws.policy
	for {
		for {
			recs, err := a.store.RevocationRecords(sent, watchBatch)
			if err != nil {
				log.Error("watch: read revocation records", "err", err)
				closeWith(CodeInternal, ErrInternal.Error())
				return
			}
			for _, r := range recs {
				if err := s.writeWatch(str, WatchFrame{Kind: FrameRevocation, Seq: r.Seq, Body: r.Raw}); err != nil {
					log.Info("watch ended", "err", err)
					return
				}
				sent = r.Seq
			}
			if len(recs) < watchBatch {
				break
			}
		}
		version, raw, err := a.store.PolicyRelease()
		if err != nil {
			log.Error("watch: read policy release", "err", err)
			closeWith(CodeInternal, ErrInternal.Error())
			return
		}
		if version > policy {
			if err := s.writeWatch(str, WatchFrame{Kind: FramePolicy, Seq: version, Body: raw}); err != nil {
				log.Info("watch ended", "err", err)
				return
			}
			policy = version
		}
		if err := a.store.watchRevoked(ws.serial, ws.id); err != nil {
			log.Info("watch closed: node revoked", "err", err)
			closeWith(CodeRevoked, err.Error())
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-conn.Context().Done():
			log.Info("watch ended", "err", context.Cause(conn.Context()))
			return
		case <-ws.w.evicted:
			closeWith(CodeBusy, fmt.Sprintf("%s: replaced by a newer watch connection of %s", ErrBusy, ws.id))
			return
		case <-expiry.C:
			closeWith(CodeWatchRefused, fmt.Sprintf("%s: certificate of %s expired; watch again with the renewed one", ErrWatchRefused, ws.id))
			return
		case <-ws.w.wake:
		}
	}
}

// watchRevoked reports (as ErrRevoked) a lineage revoked while its watch was open.
func (s *Store) watchRevoked(serial uint64, id identity.ID) error {
	return s.db.View(func(tx *bolt.Tx) error {
		if r := lineageRevoked(tx, serial); r != 0 {
			return fmt.Errorf("%w: serial %d of %s (revoked serial %d)", ErrRevoked, serial, id, r)
		}
		return nil
	})
}

func (s *Server) writeWatch(str *quic.Stream, f WatchFrame) error {
	_ = str.SetWriteDeadline(time.Now().Add(watchWriteTimeout))
	return writeFrame(str, 0, f)
}

// WatchParams configure Watch.
type WatchParams struct {
	// Addr is the authority's UDP address, host:port.
	Addr string
	// Anchor is the authority certificate received at join: the server must present its key, and
	// every record and release must verify under it.
	Anchor *identity.Certificate
	// Certificate and Key are the node's current certificate and key, presented over mutual TLS.
	Certificate *identity.Certificate
	Key         ed25519.PrivateKey
	// Credentials, when set, is called before each connection attempt instead of reading
	// Certificate and Key, so a watch survives the node's renewals.
	Credentials func() (*identity.Certificate, ed25519.PrivateKey, error)
	// SinceSeq is the highest authority revocation sequence number up to which the node holds
	// every record (contiguously: not merely the highest it has seen through gossip).
	SinceSeq uint64
	// PolicyVersion is the policy version the node holds.
	PolicyVersion uint64
	// OnRecord receives each authority revocation record with a sequence number above the last
	// one delivered, in sequence order, verified under Anchor (expired records are skipped). An
	// error ends the connection; after the backoff the watch resumes from the last record
	// OnRecord accepted.
	OnRecord func(raw []byte) error
	// OnPolicy receives each policy release newer than the last one delivered, verified under
	// Anchor. An error ends the connection like OnRecord's.
	OnPolicy func(raw []byte) error
	// OnError, when set, is told why each connection attempt failed or ended (errors.Is works on
	// the authority's refusals: ErrRevoked, ErrSuperseded, ErrWatchRefused, ErrBusy, ...).
	OnError func(err error)
	// Logger receives connection events; nil discards them.
	Logger *slog.Logger
	// Now is the clock used to verify records; nil means time.Now.
	Now func() time.Time
	// MinBackoff and MaxBackoff bound the jittered, doubling wait between connection attempts;
	// zero means 250 ms and 30 s.
	MinBackoff, MaxBackoff time.Duration
}

// WatchState is how far a watch has delivered.
type WatchState struct {
	Seq           uint64 // highest revocation sequence number delivered (or skipped as expired)
	PolicyVersion uint64 // highest policy version delivered
}

// Watch keeps a watch connection to the authority open until ctx ends, reconnecting with
// jittered exponential backoff, and returns the state it reached. It returns early only when p is
// unusable (missing Addr, Anchor, credentials or callbacks).
func Watch(ctx context.Context, p WatchParams) (WatchState, error) {
	st := WatchState{Seq: p.SinceSeq, PolicyVersion: p.PolicyVersion}
	switch {
	case p.Addr == "" || p.Anchor == nil || p.OnRecord == nil || p.OnPolicy == nil:
		return st, errors.New("watch: Addr, Anchor, OnRecord and OnPolicy are required")
	case p.Credentials == nil && (p.Certificate == nil || p.Key == nil):
		return st, errors.New("watch: Certificate and Key (or Credentials) are required")
	}
	if p.Now == nil {
		p.Now = time.Now
	}
	if p.Logger == nil {
		p.Logger = slog.New(slog.DiscardHandler)
	}
	if p.MinBackoff <= 0 {
		p.MinBackoff = watchMinBackoff
	}
	if p.MaxBackoff < p.MinBackoff {
		p.MaxBackoff = max(watchMaxBackoff, p.MinBackoff)
	}
	backoff := p.MinBackoff
	for {
		accepted, err := watchOnce(ctx, p, &st)
		if ctx.Err() != nil {
			return st, nil
		}
		if p.OnError != nil {
			p.OnError(err)
		}
		p.Logger.Warn("authority watch interrupted", "addr", p.Addr, "seq", st.Seq, "policy_version", st.PolicyVersion, "err", err)
		if accepted {
			backoff = p.MinBackoff
		}
		wait := backoff/2 + rand.N(backoff/2+1)
		backoff = min(2*backoff, p.MaxBackoff)
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return st, nil
		case <-t.C:
		}
	}
}

// watchOnce runs one watch connection; accepted says whether the authority accepted it.
func watchOnce(ctx context.Context, p WatchParams, st *WatchState) (accepted bool, err error) {
	cert, key := p.Certificate, p.Key
	if p.Credentials != nil {
		if cert, key, err = p.Credentials(); err != nil {
			return false, fmt.Errorf("watch credentials: %w", err)
		}
	}
	tlsCert, err := identity.TLSCertificate(key, cert)
	if err != nil {
		return false, err
	}
	raddr, err := net.ResolveUDPAddr("udp", p.Addr)
	if err != nil {
		return false, fmt.Errorf("authority address %q: %w", p.Addr, err)
	}
	udp, err := net.ListenUDP("udp", nil)
	if err != nil {
		return false, fmt.Errorf("dial authority: %w", err)
	}
	tr := &quic.Transport{Conn: udp}
	defer func() {
		_ = tr.Close()
		_ = udp.Close()
	}()
	want := p.Anchor.PublicKey()
	tlsConf := &tls.Config{
		MinVersion:         tls.VersionTLS13,
		NextProtos:         []string{ALPN},
		ServerName:         serverName,
		InsecureSkipVerify: true, // the authority is authenticated by its key, below
		VerifyConnection: func(cs tls.ConnectionState) error {
			pub, err := peerKey(cs)
			if err != nil {
				return err
			}
			if !pub.Equal(want) {
				return fmt.Errorf("%w: the server at %s presented key %s, not the authority key %s", ErrPinMismatch, p.Addr, identity.KeyHash(pub), identity.KeyHash(want))
			}
			return nil
		},
		SessionTicketsDisabled: true,
		Certificates:           []tls.Certificate{tlsCert},
	}
	dialCtx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	conn, err := tr.Dial(dialCtx, raddr, tlsConf, &quic.Config{
		HandshakeIdleTimeout: handshakeTimeout, MaxIdleTimeout: requestTimeout, KeepAlivePeriod: watchKeepAlive,
	})
	if err != nil {
		if errors.Is(err, ErrPinMismatch) {
			return false, pinError(err)
		}
		return false, fmt.Errorf("connect to authority at %s: %w", p.Addr, busyError(err))
	}
	defer func() { _ = conn.CloseWithError(closeOK, "") }()
	// Reads block until a frame arrives; closing the connection is what ends them when ctx does.
	stop := context.AfterFunc(ctx, func() { _ = conn.CloseWithError(closeOK, "watch stopped") })
	defer stop()
	if conn.ConnectionState().Used0RTT {
		return false, fmt.Errorf("%w: connection used 0-RTT", ErrProtocol)
	}
	str, err := conn.OpenStreamSync(dialCtx)
	if err != nil {
		return false, fmt.Errorf("open stream to authority at %s: %w", p.Addr, busyError(err))
	}
	_ = str.SetDeadline(time.Now().Add(requestTimeout))
	if err := writeFrame(str, OpWatch, WatchRequest{SinceSeq: st.Seq, PolicyVersion: st.PolicyVersion}); err != nil {
		return false, fmt.Errorf("send watch request to %s: %w", p.Addr, busyError(err))
	}
	_ = str.Close()
	body, err := readFrame(str, maxResponse)
	if err != nil {
		return false, fmt.Errorf("read watch response from %s: %w", p.Addr, busyError(err))
	}
	resp, err := DecodeResponse(body)
	if err != nil {
		return false, err
	}
	if resp.Code != CodeOK {
		return false, errOf(resp.Code, resp.Message)
	}
	if resp.Head < st.Seq {
		// The authority holds fewer records than this node has (restored from a backup): it
		// resends every record, numbered as it numbers them now.
		p.Logger.Warn("authority holds fewer revocation records than this node; receiving all again", "addr", p.Addr, "seq", st.Seq, "head", resp.Head)
		st.Seq = 0
	}
	_ = str.SetReadDeadline(time.Time{})
	p.Logger.Info("authority watch open", "addr", p.Addr, "seq", st.Seq, "policy_version", st.PolicyVersion)
	v := record.Verifier{Certs: identity.Verifier{Authority: p.Anchor}}
	for {
		body, err := readFrame(str, maxResponse)
		if err != nil {
			return true, fmt.Errorf("watch stream from %s: %w", p.Addr, err)
		}
		f, err := DecodeWatchFrame(body)
		if err != nil {
			return true, err
		}
		switch f.Kind {
		case FrameClose:
			return true, errOf(f.Code, f.Message)
		case FrameRevocation:
			if err := deliverRecord(v, p, st, f); err != nil {
				return true, err
			}
		case FramePolicy:
			if err := deliverPolicy(v, p, st, f); err != nil {
				return true, err
			}
		}
	}
}

// deliverRecord verifies a revocation frame and hands it to OnRecord. Frames must arrive in
// sequence order; a record whose certificates have all expired is skipped (nothing left to cut).
func deliverRecord(v record.Verifier, p WatchParams, st *WatchState, f WatchFrame) error {
	if f.Seq <= st.Seq {
		return fmt.Errorf("%w: revocation record %d after %d", ErrProtocol, f.Seq, st.Seq)
	}
	rev, err := v.VerifyRevocation(f.Body, p.Now())
	if errors.Is(err, record.ErrExpired) {
		st.Seq = f.Seq
		return nil
	}
	if err != nil {
		return fmt.Errorf("revocation record %d: %w", f.Seq, err)
	}
	if !rev.ByAuthority() || rev.Claims.Seq != f.Seq {
		return fmt.Errorf("%w: frame %d carries a record with sequence number %d (authority-signed: %t)", ErrProtocol, f.Seq, rev.Claims.Seq, rev.ByAuthority())
	}
	if err := p.OnRecord(f.Body); err != nil {
		return fmt.Errorf("revocation record %d not accepted: %w", f.Seq, err)
	}
	st.Seq = f.Seq
	return nil
}

// deliverPolicy verifies a policy frame and hands it to OnPolicy.
func deliverPolicy(v record.Verifier, p WatchParams, st *WatchState, f WatchFrame) error {
	if f.Seq <= st.PolicyVersion {
		return fmt.Errorf("%w: policy version %d after %d", ErrProtocol, f.Seq, st.PolicyVersion)
	}
	rel, err := v.VerifyPolicy(f.Body, p.Now())
	if err != nil {
		return fmt.Errorf("policy release %d: %w", f.Seq, err)
	}
	if rel.Claims.PolicyVersion != f.Seq {
		return fmt.Errorf("%w: frame %d carries policy version %d", ErrProtocol, f.Seq, rel.Claims.PolicyVersion)
	}
	if err := p.OnPolicy(f.Body); err != nil {
		return fmt.Errorf("policy release %d not accepted: %w", f.Seq, err)
	}
	st.PolicyVersion = f.Seq
	return nil
}
