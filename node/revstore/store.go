package revstore

import (
	"bytes"
	"cmp"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/fxamacker/cbor/v2"
	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"

	"github.com/ute-project/ute/identity/record"
)

// FileName is the store's file in the node directory.
const FileName = "revocations.db"

// DefaultMaxPerNode caps the node-signed records held per signing node (see Options.MaxPerNode).
const DefaultMaxPerNode = 4096

// Refusals of the store itself; verification refusals are identity/record's sentinels.
var (
	// ErrStalePolicy: the policy release is not newer than the one held (a replayed or reordered
	// release), or claims the held version with other content.
	ErrStalePolicy = errors.New("revstore: policy version is not newer than the one held")
	// ErrCorrupt: the file is not a readable bbolt database of this layout. The node must not run
	// without the revocations it held: restore the file or move it aside (the node then re-learns
	// revocations from its peers and the authority).
	ErrCorrupt = errors.New("revstore: store file damaged")
	// ErrLocked: another process holds the file.
	ErrLocked = errors.New("revstore: store file in use")
	// ErrLimit: the signing node already has MaxPerNode records held.
	ErrLimit = errors.New("revstore: too many records from one node")
	// ErrClosed: the store was closed.
	ErrClosed = errors.New("revstore: closed")
)

var (
	bucketMeta        = []byte("meta")
	bucketRevocations = []byte("revocations")
	bucketPolicy      = []byte("policy")
	bucketQuarantine  = []byte("quarantine")

	keyFormat  = []byte("format")
	keyCurrent = []byte("current")

	formatV1 = []byte{1}
)

// maxValueSize caps a stored value before decoding: the file is ours, but a damaged one must give
// an error, not an allocation bomb (I8).
const maxValueSize = record.MaxPolicyReleaseSize + 64

// stored is the value of the revocations and policy buckets: the record exactly as received and
// when it arrived (for metrics; not trusted for anything else).
type stored struct {
	Raw     []byte `cbor:"1,keyasint"`
	Arrived int64  `cbor:"2,keyasint"` // Unix milliseconds
}

// quarantined is the value of the quarantine bucket.
type quarantined struct {
	Bucket string `cbor:"1,keyasint"`
	Key    []byte `cbor:"2,keyasint"`
	Value  []byte `cbor:"3,keyasint"`
	Reason string `cbor:"4,keyasint"`
	At     int64  `cbor:"5,keyasint"`
}

var (
	encMode = mustEnc()
	decMode = mustDec()
)

func mustEnc() cbor.EncMode {
	m, err := cbor.CoreDetEncOptions().EncMode()
	if err != nil {
		panic(fmt.Sprintf("revstore: cbor encoder options: %v", err)) // static options
	}
	return m
}

func mustDec() cbor.DecMode {
	m, err := cbor.DecOptions{
		DupMapKey:         cbor.DupMapKeyEnforcedAPF,
		IndefLength:       cbor.IndefLengthForbidden,
		TagsMd:            cbor.TagsForbidden,
		ExtraReturnErrors: cbor.ExtraDecErrorUnknownField,
		MaxMapPairs:       16,
	}.DecMode()
	if err != nil {
		panic(fmt.Sprintf("revstore: cbor decoder options: %v", err))
	}
	return m
}

// Options configure a Store.
type Options struct {
	// Verifier verifies every record and policy release against the trust anchor. Required.
	Verifier record.Verifier
	// Now is the clock; time.Now when nil.
	Now func() time.Time
	// Logger receives quarantine and prune events; slog.Default() when nil.
	Logger *slog.Logger
	// MaxPerNode caps the node-signed records held per signing node (DefaultMaxPerNode when 0):
	// a compromised node can mint agent certificates freely, and must not grow every member's set
	// without bound by revoking them. Authority records are never capped.
	MaxPerNode int
	// LockTimeout bounds the wait for the file lock (1 s when 0).
	LockTimeout time.Duration
}

