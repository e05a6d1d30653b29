package authority

import (
	"encoding/binary"
	"fmt"
	"math/bits"
	"net/netip"
	"slices"
	"time"

	bolt "go.etcd.io/bbolt"
)

// Per-node slices of zone CIDRs. A node certificate's ZoneGrant.Prefixes hold only the node's own
// slices, so identity.Verifier refuses an agent certificate a node signs for an address outside
// them (ErrCIDRConstraint): an overlay IP then names one agent across the trust domain.
//
// Every slice ever handed out is kept in one address-ordered set per family, whatever zone it was
// allocated for, and a new slice must overlap none of them. So a slice is never given to a second
// node, not after a crash (the allocation commits with the token and serial), not after the node
// is revoked or rejoins (slices are never freed in this version), and not after a policy change
// moves a CIDR between zones or changes node_prefix.

// SliceRequest asks for a node's slice of one zone CIDR.
type SliceRequest struct {
	Zone string
	CIDR netip.Prefix
	Bits int // the slice length (zones.Zone.NodePrefixFor)
}

// SliceRecord is one allocated slice.
type SliceRecord struct {
	Prefix      string    `cbor:"1,keyasint" json:"prefix"`
	Zone        string    `cbor:"2,keyasint" json:"zone"`
	Node        string    `cbor:"3,keyasint" json:"node"`
	Serial      uint64    `cbor:"4,keyasint" json:"serial"` // the certificate whose issuance allocated it
	AllocatedAt time.Time `cbor:"5,keyasint" json:"allocated_at"`
}

// Slice parses the record's prefix.
func (r SliceRecord) Slice() (netip.Prefix, error) {
	p, err := netip.ParsePrefix(r.Prefix)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("stored slice %q: %w", r.Prefix, err)
	}
	return p, nil
}

var (
	bucketSlices4    = []byte("slices4")
	bucketSlices6    = []byte("slices6")
	bucketNodeSlices = []byte("node_slices")
	// bucketRenewed maps a renewed serial to its successor, bucketRenewedFrom the successor back
	// (both u64 big-endian). Written in the renewal's transaction, never deleted.
	bucketRenewed     = []byte("renewed")
	bucketRenewedFrom = []byte("renewed_from")
)

// sliceKeyLen: the slice's first address as 16 bytes (IPv4 mapped), then its length in its
// family's bits. Big-endian addresses make bbolt's key order the address order.
const sliceKeyLen = 17

func sliceKey(p netip.Prefix) []byte {
	a := p.Masked().Addr().As16()
	return append(a[:], byte(p.Bits()))
}

func familyBucket(tx *bolt.Tx, p netip.Prefix) *bolt.Bucket {
	if p.Addr().Is4() {
		return tx.Bucket(bucketSlices4)
	}
	return tx.Bucket(bucketSlices6)
}

// indexKey is a slice's key in a node's index: its family (4 or 6), then its slice key.
func indexKey(p netip.Prefix) []byte {
	fam := byte(6)
	if p.Addr().Is4() {
		fam = 4
	}
	return append([]byte{fam}, sliceKey(p)...)
}

// u128 is an address in 16-byte form, for slice arithmetic.
type u128 struct{ hi, lo uint64 }

func u128Of(b []byte) u128 {
	return u128{binary.BigEndian.Uint64(b[:8]), binary.BigEndian.Uint64(b[8:16])}
}

func (u u128) bytes() [16]byte {
	var b [16]byte
	binary.BigEndian.PutUint64(b[:8], u.hi)
	binary.BigEndian.PutUint64(b[8:], u.lo)
	return b
}

func (u u128) cmp(v u128) int {
	switch {
	case u.hi < v.hi || u.hi == v.hi && u.lo < v.lo:
		return -1
	case u == v:
		return 0
	default:
		return 1
	}
}

// add returns u+v and whether it overflowed 128 bits.
func (u u128) add(v u128) (u128, bool) {
	lo, c := bits.Add64(u.lo, v.lo, 0)
	hi, c := bits.Add64(u.hi, v.hi, c)
	return u128{hi, lo}, c != 0
}

