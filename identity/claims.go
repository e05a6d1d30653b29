package identity

import (
	"bytes"
	"encoding/asn1"
	"errors"
	"fmt"
	"math/big"
	"net/netip"
	"slices"

	"github.com/fxamacker/cbor/v2"
)

// OIDClaims is the private OID of the UTE claims extension.
//
// UTE has no IANA Private Enterprise Number yet. Until it does, its arc is 1.3.6.1.4.1.32473.7,
// under the PEN that RFC 5612 reserves for documentation: that PEN belongs to no organisation, so
// the extension cannot collide with anyone's real one. Registering a PEN changes this OID and is a
// breaking change of the certificate profile (see docs/identity.md).
//
// The extension is not critical, so that verifiers that do not know it (crypto/x509, go-spiffe,
// OpenSSL) can still validate the path: UTE's own Verifier requires it on every node, issuing and
// agent certificate and enforces what it says. docs/identity.md explains the trade.
var OIDClaims = asn1.ObjectIdentifier{1, 3, 6, 1, 4, 1, 32473, 7, 1}

// ErrClaims marks a claims extension that is missing, malformed or inconsistent with its
// certificate. It is also a verification sentinel.
var ErrClaims = errors.New("invalid UTE claims")

// Limits on the claims extension. They bound decoding work on untrusted bytes and are far above
// what a real node or agent needs.
const (
	MaxClaimsSize    = 4 << 10
	maxZones         = 64
	maxPrefixes      = 16
	maxOverlayIPs    = 16
	maxRegions       = 16
	maxLabels        = 32
	maxLabelKeyLen   = 63
	maxLabelValueLen = 255
	digestLen        = 32
	wgKeyLen         = 32
)

// ZoneGrant is a zone a node holds, with the overlay CIDRs inside which it may give its agents IPs.
type ZoneGrant struct {
	Name     string
	Prefixes []netip.Prefix
}

// Claims is the content of the UTE claims extension.
type Claims struct {
	Zones        []ZoneGrant       // node: its zones and CIDRs; agent: exactly one, its own zone
	OverlayIPs   []netip.Addr      // agent: its overlay IP(s)
	Regions      []string          // allowed regions (node: its region(s))
	Fingerprint  []byte            // 32-byte digest: host fingerprint (node) / workload fingerprint (agent)
	WireGuardKey []byte            // node only: its WireGuard public key, 32 bytes, or empty
	Labels       map[string]string // agent labels used by policy selectors
	// Node and NodeSerial appear on a node's issuing certificate only: the node it belongs to
	// and the serial of the node certificate it was issued with. They bind what the issuing key
	// signs to that node (admission, revocation by node serial) although the issuing
	// certificate's URI SAN is the bare trust domain, as SPIFFE requires of signing certificates.
	Node       string
	NodeSerial *big.Int
}

// Zone returns the grant for the named zone.
func (c Claims) Zone(name string) (ZoneGrant, bool) {
	for _, z := range c.Zones {
		if z.Name == name {
			return z, true
		}
	}
	return ZoneGrant{}, false
}

// ZoneNames lists the zone names in claim order.
func (c Claims) ZoneNames() []string {
	out := make([]string, len(c.Zones))
	for i, z := range c.Zones {
		out[i] = z.Name
	}
	return out
}

// Contains reports whether addr lies inside one of the grant's prefixes.
func (g ZoneGrant) Contains(addr netip.Addr) bool {
	for _, p := range g.Prefixes {
		if p.Contains(addr) {
			return true
		}
	}
	return false
}

// covers reports whether p lies wholly inside one of the grant's prefixes.
func (g ZoneGrant) covers(p netip.Prefix) bool {
	for _, q := range g.Prefixes {
		if q.Bits() <= p.Bits() && q.Contains(p.Addr()) {
			return true
		}
	}
	return false
}

// Wire form. Integer keys keep the extension small; omitempty plus the deterministic encoder give
// one byte string per Claims value. Addresses and prefixes travel as their canonical text so that
// the decoder can insist on exactly one spelling of each.
type claimsWire struct {
	Zones        []zoneGrantWire   `cbor:"1,keyasint,omitempty"`
	OverlayIPs   []string          `cbor:"2,keyasint,omitempty"`
	Regions      []string          `cbor:"3,keyasint,omitempty"`
	Fingerprint  []byte            `cbor:"4,keyasint,omitempty"`
	WireGuardKey []byte            `cbor:"5,keyasint,omitempty"`
	Labels       map[string]string `cbor:"6,keyasint,omitempty"`
	Node         string            `cbor:"7,keyasint,omitempty"`
	NodeSerial   []byte            `cbor:"8,keyasint,omitempty"`
}

type zoneGrantWire struct {
	Name     string   `cbor:"1,keyasint"`
	Prefixes []string `cbor:"2,keyasint,omitempty"`
}