// Entry is one held revocation.
type Entry struct {
	Record *record.Revocation
	// Arrived is when this node first stored the record (local clock).
	Arrived time.Time
	// Held is when this copy took effect here (local clock, not persisted): after its durable
	// write, the moment Revoked starts to report it; for a record loaded at Open, that Open.
	// Arrived is taken before verification and the write, so Held − Arrived is their cost.
	Held time.Time
}

// AgeAtArrival is how long after its issued-at the record reached this node (convergence metric).
func (e Entry) AgeAtArrival() time.Duration { return e.Arrived.Sub(e.Record.Claims.IssuedAt) }

// Quarantine describes a stored item that failed verification or decoding at Open. It was moved
// to the file's quarantine bucket, is not applied, and stays there as evidence.
type Quarantine struct {
	Bucket string // "revocations" or "policy"
	Key    string // its key in that bucket
	Err    error  // why it was refused (wraps a sentinel of identity/record, or ErrCorrupt)
}

// OpenReport says what Open found. The caller must surface Quarantined (log and audit): a
// quarantined revocation is one this node no longer enforces until gossip or the authority brings
// it back.
type OpenReport struct {
	Loaded      int          // revocations in force
	Expired     int          // revocations dropped because they had expired
	Rekeyed     int          // authentic records stored under another key, moved to their own
	Quarantined []Quarantine // refused at this Open
	// QuarantineTotal counts everything in the quarantine bucket, from this and earlier Opens.
	QuarantineTotal int
	PolicyVersion   uint64 // 0 when no valid policy release is held
}

// Store is the node's revocation set and policy. Safe for concurrent use.
type Store struct {
	db         *bolt.DB
	v          record.Verifier
	now        func() time.Time
	log        *slog.Logger
	maxPerNode int

	wmu sync.Mutex // serialises writers, so the index and the file change in the same order

	mu        sync.RWMutex
	closed    bool
	byKey     map[string]*Entry
	revoked   map[string]int // canonical key -> number of held records revoking it
	perSigner map[string]int // node ID -> node-signed records held
	policy    *record.PolicyRelease
}

// Open opens (creating if needed) the store at path, re-verifies every stored record and the
// policy release, drops expired records, quarantines anything that fails, and builds the index, so
// that every accepted revocation is in force when Open returns. A file bbolt cannot read, or whose
// structure is inconsistent, is ErrCorrupt; a file held by another process is ErrLocked.
func Open(path string, opts Options) (*Store, OpenReport, error) {
	if opts.Verifier.Certs.Authority == nil {
		return nil, OpenReport{}, fmt.Errorf("revstore: open %s: %w", path, record.ErrSigner)
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.MaxPerNode <= 0 {
		opts.MaxPerNode = DefaultMaxPerNode
	}
	if opts.LockTimeout <= 0 {
		opts.LockTimeout = time.Second
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: opts.LockTimeout})
	if err != nil {
		switch {
		case errors.Is(err, bolterrors.ErrTimeout):
			return nil, OpenReport{}, fmt.Errorf("%w: %s (is another node process running on this directory?)", ErrLocked, path)
		case errors.Is(err, bolterrors.ErrInvalid), errors.Is(err, bolterrors.ErrChecksum), errors.Is(err, bolterrors.ErrVersionMismatch):
			return nil, OpenReport{}, fmt.Errorf("%w: %s: %v; restore it from a backup or move it aside", ErrCorrupt, path, err)
		}
		return nil, OpenReport{}, fmt.Errorf("revstore: open %s: %w", path, err)
	}
	// bbolt applies the mode only when it creates the file.
	if err := os.Chmod(path, 0o600); err != nil {
		_ = db.Close()
		return nil, OpenReport{}, fmt.Errorf("revstore: %s: %w", path, err)
	}
	s := &Store{
		db: db, v: opts.Verifier, now: opts.Now, log: opts.Logger, maxPerNode: opts.MaxPerNode,
		byKey: map[string]*Entry{}, revoked: map[string]int{}, perSigner: map[string]int{},
	}
	rep, err := s.load()
	if err != nil {
		_ = db.Close()
		return nil, OpenReport{}, fmt.Errorf("%s: %w", path, err)
	}
	for _, q := range rep.Quarantined {
		s.log.Warn("revocation store: quarantined a stored item that failed verification", "bucket", q.Bucket, "key", q.Key, "err", q.Err)
	}
	return s, rep, nil
}