// hostMask is 2^n - 1 for n in 0..128.
func hostMask(n int) u128 {
	switch {
	case n <= 0:
		return u128{}
	case n < 64:
		return u128{0, 1<<n - 1}
	case n < 128:
		return u128{1<<(n-64) - 1, ^uint64(0)}
	default:
		return u128{^uint64(0), ^uint64(0)}
	}
}

// span returns the first and last address of a slice key's prefix, in 16-byte form.
func span(key []byte, familyBits int) (first, last u128, err error) {
	if len(key) != sliceKeyLen {
		return u128{}, u128{}, fmt.Errorf("slice key of %d bytes; the store is damaged", len(key))
	}
	first = u128Of(key[:16])
	b := int(key[16])
	if b > familyBits {
		return u128{}, u128{}, fmt.Errorf("slice key length /%d; the store is damaged", b)
	}
	m := hostMask(familyBits - b)
	return first, u128{first.hi | m.hi, first.lo | m.lo}, nil
}

// blocker returns the last address of a stored slice overlapping [first, last], if any. Stored
// slices are pairwise disjoint, so only the one starting at or after first and the one before it
// can overlap.
func blocker(b *bolt.Bucket, familyBits int, first, last u128) (u128, bool, error) {
	fb := first.bytes()
	c := b.Cursor()
	k, _ := c.Seek(fb[:])
	if k != nil {
		s, e, err := span(k, familyBits)
		if err != nil {
			return u128{}, false, err
		}
		if s.cmp(last) <= 0 {
			return e, true, nil
		}
		k, _ = c.Prev()
	} else {
		k, _ = c.Last()
	}
	if k != nil {
		s, e, err := span(k, familyBits)
		if err != nil {
			return u128{}, false, err
		}
		if s.cmp(first) < 0 && e.cmp(first) >= 0 {
			return e, true, nil
		}
	}
	return u128{}, false, nil
}

// allocateSlice takes the lowest free slice of req.CIDR of length req.Bits for node, inside tx.
func allocateSlice(tx *bolt.Tx, req SliceRequest, node string, serial uint64, now time.Time) (SliceRecord, error) {
	cidr := req.CIDR.Masked()
	familyBits := cidr.Addr().BitLen()
	if !cidr.IsValid() || req.Bits <= cidr.Bits() || req.Bits > familyBits {
		return SliceRecord{}, fmt.Errorf("zone %s: slice length /%d does not fit CIDR %s", req.Zone, req.Bits, req.CIDR)
	}
	b := familyBucket(tx, cidr)
	a16 := cidr.Addr().As16()
	base := u128Of(a16[:])
	zoneMask := hostMask(familyBits - cidr.Bits())
	end := u128{base.hi | zoneMask.hi, base.lo | zoneMask.lo}
	sliceMask := hostMask(familyBits - req.Bits)
	cand := base
	for {
		last := u128{cand.hi | sliceMask.hi, cand.lo | sliceMask.lo}
		blockEnd, blocked, err := blocker(b, familyBits, cand, last)
		if err != nil {
			return SliceRecord{}, err
		}
		if !blocked {
			addr := netip.AddrFrom16(cand.bytes())
			if cidr.Addr().Is4() {
				addr = addr.Unmap()
			}
			p := netip.PrefixFrom(addr, req.Bits)
			rec := SliceRecord{Prefix: p.String(), Zone: req.Zone, Node: node, Serial: serial, AllocatedAt: now.UTC()}
			val, err := storeEnc.Marshal(rec)
			if err != nil {
				return SliceRecord{}, fmt.Errorf("encode slice record: %w", err)
			}
			if err := b.Put(sliceKey(p), val); err != nil {
				return SliceRecord{}, err
			}
			nb, err := tx.Bucket(bucketNodeSlices).CreateBucketIfNotExists([]byte(node))
			if err != nil {
				return SliceRecord{}, fmt.Errorf("node slice index for %q: %w", node, err)
			}
			return rec, nb.Put(indexKey(p), []byte(req.Zone))
		}
		// Jump to the first aligned slice after the one in the way: the blocker may be larger or
		// smaller than a slice (node_prefix changed), alignment handles both.
		next, overflow := blockEnd.add(u128{0, 1})
		if !overflow {
			next, overflow = next.add(sliceMask)
			next = u128{next.hi &^ sliceMask.hi, next.lo &^ sliceMask.lo}
		}
		if overflow || next.cmp(end) > 0 {
			return SliceRecord{}, fmt.Errorf("%w: zone %s CIDR %s has no free /%d slice left; widen the zone (add a CIDR) or lower node_prefix for new nodes", ErrZoneFull, req.Zone, req.CIDR, req.Bits)
		}
		cand = next
	}
}