// codec holds the CBOR modes. They are immutable after construction and safe for concurrent use.
type codec struct {
	enc cbor.EncMode
	dec cbor.DecMode
}

var claimsCodec = mustCodec()

func mustCodec() codec {
	enc, err := cbor.CoreDetEncOptions().EncMode()
	if err != nil {
		panic(err) // static options; cannot fail at run time
	}
	dec, err := cbor.DecOptions{
		DupMapKey:         cbor.DupMapKeyEnforcedAPF,
		IndefLength:       cbor.IndefLengthForbidden,
		TagsMd:            cbor.TagsForbidden,
		ExtraReturnErrors: cbor.ExtraDecErrorUnknownField,
		MaxNestedLevels:   8,
		MaxArrayElements:  256,
		MaxMapPairs:       64,
		UTF8:              cbor.UTF8RejectInvalid,
	}.DecMode()
	if err != nil {
		panic(err)
	}
	return codec{enc: enc, dec: dec}
}

// Validate checks the claims on their own: sizes, formats, canonical prefixes, no duplicates. The
// per-kind rules (what a node or an agent must carry) are checked by ValidateFor.
func (c Claims) Validate() error {
	if len(c.Zones) > maxZones {
		return fmt.Errorf("%w: %d zones; the limit is %d", ErrClaims, len(c.Zones), maxZones)
	}
	seen := map[string]bool{}
	for _, z := range c.Zones {
		if err := checkLabel(z.Name); err != nil {
			return fmt.Errorf("%w: zone name %q %s", ErrClaims, z.Name, err.Error())
		}
		if seen[z.Name] {
			return fmt.Errorf("%w: zone %q appears twice", ErrClaims, z.Name)
		}
		seen[z.Name] = true
		if len(z.Prefixes) > maxPrefixes {
			return fmt.Errorf("%w: zone %q has %d prefixes; the limit is %d", ErrClaims, z.Name, len(z.Prefixes), maxPrefixes)
		}
		for i, p := range z.Prefixes {
			if !p.IsValid() || p.Addr().Zone() != "" || p.Addr().Is4In6() {
				return fmt.Errorf("%w: zone %q prefix %d is not a valid CIDR", ErrClaims, z.Name, i)
			}
			if p.Masked() != p {
				return fmt.Errorf("%w: zone %q prefix %s has host bits set; use %s", ErrClaims, z.Name, p, p.Masked())
			}
			if slices.Contains(z.Prefixes[:i], p) {
				return fmt.Errorf("%w: zone %q lists prefix %s twice", ErrClaims, z.Name, p)
			}
		}
	}
	if len(c.OverlayIPs) > maxOverlayIPs {
		return fmt.Errorf("%w: %d overlay IPs; the limit is %d", ErrClaims, len(c.OverlayIPs), maxOverlayIPs)
	}
	for i, a := range c.OverlayIPs {
		if !a.IsValid() || a.Zone() != "" || a.Is4In6() || a.IsUnspecified() {
			return fmt.Errorf("%w: overlay IP %d (%s) is not a usable unicast address", ErrClaims, i, a)
		}
		if slices.Contains(c.OverlayIPs[:i], a) {
			return fmt.Errorf("%w: overlay IP %s appears twice", ErrClaims, a)
		}
	}
	if len(c.Regions) > maxRegions {
		return fmt.Errorf("%w: %d regions; the limit is %d", ErrClaims, len(c.Regions), maxRegions)
	}
	for i, r := range c.Regions {
		if err := checkLabel(r); err != nil {
			return fmt.Errorf("%w: region %q %s", ErrClaims, r, err.Error())
		}
		if slices.Contains(c.Regions[:i], r) {
			return fmt.Errorf("%w: region %q appears twice", ErrClaims, r)
		}
	}
	if n := len(c.Fingerprint); n != 0 && n != digestLen {
		return fmt.Errorf("%w: fingerprint is %d bytes; want %d", ErrClaims, n, digestLen)
	}
	if n := len(c.WireGuardKey); n != 0 && n != wgKeyLen {
		return fmt.Errorf("%w: WireGuard key is %d bytes; want %d", ErrClaims, n, wgKeyLen)
	}
	if c.Node != "" {
		if err := checkLabel(c.Node); err != nil {
			return fmt.Errorf("%w: node name %q %s", ErrClaims, c.Node, err.Error())
		}
	}
	if c.NodeSerial != nil && (c.NodeSerial.Sign() <= 0 || c.NodeSerial.BitLen() > 159) {
		return fmt.Errorf("%w: node serial must be positive and at most 159 bits", ErrClaims)
	}
	if len(c.Labels) > maxLabels {
		return fmt.Errorf("%w: %d labels; the limit is %d", ErrClaims, len(c.Labels), maxLabels)
	}
	for k, v := range c.Labels {
		if err := checkLabelKey(k); err != nil {
			return fmt.Errorf("%w: label key %q %s", ErrClaims, k, err.Error())
		}
		if len(v) > maxLabelValueLen {
			return fmt.Errorf("%w: label %q value is %d bytes; the limit is %d", ErrClaims, k, len(v), maxLabelValueLen)
		}
		for _, r := range v {
			if r < 0x20 || r == 0x7f {
				return fmt.Errorf("%w: label %q value contains a control character", ErrClaims, k)
			}
		}
	}
	return nil
}