// load checks the file's structure, then re-verifies and indexes everything in one transaction.
// bbolt panics on some page corruption; that becomes ErrCorrupt rather than a crash (I8).
func (s *Store) load() (rep OpenReport, err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("%w: %v; restore it from a backup or move it aside", ErrCorrupt, p)
		}
	}()
	if err := s.db.View(func(tx *bolt.Tx) error {
		var first error
		for cerr := range tx.Check() { // drain: the checker runs on its own goroutine until done
			if first == nil {
				first = cerr
			}
		}
		return first
	}); err != nil {
		return rep, fmt.Errorf("%w: %v; restore it from a backup or move it aside", ErrCorrupt, err)
	}
	now := s.now()
	err = s.db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketMeta, bucketRevocations, bucketPolicy, bucketQuarantine} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return fmt.Errorf("%w: bucket %s: %v", ErrCorrupt, b, err)
			}
		}
		meta := tx.Bucket(bucketMeta)
		switch f := meta.Get(keyFormat); {
		case f == nil:
			if err := meta.Put(keyFormat, formatV1); err != nil {
				return err
			}
		case !bytes.Equal(f, formatV1):
			return fmt.Errorf("%w: unknown store format %x (this node reads %x)", ErrCorrupt, f, formatV1)
		}
		if err := s.loadRevocations(tx, now, &rep); err != nil {
			return err
		}
		if err := s.loadPolicy(tx, now, &rep); err != nil {
			return err
		}
		// Stats would miss this transaction's own writes; count directly.
		return tx.Bucket(bucketQuarantine).ForEach(func(_, _ []byte) error {
			rep.QuarantineTotal++
			return nil
		})
	})
	rep.Loaded = len(s.byKey)
	if s.policy != nil {
		rep.PolicyVersion = s.policy.Claims.PolicyVersion
	}
	return rep, err
}

func (s *Store) loadRevocations(tx *bolt.Tx, now time.Time, rep *OpenReport) error {
	b := tx.Bucket(bucketRevocations)
	type item struct{ k, v []byte }
	var items []item
	if err := b.ForEach(func(k, v []byte) error {
		items = append(items, item{bytes.Clone(k), bytes.Clone(v)})
		return nil
	}); err != nil {
		return fmt.Errorf("%w: %v", ErrCorrupt, err)
	}
	type winner struct {
		e *Entry
		v []byte
	}
	winners := map[string]winner{}
	for _, it := range items {
		st, err := decodeStored(it.v)
		var r *record.Revocation
		if err == nil {
			r, err = s.v.ReverifyRevocation(st.Raw, now)
		}
		switch {
		case errors.Is(err, record.ErrExpired):
			rep.Expired++
			if err := b.Delete(it.k); err != nil {
				return err
			}
			continue
		case err != nil:
			if err := quarantine(tx, string(bucketRevocations), it.k, it.v, err, now); err != nil {
				return err
			}
			rep.Quarantined = append(rep.Quarantined, Quarantine{Bucket: string(bucketRevocations), Key: printable(it.k), Err: err})
			continue
		}
		if string(it.k) != r.Key() {
			// Authentic, but filed under another key (tampering or a bug): it moves to its own key
			// below, once every slot has been read.
			rep.Rekeyed++
			if err := b.Delete(it.k); err != nil {
				return err
			}
		}
		if w, ok := winners[r.Key()]; ok && !supersedes(r, w.e.Record) {
			continue
		}
		winners[r.Key()] = winner{&Entry{Record: r, Arrived: time.UnixMilli(st.Arrived), Held: now}, it.v}
	}
	for k, w := range winners {
		if !bytes.Equal(b.Get([]byte(k)), w.v) {
			if err := b.Put([]byte(k), w.v); err != nil {
				return err
			}
		}
		s.install(w.e)
	}
	return nil
}