// sliceRecord reads the stored record of slice p, if any.
func sliceRecord(tx *bolt.Tx, p netip.Prefix) (SliceRecord, bool, error) {
	v := familyBucket(tx, p).Get(sliceKey(p))
	if v == nil {
		return SliceRecord{}, false, nil
	}
	var rec SliceRecord
	if err := decodeRecord(v, &rec); err != nil {
		return SliceRecord{}, false, err
	}
	return rec, true, nil
}

// RenewalRequest is what a renewal needs from the store in one transaction.
type RenewalRequest struct {
	Node string
	// Held are the slices of the certificate presented for renewal, per zone.
	Held map[string][]netip.Prefix
	// Want are the zone CIDRs the renewed certificate grants, with their slice lengths.
	Want []SliceRequest
	Now  time.Time
	// Renews is the serial of the certificate presented for renewal. The transaction refuses it
	// (ErrRevoked) when it or any certificate it descends from by renewal is revoked, and
	// (ErrSuperseded) when it was already renewed; then it records the new serial as its only
	// successor. Zero skips both checks (store tests that exercise slices alone).
	Renews uint64
	// KeyHash is identity.KeyHash of the key the renewed certificate is for (RenewAndIssue only).
	// A renewal of an already renewed Renews whose successor was issued for this same key is a
	// retry after a lost response, answered with that successor.
	KeyHash string
	// HoldUntil is when the renewed certificate expires: Node stays held (see Consume) until then.
	HoldUntil time.Time
	// Advertise is the underlay address the renewing node advertises (RenewAndIssue only); empty
	// keeps the one recorded for the certificate it renews.
	Advertise string
}

// Renewal allocates the serial of a renewed node certificate and its slices, in one durable
// transaction. For each wanted zone CIDR it keeps the slice the node holds inside it (a slice of
// the presented certificate that the store records as this node's, in this zone); a CIDR the node
// holds no slice of (added to the zone since, or a certificate from before per-node slices) gets a
// new slice. Slices the node no longer needs are not freed. It records no certificate, so it never
// answers a retry (RenewAndIssue does).
func (s *Store) Renewal(req RenewalRequest) (uint64, []SliceRecord, error) {
	req.KeyHash = ""
	r, err := s.RenewAndIssue(req, nil)
	if err != nil {
		return 0, nil, err
	}
	return r.Serial, r.Slices, nil
}

// Renewed is the outcome of RenewAndIssue.
type Renewed struct {
	Serial uint64
	// Slices are the renewed certificate's slices, one per RenewalRequest.Want; nil on a retry.
	Slices []SliceRecord
	// Issued is the stored record of the renewed certificate (zero when sign was nil).
	Issued IssuedRecord
	// Retry is true when the request repeated a renewal whose certificate was already issued for
	// the same key: Issued is that certificate and nothing was allocated or written.
	Retry bool
}

