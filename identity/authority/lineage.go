package authority

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/ute-project/ute/identity"
)

// A node identity is a lineage: the certificate a join issued and every renewal of it (each
// serial has at most one successor, see RenewAndIssue). Revoking any serial revokes the lineage
// from that serial on: renewals of it or of any descendant are refused (ErrRevoked), its live
// descendants are revoked with it (each with its own revocation record, so that peers refuse
// them too), and the node's name stays closed to new joins (ErrNameRevoked) until an operator
// releases it with ReleaseName.

// ErrReleaseRefused means ReleaseName found nothing to release: the name is unknown, still held by
// a live unrevoked certificate (revoke it first), or free already.
var ErrReleaseRefused = errors.New("node name release refused")

// OutcomeReleased: an operator reopened a node name whose lineage was revoked.
const OutcomeReleased Outcome = "released"

// EventRelease is the audit event of ReleaseName.
const EventRelease = "release"

// ReleaseRequest is the admin API's release request.
type ReleaseRequest struct {
	Name   string `json:"name"`
	Reason string `json:"reason"`
}

// Released is what ReleaseName did.
type Released struct {
	Name     string `json:"name"`
	SPIFFEID string `json:"spiffe_id"`
	// Serial is the last certificate that held the name; RevokedSerial the revoked serial of its
	// lineage that closed it.
	Serial        uint64    `json:"serial"`
	RevokedSerial uint64    `json:"revoked_serial"`
	ReleasedAt    time.Time `json:"released_at"`
	Reason        string    `json:"reason"`
}

// LineageEntry is one certificate of a node's lineage, oldest first.
type LineageEntry struct {
	Serial   uint64    `json:"serial"`
	SPIFFEID string    `json:"spiffe_id"`
	Renews   uint64    `json:"renews_serial,omitempty"` // 0: issued by a join
	TokenID  string    `json:"token_id,omitempty"`
	IssuedAt time.Time `json:"issued_at"`
	NotAfter time.Time `json:"not_after"`
	// Revoked is set when this serial is in the revoked set; RevokedBy when it or an ancestor is
	// (the serial whose revocation covers it), so Revoked implies RevokedBy == Serial.
	Revoked   bool      `json:"revoked"`
	RevokedBy uint64    `json:"revoked_by,omitempty"`
	RevokedAt time.Time `json:"revoked_at,omitzero"`
	Reason    string    `json:"reason,omitempty"`
}

// ReleaseName reopens name after its lineage was revoked, so that a join with a new token may take
// it (with a new lineage). It is the operator's explicit act that ErrNameRevoked asks for, audited
// with the reason in the same transaction. A name held by a live, unrevoked certificate is refused
// (revoke it first), as is a name that is free already.
func (a *Authority) ReleaseName(_ context.Context, name, reason string) (Released, error) {
	err := identity.ValidateName("node name", name)
	if err == nil {
		err = ValidateRevokeReason(reason)
	}
	now := a.opts.Now()
	id := identity.NodeID(a.trustDomain, name)
	var out Released
	if err == nil {
		out, err = a.store.releaseName(id, reason, now)
	}
	if err != nil {
		a.audit(AuditRecord{Event: EventRelease, Subject: auditSubject(id.String()), Outcome: OutcomeRefused, Reason: err.Error()})
		a.log.Warn("name release refused", "name", auditSubject(name), "err", err)
		return Released{}, err
	}
	a.log.Info("node name released", "node", id.String(), "serial", out.Serial, "revoked_serial", out.RevokedSerial, "reason", reason)
	return out, nil
}

func (s *Store) releaseName(id identity.ID, reason string, now time.Time) (Released, error) {
	var out Released
	err := s.db.Update(func(tx *bolt.Tx) error {
		names := tx.Bucket(bucketNodeNames)
		v := names.Get([]byte(id.Name))
		if v == nil {
			return fmt.Errorf("%w: no certificate was ever issued to %s; check the name with `ute authority audit`", ErrReleaseRefused, id)
		}
		held, until, err := nameLease(v)
		if err != nil {
			return fmt.Errorf("node name %q: %w", id.Name, err)
		}
		r := oldestRevoked(tx, held)
		switch {
		case r == 0 && now.Before(until):
			return fmt.Errorf("%w: %s is held by live serial %d until %s; revoke it first (`ute revoke %s --reason TEXT`)",
				ErrReleaseRefused, id, held, until.UTC().Format(time.RFC3339), id)
		case r == 0:
			return fmt.Errorf("%w: %s is not revoked and its last certificate (serial %d) expired; the name is free already", ErrReleaseRefused, id, held)
		}
		if err := names.Delete([]byte(id.Name)); err != nil {
			return err
		}
		out = Released{Name: id.Name, SPIFFEID: id.String(), Serial: held, RevokedSerial: r, ReleasedAt: now.UTC(), Reason: reason}
		return appendAudit(tx, AuditRecord{Time: now, Event: EventRelease, Subject: id.String(), Serial: held, Outcome: OutcomeReleased,
			Reason: fmt.Sprintf("name reopened for a new join; lineage revoked at serial %d: %s", r, reason)})
	})
	return out, err
}