func (s *Store) loadPolicy(tx *bolt.Tx, now time.Time, rep *OpenReport) error {
	b := tx.Bucket(bucketPolicy)
	v := b.Get(keyCurrent)
	if v == nil {
		return nil
	}
	v = bytes.Clone(v)
	st, err := decodeStored(v)
	var rel *record.PolicyRelease
	if err == nil {
		rel, err = s.v.ReverifyPolicy(st.Raw, now)
	}
	if err != nil {
		if err := quarantine(tx, string(bucketPolicy), keyCurrent, v, err, now); err != nil {
			return err
		}
		rep.Quarantined = append(rep.Quarantined, Quarantine{Bucket: string(bucketPolicy), Key: string(keyCurrent), Err: err})
		return b.Delete(keyCurrent)
	}
	s.policy = rel
	return nil
}

// quarantine moves a refused item out of the live buckets, keeping it as evidence.
func quarantine(tx *bolt.Tx, bucket string, k, v []byte, why error, now time.Time) error {
	q, err := encMode.Marshal(quarantined{Bucket: bucket, Key: k, Value: v, Reason: why.Error(), At: now.UnixMilli()})
	if err != nil {
		return err
	}
	id := sha256.Sum256(append(append([]byte(bucket+"\x00"), k...), v...))
	if err := tx.Bucket(bucketQuarantine).Put(id[:], q); err != nil {
		return err
	}
	return tx.Bucket([]byte(bucket)).Delete(k)
}

func decodeStored(v []byte) (stored, error) {
	var st stored
	if len(v) > maxValueSize {
		return st, fmt.Errorf("%w: stored value is %d bytes", ErrCorrupt, len(v))
	}
	if err := decMode.Unmarshal(v, &st); err != nil {
		return st, fmt.Errorf("%w: stored value: %v", ErrCorrupt, err)
	}
	if len(st.Raw) == 0 {
		return st, fmt.Errorf("%w: stored value holds no record", ErrCorrupt)
	}
	return st, nil
}

// printable keeps a (possibly hostile) stored key bounded and printable in reports and logs.
func printable(k []byte) string {
	if len(k) > 200 {
		k = k[:200]
	}
	q := strconv.QuoteToGraphic(string(k))
	return q[1 : len(q)-1]
}

// supersedes reports whether a should replace b, both having the same key: a later expiry wins
// (it keeps the revocation in force longer); on equal expiry the authority's record beats a
// node's, and a higher authority seq beats a lower one. Ties keep the held record, so that
// re-signed copies never churn the set or the gossip.
func supersedes(a, b *record.Revocation) bool {
	if c := a.Claims.Expires.Compare(b.Claims.Expires); c != 0 {
		return c > 0
	}
	if a.ByAuthority() != b.ByAuthority() {
		return a.ByAuthority()
	}
	return a.Claims.Seq > b.Claims.Seq
}

// install puts e in the index, replacing a held record of the same key. Caller holds wmu (or is
// load, before the store is shared).
func (s *Store) install(e *Entry) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if old := s.byKey[e.Record.Key()]; old != nil {
		s.unindex(old)
	}
	s.byKey[e.Record.Key()] = e
	for _, k := range e.Record.Keys() {
		s.revoked[k]++
	}
	if !e.Record.ByAuthority() {
		s.perSigner[e.Record.SignerID.String()]++
	}
}

