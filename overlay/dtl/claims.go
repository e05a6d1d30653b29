package dtl

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/fxamacker/cbor/v2"
)

// Version1 is the only claims version this code understands; anything else is refused (I7).
const Version1 = 1

// Claim keys of the CBOR claims map (docs/protocol.md, "DTL claims").
const (
	KeyVersion     = 1
	KeyZone        = 2
	KeyAgent       = 3
	KeyChain       = 4
	KeyChainHash   = 5
	KeyNode        = 6
	KeyFingerprint = 7
	KeyRegion      = 8
	KeyTrust       = 9
	KeyDrift       = 10
	KeyDestination = 11
	KeyFlowID      = 12
	KeySeq         = 13
	KeyIssuedAt    = 14
)

// Size bounds of individual claims. The record as a whole is capped by MaxRecordSize; these keep
// each field to what a legitimate sender can produce, so a peer cannot make us carry megabyte IDs.
const (
	MaxZoneLen   = 63   // a DNS label
	MaxIDLen     = 2048 // SPIFFE's maximum URI length
	MaxRegionLen = 64
	MaxNameLen   = 253 // a DNS name
	MaxCertLen   = 3072
	HashLen      = sha256.Size
	MaxTrust     = 100
)

// DriftFlags is the bit set of drift signals the sending node declares about the agent (claim 10).
// A receiver refuses unknown bits: a newer sender must not get its signals silently ignored.
type DriftFlags uint64

// Drift bits.
const (
	// DriftRegion: the node runs outside the zone's allowed regions.
	DriftRegion DriftFlags = 1 << 0
	// DriftFingerprint: the workload fingerprint differs from the one in the agent certificate.
	DriftFingerprint DriftFlags = 1 << 1
	// DriftDuplicate: the same identity was seen live at two places at once.
	DriftDuplicate DriftFlags = 1 << 2

	driftKnown = DriftRegion | DriftFingerprint | DriftDuplicate
)

// String lists the set bits by name, e.g. "region|fingerprint", or "none".
func (f DriftFlags) String() string {
	if f == 0 {
		return "none"
	}
	var parts []string
	for _, b := range []struct {
		bit  DriftFlags
		name string
	}{{DriftRegion, "region"}, {DriftFingerprint, "fingerprint"}, {DriftDuplicate, "duplicate-identity"}} {
		if f&b.bit != 0 {
			parts = append(parts, b.name)
		}
	}
	if rest := f &^ driftKnown; rest != 0 {
		parts = append(parts, fmt.Sprintf("0x%x", uint64(rest)))
	}
	return strings.Join(parts, "|")
}

// Proto is the transport protocol of a flow, as an IANA protocol number.
type Proto uint8

// Protocols a flow may use; any other number is refused.
const (
	ProtoICMP   Proto = 1
	ProtoTCP    Proto = 6
	ProtoUDP    Proto = 17
	ProtoICMPv6 Proto = 58
)

func (p Proto) String() string {
	switch p {
	case ProtoICMP:
		return "icmp"
	case ProtoTCP:
		return "tcp"
	case ProtoUDP:
		return "udp"
	case ProtoICMPv6:
		return "icmpv6"
	}
	return fmt.Sprintf("proto(%d)", uint8(p))
}

func (p Proto) known() bool {
	return p == ProtoICMP || p == ProtoTCP || p == ProtoUDP || p == ProtoICMPv6
}

// Destination names the flow's target inside the record's zone (claim 11). It is structured rather
// than a "agent.zone:port/proto" string so that nothing is parsed twice, and it carries no zone of its
// own: a tunnel carries exactly one zone (claim 2), which makes a cross-zone destination
// unrepresentable instead of something to check.
type Destination struct {
	Agent string // the destination agent's name within the zone
	Port  uint16 // 0 for ICMP
	Proto Proto
}

