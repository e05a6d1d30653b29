package authority

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	bolt "go.etcd.io/bbolt"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/identity/record"
)

// Refusals of `ute revoke` at the authority. They are admin-side only (never on the QUIC wire).
var (
	// ErrRevocationMalformed means the subject or the reason could not be parsed: a usage error.
	ErrRevocationMalformed = errors.New("revocation request malformed")
	// ErrSubjectUnknown means the subject names nothing this authority ever issued.
	ErrSubjectUnknown = errors.New("revocation subject unknown")
	// ErrAgentRevocation was returned for agent subjects before the authority signed revocation
	// records; an agent SPIFFE ID is now revoked by a record (see RevokeSubject). Kept so that
	// callers comparing against it still compile; nothing returns it any more.
	ErrAgentRevocation = errors.New("agent certificates are revoked by their node, not the authority")
)

// MaxRevokeReason caps the reason stored with a revocation and shown in the audit trail.
const MaxRevokeReason = 256

// subjectSerialPrefix introduces a subject given by certificate serial.
const subjectSerialPrefix = "serial:"

// Subject is what a revocation names: one certificate serial, a node SPIFFE ID (every live
// certificate issued to it), or an agent SPIFFE ID (every certificate any node of its zone issues
// under that name, through the signed record alone: the authority issues no agent certificate).
type Subject struct {
	// Serial is set for "serial:N".
	Serial uint64
	// Node is set (Kind == identity.KindNode) for "spiffe://<td>/node/<name>".
	Node identity.ID
	// Agent is set (Kind == identity.KindAgent) for "spiffe://<td>/zone/<zone>/agent/<name>".
	Agent identity.ID
}

// String is the subject in the form ParseSubject reads.
func (s Subject) String() string {
	switch {
	case s.Serial != 0:
		return subjectSerialPrefix + strconv.FormatUint(s.Serial, 10)
	case s.Agent.Kind == identity.KindAgent:
		return s.Agent.String()
	}
	return s.Node.String()
}

// trustDomain is the subject's trust domain; empty for a serial.
func (s Subject) trustDomain() string {
	switch {
	case s.Serial != 0:
		return ""
	case s.Agent.Kind == identity.KindAgent:
		return s.Agent.TrustDomain
	}
	return s.Node.TrustDomain
}

// ParseSubject parses a revocation subject: "serial:N" (N a decimal serial, 1 or more), a node
// SPIFFE ID or an agent SPIFFE ID; anything else is ErrRevocationMalformed.
func ParseSubject(s string) (Subject, error) {
	if num, ok := strings.CutPrefix(s, subjectSerialPrefix); ok {
		// ParseUint alone accepts "+1" and leading zeros; a serial has one spelling.
		n, err := strconv.ParseUint(num, 10, 64)
		if err != nil || n == 0 || num != strconv.FormatUint(n, 10) {
			return Subject{}, fmt.Errorf("%w: %q: the serial must be a decimal number from 1 to %d, e.g. serial:7", ErrRevocationMalformed, s, uint64(1<<64-1))
		}
		return Subject{Serial: n}, nil
	}
	id, err := identity.ParseID(s)
	if err != nil {
		return Subject{}, fmt.Errorf("%w: %w; give spiffe://<trust-domain>/node/<name>, spiffe://<trust-domain>/zone/<zone>/agent/<name> or serial:<N>", ErrRevocationMalformed, err)
	}
	switch id.Kind {
	case identity.KindNode:
		return Subject{Node: id}, nil
	case identity.KindAgent:
		return Subject{Agent: id}, nil
	default:
		return Subject{}, fmt.Errorf("%w: %s is the authority itself, which cannot be revoked; give spiffe://%s/node/<name>, spiffe://%s/zone/<zone>/agent/<name> or serial:<N>",
			ErrRevocationMalformed, id, id.TrustDomain, id.TrustDomain)
	}
}

