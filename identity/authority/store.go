package authority

import (
	"bytes"
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/fxamacker/cbor/v2"
	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"
)

// Bucket and key names of the store. The layout is documented in docs/identity.md.
var (
	bucketMeta    = []byte("meta")
	bucketTokens  = []byte("tokens")
	bucketIssued  = []byte("issued")
	bucketRevoked = []byte("revoked")
	bucketAudit   = []byte("audit")

	keyTrustDomain = []byte("trust_domain")
	keyPolicy      = []byte("policy")
	keySerial      = []byte("serial")
	keyCreated     = []byte("created")
)

// maxRecordSize caps every record decoded from the store: the file is ours, but I8 says a damaged
// file must give an error, not an allocation bomb.
const maxRecordSize = 1 << 20

var (
	storeEnc cbor.EncMode
	storeDec cbor.DecMode
)

func init() {
	var err error
	if storeEnc, err = cbor.CoreDetEncOptions().EncMode(); err != nil {
		panic(err)
	}
	storeDec, err = cbor.DecOptions{
		DupMapKey:         cbor.DupMapKeyEnforcedAPF,
		IndefLength:       cbor.IndefLengthForbidden,
		ExtraReturnErrors: cbor.ExtraDecErrorUnknownField,
	}.DecMode()
	if err != nil {
		panic(err)
	}
}

// TokenRecord is what the store keeps of a join token: never the secret, only its hash.
type TokenRecord struct {
	ID         string    `cbor:"1,keyasint" json:"id"`
	SecretHash []byte    `cbor:"2,keyasint" json:"-"`
	Zones      []string  `cbor:"3,keyasint" json:"zones"`
	Regions    []string  `cbor:"4,keyasint,omitempty" json:"regions,omitempty"`
	CreatedAt  time.Time `cbor:"5,keyasint" json:"created_at"`
	ExpiresAt  time.Time `cbor:"6,keyasint" json:"expires_at"`
	ConsumedBy string    `cbor:"7,keyasint,omitempty" json:"consumed_by,omitempty"`
	ConsumedAt time.Time `cbor:"8,keyasint,omitempty" json:"consumed_at,omitzero"`
	Serial     uint64    `cbor:"9,keyasint,omitempty" json:"serial,omitempty"`
}

// IssuedRecord is one certificate the authority signed.
type IssuedRecord struct {
	Serial    uint64    `cbor:"1,keyasint" json:"serial"`
	SPIFFEID  string    `cbor:"2,keyasint" json:"spiffe_id"`
	TokenID   string    `cbor:"3,keyasint,omitempty" json:"token_id,omitempty"`
	Renewal   uint64    `cbor:"4,keyasint,omitempty" json:"renews_serial,omitempty"`
	IssuedAt  time.Time `cbor:"5,keyasint" json:"issued_at"`
	NotAfter  time.Time `cbor:"6,keyasint" json:"not_after"`
	KeyHash   string    `cbor:"7,keyasint" json:"key_hash"`
	CertDER   []byte    `cbor:"8,keyasint" json:"-"`
	RemoteAdr string    `cbor:"9,keyasint,omitempty" json:"remote_addr,omitempty"`
	// IssuerKeyHash and IssuerCertDER are the node's issuing key and the issuing certificate
	// signed with this certificate at a join (ConsumeAndIssue): a join retried after a lost
	// answer is matched on both keys and gets both certificates back byte for byte. Empty for
	// renewals and for joins recorded before join retries existed.
	IssuerKeyHash string `cbor:"10,keyasint,omitempty" json:"issuer_key_hash,omitempty"`
	IssuerCertDER []byte `cbor:"11,keyasint,omitempty" json:"-"`
}

// Outcome of an audited event.
type Outcome string

// Audit outcomes.
const (
	OutcomeIssued  Outcome = "issued"
	OutcomeRefused Outcome = "refused"
	OutcomeCreated Outcome = "created"
	// OutcomeResent: a renewal or a join retried after a lost response got the certificate
	// already issued.
	OutcomeResent Outcome = "resent"
	// OutcomeRevoked: a serial was added to the revoked set (or already was: see the reason).
	OutcomeRevoked Outcome = "revoked"
	// OutcomeSuppressed: a summary of unauthenticated refusals that were counted instead of
	// being audited one by one (Count, First, Last, Reasons say how many, when and why).
	OutcomeSuppressed Outcome = "suppressed"
)