func (d Destination) String() string {
	// Built by hand: the audit log writes one per admitted flow.
	var buf [64]byte
	b := append(append(buf[:0], d.Agent...), ':')
	b = append(strconv.AppendUint(b, uint64(d.Port), 10), '/')
	return string(append(b, d.Proto.String()...))
}

// CertChain is the agent's certificate chain as DER: the node certificate (signed by the authority)
// and the agent certificate (signed by the node). The authority is the receiver's trust anchor and is
// never sent.
type CertChain struct {
	Node  []byte
	Agent []byte
}

// Hash is the chain hash used in claim 5: SHA-256 over the deterministic CBOR encoding of the
// two-element array [node DER, agent DER] (the same bytes claim 4 carries), so both sides compute it
// from one unambiguous form.
func (c CertChain) Hash() [HashLen]byte {
	// Two certificates fit the stack buffer; larger ones (up to MaxCertLen each) spill to the heap.
	var buf [2048]byte
	return sha256.Sum256(c.appendTo(buf[:0]))
}

// appendTo appends the chain as claim 4 carries it: [node DER, agent DER].
func (c CertChain) appendTo(b []byte) []byte {
	b = appendHead(b, majorArray, 2)
	return appendBytes(appendBytes(b, c.Node), c.Agent)
}

// Claims is the content of a DTL record. Exactly one of Chain and ChainHash is set.
type Claims struct {
	Version     uint64 // Version1; zero is filled in by Sign
	Zone        string
	Agent       string     // agent SPIFFE ID
	Chain       *CertChain // full chain, or nil when ChainHash names a chain the peer cached
	ChainHash   []byte     // 32 bytes, see CertChain.Hash
	Node        string     // node SPIFFE ID
	Fingerprint []byte     // 32-byte workload fingerprint
	Region      string     // optional: the node's region; empty when the node has none configured
	Trust       uint8      // 0..100
	Drift       DriftFlags
	Destination Destination
	FlowID      uint64
	Seq         uint64
	IssuedAt    time.Time // carried with millisecond precision
}

// Encoding and decoding modes of the reject frame body (records have their own codec, cbor.go).
// They are immutable after construction and safe for concurrent use.
var (
	encMode = mustEncMode()
	decMode = mustDecMode()
)

func mustEncMode() cbor.EncMode {
	m, err := cbor.CoreDetEncOptions().EncMode()
	if err != nil {
		panic(fmt.Sprintf("dtl: cbor encoder options: %v", err)) // static options; cannot fail at run time
	}
	return m
}

func mustDecMode() cbor.DecMode {
	m, err := cbor.DecOptions{
		DupMapKey:         cbor.DupMapKeyEnforcedAPF,
		IndefLength:       cbor.IndefLengthForbidden,
		TagsMd:            cbor.TagsForbidden,
		ExtraReturnErrors: cbor.ExtraDecErrorUnknownField,
		MaxNestedLevels:   8,
		MaxArrayElements:  16,
		MaxMapPairs:       32,
		UTF8:              cbor.UTF8RejectInvalid,
	}.DecMode()
	if err != nil {
		panic(fmt.Sprintf("dtl: cbor decoder options: %v", err))
	}
	return m
}

func u64(v uint64) *uint64 { return &v }

// Marshal returns the deterministic CBOR encoding of the claims after validating them, so that this
// code never emits a record its own Parse would refuse.
func (c *Claims) Marshal() ([]byte, error) {
	if err := c.checkEncodable(); err != nil {
		return nil, err
	}
	return c.appendTo(make([]byte, 0, c.encodedLenHint())), nil
}

func (c *Claims) checkEncodable() error {
	if err := c.validate(); err != nil {
		return err
	}
	if c.IssuedAt.UnixMilli() < 0 {
		return fmt.Errorf("%w: issued-at before 1970", ErrMalformed)
	}
	return nil
}