// RenewAndIssue is Renewal with the signature inside the same transaction: sign receives the
// allocated serial and slices and returns the issued record, which is stored before the
// transaction commits. So the successor recorded for req.Renews always has its certificate stored,
// and a renewal retried after a lost response (same req.KeyHash) gets that certificate back
// instead of ErrSuperseded. A retry is answered only while the successor is live: unexpired, not
// revoked (its lineage included: ErrRevoked) and not itself renewed.
func (s *Store) RenewAndIssue(req RenewalRequest, sign func(serial uint64, slices []SliceRecord) (IssuedRecord, error)) (Renewed, error) {
	var out Renewed
	err := s.db.Update(func(tx *bolt.Tx) error {
		out = Renewed{}
		if req.Renews != 0 {
			prev, retry, err := checkRenewable(tx, req)
			if err != nil {
				return err
			}
			if retry {
				out = Renewed{Serial: prev.Serial, Issued: prev, Retry: true}
				return nil
			}
		}
		serial, err := nextSerial(tx)
		if err != nil {
			return err
		}
		out.Serial = serial
		if req.Renews != 0 {
			if err := tx.Bucket(bucketRenewed).Put(u64(req.Renews), u64(serial)); err != nil {
				return err
			}
			if err := tx.Bucket(bucketRenewedFrom).Put(u64(serial), u64(req.Renews)); err != nil {
				return err
			}
		}
		if !req.HoldUntil.IsZero() && req.Node != "" {
			if err := tx.Bucket(bucketNodeNames).Put([]byte(req.Node), nameLeaseValue(serial, req.HoldUntil)); err != nil {
				return err
			}
		}
		for _, w := range req.Want {
			rec, ok, err := heldSlice(tx, req, w)
			if err != nil {
				return err
			}
			if !ok {
				if rec, err = allocateSlice(tx, w, req.Node, serial, req.Now); err != nil {
					return err
				}
			}
			out.Slices = append(out.Slices, rec)
		}
		if sign == nil {
			return nil
		}
		rec, err := sign(serial, out.Slices)
		if err != nil {
			return err
		}
		if rec.Serial != serial {
			return fmt.Errorf("signed record has serial %d, want %d", rec.Serial, serial)
		}
		if err := putIssued(tx, rec); err != nil {
			return err
		}
		var zones []string
		for _, sl := range out.Slices {
			if !slices.Contains(zones, sl.Zone) {
				zones = append(zones, sl.Zone)
			}
		}
		if err := putMember(tx, req.Node, rec, zones, req.Advertise, req.Renews, req.Now); err != nil {
			return err
		}
		out.Issued = rec
		return nil
	})
	if err != nil {
		return Renewed{}, err
	}
	return out, nil
}

// checkRenewable refuses the renewal of req.Renews when it, or any serial it was renewed from, is
// revoked, and when it already has a successor, unless that successor is a live certificate for
// req.KeyHash: then the request is a retry and the successor's record is returned. Serials only
// grow along a lineage, which bounds the walk and catches a damaged store that would make it loop.
func checkRenewable(tx *bolt.Tx, req RenewalRequest) (IssuedRecord, bool, error) {
	serial, node := req.Renews, req.Node
	switch s := lineageRevoked(tx, serial); {
	case s == serial:
		return IssuedRecord{}, false, fmt.Errorf("%w: serial %d of node %s; the node must rejoin with a new token", ErrRevoked, serial, node)
	case s != 0:
		return IssuedRecord{}, false, fmt.Errorf("%w: serial %d of node %s was renewed from revoked serial %d; the node must rejoin with a new token", ErrRevoked, serial, node, s)
	}
	v := tx.Bucket(bucketRenewed).Get(u64(serial))
	if v == nil {
		return IssuedRecord{}, false, nil
	}
	next, err := getU64(v)
	if err != nil {
		return IssuedRecord{}, false, fmt.Errorf("successor of serial %d: %w; the store is damaged", serial, err)
	}
	if prev, ok, err := retryOf(tx, req, next); err != nil || ok {
		return prev, ok, err
	}
	return IssuedRecord{}, false, fmt.Errorf("%w: serial %d of node %s was already renewed as serial %d; if this node did not renew it, its key was copied: revoke serial %d and rejoin with a new token",
		ErrSuperseded, serial, node, next, next)
}

// retryOf reports whether a renewal of req.Renews, already renewed as next, repeats that renewal:
// same key (the CSR's signature proved possession of it), and next still live and not renewed
// itself. Anything else stays ErrSuperseded: a thief holding the old key and certificate has its
// own new key, never the node's.
func retryOf(tx *bolt.Tx, req RenewalRequest, next uint64) (IssuedRecord, bool, error) {
	if req.KeyHash == "" {
		return IssuedRecord{}, false, nil
	}
	v := tx.Bucket(bucketIssued).Get(u64(next))
	if v == nil {
		return IssuedRecord{}, false, nil
	}
	var rec IssuedRecord
	if err := decodeRecord(v, &rec); err != nil {
		return IssuedRecord{}, false, err
	}
	if rec.Renewal != req.Renews || rec.KeyHash != req.KeyHash || len(rec.CertDER) == 0 {
		return IssuedRecord{}, false, nil
	}
	if tx.Bucket(bucketRenewed).Get(u64(next)) != nil || !req.Now.Before(rec.NotAfter) {
		return IssuedRecord{}, false, nil
	}
	if s := lineageRevoked(tx, next); s != 0 {
		return IssuedRecord{}, false, fmt.Errorf("%w: serial %d of node %s (the renewal of serial %d this request repeats); the node must rejoin with a new token", ErrRevoked, s, req.Node, req.Renews)
	}
	return rec, true, nil
}