// Lineage lists every certificate issued to node name, grouped by lineage (each starting at a
// join and followed by its renewals), lineages in the order their joins were issued.
func (a *Authority) Lineage(_ context.Context, name string) ([]LineageEntry, error) {
	if err := identity.ValidateName("node name", name); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrSubjectUnknown, err)
	}
	return a.store.Lineage(identity.NodeID(a.trustDomain, name).String())
}

// Lineage lists the certificates issued to the node SPIFFE ID id, each join followed by its chain
// of renewals; ErrSubjectUnknown when there is none.
func (s *Store) Lineage(id string) ([]LineageEntry, error) {
	var out []LineageEntry
	err := s.db.View(func(tx *bolt.Tx) error {
		bySerial := map[uint64]IssuedRecord{}
		var roots []uint64
		err := tx.Bucket(bucketIssued).ForEach(func(_, v []byte) error {
			var rec IssuedRecord
			if err := decodeRecord(v, &rec); err != nil {
				return err
			}
			if rec.SPIFFEID != id {
				return nil
			}
			bySerial[rec.Serial] = rec
			if rec.Renewal == 0 {
				roots = append(roots, rec.Serial)
			}
			return nil
		})
		if err != nil {
			return err
		}
		if len(bySerial) == 0 {
			return fmt.Errorf("%w: no certificate was ever issued to %s", ErrSubjectUnknown, id)
		}
		// A renewal whose predecessor is missing (a damaged store) still shows, as its own root.
		for serial, rec := range bySerial {
			if _, ok := bySerial[rec.Renewal]; rec.Renewal != 0 && !ok {
				roots = append(roots, serial)
			}
		}
		slices.Sort(roots)
		renewed := tx.Bucket(bucketRenewed)
		for _, root := range roots {
			for s, n := root, 0; s != 0 && n < len(bySerial); n++ {
				rec, ok := bySerial[s]
				if !ok {
					break
				}
				e := LineageEntry{Serial: rec.Serial, SPIFFEID: rec.SPIFFEID, Renews: rec.Renewal, TokenID: rec.TokenID,
					IssuedAt: rec.IssuedAt, NotAfter: rec.NotAfter, RevokedBy: oldestRevoked(tx, s)}
				if v := tx.Bucket(bucketRevoked).Get(u64(s)); v != nil {
					var rv revocationValue
					if err := decodeRecord(v, &rv); err != nil {
						return fmt.Errorf("revocation of serial %d: %w", s, err)
					}
					e.Revoked, e.RevokedAt, e.Reason = true, rv.Time, rv.Reason
				}
				out = append(out, e)
				next := renewed.Get(u64(s))
				if next == nil {
					break
				}
				ns, err := getU64(next)
				if err != nil || ns <= s {
					break
				}
				s = ns
			}
		}
		return nil
	})
	return out, err
}

// descendants lists the live certificates renewed, directly or not, from serial, oldest first.
// Serials only grow along a lineage, which bounds the walk.
func descendants(tx *bolt.Tx, serial uint64, now time.Time) ([]RevokedSerial, error) {
	var out []RevokedSerial
	renewed, issued := tx.Bucket(bucketRenewed), tx.Bucket(bucketIssued)
	for s := serial; ; {
		v := renewed.Get(u64(s))
		if v == nil {
			return out, nil
		}
		next, err := getU64(v)
		if err != nil || next <= s {
			return nil, fmt.Errorf("successor of serial %d: the store is damaged", s)
		}
		s = next
		rv := issued.Get(u64(s))
		if rv == nil {
			continue
		}
		var rec IssuedRecord
		if err := decodeRecord(rv, &rec); err != nil {
			return nil, err
		}
		if now.Before(rec.NotAfter) {
			out = append(out, RevokedSerial{Serial: rec.Serial, SPIFFEID: rec.SPIFFEID, NotAfter: rec.NotAfter, Via: serial})
		}
	}
}

// oldestRevoked is like lineageRevoked but walks the whole lineage back and returns the oldest
// revoked serial: the one the operator named, when descendants were revoked along with it.
func oldestRevoked(tx *bolt.Tx, serial uint64) uint64 {
	var out uint64
	for s := serial; s != 0; {
		r := lineageRevoked(tx, s)
		if r == 0 {
			return out
		}
		out = r
		v := tx.Bucket(bucketRenewedFrom).Get(u64(r))
		if v == nil {
			return out
		}
		prev, err := getU64(v)
		if err != nil || prev >= r {
			return out
		}
		s = prev
	}
	return out
}