// encodedLenHint is an upper bound of the encoding's length for a buffer's capacity.
func (c *Claims) encodedLenHint() int {
	n := 96 + len(c.Zone) + len(c.Agent) + len(c.ChainHash) + len(c.Node) + len(c.Fingerprint) +
		len(c.Region) + len(c.Destination.Agent)
	if c.Chain != nil {
		n += 8 + len(c.Chain.Node) + len(c.Chain.Agent)
	}
	return n
}

// appendTo appends the deterministic CBOR encoding of c: a map with its integer keys in ascending
// order, every integer and length in its shortest form, and the empty text and byte strings of
// optional claims left out (docs/protocol.md §4). It does not validate; Marshal and Sign do.
func (c *Claims) appendTo(b []byte) []byte {
	n := uint64(7) // version, trust, drift, destination, flow id, sequence and issued-at are always sent
	for _, present := range [...]bool{c.Zone != "", c.Agent != "", c.Chain != nil, len(c.ChainHash) > 0,
		c.Node != "", len(c.Fingerprint) > 0, c.Region != ""} {
		if present {
			n++
		}
	}
	b = appendHead(b, majorMap, n)
	b = appendHead(appendHead(b, majorUint, KeyVersion), majorUint, c.Version)
	if c.Zone != "" {
		b = appendText(appendHead(b, majorUint, KeyZone), c.Zone)
	}
	if c.Agent != "" {
		b = appendText(appendHead(b, majorUint, KeyAgent), c.Agent)
	}
	if c.Chain != nil {
		b = c.Chain.appendTo(appendHead(b, majorUint, KeyChain))
	}
	if len(c.ChainHash) > 0 {
		b = appendBytes(appendHead(b, majorUint, KeyChainHash), c.ChainHash)
	}
	if c.Node != "" {
		b = appendText(appendHead(b, majorUint, KeyNode), c.Node)
	}
	if len(c.Fingerprint) > 0 {
		b = appendBytes(appendHead(b, majorUint, KeyFingerprint), c.Fingerprint)
	}
	if c.Region != "" {
		b = appendText(appendHead(b, majorUint, KeyRegion), c.Region)
	}
	b = appendHead(appendHead(b, majorUint, KeyTrust), majorUint, uint64(c.Trust))
	b = appendHead(appendHead(b, majorUint, KeyDrift), majorUint, uint64(c.Drift))
	b = appendHead(b, majorUint, KeyDestination)
	d := c.Destination
	if d.Agent != "" {
		b = appendText(appendHead(appendHead(b, majorMap, 3), majorUint, destKeyAgent), d.Agent)
	} else {
		b = appendHead(b, majorMap, 2)
	}
	b = appendHead(appendHead(b, majorUint, destKeyPort), majorUint, uint64(d.Port))
	b = appendHead(appendHead(b, majorUint, destKeyProto), majorUint, uint64(d.Proto))
	b = appendHead(appendHead(b, majorUint, KeyFlowID), majorUint, c.FlowID)
	b = appendHead(appendHead(b, majorUint, KeySeq), majorUint, c.Seq)
	return appendHead(appendHead(b, majorUint, KeyIssuedAt), majorUint, uint64(c.IssuedAt.UnixMilli()))
}

// Keys of the destination map (claim 11).
const (
	destKeyAgent = 1
	destKeyPort  = 2
	destKeyProto = 3
)

// Text claims are kept as offsets while decoding and turned into strings at the end, all sharing
// one allocation.
const (
	textZone = iota
	textAgent
	textNode
	textRegion
	textDestAgent
	textCount
)

type span struct{ start, end int }

