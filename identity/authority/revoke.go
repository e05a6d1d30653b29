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
)

// Refusals of `ute revoke` at the authority. They are admin-side only (never on the QUIC wire).
var (
	// ErrRevocationMalformed means the subject or the reason could not be parsed: a usage error.
	ErrRevocationMalformed = errors.New("revocation request malformed")
	// ErrSubjectUnknown means the subject names nothing this authority ever issued.
	ErrSubjectUnknown = errors.New("revocation subject unknown")
	// ErrAgentRevocation means the subject is an agent: the authority never issues agent
	// certificates, so it holds nothing to revoke; the agent's node revokes it.
	ErrAgentRevocation = errors.New("agent certificates are revoked by their node, not the authority")
)

// MaxRevokeReason caps the reason stored with a revocation and shown in the audit trail.
const MaxRevokeReason = 256

// subjectSerialPrefix introduces a subject given by certificate serial.
const subjectSerialPrefix = "serial:"

// Subject is what a revocation names: one certificate serial, or a node SPIFFE ID (every live
// certificate issued to it).
type Subject struct {
	// Serial is set for "serial:N".
	Serial uint64
	// Node is set (Kind == identity.KindNode) for "spiffe://<td>/node/<name>".
	Node identity.ID
}

// String is the subject in the form ParseSubject reads.
func (s Subject) String() string {
	if s.Serial != 0 {
		return subjectSerialPrefix + strconv.FormatUint(s.Serial, 10)
	}
	return s.Node.String()
}

// ParseSubject parses a revocation subject: "serial:N" (N a decimal serial, 1 or more) or a node
// SPIFFE ID. An agent SPIFFE ID is well formed but refused with ErrAgentRevocation; anything else
// that does not parse is ErrRevocationMalformed.
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
		return Subject{}, fmt.Errorf("%w: %w; give spiffe://<trust-domain>/node/<name> or serial:<N>", ErrRevocationMalformed, err)
	}
	switch id.Kind {
	case identity.KindNode:
		return Subject{Node: id}, nil
	case identity.KindAgent:
		return Subject{}, fmt.Errorf("%w: %s is an agent; its node issued its certificate and revokes it (node-side revocation arrives with the node daemon); to cut off the whole node, revoke spiffe://%s/node/<name>",
			ErrAgentRevocation, id, id.TrustDomain)
	default:
		return Subject{}, fmt.Errorf("%w: %s is the authority itself, which cannot be revoked; give spiffe://%s/node/<name> or serial:<N>", ErrRevocationMalformed, id, id.TrustDomain)
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
}

// Revocation is the outcome of a revocation: the serials it covers, in serial order. For a node it
// is every certificate issued to the node that has not expired; none means nothing was live.
type Revocation struct {
	Subject string          `json:"subject"`
	Reason  string          `json:"reason"`
	Serials []RevokedSerial `json:"serials"`
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
func (a *Authority) RevokeSubject(_ context.Context, subject, reason string) (Revocation, error) {
	sub, err := ParseSubject(subject)
	if err == nil {
		err = ValidateRevokeReason(reason)
	}
	if err == nil && sub.Serial == 0 && sub.Node.TrustDomain != a.trustDomain {
		err = fmt.Errorf("%w: %s is in trust domain %s; this authority is %s", ErrSubjectUnknown, sub.Node, sub.Node.TrustDomain, a.trustDomain)
	}
	var out []RevokedSerial
	if err == nil {
		out, err = a.store.RevokeSubject(sub, reason, a.opts.Now())
	}
	if err != nil {
		a.audit(AuditRecord{Event: "revoke", Subject: auditSubject(subject), Outcome: OutcomeRefused, Reason: err.Error()})
		a.log.Warn("revocation refused", "subject", auditSubject(subject), "err", err)
		return Revocation{}, err
	}
	for _, r := range out {
		a.log.Info("revoked", "subject", sub.String(), "serial", r.Serial, "spiffe_id", r.SPIFFEID, "already", r.Already, "reason", reason)
	}
	if out == nil {
		out = []RevokedSerial{}
	}
	return Revocation{Subject: sub.String(), Reason: reason, Serials: out}, nil
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
func (s *Store) RevokeSubject(sub Subject, reason string, now time.Time) ([]RevokedSerial, error) {
	val, err := storeEnc.Marshal(revocationValue{Time: now.UTC(), Reason: reason})
	if err != nil {
		return nil, fmt.Errorf("encode revocation: %w", err)
	}
	var out []RevokedSerial
	err = s.db.Update(func(tx *bolt.Tx) error {
		targets, err := resolveSubject(tx, sub, now)
		if err != nil {
			return err
		}
		out = nil
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
			why := reason
			if t.Already {
				why = fmt.Sprintf("already revoked at %s (%s); requested again: %s", t.RevokedAt.Format(time.RFC3339), t.Reason, reason)
			}
			if err := appendAudit(tx, AuditRecord{Time: now, Event: "revoke", Subject: t.SPIFFEID, Serial: t.Serial, Outcome: OutcomeRevoked, Reason: why}); err != nil {
				return err
			}
			out = append(out, t)
		}
		if len(targets) == 0 {
			return appendAudit(tx, AuditRecord{Time: now, Event: "revoke", Subject: sub.String(), Outcome: OutcomeRevoked,
				Reason: "no live certificate, nothing to revoke: " + reason})
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
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
			return []RevokedSerial{{Serial: rec.Serial, SPIFFEID: rec.SPIFFEID, NotAfter: rec.NotAfter}}, nil
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