// unindex removes e's contributions. Caller holds mu.
func (s *Store) unindex(e *Entry) {
	delete(s.byKey, e.Record.Key())
	for _, k := range e.Record.Keys() {
		if s.revoked[k]--; s.revoked[k] <= 0 {
			delete(s.revoked, k)
		}
	}
	if !e.Record.ByAuthority() {
		sig := e.Record.SignerID.String()
		if s.perSigner[sig]--; s.perSigner[sig] <= 0 {
			delete(s.perSigner, sig)
		}
	}
}

// Add verifies raw at the store's clock and stores it. changed is true when the held set changed
// — a key not held before, or a record that supersedes the held one (later expiry; see
// Revocation.Key for what "same" means) — and only after the change is durable on disk: the
// caller then acts on it (cuts the subject's tunnels and flows) and re-broadcasts it. A record
// whose key is held with an equal or later expiry returns changed=false and the verified record,
// which is the idempotent case (I5). Refusals wrap identity/record's sentinels, ErrLimit or
// ErrClosed; nothing refused is stored.
func (s *Store) Add(raw []byte) (rec *record.Revocation, changed bool, err error) {
	if s.isClosed() {
		return nil, false, ErrClosed
	}
	now := s.now()
	r, err := s.v.VerifyRevocation(raw, now)
	if err != nil {
		return nil, false, err
	}
	s.wmu.Lock()
	defer s.wmu.Unlock()
	s.mu.RLock()
	closed, cur, signed := s.closed, s.byKey[r.Key()], s.perSigner[r.SignerID.String()]
	s.mu.RUnlock()
	switch {
	case closed:
		return nil, false, ErrClosed
	case cur != nil && !supersedes(r, cur.Record):
		return r, false, nil
	case cur == nil && !r.ByAuthority() && signed >= s.maxPerNode:
		return nil, false, fmt.Errorf("%w: %s already has %d records held", ErrLimit, r.SignerID, signed)
	}
	e := &Entry{Record: r, Arrived: now}
	v, err := encMode.Marshal(stored{Raw: r.Raw(), Arrived: now.UnixMilli()})
	if err != nil {
		return nil, false, fmt.Errorf("revstore: encode: %w", err)
	}
	if err := s.db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketRevocations).Put([]byte(r.Key()), v)
	}); err != nil {
		return nil, false, fmt.Errorf("revstore: store revocation %s: %w", r.Key(), err)
	}
	e.Held = s.now()
	s.install(e)
	return r, true, nil
}

func (s *Store) isClosed() bool {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.closed
}

// Revoked reports whether any of the canonical keys is revoked (see record.ChainKeys). It reads
// only memory.
func (s *Store) Revoked(keys ...string) bool {
	s.mu.RLock()
	defer s.mu.RUnlock()
	for _, k := range keys {
		if s.revoked[k] > 0 {
			return true
		}
	}
	return false
}

// Lookup returns the held record of key (a Revocation.Key).
func (s *Store) Lookup(key string) (Entry, bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	e, ok := s.byKey[key]
	if !ok {
		return Entry{}, false
	}
	return *e, true
}

// All returns the held records in key order.
func (s *Store) All() []Entry {
	s.mu.RLock()
	out := make([]Entry, 0, len(s.byKey))
	for _, e := range s.byKey {
		out = append(out, *e)
	}
	s.mu.RUnlock()
	slices.SortFunc(out, func(a, b Entry) int { return cmp.Compare(a.Record.Key(), b.Record.Key()) })
	return out
}

// Raw returns the held records as received, in key order, for gossip push/pull. The slices are
// shared with the store and must not be modified.
func (s *Store) Raw() [][]byte {
	all := s.All()
	out := make([][]byte, len(all))
	for i, e := range all {
		out[i] = e.Record.Raw()
	}
	return out
}

// Len is the number of records held.
func (s *Store) Len() int {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return len(s.byKey)
}