// ValidateRevokeReason checks the operator's reason: required, one line of printable text, at most
// MaxRevokeReason bytes, because it is stored and printed in one-line audit output.
func ValidateRevokeReason(reason string) error {
	switch {
	case strings.TrimSpace(reason) == "":
		return fmt.Errorf("%w: the reason is empty; say why with --reason, e.g. --reason \"key leaked\"", ErrRevocationMalformed)
	case len(reason) > MaxRevokeReason:
		return fmt.Errorf("%w: the reason is %d bytes; keep it under %d", ErrRevocationMalformed, len(reason), MaxRevokeReason)
	case !utf8.ValidString(reason):
		return fmt.Errorf("%w: the reason is not UTF-8 text", ErrRevocationMalformed)
	}
	for _, r := range reason {
		if !unicode.IsPrint(r) && r != ' ' {
			return fmt.Errorf("%w: the reason contains the control character %q; give one line of text", ErrRevocationMalformed, r)
		}
	}
	return nil
}

// RevokeRequest is the admin API's revocation request.
type RevokeRequest struct {
	Subject string `json:"subject"`
	Reason  string `json:"reason"`
}

// RevokedSerial is what one revocation did to one serial.
type RevokedSerial struct {
	Serial   uint64    `json:"serial"`
	SPIFFEID string    `json:"spiffe_id,omitempty"`
	NotAfter time.Time `json:"not_after,omitzero"`
	// Already is true when the serial was revoked before this request; RevokedAt and Reason are
	// then those of the first revocation, which stays in force unchanged.
	Already   bool      `json:"already_revoked"`
	RevokedAt time.Time `json:"revoked_at"`
	Reason    string    `json:"reason"`
	// Via is set when the serial was revoked because it descends by renewal from the revoked
	// serial Via: revocation follows the lineage (lineage.go).
	Via uint64 `json:"via_serial,omitempty"`
}

// Revocation is the outcome of a revocation: the serials it covers, in serial order, and the
// signed revocation record that carries it to the nodes. For a node the serials are every
// certificate issued to the node that has not expired; none (and no record) means nothing was
// live. An agent subject has no serials (the authority issued none of its certificates), only the
// record.
type Revocation struct {
	Subject string          `json:"subject"`
	Reason  string          `json:"reason"`
	Serials []RevokedSerial `json:"serials"`
	// Seq is the sequence number of the authority-signed revocation record covering the subject
	// (the one this call wrote, or, when Already, the one written before); 0 when there is none.
	Seq uint64 `json:"seq,omitempty"`
	// Expires is when every certificate the record covers has expired (nodes drop it then).
	Expires time.Time `json:"expires,omitzero"`
	// Already is true when this call changed nothing: the subject's serials (and its record, if it
	// has one) were revoked before.
	Already bool `json:"already_revoked"`
	// Record is the signed record (COSE_Sign1, identity/record) when this call wrote one.
	Record []byte `json:"record,omitempty"`
}

// revocationValue is the value of the revoked bucket.
type revocationValue struct {
	Time   time.Time `cbor:"1,keyasint"`
	Reason string    `cbor:"2,keyasint"`
}

// RevokeSubject revokes what subject names and returns what it did. It is durable before it
// returns (one bbolt transaction, with its audit records), and idempotent: a serial revoked before
// keeps its first revocation and is reported Already. Revoking a node revokes every unexpired
// certificate issued to its SPIFFE ID (superseded ones included, which may still be presented to
// peers until they expire), which also stops any renewal from them and frees the node's name.
//
// Every revocation that revokes something new also writes one revocation record, signed by the
// authority with the next sequence number, in the same transaction; watchers (watch.go) receive
// it once the transaction has committed. The record expires when every certificate it covers has:
// a node's or serial's latest NotAfter; for an agent (whose certificates nodes issue, each within
// its node certificate's lifetime) the latest NotAfter of any live node certificate of its zone,
// and never earlier than now plus the node certificate lifetime, which bounds every node
// certificate issued so far. Revoking an agent twice keeps the first record.
func (a *Authority) RevokeSubject(_ context.Context, subject, reason string) (Revocation, error) {
	sub, err := ParseSubject(subject)
	if err == nil {
		err = ValidateRevokeReason(reason)
	}
	if td := sub.trustDomain(); err == nil && sub.Serial == 0 && td != a.trustDomain {
		err = fmt.Errorf("%w: %s is in trust domain %s; this authority is %s", ErrSubjectUnknown, sub, td, a.trustDomain)
	}
	now := a.opts.Now()
	var res revokeResult
	if err == nil {
		res, err = a.store.revokeSubject(sub, reason, now, a.notAfter(now, a.opts.NodeLifetime), a.recordSigner(reason, now))
	}
	if err != nil {
		a.audit(AuditRecord{Event: "revoke", Subject: auditSubject(subject), Outcome: OutcomeRefused, Reason: err.Error()})
		a.log.Warn("revocation refused", "subject", auditSubject(subject), "err", err)
		return Revocation{}, err
	}
	if res.raw != nil {
		a.watch.notify()
	}
	for _, r := range res.serials {
		a.log.Info("revoked", "subject", sub.String(), "serial", r.Serial, "spiffe_id", r.SPIFFEID, "already", r.Already, "reason", reason)
	}
	a.log.Info("revocation record", "subject", sub.String(), "seq", res.seq, "expires", res.expires, "new", res.raw != nil)
	out := res.serials
	if out == nil {
		out = []RevokedSerial{}
	}
	return Revocation{Subject: sub.String(), Reason: reason, Serials: out, Seq: res.seq, Expires: res.expires, Already: res.already, Record: res.raw}, nil
}