// checkLabelKey allows the Kubernetes-like label key alphabet: lowercase letters, digits, '-', '_',
// '.', '/'.
func checkLabelKey(k string) error {
	if k == "" || len(k) > maxLabelKeyLen {
		return fmt.Errorf("must be 1-%d characters", maxLabelKeyLen)
	}
	for i := 0; i < len(k); i++ {
		c := k[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.' || c == '/') {
			return fmt.Errorf("contains %q; use lowercase letters, digits, '-', '_', '.', '/'", rune(c))
		}
	}
	return nil
}

// ValidateFor checks the claims a certificate of the given ID must carry, on top of Validate:
//   - node: at least one zone, each with at least one prefix; no overlay IPs or labels;
//     a 32-byte host fingerprint; WireGuard key empty or 32 bytes.
//   - agent: exactly one zone, named as in the ID; at least one overlay IP; a 32-byte workload
//     fingerprint; no WireGuard key.
//   - authority: no claims at all.
//
// Node and NodeSerial belong to issuing certificates only (ValidateIssuer); every kind here
// refuses them.
func (c Claims) ValidateFor(id ID) error {
	if err := c.Validate(); err != nil {
		return err
	}
	if c.Node != "" || c.NodeSerial != nil {
		return fmt.Errorf("%w: %s carries the node name or serial of an issuing certificate", ErrClaims, id)
	}
	switch id.Kind {
	case KindAuthority:
		if !c.isEmpty() {
			return fmt.Errorf("%w: an authority certificate carries no claims", ErrClaims)
		}
	case KindNode:
		if len(c.Zones) == 0 {
			return fmt.Errorf("%w: node %s holds no zone", ErrClaims, id)
		}
		for _, z := range c.Zones {
			if len(z.Prefixes) == 0 {
				return fmt.Errorf("%w: node %s zone %q has no CIDR", ErrClaims, id, z.Name)
			}
		}
		if len(c.OverlayIPs) != 0 || len(c.Labels) != 0 {
			return fmt.Errorf("%w: node %s must not carry overlay IPs or labels", ErrClaims, id)
		}
		if len(c.Fingerprint) != digestLen {
			return fmt.Errorf("%w: node %s has no %d-byte host fingerprint", ErrClaims, id, digestLen)
		}
	case KindAgent:
		if len(c.Zones) != 1 {
			return fmt.Errorf("%w: agent %s must carry exactly one zone, has %d", ErrClaims, id, len(c.Zones))
		}
		if c.Zones[0].Name != id.Zone {
			return fmt.Errorf("%w: agent %s claims zone %q but its ID names zone %q", ErrClaims, id, c.Zones[0].Name, id.Zone)
		}
		if len(c.OverlayIPs) == 0 {
			return fmt.Errorf("%w: agent %s has no overlay IP", ErrClaims, id)
		}
		if len(c.Fingerprint) != digestLen {
			return fmt.Errorf("%w: agent %s has no %d-byte workload fingerprint", ErrClaims, id, digestLen)
		}
		if len(c.WireGuardKey) != 0 {
			return fmt.Errorf("%w: agent %s must not carry a WireGuard key", ErrClaims, id)
		}
	default:
		return fmt.Errorf("%w: %w: unknown kind", ErrClaims, ErrSPIFFEID)
	}
	return nil
}

// ValidateIssuer checks the claims of node's issuing certificate: its node's zones, each with at
// least one prefix (what it may grant its agents), the node's name and its certificate's serial;
// regions allowed; nothing else.
func (c Claims) ValidateIssuer(node ID) error {
	if err := c.Validate(); err != nil {
		return err
	}
	if node.Kind != KindNode || c.Node != node.Name {
		return fmt.Errorf("%w: issuing certificate names node %q, expected %s", ErrClaims, c.Node, node)
	}
	if c.NodeSerial == nil {
		return fmt.Errorf("%w: issuing certificate of %s does not name its node certificate's serial", ErrClaims, node)
	}
	if len(c.Zones) == 0 {
		return fmt.Errorf("%w: issuing certificate of %s holds no zone", ErrClaims, node)
	}
	for _, z := range c.Zones {
		if len(z.Prefixes) == 0 {
			return fmt.Errorf("%w: issuing certificate of %s: zone %q has no CIDR", ErrClaims, node, z.Name)
		}
	}
	if len(c.OverlayIPs) != 0 || len(c.Labels) != 0 || len(c.Fingerprint) != 0 || len(c.WireGuardKey) != 0 {
		return fmt.Errorf("%w: issuing certificate of %s must carry only zones, regions, node name and serial", ErrClaims, node)
	}
	return nil
}