// MaxSeq is the highest authority sequence number among the held records, 0 if none: what the
// node sends when it (re)connects to the authority's watch to receive the rest. A record that a
// same-key record with a later expiry superseded, or that expired, does not count, so the
// authority may resend it; Add is idempotent.
func (s *Store) MaxSeq() uint64 {
	s.mu.RLock()
	defer s.mu.RUnlock()
	var m uint64
	for _, e := range s.byKey {
		m = max(m, e.Record.Claims.Seq)
	}
	return m
}

// Prune drops the records that have expired at now (now after their Expires: every certificate
// they cover has expired), durably, and returns how many. Nothing is dropped before its expiry.
func (s *Store) Prune(now time.Time) (int, error) {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	s.mu.RLock()
	if s.closed {
		s.mu.RUnlock()
		return 0, ErrClosed
	}
	var gone []*Entry
	for _, e := range s.byKey {
		if now.After(e.Record.Claims.Expires) {
			gone = append(gone, e)
		}
	}
	s.mu.RUnlock()
	if len(gone) == 0 {
		return 0, nil
	}
	if err := s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketRevocations)
		for _, e := range gone {
			if err := b.Delete([]byte(e.Record.Key())); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		return 0, fmt.Errorf("revstore: prune: %w", err)
	}
	s.mu.Lock()
	for _, e := range gone {
		s.unindex(e)
	}
	s.mu.Unlock()
	s.log.Info("revocation store: pruned expired records", "count", len(gone), "held", s.Len())
	return len(gone), nil
}

// Policy returns the held policy release as received and its policy version; nil and 0 when none.
func (s *Store) Policy() (raw []byte, version uint64) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.policy == nil {
		return nil, 0
	}
	return s.policy.Raw(), s.policy.Claims.PolicyVersion
}

// PolicyRelease returns the held, verified policy release, or nil.
func (s *Store) PolicyRelease() *record.PolicyRelease {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.policy
}

// SetPolicy verifies a policy release and, if its version is above the held one, stores it
// durably before returning changed=true; the caller then applies it. The held release again (same
// version, same digest) is changed=false without error, so a re-gossiped release is harmless; a
// lower version, or the held version with other content, is ErrStalePolicy.
func (s *Store) SetPolicy(raw []byte) (rel *record.PolicyRelease, changed bool, err error) {
	if s.isClosed() {
		return nil, false, ErrClosed
	}
	now := s.now()
	rel, err = s.v.VerifyPolicy(raw, now)
	if err != nil {
		return nil, false, err
	}
	s.wmu.Lock()
	defer s.wmu.Unlock()
	s.mu.RLock()
	closed, held := s.closed, s.policy
	s.mu.RUnlock()
	if closed {
		return nil, false, ErrClosed
	}
	if held != nil {
		hv, nv := held.Claims.PolicyVersion, rel.Claims.PolicyVersion
		switch {
		case nv == hv && rel.SHA256 == held.SHA256:
			return held, false, nil
		case nv <= hv:
			return nil, false, fmt.Errorf("%w: offered version %d, holding version %d", ErrStalePolicy, nv, hv)
		}
	}
	v, err := encMode.Marshal(stored{Raw: rel.Raw(), Arrived: now.UnixMilli()})
	if err != nil {
		return nil, false, fmt.Errorf("revstore: encode: %w", err)
	}
	if err := s.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketPolicy).Put(keyCurrent, v) }); err != nil {
		return nil, false, fmt.Errorf("revstore: store policy version %d: %w", rel.Claims.PolicyVersion, err)
	}
	s.mu.Lock()
	s.policy = rel
	s.mu.Unlock()
	return rel, true, nil
}

// Close closes the file. Lookups keep answering from memory; writes return ErrClosed.
func (s *Store) Close() error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	s.mu.Unlock()
	return s.db.Close()
}