// recordSigner signs the authority's revocation record of subject with sequence number seq.
func (a *Authority) recordSigner(reason string, now time.Time) func(seq uint64, subject string, expires time.Time) ([]byte, error) {
	return func(seq uint64, subject string, expires time.Time) ([]byte, error) {
		// A record can outlive nothing the authority signed, and must expire after it is issued.
		if ca := a.cert.X509.NotAfter; expires.After(ca) {
			expires = ca
		}
		if floor := now.Truncate(time.Millisecond).Add(time.Millisecond); expires.Before(floor) {
			expires = floor
		}
		raw, err := record.SignRevocation(record.RevocationClaims{
			TrustDomain: a.trustDomain, Subject: subject, Reason: reason, IssuedAt: now, Expires: expires,
			Signer: identity.AuthorityID(a.trustDomain).String(), Seq: seq,
		}, a.key)
		if err != nil {
			return nil, fmt.Errorf("sign revocation record %d for %s: %w", seq, subject, err)
		}
		return raw, nil
	}
}

// auditSubject keeps a refused subject printable and bounded in the audit trail.
func auditSubject(s string) string {
	if len(s) > 128 {
		s = s[:128] + "..."
	}
	q := strconv.QuoteToGraphic(s)
	return q[1 : len(q)-1]
}

// RevokeSubject resolves sub to serials and revokes them, with one audit record per serial, in
// one durable transaction. A serial subject must have been allocated by this authority; a node
// subject must have had a certificate issued to it (or its name held), else ErrSubjectUnknown.
// It writes no revocation record (Authority.RevokeSubject does); an agent subject revokes nothing
// here.
func (s *Store) RevokeSubject(sub Subject, reason string, now time.Time) ([]RevokedSerial, error) {
	res, err := s.revokeSubject(sub, reason, now, time.Time{}, nil)
	return res.serials, err
}

// revokeResult is what revokeSubject did.
type revokeResult struct {
	serials []RevokedSerial
	seq     uint64    // the subject's record: new (raw set) or earlier; 0 if none
	expires time.Time // the new record's expiry
	raw     []byte    // the record written now, nil if none
	already bool
}

