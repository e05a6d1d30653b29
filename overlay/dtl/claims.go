package dtl

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
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
	return fmt.Sprintf("%s:%d/%s", d.Agent, d.Port, d.Proto)
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
	// Marshalling two byte strings cannot fail.
	b, _ := encMode.Marshal([][]byte{c.Node, c.Agent})
	return sha256.Sum256(b)
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

// wireClaims is the CBOR shape of Claims. Pointers mark claims whose zero value is legitimate, so
// that "absent" and "zero" stay distinguishable on decode (absent is refused, I7).
type wireClaims struct {
	Version     *uint64   `cbor:"1,keyasint,omitempty"`
	Zone        string    `cbor:"2,keyasint,omitempty"`
	Agent       string    `cbor:"3,keyasint,omitempty"`
	Chain       [][]byte  `cbor:"4,keyasint,omitempty"`
	ChainHash   []byte    `cbor:"5,keyasint,omitempty"`
	Node        string    `cbor:"6,keyasint,omitempty"`
	Fingerprint []byte    `cbor:"7,keyasint,omitempty"`
	Region      string    `cbor:"8,keyasint,omitempty"`
	Trust       *uint64   `cbor:"9,keyasint,omitempty"`
	Drift       *uint64   `cbor:"10,keyasint,omitempty"`
	Destination *wireDest `cbor:"11,keyasint,omitempty"`
	FlowID      *uint64   `cbor:"12,keyasint,omitempty"`
	Seq         *uint64   `cbor:"13,keyasint,omitempty"`
	IssuedAt    *uint64   `cbor:"14,keyasint,omitempty"`
}

type wireDest struct {
	Agent string  `cbor:"1,keyasint,omitempty"`
	Port  *uint64 `cbor:"2,keyasint,omitempty"`
	Proto *uint64 `cbor:"3,keyasint,omitempty"`
}

// Encoding and decoding modes are immutable after construction and safe for concurrent use.
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

func (c *Claims) toWire() *wireClaims {
	w := &wireClaims{
		Version:     u64(c.Version),
		Zone:        c.Zone,
		Agent:       c.Agent,
		ChainHash:   c.ChainHash,
		Node:        c.Node,
		Fingerprint: c.Fingerprint,
		Region:      c.Region,
		Trust:       u64(uint64(c.Trust)),
		Drift:       u64(uint64(c.Drift)),
		Destination: &wireDest{
			Agent: c.Destination.Agent,
			Port:  u64(uint64(c.Destination.Port)),
			Proto: u64(uint64(c.Destination.Proto)),
		},
		FlowID:   u64(c.FlowID),
		Seq:      u64(c.Seq),
		IssuedAt: u64(uint64(c.IssuedAt.UnixMilli())),
	}
	if c.Chain != nil {
		w.Chain = [][]byte{c.Chain.Node, c.Chain.Agent}
	}
	return w
}

// Marshal returns the deterministic CBOR encoding of the claims after validating them, so that this
// code never emits a record its own Parse would refuse.
func (c *Claims) Marshal() ([]byte, error) {
	if err := c.validate(); err != nil {
		return nil, err
	}
	if c.IssuedAt.UnixMilli() < 0 {
		return nil, fmt.Errorf("%w: issued-at before 1970", ErrMalformed)
	}
	b, err := encMode.Marshal(c.toWire())
	if err != nil {
		return nil, fmt.Errorf("dtl: encode claims: %w", err)
	}
	return b, nil
}

// unmarshalClaims decodes strictly and refuses any encoding that is not the deterministic one: the
// signature is checked over the received bytes anyway, but a single valid encoding per claim set keeps
// hashes, logs and caches unambiguous.
func unmarshalClaims(b []byte) (*Claims, error) {
	if len(b) == 0 || b[0]>>5 != 5 {
		return nil, fmt.Errorf("%w: claims are not a CBOR map", ErrMalformed)
	}
	var w wireClaims
	if err := decMode.Unmarshal(b, &w); err != nil {
		return nil, classifyCBOR("claims", err)
	}
	c, err := w.toClaims()
	if err != nil {
		return nil, err
	}
	re, err := encMode.Marshal(&w)
	if err != nil || !bytes.Equal(re, b) {
		return nil, fmt.Errorf("%w: claims are not in deterministic CBOR encoding", ErrMalformed)
	}
	return c, nil
}

func (w *wireClaims) toClaims() (*Claims, error) {
	missing := func(name string, key int) error {
		return fmt.Errorf("%w: %s (key %d)", ErrMissingClaim, name, key)
	}
	switch {
	case w.Version == nil:
		return nil, missing("version", KeyVersion)
	case *w.Version != Version1:
		return nil, fmt.Errorf("%w: %d (this node speaks %d)", ErrVersion, *w.Version, Version1)
	case w.Trust == nil:
		return nil, missing("trust score", KeyTrust)
	case w.Drift == nil:
		return nil, missing("drift flags", KeyDrift)
	case w.Destination == nil:
		return nil, missing("destination", KeyDestination)
	case w.Destination.Port == nil:
		return nil, missing("destination port", KeyDestination)
	case w.Destination.Proto == nil:
		return nil, missing("destination protocol", KeyDestination)
	case w.FlowID == nil:
		return nil, missing("flow id", KeyFlowID)
	case w.Seq == nil:
		return nil, missing("sequence number", KeySeq)
	case w.IssuedAt == nil:
		return nil, missing("issued-at", KeyIssuedAt)
	case *w.Trust > MaxTrust:
		return nil, fmt.Errorf("%w: trust score %d is outside 0..%d", ErrMalformed, *w.Trust, MaxTrust)
	case *w.Destination.Port > 0xffff:
		return nil, fmt.Errorf("%w: destination port %d is outside 0..65535", ErrMalformed, *w.Destination.Port)
	case *w.Destination.Proto > 0xff:
		return nil, fmt.Errorf("%w: destination protocol %d is outside 0..255", ErrMalformed, *w.Destination.Proto)
	case *w.IssuedAt > 1<<53:
		return nil, fmt.Errorf("%w: issued-at %d ms is out of range", ErrMalformed, *w.IssuedAt)
	}
	c := &Claims{
		Version:     *w.Version,
		Zone:        w.Zone,
		Agent:       w.Agent,
		ChainHash:   w.ChainHash,
		Node:        w.Node,
		Fingerprint: w.Fingerprint,
		Region:      w.Region,
		Trust:       uint8(*w.Trust),
		Drift:       DriftFlags(*w.Drift),
		Destination: Destination{
			Agent: w.Destination.Agent,
			Port:  uint16(*w.Destination.Port),
			Proto: Proto(*w.Destination.Proto),
		},
		FlowID:   *w.FlowID,
		Seq:      *w.Seq,
		IssuedAt: time.UnixMilli(int64(*w.IssuedAt)),
	}
	if w.Chain != nil {
		if len(w.Chain) != 2 {
			return nil, fmt.Errorf("%w: certificate chain has %d elements, want [node, agent]", ErrMalformed, len(w.Chain))
		}
		c.Chain = &CertChain{Node: w.Chain[0], Agent: w.Chain[1]}
	}
	if err := c.validate(); err != nil {
		return nil, err
	}
	return c, nil
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