// unmarshalClaims decodes b into c strictly: a definite-length map of the defined claims only
// (unknown keys are ErrUnknownClaim, repeated ones ErrDuplicateKey), every value of its one type,
// and nothing but the deterministic encoding (ascending keys, shortest integers and lengths, no
// empty optional claim), so that each claim set has exactly one valid encoding and hashes, logs and
// caches stay unambiguous. The signature is checked over the received bytes regardless. Byte-string
// claims alias b; text claims share one new string.
func unmarshalClaims(b []byte, c *Claims) error {
	if len(b) == 0 || b[0]>>5 != majorMap {
		return fmt.Errorf("%w: claims are not a CBOR map", ErrMalformed)
	}
	r := reader{b: b}
	n, err := r.count("claims", majorMap)
	if err != nil {
		return err
	}
	var (
		text                [textCount]span
		seen, destSeen      uint32
		last                uint64
		version, trust      uint64
		drift, port, proto  uint64
		flow, seq, issuedAt uint64
		chain               *CertChain
	)
	readText := func(what string, slot int) error {
		s, e, err := r.str(what, majorText)
		text[slot] = span{s, e}
		return err
	}
	for range n {
		k, err := r.key("claims key", KeyIssuedAt, &seen, &last)
		if err != nil {
			return err
		}
		switch k {
		case KeyVersion:
			version, err = r.uint("version (key 1)")
		case KeyZone:
			err = readText("zone (key 2)", textZone)
		case KeyAgent:
			err = readText("agent ID (key 3)", textAgent)
		case KeyChain:
			chain, err = r.chain()
		case KeyChainHash:
			c.ChainHash, err = r.bytes("chain hash (key 5)")
		case KeyNode:
			err = readText("node ID (key 6)", textNode)
		case KeyFingerprint:
			c.Fingerprint, err = r.bytes("workload fingerprint (key 7)")
		case KeyRegion:
			err = readText("region (key 8)", textRegion)
		case KeyTrust:
			trust, err = r.uint("trust score (key 9)")
		case KeyDrift:
			drift, err = r.uint("drift flags (key 10)")
		case KeyDestination:
			err = r.destination(&destSeen, &port, &proto, &text[textDestAgent])
		case KeyFlowID:
			flow, err = r.uint("flow id (key 12)")
		case KeySeq:
			seq, err = r.uint("sequence number (key 13)")
		case KeyIssuedAt:
			issuedAt, err = r.uint("issued-at (key 14)")
		}
		if err != nil {
			return err
		}
	}
	if !r.done() {
		return fmt.Errorf("%w: claims: %d bytes after the map", ErrMalformed, len(b)-r.i)
	}
	missing := func(name string, key int) error {
		return fmt.Errorf("%w: %s (key %d)", ErrMissingClaim, name, key)
	}
	has := func(k int) bool { return seen&(1<<k) != 0 }
	switch {
	case !has(KeyVersion):
		return missing("version", KeyVersion)
	case version != Version1:
		return fmt.Errorf("%w: %d (this node speaks %d)", ErrVersion, version, Version1)
	case !has(KeyTrust):
		return missing("trust score", KeyTrust)
	case !has(KeyDrift):
		return missing("drift flags", KeyDrift)
	case !has(KeyDestination):
		return missing("destination", KeyDestination)
	case destSeen&(1<<destKeyPort) == 0:
		return missing("destination port", KeyDestination)
	case destSeen&(1<<destKeyProto) == 0:
		return missing("destination protocol", KeyDestination)
	case !has(KeyFlowID):
		return missing("flow id", KeyFlowID)
	case !has(KeySeq):
		return missing("sequence number", KeySeq)
	case !has(KeyIssuedAt):
		return missing("issued-at", KeyIssuedAt)
	case trust > MaxTrust:
		return fmt.Errorf("%w: trust score %d is outside 0..%d", ErrMalformed, trust, MaxTrust)
	case port > 0xffff:
		return fmt.Errorf("%w: destination port %d is outside 0..65535", ErrMalformed, port)
	case proto > 0xff:
		return fmt.Errorf("%w: destination protocol %d is outside 0..255", ErrMalformed, proto)
	case issuedAt > 1<<53:
		return fmt.Errorf("%w: issued-at %d ms is out of range", ErrMalformed, issuedAt)
	}
	var strs [textCount]string
	setStrings(b, &text, &strs)
	c.Version = version
	c.Zone, c.Agent, c.Node, c.Region = strs[textZone], strs[textAgent], strs[textNode], strs[textRegion]
	c.Chain = chain
	c.Trust = uint8(trust)
	c.Drift = DriftFlags(drift)
	c.Destination = Destination{Agent: strs[textDestAgent], Port: uint16(port), Proto: Proto(proto)}
	c.FlowID, c.Seq = flow, seq
	c.IssuedAt = time.UnixMilli(int64(issuedAt))
	if err := c.validate(); err != nil {
		return err
	}
	// The one claim that validate lets through empty is the optional region; sent empty, it is not
	// the deterministic encoding, which leaves it out.
	if has(KeyRegion) && c.Region == "" {
		return fmt.Errorf("%w: empty region (key %d) must be left out; not in deterministic CBOR encoding", ErrMalformed, KeyRegion)
	}
	return nil
}