// revokeSubject is RevokeSubject that also, when sign is set and the call revokes something new
// (or an agent subject not revoked before), assigns the next revocation sequence number, has sign
// produce the record for it and stores the record, all in the same transaction. bound is the
// expiry used when no certificate gives one: an agent's (raised to the latest NotAfter of its
// zone's live members) or a serial allocated but never recorded as issued.
func (s *Store) revokeSubject(sub Subject, reason string, now, bound time.Time, sign func(seq uint64, subject string, expires time.Time) ([]byte, error)) (revokeResult, error) {
	val, err := storeEnc.Marshal(revocationValue{Time: now.UTC(), Reason: reason})
	if err != nil {
		return revokeResult{}, fmt.Errorf("encode revocation: %w", err)
	}
	var res revokeResult
	err = s.db.Update(func(tx *bolt.Tx) error {
		res = revokeResult{}
		var targets []RevokedSerial
		if sub.Agent.Kind != identity.KindAgent {
			if targets, err = resolveSubject(tx, sub, now); err != nil {
				return err
			}
		}
		subjects := tx.Bucket(bucketRevSubjects)
		if v := subjects.Get([]byte(sub.String())); v != nil {
			if res.seq, err = getU64(v); err != nil {
				return fmt.Errorf("revocation record of %s: %w; the store is damaged", sub, err)
			}
		}
		fresh, expires := false, time.Time{}
		for _, t := range targets {
			if tx.Bucket(bucketRevoked).Get(u64(t.Serial)) == nil {
				fresh = true
			}
			if t.NotAfter.IsZero() {
				expires = later(expires, bound)
			}
			expires = later(expires, t.NotAfter)
		}
		if sub.Agent.Kind == identity.KindAgent {
			fresh = res.seq == 0
			if expires, err = zoneExpiry(tx, sub.Agent.Zone, bound); err != nil {
				return err
			}
		}
		var recordNote string
		if sign != nil && fresh {
			if res.seq, err = nextRevocationSeq(tx); err != nil {
				return err
			}
			if res.raw, err = sign(res.seq, sub.String(), expires); err != nil {
				return err
			}
			if err := tx.Bucket(bucketRevRecords).Put(u64(res.seq), res.raw); err != nil {
				return err
			}
			if err := subjects.Put([]byte(sub.String()), u64(res.seq)); err != nil {
				return err
			}
			res.expires = expires.UTC()
			recordNote = fmt.Sprintf(" (revocation record %d, expires %s)", res.seq, expires.UTC().Format(time.RFC3339))
		}
		// Peers check a certificate's own serial, so each live descendant revoked through the
		// lineage gets a record of its own.
		descNotes := map[uint64]string{}
		for _, t := range targets {
			if sign == nil || t.Via == 0 || tx.Bucket(bucketRevoked).Get(u64(t.Serial)) != nil {
				continue
			}
			dsub := Subject{Serial: t.Serial}.String()
			if subjects.Get([]byte(dsub)) != nil {
				continue
			}
			seq, err := nextRevocationSeq(tx)
			if err != nil {
				return err
			}
			raw, err := sign(seq, dsub, t.NotAfter)
			if err != nil {
				return err
			}
			if err := tx.Bucket(bucketRevRecords).Put(u64(seq), raw); err != nil {
				return err
			}
			if err := subjects.Put([]byte(dsub), u64(seq)); err != nil {
				return err
			}
			descNotes[t.Serial] = fmt.Sprintf(" (revocation record %d, expires %s)", seq, t.NotAfter.UTC().Format(time.RFC3339))
		}
		res.already = !fresh && (len(targets) > 0 || res.seq != 0)
		revoked := tx.Bucket(bucketRevoked)
		for _, t := range targets {
			if v := revoked.Get(u64(t.Serial)); v != nil {
				var prev revocationValue
				if err := decodeRecord(v, &prev); err != nil {
					return fmt.Errorf("revocation of serial %d: %w", t.Serial, err)
				}
				t.Already, t.RevokedAt, t.Reason = true, prev.Time, prev.Reason
			} else {
				if err := revoked.Put(u64(t.Serial), val); err != nil {
					return err
				}
				t.RevokedAt, t.Reason = now.UTC(), reason
			}
			why := reason + recordNote
			if t.Via != 0 {
				why = fmt.Sprintf("descends by renewal from revoked serial %d: %s%s", t.Via, reason, descNotes[t.Serial])
			}
			if t.Already {
				why = fmt.Sprintf("already revoked at %s (%s); requested again: %s", t.RevokedAt.Format(time.RFC3339), t.Reason, reason)
			}
			if err := appendAudit(tx, AuditRecord{Time: now, Event: "revoke", Subject: t.SPIFFEID, Serial: t.Serial, Outcome: OutcomeRevoked, Reason: why}); err != nil {
				return err
			}
			res.serials = append(res.serials, t)
		}
		switch {
		case len(targets) > 0:
			return nil
		case sub.Agent.Kind == identity.KindAgent && recordNote != "":
			return appendAudit(tx, AuditRecord{Time: now, Event: "revoke", Subject: sub.String(), Outcome: OutcomeRevoked, Reason: reason + recordNote})
		case sub.Agent.Kind == identity.KindAgent && res.seq != 0:
			return appendAudit(tx, AuditRecord{Time: now, Event: "revoke", Subject: sub.String(), Outcome: OutcomeRevoked,
				Reason: fmt.Sprintf("already revoked by revocation record %d; requested again: %s", res.seq, reason)})
		}
		return appendAudit(tx, AuditRecord{Time: now, Event: "revoke", Subject: sub.String(), Outcome: OutcomeRevoked,
			Reason: "no live certificate, nothing to revoke: " + reason})
	})
	if err != nil {
		return revokeResult{}, err
	}
	return res, nil
}