// EventSuppressed is the event of a suppressed-refusals summary; Remote is the source (an IPv4
// address, an IPv6 /64, or "*" for refusals folded once the global budget was spent).
const EventSuppressed = "refusals"

// AuditRecord is one event of the authority's audit trail.
type AuditRecord struct {
	Seq      uint64    `cbor:"1,keyasint" json:"seq"`
	Time     time.Time `cbor:"2,keyasint" json:"time"`
	Event    string    `cbor:"3,keyasint" json:"event"`
	Remote   string    `cbor:"4,keyasint,omitempty" json:"remote,omitempty"`
	TokenID  string    `cbor:"5,keyasint,omitempty" json:"token_id,omitempty"`
	Subject  string    `cbor:"6,keyasint,omitempty" json:"subject,omitempty"`
	Serial   uint64    `cbor:"7,keyasint,omitempty" json:"serial,omitempty"`
	Outcome  Outcome   `cbor:"8,keyasint" json:"outcome"`
	Reason   string    `cbor:"9,keyasint,omitempty" json:"reason,omitempty"`
	WireCode Code      `cbor:"10,keyasint,omitempty" json:"code,omitempty"`
	// Count, First, Last and Reasons are set on summaries only (OutcomeSuppressed): how many
	// refusals were folded, the first and last of them, and how many per event/code name.
	Count   uint64            `cbor:"11,keyasint,omitempty" json:"count,omitempty"`
	First   time.Time         `cbor:"12,keyasint,omitempty" json:"first,omitzero"`
	Last    time.Time         `cbor:"13,keyasint,omitempty" json:"last,omitzero"`
	Reasons map[string]uint64 `cbor:"14,keyasint,omitempty" json:"reasons,omitempty"`
}

// Meta is the authority's identity-independent configuration held in the store.
type Meta struct {
	TrustDomain string
	Policy      []byte
	LastSerial  uint64
	Created     time.Time
}

// Store is the authority's durable state in one bbolt file. bbolt holds an exclusive lock on the
// file, so one process at a time opens it: the running daemon, or an offline CLI command.
type Store struct {
	db *bolt.DB
}

// ErrStoreLocked means another process (normally `ute authority run`) holds the store open.
var ErrStoreLocked = errors.New("authority store is locked by another process")

// OpenStore opens (creating if needed) the store at path, waiting at most timeout for the file
// lock. A timeout of zero waits forever, as bbolt does.
func OpenStore(path string, timeout time.Duration) (*Store, error) {
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: timeout})
	if err != nil {
		if errors.Is(err, bolterrors.ErrTimeout) {
			return nil, fmt.Errorf("%w: %s (stop the daemon or use its admin socket)", ErrStoreLocked, path)
		}
		return nil, fmt.Errorf("open authority store %s: %w", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketMeta, bucketTokens, bucketIssued, bucketRevoked, bucketAudit, bucketSlices4, bucketSlices6, bucketNodeSlices, bucketRenewed, bucketRenewedFrom, bucketNodeNames, bucketMembers, bucketRevRecords, bucketRevSubjects} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("prepare authority store %s: %w", path, err)
	}
	return &Store{db: db}, nil
}

// Close releases the file lock.
func (s *Store) Close() error { return s.db.Close() }

// Init records the trust domain and policy of a new authority; it refuses a store that already has
// them.
func (s *Store) Init(trustDomain string, policy []byte, now time.Time) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		m := tx.Bucket(bucketMeta)
		if m.Get(keyTrustDomain) != nil {
			return ErrAlreadyInitialized
		}
		created, err := now.UTC().MarshalBinary()
		if err != nil {
			return err
		}
		if err := m.Put(keyTrustDomain, []byte(trustDomain)); err != nil {
			return err
		}
		if err := m.Put(keyPolicy, policy); err != nil {
			return err
		}
		if err := m.Put(keyCreated, created); err != nil {
			return err
		}
		return m.Put(keySerial, u64(0))
	})
}

// Meta returns the stored trust domain, policy and serial counter.
func (s *Store) Meta() (Meta, error) {
	var meta Meta
	err := s.db.View(func(tx *bolt.Tx) error {
		m := tx.Bucket(bucketMeta)
		td := m.Get(keyTrustDomain)
		if td == nil {
			return ErrNotInitialized
		}
		meta.TrustDomain = string(td)
		meta.Policy = bytes.Clone(m.Get(keyPolicy))
		serial, err := getU64(m.Get(keySerial))
		if err != nil {
			return fmt.Errorf("serial counter: %w", err)
		}
		meta.LastSerial = serial
		if c := m.Get(keyCreated); c != nil {
			if err := meta.Created.UnmarshalBinary(c); err != nil {
				return fmt.Errorf("creation time: %w", err)
			}
		}
		return nil
	})
	return meta, err
}

