package authority

import (
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	bolt "go.etcd.io/bbolt"
)

// Bootstrap: the authority remembers the underlay address each node advertises at join and
// renewal, and answers both with a few live members of the node's zones, so a node can find its
// zones' gossip pools without static peers.

// MaxMembers is how many members a join or renewal response names at most.
const MaxMembers = 8

// maxAdvertise bounds an advertised address: a 253-character DNS name, brackets, colon, port.
const maxAdvertise = 261

// bucketMembers maps a node name to its memberRecord: the newest certificate of that name and the
// address its node advertised.
var bucketMembers = []byte("members")

// memberRecord is the value of the members bucket.
type memberRecord struct {
	Serial   uint64    `cbor:"1,keyasint"`
	ID       string    `cbor:"2,keyasint"`
	Addr     string    `cbor:"3,keyasint,omitempty"`
	Zones    []string  `cbor:"4,keyasint"`
	NotAfter time.Time `cbor:"5,keyasint"`
	Updated  time.Time `cbor:"6,keyasint"`
}

// ValidateAdvertise checks an advertised underlay address: host:port with a decimal port 1..65535
// and a host that is an IP address (not unspecified, multicast or zoned) or a DNS name. The error
// wraps ErrAdvertise and says what is wrong.
func ValidateAdvertise(s string) error {
	if len(s) > maxAdvertise {
		return fmt.Errorf("%w: %d bytes, at most %d", ErrAdvertise, len(s), maxAdvertise)
	}
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return fmt.Errorf("%w: %q is not host:port (%v); write e.g. 192.0.2.10:7946 or [2001:db8::1]:7946", ErrAdvertise, s, err)
	}
	n, err := strconv.ParseUint(port, 10, 16)
	if err != nil || n == 0 || port != strconv.FormatUint(n, 10) {
		return fmt.Errorf("%w: %q: the port must be a decimal number from 1 to 65535", ErrAdvertise, s)
	}
	if ip, err := netip.ParseAddr(host); err == nil {
		switch {
		case ip.Zone() != "":
			return fmt.Errorf("%w: %q: an address with an interface zone means nothing to other hosts", ErrAdvertise, s)
		case ip.IsUnspecified():
			return fmt.Errorf("%w: %q: the unspecified address is where a node listens, not where others reach it; advertise a routable address", ErrAdvertise, s)
		case ip.IsMulticast():
			return fmt.Errorf("%w: %q: a multicast address cannot name one node", ErrAdvertise, s)
		case ip.Is4In6():
			return fmt.Errorf("%w: %q: write the IPv4 address without the ::ffff: prefix", ErrAdvertise, s)
		case ip.Is6() && !strings.HasPrefix(s, "["):
			return fmt.Errorf("%w: %q: write an IPv6 address in brackets", ErrAdvertise, s)
		}
		return nil
	}
	if !validHostname(host) {
		return fmt.Errorf("%w: %q: the host is neither an IP address nor a DNS name", ErrAdvertise, s)
	}
	return nil
}

// validHostname accepts a DNS name of letters, digits and inner hyphens, at most 253 characters,
// with at least one letter somewhere (so "1.2.3" is not taken for a name).
func validHostname(h string) bool {
	if h == "" || len(h) > 253 {
		return false
	}
	letter := false
	for label := range strings.SplitSeq(h, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for _, c := range []byte(label) {
			switch {
			case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z':
				letter = true
			case c >= '0' && c <= '9', c == '-':
			default:
				return false
			}
		}
	}
	return letter
}

// putMember records name's newest certificate and, when addr is not empty, its address. An empty
// addr keeps the address already recorded for that certificate's lineage (a renewal from a node
// that advertises nothing new); a join (renews == 0) starts afresh, so a rejoined name never
// inherits the address of the node that held it before.
func putMember(tx *bolt.Tx, name string, rec IssuedRecord, zones []string, addr string, renews uint64, now time.Time) error {
	if name == "" {
		return nil
	}
	b := tx.Bucket(bucketMembers)
	if addr == "" && renews != 0 {
		if v := b.Get([]byte(name)); v != nil {
			var prev memberRecord
			if err := decodeRecord(v, &prev); err != nil {
				return fmt.Errorf("member %q: %w", name, err)
			}
			if prev.Serial == renews {
				addr = prev.Addr
			}
		}
	}
	val, err := storeEnc.Marshal(memberRecord{
		Serial: rec.Serial, ID: rec.SPIFFEID, Addr: addr, Zones: zones, NotAfter: rec.NotAfter.UTC(), Updated: now.UTC(),
	})
	if err != nil {
		return fmt.Errorf("encode member record: %w", err)
	}
	return b.Put([]byte(name), val)
}

// MembersFor picks at most limit live members that share a zone with zones, excluding the node
// named self: a uniform random sample (reservoir) of every member whose newest certificate is
// unexpired at now, whose lineage is not revoked and which advertised an address.
func (s *Store) MembersFor(self string, zones []string, now time.Time, limit int) ([]Member, error) {
	var out []Member
	err := s.db.View(func(tx *bolt.Tx) error {
		seen := 0
		return tx.Bucket(bucketMembers).ForEach(func(k, v []byte) error {
			if string(k) == self {
				return nil
			}
			var m memberRecord
			if err := decodeRecord(v, &m); err != nil {
				return fmt.Errorf("member %q: %w", k, err)
			}
			if m.Addr == "" || !now.Before(m.NotAfter) {
				return nil
			}
			shared := slices.DeleteFunc(slices.Clone(m.Zones), func(z string) bool { return !slices.Contains(zones, z) })
			if len(shared) == 0 || lineageRevoked(tx, m.Serial) != 0 {
				return nil
			}
			slices.Sort(shared)
			seen++
			mem := Member{ID: m.ID, Addr: m.Addr, Zones: shared}
			if len(out) < limit {
				out = append(out, mem)
			} else if j := rand.IntN(seen); j < limit {
				out[j] = mem
			}
			return nil
		})
	})
	return out, err
}

// members is MembersFor for a response: a failure to read them costs the node its bootstrap
// hint, never its certificate, so it is logged and the response goes out without members.
func (a *Authority) members(self string, zones []string, now time.Time) []Member {
	m, err := a.store.MembersFor(self, zones, now, MaxMembers)
	if err != nil {
		a.log.Error("read members for bootstrap", "node", self, "err", err)
		return nil
	}
	return m
}