// setStrings turns the text spans of b into strings backed by a single allocation.
func setStrings(b []byte, spans *[textCount]span, out *[textCount]string) {
	total := 0
	for _, s := range spans {
		total += s.end - s.start
	}
	if total == 0 {
		return
	}
	var sb strings.Builder
	sb.Grow(total)
	for _, s := range spans {
		sb.Write(b[s.start:s.end])
	}
	all := sb.String()
	off := 0
	for i, s := range spans {
		n := s.end - s.start
		out[i] = all[off : off+n]
		off += n
	}
}

// chain reads claim 4: exactly [node DER, agent DER].
func (r *reader) chain() (*CertChain, error) {
	n, err := r.count("certificate chain (key 4)", majorArray)
	if err != nil {
		return nil, err
	}
	if n != 2 {
		return nil, fmt.Errorf("%w: certificate chain has %d elements, want [node, agent]", ErrMalformed, n)
	}
	node, err := r.bytes("node certificate (key 4)")
	if err != nil {
		return nil, err
	}
	agent, err := r.bytes("agent certificate (key 4)")
	if err != nil {
		return nil, err
	}
	return &CertChain{Node: node, Agent: agent}, nil
}

// destination reads claim 11: {1: agent name, 2: port, 3: protocol}.
func (r *reader) destination(seen *uint32, port, proto *uint64, agent *span) error {
	n, err := r.count("destination (key 11)", majorMap)
	if err != nil {
		return err
	}
	var last uint64
	for range n {
		k, err := r.key("destination key", destKeyProto, seen, &last)
		if err != nil {
			return err
		}
		switch k {
		case destKeyAgent:
			agent.start, agent.end, err = r.str("destination agent (key 11)", majorText)
		case destKeyPort:
			*port, err = r.uint("destination port (key 11)")
		case destKeyProto:
			*proto, err = r.uint("destination protocol (key 11)")
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// validate checks presence and bounds of every claim; it is shared by the encoder and the decoder.
func (c *Claims) validate() error {
	if c.Version != Version1 {
		return fmt.Errorf("%w: %d (this node speaks %d)", ErrVersion, c.Version, Version1)
	}
	if err := checkText("zone", KeyZone, c.Zone, MaxZoneLen, true); err != nil {
		return err
	}
	if err := checkSPIFFE("agent ID", KeyAgent, c.Agent); err != nil {
		return err
	}
	if err := checkSPIFFE("node ID", KeyNode, c.Node); err != nil {
		return err
	}
	switch {
	case c.Chain != nil && c.ChainHash != nil:
		return fmt.Errorf("%w: both certificate chain (key 4) and chain hash (key 5); send exactly one", ErrMalformed)
	case c.Chain == nil && c.ChainHash == nil:
		return fmt.Errorf("%w: certificate chain (key 4) or chain hash (key 5)", ErrMissingClaim)
	case c.Chain != nil:
		for _, der := range []struct {
			name string
			b    []byte
		}{{"node certificate", c.Chain.Node}, {"agent certificate", c.Chain.Agent}} {
			if len(der.b) == 0 {
				return fmt.Errorf("%w: %s in chain (key 4) is empty", ErrMissingClaim, der.name)
			}
			if len(der.b) > MaxCertLen {
				return fmt.Errorf("%w: %s is %d bytes, limit %d", ErrTooLarge, der.name, len(der.b), MaxCertLen)
			}
		}
	case len(c.ChainHash) != HashLen:
		return fmt.Errorf("%w: chain hash (key 5) is %d bytes, want %d", ErrMalformed, len(c.ChainHash), HashLen)
	}
	if len(c.Fingerprint) == 0 {
		return fmt.Errorf("%w: workload fingerprint (key %d)", ErrMissingClaim, KeyFingerprint)
	}
	if len(c.Fingerprint) != HashLen {
		return fmt.Errorf("%w: workload fingerprint (key %d) is %d bytes, want %d", ErrMalformed, KeyFingerprint, len(c.Fingerprint), HashLen)
	}
	if err := checkText("region", KeyRegion, c.Region, MaxRegionLen, false); err != nil {
		return err
	}
	if c.Trust > MaxTrust {
		return fmt.Errorf("%w: trust score %d is outside 0..%d", ErrMalformed, c.Trust, MaxTrust)
	}
	if c.Drift&^driftKnown != 0 {
		return fmt.Errorf("%w: unknown drift flag bits %s", ErrMalformed, c.Drift&^driftKnown)
	}
	if err := checkText("destination agent", KeyDestination, c.Destination.Agent, MaxNameLen, true); err != nil {
		return err
	}
	if !c.Destination.Proto.known() {
		return fmt.Errorf("%w: destination protocol %d is not icmp, tcp, udp or icmpv6", ErrMalformed, c.Destination.Proto)
	}
	if c.IssuedAt.IsZero() {
		return fmt.Errorf("%w: issued-at (key %d)", ErrMissingClaim, KeyIssuedAt)
	}
	return nil
}

func checkText(name string, key int, s string, limit int, required bool) error {
	if s == "" {
		if required {
			return fmt.Errorf("%w: %s (key %d)", ErrMissingClaim, name, key)
		}
		return nil
	}
	if len(s) > limit {
		return fmt.Errorf("%w: %s (key %d) is %d bytes, limit %d", ErrTooLarge, name, key, len(s), limit)
	}
	if !utf8.ValidString(s) {
		return fmt.Errorf("%w: %s (key %d) is not UTF-8", ErrMalformed, name, key)
	}
	for _, r := range s {
		if r < 0x20 || r == 0x7f {
			return fmt.Errorf("%w: %s (key %d) contains a control character", ErrMalformed, name, key)
		}
	}
	return nil
}

// checkSPIFFE bounds and shape-checks an ID without parsing it: full SPIFFE validation belongs to
// the identity package, and the ID is compared to the verified certificate during admission anyway.
func checkSPIFFE(name string, key int, s string) error {
	if err := checkText(name, key, s, MaxIDLen, true); err != nil {
		return err
	}
	if !strings.HasPrefix(s, "spiffe://") {
		return fmt.Errorf("%w: %s (key %d) %q is not a spiffe:// URI", ErrMalformed, name, key, s)
	}
	return nil
}

// classifyCBOR maps decoder errors onto this package's sentinels, keeping the decoder's detail.
func classifyCBOR(what string, err error) error {
	var (
		dup     *cbor.DupMapKeyError
		unknown *cbor.UnknownFieldError
		indef   *cbor.IndefiniteLengthError
	)
	switch {
	case errors.As(err, &dup):
		return fmt.Errorf("%w in %s: %v", ErrDuplicateKey, what, err)
	case errors.As(err, &unknown):
		return fmt.Errorf("%w in %s: %v", ErrUnknownClaim, what, err)
	case errors.As(err, &indef):
		return fmt.Errorf("%w in %s: %v", ErrIndefinite, what, err)
	}
	return fmt.Errorf("%w: %s: %v", ErrMalformed, what, err)
}