// SetPolicy replaces the stored policy bytes (validated by the caller).
func (s *Store) SetPolicy(policy []byte) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		m := tx.Bucket(bucketMeta)
		if m.Get(keyTrustDomain) == nil {
			return ErrNotInitialized
		}
		return m.Put(keyPolicy, policy)
	})
}

// PutToken stores a new token record; an existing id is refused (ids are random, a collision
// means a bug or an attack, never something to overwrite).
func (s *Store) PutToken(rec TokenRecord) error {
	val, err := storeEnc.Marshal(rec)
	if err != nil {
		return fmt.Errorf("encode token record: %w", err)
	}
	return s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketTokens)
		if b.Get([]byte(rec.ID)) != nil {
			return fmt.Errorf("%w: %s", ErrDuplicateToken, rec.ID)
		}
		return b.Put([]byte(rec.ID), val)
	})
}

// Token returns the stored record of a token id.
func (s *Store) Token(id string) (TokenRecord, error) {
	var rec TokenRecord
	err := s.db.View(func(tx *bolt.Tx) error {
		v := tx.Bucket(bucketTokens).Get([]byte(id))
		if v == nil {
			return fmt.Errorf("%w: no token with id %q", ErrTokenUnknown, id)
		}
		return decodeRecord(v, &rec)
	})
	return rec, err
}

// Tokens lists all token records, oldest id order (ids are random, so effectively unordered).
func (s *Store) Tokens() ([]TokenRecord, error) {
	var out []TokenRecord
	err := s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketTokens).ForEach(func(_, v []byte) error {
			var rec TokenRecord
			if err := decodeRecord(v, &rec); err != nil {
				return err
			}
			out = append(out, rec)
			return nil
		})
	})
	return out, err
}

// ConsumeRequest is one attempt to spend a token.
type ConsumeRequest struct {
	ID         string
	SecretHash []byte
	Consumer   string // the name the joining node asked for
	Now        time.Time
	// Check validates the token's zones and regions against the request and the policy and names
	// the zone CIDRs the node gets a slice of; a non-nil error refuses the join without consuming
	// the token.
	Check func(TokenRecord) ([]SliceRequest, error)
	// HoldUntil, called after Check, is when the certificate about to be signed expires. When set,
	// the join is refused with ErrNameTaken if Consumer names a node whose newest certificate is
	// still live (unexpired and not revoked), and otherwise Consumer is held until that time.
	HoldUntil func() time.Time
	// KeyHash and IssuerKeyHash are identity.KeyHash of the keys the certificates about to be
	// signed are for (ConsumeAndIssue only; the CSRs' signatures proved possession of both). A
	// request with the right secret for a token already consumed by a join whose certificates
	// were issued for these same keys is a retry after a lost answer (see ConsumeAndIssue).
	KeyHash       string
	IssuerKeyHash string
	// Advertise is the underlay address the joining node advertises (ConsumeAndIssue only).
	Advertise string
}

// Consumed is the outcome of a successful Consume.
type Consumed struct {
	Token  TokenRecord
	Serial uint64
	// Slices are the node's new slices, one per SliceRequest, in request order.
	Slices []SliceRecord
}

// tokenWithSecret returns the record of token id if secretHash is its secret's hash, and
// ErrTokenUnknown otherwise: unknown id and wrong secret are indistinguishable.
func tokenWithSecret(tx *bolt.Tx, id string, secretHash []byte) (TokenRecord, error) {
	var rec TokenRecord
	v := tx.Bucket(bucketTokens).Get([]byte(id))
	if v == nil {
		return rec, fmt.Errorf("%w: check the token was created by this authority", ErrTokenUnknown)
	}
	if err := decodeRecord(v, &rec); err != nil {
		return rec, err
	}
	if len(rec.SecretHash) == 0 || subtle.ConstantTimeCompare(rec.SecretHash, secretHash) != 1 {
		return rec, fmt.Errorf("%w: check the token was created by this authority", ErrTokenUnknown)
	}
	return rec, nil
}