func later(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}

// zoneExpiry bounds the certificates of an agent of zone: each was issued by a node certificate
// of that zone and ends no later than it. It is the latest NotAfter among the recorded node
// certificates holding zone, and at least bound (now plus the node lifetime, which no node
// certificate issued so far outlives, including any the members bucket predates).
func zoneExpiry(tx *bolt.Tx, zone string, bound time.Time) (time.Time, error) {
	out := bound
	err := tx.Bucket(bucketMembers).ForEach(func(k, v []byte) error {
		var m memberRecord
		if err := decodeRecord(v, &m); err != nil {
			return fmt.Errorf("member %q: %w", k, err)
		}
		if slices.Contains(m.Zones, zone) {
			out = later(out, m.NotAfter)
		}
		return nil
	})
	return out, err
}

// resolveSubject lists the serials sub names, in serial order.
func resolveSubject(tx *bolt.Tx, sub Subject, now time.Time) ([]RevokedSerial, error) {
	issued := tx.Bucket(bucketIssued)
	if sub.Serial != 0 {
		if v := issued.Get(u64(sub.Serial)); v != nil {
			var rec IssuedRecord
			if err := decodeRecord(v, &rec); err != nil {
				return nil, err
			}
			// Every live renewal of it goes too: otherwise a node revoked by serial keeps a working
			// identity in the successor a routine renewal gave it.
			desc, err := descendants(tx, sub.Serial, now)
			if err != nil {
				return nil, err
			}
			return append([]RevokedSerial{{Serial: rec.Serial, SPIFFEID: rec.SPIFFEID, NotAfter: rec.NotAfter}}, desc...), nil
		}
		last, err := getU64(tx.Bucket(bucketMeta).Get(keySerial))
		if err != nil {
			return nil, fmt.Errorf("serial counter: %w", err)
		}
		if sub.Serial > last {
			return nil, fmt.Errorf("%w: serial %d was never issued (the last serial is %d); check the serial with `ute authority audit`", ErrSubjectUnknown, sub.Serial, last)
		}
		// Allocated but never recorded as issued: a crash between allocation and signing. The
		// certificate may exist nowhere, but revoking it is harmless and closes the question.
		return []RevokedSerial{{Serial: sub.Serial}}, nil
	}
	id := sub.Node.String()
	var (
		out  []RevokedSerial
		seen bool
	)
	err := issued.ForEach(func(_, v []byte) error {
		var rec IssuedRecord
		if err := decodeRecord(v, &rec); err != nil {
			return err
		}
		if rec.SPIFFEID != id {
			return nil
		}
		seen = true
		if now.Before(rec.NotAfter) {
			out = append(out, RevokedSerial{Serial: rec.Serial, SPIFFEID: rec.SPIFFEID, NotAfter: rec.NotAfter})
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	// The name's lease may name a serial whose certificate was never recorded (a crash between the
	// join's commit and its signature): revoke it too, so the name is freed either way.
	if v := tx.Bucket(bucketNodeNames).Get([]byte(sub.Node.Name)); v != nil {
		held, until, err := nameLease(v)
		if err != nil {
			return nil, fmt.Errorf("node name %q: %w", sub.Node.Name, err)
		}
		seen = true
		if now.Before(until) && issued.Get(u64(held)) == nil {
			out = append(out, RevokedSerial{Serial: held, SPIFFEID: id, NotAfter: until.UTC()})
		}
	}
	slices.SortFunc(out, func(a, b RevokedSerial) int { return cmp.Compare(a.Serial, b.Serial) })
	if !seen {
		return nil, fmt.Errorf("%w: no certificate was ever issued to %s; check the node name with `ute authority audit`", ErrSubjectUnknown, id)
	}
	return out, nil
}