// lineageRevoked returns serial, or the serial it descends from by renewal, that is revoked; 0 if
// none is. Serials only grow along a lineage, which bounds the walk; a link that does not (a
// damaged store) counts as revoked, so damage fails closed.
func lineageRevoked(tx *bolt.Tx, serial uint64) uint64 {
	revoked, from := tx.Bucket(bucketRevoked), tx.Bucket(bucketRenewedFrom)
	for s := serial; s != 0; {
		if revoked.Get(u64(s)) != nil {
			return s
		}
		v := from.Get(u64(s))
		if v == nil {
			return 0
		}
		prev, err := getU64(v)
		if err != nil || prev >= s {
			return s
		}
		s = prev
	}
	return 0
}

func heldSlice(tx *bolt.Tx, req RenewalRequest, w SliceRequest) (SliceRecord, bool, error) {
	for _, p := range req.Held[w.Zone] {
		if p.Bits() < w.CIDR.Bits() || !w.CIDR.Contains(p.Addr()) {
			continue
		}
		rec, ok, err := sliceRecord(tx, p)
		if err != nil {
			return SliceRecord{}, false, err
		}
		if ok && rec.Node == req.Node && rec.Zone == w.Zone {
			return rec, true, nil
		}
	}
	return SliceRecord{}, false, nil
}

// NodeSlices lists every slice ever allocated to a node name, in address order (IPv4 first).
func (s *Store) NodeSlices(node string) ([]SliceRecord, error) {
	var out []SliceRecord
	err := s.db.View(func(tx *bolt.Tx) error {
		nb := tx.Bucket(bucketNodeSlices).Bucket([]byte(node))
		if nb == nil {
			return nil
		}
		return nb.ForEach(func(k, _ []byte) error {
			if len(k) != 1+sliceKeyLen || (k[0] != 4 && k[0] != 6) {
				return fmt.Errorf("slice index key of %d bytes; the store is damaged", len(k))
			}
			b := tx.Bucket(bucketSlices6)
			if k[0] == 4 {
				b = tx.Bucket(bucketSlices4)
			}
			v := b.Get(k[1:])
			if v == nil {
				return fmt.Errorf("slice index of %q names a slice the store does not hold; the store is damaged", node)
			}
			var rec SliceRecord
			if err := decodeRecord(v, &rec); err != nil {
				return err
			}
			out = append(out, rec)
			return nil
		})
	})
	return out, err
}

// Slices lists every allocated slice, in address order (IPv4 first).
func (s *Store) Slices() ([]SliceRecord, error) {
	var out []SliceRecord
	err := s.db.View(func(tx *bolt.Tx) error {
		for _, name := range [][]byte{bucketSlices4, bucketSlices6} {
			err := tx.Bucket(name).ForEach(func(_, v []byte) error {
				var rec SliceRecord
				if err := decodeRecord(v, &rec); err != nil {
					return err
				}
				out = append(out, rec)
				return nil
			})
			if err != nil {
				return err
			}
		}
		return nil
	})
	return out, err
}

// grantsFrom groups allocated slices by zone, keeping the order of zones and of slices within a
// zone as requested.
func grantsFrom(zoneOrder []string, recs []SliceRecord) (map[string][]netip.Prefix, error) {
	out := make(map[string][]netip.Prefix, len(zoneOrder))
	for _, r := range recs {
		p, err := r.Slice()
		if err != nil {
			return nil, err
		}
		if !slices.Contains(zoneOrder, r.Zone) {
			return nil, fmt.Errorf("slice %s allocated for zone %q nobody asked for", p, r.Zone)
		}
		out[r.Zone] = append(out[r.Zone], p)
	}
	return out, nil
}