// consume checks and consumes a token and allocates the serial of the certificate about to be
// signed and the node's slices, inside tx (ConsumeAndIssue's transaction): a refusal (ErrZoneFull
// included) rolls all of it back and leaves the token unused. Of any number of concurrent joins
// with the same token, exactly one consumes it; the others get ErrTokenUsed (or, for the same
// keys, the retry answer). The order of checks is fixed so that a caller without the right secret
// learns nothing beyond ErrTokenUnknown.
func consume(tx *bolt.Tx, req ConsumeRequest) (Consumed, error) {
	rec, err := tokenWithSecret(tx, req.ID, req.SecretHash)
	if err != nil {
		return Consumed{}, err
	}
	if rec.ConsumedBy != "" {
		return Consumed{}, fmt.Errorf("%w: token %s was consumed at %s; create a new token", ErrTokenUsed, rec.ID, rec.ConsumedAt.UTC().Format(time.RFC3339))
	}
	if !req.Now.Before(rec.ExpiresAt) {
		return Consumed{}, fmt.Errorf("%w: token %s expired at %s; create a new token", ErrTokenExpired, rec.ID, rec.ExpiresAt.UTC().Format(time.RFC3339))
	}
	var want []SliceRequest
	if req.Check != nil {
		if want, err = req.Check(rec); err != nil {
			return Consumed{}, err
		}
	}
	serial, err := nextSerial(tx)
	if err != nil {
		return Consumed{}, err
	}
	if req.HoldUntil != nil {
		if err := holdName(tx, req.Consumer, serial, req.HoldUntil(), req.Now); err != nil {
			return Consumed{}, err
		}
	}
	consumer := req.Consumer
	if consumer == "" {
		consumer = "?"
	}
	var sl []SliceRecord
	for _, w := range want {
		r, err := allocateSlice(tx, w, consumer, serial, req.Now)
		if err != nil {
			return Consumed{}, err
		}
		sl = append(sl, r)
	}
	rec.ConsumedBy = consumer
	rec.ConsumedAt = req.Now.UTC()
	rec.Serial = serial
	val, err := storeEnc.Marshal(rec)
	if err != nil {
		return Consumed{}, fmt.Errorf("encode token record: %w", err)
	}
	if err := tx.Bucket(bucketTokens).Put([]byte(rec.ID), val); err != nil {
		return Consumed{}, err
	}
	return Consumed{Token: rec, Serial: serial, Slices: sl}, nil
}

// JoinIssued is the outcome of ConsumeAndIssue.
type JoinIssued struct {
	Consumed
	// Issued is the stored record of the join's certificate.
	Issued IssuedRecord
	// Retry is true when the request repeated a join whose certificates were already issued for
	// the same keys: Issued is that record, Slices is nil, and nothing was allocated or written.
	Retry bool
}

// ConsumeAndIssue is Consume with the signature inside the same transaction: sign receives the
// allocated serial and slices and returns the issued record (with the issuing certificate), which
// is stored, with the node's member record, before the transaction commits. So a consumed token
// always has its certificate stored, and a join retried after a lost answer (the right secret,
// same req.KeyHash and req.IssuerKeyHash, same node name) gets that record back instead of
// ErrTokenUsed. A retry is answered only while the certificate is live: unexpired, its lineage
// not revoked, and not renewed (a node that renewed has its certificate). Anything else is
// refused exactly as Consume refuses it.
func (s *Store) ConsumeAndIssue(req ConsumeRequest, sign func(serial uint64, slices []SliceRecord) (IssuedRecord, error)) (JoinIssued, error) {
	var out JoinIssued
	err := s.db.Update(func(tx *bolt.Tx) error {
		out = JoinIssued{}
		if req.KeyHash != "" && req.IssuerKeyHash != "" {
			tok, prev, ok, err := joinRetryOf(tx, req)
			if err != nil {
				return err
			}
			if ok {
				out = JoinIssued{Consumed: Consumed{Token: tok, Serial: prev.Serial}, Issued: prev, Retry: true}
				return nil
			}
		}
		c, err := consume(tx, req)
		if err != nil {
			return err
		}
		rec, err := sign(c.Serial, c.Slices)
		if err != nil {
			return err
		}
		if rec.Serial != c.Serial {
			return fmt.Errorf("signed record has serial %d, want %d", rec.Serial, c.Serial)
		}
		if err := putIssued(tx, rec); err != nil {
			return err
		}
		var zones []string
		for _, sl := range c.Slices {
			if !slices.Contains(zones, sl.Zone) {
				zones = append(zones, sl.Zone)
			}
		}
		if err := putMember(tx, req.Consumer, rec, zones, req.Advertise, 0, req.Now); err != nil {
			return err
		}
		out = JoinIssued{Consumed: c, Issued: rec}
		return nil
	})
	if err != nil {
		return JoinIssued{}, err
	}
	return out, nil
}