func (c Claims) isEmpty() bool {
	return len(c.Zones) == 0 && len(c.OverlayIPs) == 0 && len(c.Regions) == 0 &&
		len(c.Fingerprint) == 0 && len(c.WireGuardKey) == 0 && len(c.Labels) == 0 &&
		c.Node == "" && c.NodeSerial == nil
}

// MarshalClaims validates c and encodes it as deterministic CBOR (RFC 8949 core deterministic
// encoding). Equal claims always produce equal bytes, except that the order of Zones, OverlayIPs,
// Regions and prefixes is kept as given: order is meaningful to callers (first zone first).
func MarshalClaims(c Claims) ([]byte, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	w := claimsWire{
		Regions:      c.Regions,
		Fingerprint:  c.Fingerprint,
		WireGuardKey: c.WireGuardKey,
		Labels:       c.Labels,
		Node:         c.Node,
	}
	if c.NodeSerial != nil {
		w.NodeSerial = c.NodeSerial.Bytes()
	}
	for _, z := range c.Zones {
		zw := zoneGrantWire{Name: z.Name}
		for _, p := range z.Prefixes {
			zw.Prefixes = append(zw.Prefixes, p.String())
		}
		w.Zones = append(w.Zones, zw)
	}
	for _, a := range c.OverlayIPs {
		w.OverlayIPs = append(w.OverlayIPs, a.String())
	}
	b, err := claimsCodec.enc.Marshal(w)
	if err != nil {
		return nil, fmt.Errorf("%w: encode: %w", ErrClaims, err)
	}
	if len(b) > MaxClaimsSize {
		return nil, fmt.Errorf("%w: encoded claims are %d bytes; the limit is %d", ErrClaims, len(b), MaxClaimsSize)
	}
	return b, nil
}

// ParseClaims decodes the claims extension strictly: at most MaxClaimsSize bytes, no duplicate map
// keys, no indefinite lengths, no tags, no unknown fields, canonical addresses and prefixes, and the
// exact deterministic encoding (re-encoding must reproduce the input), so that one claims value has
// exactly one byte form. Errors wrap ErrClaims.
func ParseClaims(b []byte) (Claims, error) {
	if len(b) > MaxClaimsSize {
		return Claims{}, fmt.Errorf("%w: extension is %d bytes; the limit is %d", ErrClaims, len(b), MaxClaimsSize)
	}
	if len(b) == 0 {
		return Claims{}, fmt.Errorf("%w: extension is empty", ErrClaims)
	}
	var w claimsWire
	if err := claimsCodec.dec.Unmarshal(b, &w); err != nil {
		return Claims{}, fmt.Errorf("%w: decode: %w", ErrClaims, err)
	}
	c := Claims{
		Regions:      w.Regions,
		Fingerprint:  w.Fingerprint,
		WireGuardKey: w.WireGuardKey,
		Labels:       w.Labels,
		Node:         w.Node,
	}
	if len(w.NodeSerial) > 0 {
		// A leading zero byte is not minimal; re-encoding below refuses it.
		c.NodeSerial = new(big.Int).SetBytes(w.NodeSerial)
	}
	for _, zw := range w.Zones {
		z := ZoneGrant{Name: zw.Name}
		for _, s := range zw.Prefixes {
			p, err := netip.ParsePrefix(s)
			if err != nil || p.String() != s {
				return Claims{}, fmt.Errorf("%w: zone %q prefix %q is not a canonical CIDR", ErrClaims, zw.Name, s)
			}
			z.Prefixes = append(z.Prefixes, p)
		}
		c.Zones = append(c.Zones, z)
	}
	for _, s := range w.OverlayIPs {
		a, err := netip.ParseAddr(s)
		if err != nil || a.String() != s {
			return Claims{}, fmt.Errorf("%w: overlay IP %q is not a canonical address", ErrClaims, s)
		}
		c.OverlayIPs = append(c.OverlayIPs, a)
	}
	if err := c.Validate(); err != nil {
		return Claims{}, err
	}
	again, err := MarshalClaims(c)
	if err != nil {
		return Claims{}, err
	}
	if !bytes.Equal(again, b) {
		return Claims{}, fmt.Errorf("%w: not in deterministic CBOR encoding", ErrClaims)
	}
	return c, nil
}