// joinRetryOf reports whether req repeats a join that was already answered: the right secret for
// a token consumed by req.Consumer, whose certificate was issued for req.KeyHash with an issuing
// certificate for req.IssuerKeyHash, and is still live. Anything else is not a retry and is left
// to consume, which refuses it as before (ErrTokenUnknown, ErrTokenUsed): a thief holding the
// token but not the node's staged key has its own key, never the node's.
func joinRetryOf(tx *bolt.Tx, req ConsumeRequest) (TokenRecord, IssuedRecord, bool, error) {
	tok, err := tokenWithSecret(tx, req.ID, req.SecretHash)
	if err != nil || tok.ConsumedBy == "" || tok.ConsumedBy != req.Consumer || tok.Serial == 0 {
		return TokenRecord{}, IssuedRecord{}, false, nil
	}
	v := tx.Bucket(bucketIssued).Get(u64(tok.Serial))
	if v == nil {
		return TokenRecord{}, IssuedRecord{}, false, nil
	}
	var rec IssuedRecord
	if err := decodeRecord(v, &rec); err != nil {
		return TokenRecord{}, IssuedRecord{}, false, err
	}
	if rec.TokenID != tok.ID || rec.Renewal != 0 || len(rec.CertDER) == 0 || len(rec.IssuerCertDER) == 0 ||
		subtle.ConstantTimeCompare([]byte(rec.KeyHash), []byte(req.KeyHash)) != 1 ||
		subtle.ConstantTimeCompare([]byte(rec.IssuerKeyHash), []byte(req.IssuerKeyHash)) != 1 {
		return TokenRecord{}, IssuedRecord{}, false, nil
	}
	if !req.Now.Before(rec.NotAfter) || lineageRevoked(tx, rec.Serial) != 0 || tx.Bucket(bucketRenewed).Get(u64(rec.Serial)) != nil {
		return TokenRecord{}, IssuedRecord{}, false, nil
	}
	return tok, rec, true, nil
}

// bucketNodeNames maps a node name to the serial of its newest certificate and that
// certificate's expiry (u64 serial ‖ i64 Unix seconds, big-endian): the name is held while that
// certificate, or a renewal of it, lives.
var bucketNodeNames = []byte("node_names")

// holdName refuses name when it is held by a live certificate at now (ErrNameTaken) or when the
// lineage of its last holder was revoked and no operator released it since (ErrNameRevoked), and
// otherwise records it as held by serial until until.
func holdName(tx *bolt.Tx, name string, serial uint64, until, now time.Time) error {
	if name == "" {
		return nil
	}
	b := tx.Bucket(bucketNodeNames)
	if v := b.Get([]byte(name)); v != nil {
		held, heldUntil, err := nameLease(v)
		if err != nil {
			return fmt.Errorf("node name %q: %w", name, err)
		}
		// A revoked lineage closes the name for good, expired or not: the operator revoked the
		// identity, so only the operator reopens it (ReleaseName), and that act is audited.
		if lineageRevoked(tx, held) != 0 {
			r := oldestRevoked(tx, held)
			return fmt.Errorf("%w: node %q (serial %d) descends from revoked serial %d; to register the name again an operator runs `ute authority release --dir <authority dir> %s --reason TEXT` (audited), or join under another --name",
				ErrNameRevoked, name, held, r, name)
		}
		if now.Before(heldUntil) {
			return fmt.Errorf("%w: node %q has certificate serial %d valid until %s; choose another --name, or wait until it expires (revoking serial %d and releasing the name with `ute authority release` also frees it)",
				ErrNameTaken, name, held, heldUntil.UTC().Format(time.RFC3339), held)
		}
	}
	return b.Put([]byte(name), nameLeaseValue(serial, until))
}

func nameLeaseValue(serial uint64, until time.Time) []byte {
	return binary.BigEndian.AppendUint64(u64(serial), uint64(until.Unix()))
}

func nameLease(v []byte) (uint64, time.Time, error) {
	if len(v) != 16 {
		return 0, time.Time{}, fmt.Errorf("name record of %d bytes; the store is damaged", len(v))
	}
	return binary.BigEndian.Uint64(v[:8]), time.Unix(int64(binary.BigEndian.Uint64(v[8:])), 0), nil
}

// AllocateSerial reserves the next serial (for renewals, which spend no token).
func (s *Store) AllocateSerial() (uint64, error) {
	var serial uint64
	err := s.db.Update(func(tx *bolt.Tx) error {
		var err error
		serial, err = nextSerial(tx)
		return err
	})
	return serial, err
}

func nextSerial(tx *bolt.Tx) (uint64, error) {
	m := tx.Bucket(bucketMeta)
	last, err := getU64(m.Get(keySerial))
	if err != nil {
		return 0, fmt.Errorf("serial counter: %w", err)
	}
	if last == ^uint64(0) {
		return 0, errors.New("serial counter exhausted")
	}
	next := last + 1
	return next, m.Put(keySerial, u64(next))
}

// PutIssued records a signed certificate.
func (s *Store) PutIssued(rec IssuedRecord) error {
	return s.db.Update(func(tx *bolt.Tx) error { return putIssued(tx, rec) })
}

func putIssued(tx *bolt.Tx, rec IssuedRecord) error {
	val, err := storeEnc.Marshal(rec)
	if err != nil {
		return fmt.Errorf("encode issued record: %w", err)
	}
	b := tx.Bucket(bucketIssued)
	if b.Get(u64(rec.Serial)) != nil {
		return fmt.Errorf("serial %d already issued", rec.Serial)
	}
	return b.Put(u64(rec.Serial), val)
}

// Issued lists every issued certificate in serial order.
func (s *Store) Issued() ([]IssuedRecord, error) {
	var out []IssuedRecord
	err := s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketIssued).ForEach(func(_, v []byte) error {
			var rec IssuedRecord
			if err := decodeRecord(v, &rec); err != nil {
				return err
			}
			out = append(out, rec)
			return nil
		})
	})
	return out, err
}

// Revoke adds a serial to the revoked set. Revoking twice is not an error (I5: idempotent).
func (s *Store) Revoke(serial uint64, reason string, now time.Time) error {
	val, err := storeEnc.Marshal(revocationValue{Time: now.UTC(), Reason: reason})
	if err != nil {
		return err
	}
	return s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketRevoked)
		if b.Get(u64(serial)) != nil {
			return nil
		}
		return b.Put(u64(serial), val)
	})
}

// IsRevoked reports whether a serial is in the revoked set.
func (s *Store) IsRevoked(serial uint64) (bool, error) {
	var revoked bool
	err := s.db.View(func(tx *bolt.Tx) error {
		revoked = tx.Bucket(bucketRevoked).Get(u64(serial)) != nil
		return nil
	})
	return revoked, err
}

// AppendAudit appends events to the audit trail in one transaction (one fsync), assigning their
// sequence numbers in order.
func (s *Store) AppendAudit(recs ...AuditRecord) error {
	if len(recs) == 0 {
		return nil
	}
	return s.db.Update(func(tx *bolt.Tx) error {
		for _, rec := range recs {
			if err := appendAudit(tx, rec); err != nil {
				return err
			}
		}
		return nil
	})
}

func appendAudit(tx *bolt.Tx, rec AuditRecord) error {
	b := tx.Bucket(bucketAudit)
	seq, err := b.NextSequence()
	if err != nil {
		return err
	}
	rec.Seq = seq
	rec.Time = rec.Time.UTC()
	val, err := storeEnc.Marshal(rec)
	if err != nil {
		return fmt.Errorf("encode audit record: %w", err)
	}
	return b.Put(u64(seq), val)
}

// Audit returns the audit trail in order.
func (s *Store) Audit() ([]AuditRecord, error) {
	var out []AuditRecord
	err := s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketAudit).ForEach(func(_, v []byte) error {
			var rec AuditRecord
			if err := decodeRecord(v, &rec); err != nil {
				return err
			}
			out = append(out, rec)
			return nil
		})
	})
	return out, err
}

func decodeRecord(v []byte, into any) error {
	if len(v) > maxRecordSize {
		return fmt.Errorf("store record of %d bytes exceeds the %d-byte cap", len(v), maxRecordSize)
	}
	if err := storeDec.Unmarshal(v, into); err != nil {
		return fmt.Errorf("decode store record: %w", err)
	}
	return nil
}

func u64(v uint64) []byte { return binary.BigEndian.AppendUint64(nil, v) }

func getU64(b []byte) (uint64, error) {
	if len(b) != 8 {
		return 0, fmt.Errorf("want 8 bytes, have %d", len(b))
	}
	return binary.BigEndian.Uint64(b), nil
}
