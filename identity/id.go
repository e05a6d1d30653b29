package identity

import (
	"errors"
	"fmt"
	"strings"
	"unicode/utf8"
)

// Kind says which level of the trust chain an identity sits at.
type Kind uint8

// The zero Kind is deliberately invalid so that an unset ID never passes as a node or an agent.
const (
	KindUnknown Kind = iota
	KindAuthority
	KindNode
	KindAgent
)

func (k Kind) String() string {
	switch k {
	case KindAuthority:
		return "authority"
	case KindNode:
		return "node"
	case KindAgent:
		return "agent"
	default:
		return fmt.Sprintf("kind(%d)", uint8(k))
	}
}

// ID is a UTE SPIFFE ID:
//
//	spiffe://<td>                          the authority (trust domain root)
//	spiffe://<td>/node/<name>              a node
//	spiffe://<td>/zone/<zone>/agent/<name> an agent
type ID struct {
	TrustDomain string
	Kind        Kind
	Zone        string // agents only
	Name        string // nodes and agents
}

const (
	spiffeScheme = "spiffe://"
	// maxIDLen follows the SPIFFE ID specification's 2048-byte URI limit.
	maxIDLen       = 2048
	maxLabelLen    = 63
	maxTrustDomain = 253
)

// ErrSPIFFEID marks a SPIFFE ID of the wrong shape or kind. It is also a verification sentinel.
var ErrSPIFFEID = errors.New("invalid SPIFFE ID")

// NodeID builds a node ID. It does not validate; call Validate or ParseID(String()) for that.
func NodeID(td, name string) ID { return ID{TrustDomain: td, Kind: KindNode, Name: name} }

// AgentID builds an agent ID. It does not validate.
func AgentID(td, zone, name string) ID {
	return ID{TrustDomain: td, Kind: KindAgent, Zone: zone, Name: name}
}

// AuthorityID builds the ID of a trust domain's authority (the bare trust domain URI).
func AuthorityID(td string) ID { return ID{TrustDomain: td, Kind: KindAuthority} }

// String returns the SPIFFE URI. An invalid ID still formats, so that it can appear in error messages.
func (id ID) String() string {
	switch id.Kind {
	case KindAuthority:
		return spiffeScheme + id.TrustDomain
	case KindNode:
		return spiffeScheme + id.TrustDomain + "/node/" + id.Name
	case KindAgent:
		return spiffeScheme + id.TrustDomain + "/zone/" + id.Zone + "/agent/" + id.Name
	default:
		return spiffeScheme + id.TrustDomain + "/?"
	}
}

// IsZero reports whether id is the zero ID.
func (id ID) IsZero() bool { return id == ID{} }

// Validate checks every component of id. Errors wrap ErrSPIFFEID.
func (id ID) Validate() error {
	if err := ValidateTrustDomain(id.TrustDomain); err != nil {
		return err
	}
	switch id.Kind {
	case KindAuthority:
		if id.Zone != "" || id.Name != "" {
			return fmt.Errorf("%w: authority ID %q must not carry a zone or name", ErrSPIFFEID, id.String())
		}
	case KindNode:
		if id.Zone != "" {
			return fmt.Errorf("%w: node ID %q must not carry a zone", ErrSPIFFEID, id.String())
		}
		if err := ValidateName("node name", id.Name); err != nil {
			return err
		}
	case KindAgent:
		if err := ValidateName("zone name", id.Zone); err != nil {
			return err
		}
		if err := ValidateName("agent name", id.Name); err != nil {
			return err
		}
	default:
		return fmt.Errorf("%w: unknown kind %d", ErrSPIFFEID, uint8(id.Kind))
	}
	return nil
}

// ValidateName checks a node, zone or agent name: one lowercase DNS label (a-z, 0-9, '-', 1 to 63
// characters, not starting or ending with '-'). what names the field in the error. Errors wrap
// ErrSPIFFEID.
func ValidateName(what, name string) error {
	if err := checkLabel(name); err != nil {
		return fmt.Errorf("%w: %s %q %s; use 1-63 lowercase letters, digits or '-' (not at either end)",
			ErrSPIFFEID, what, name, err.Error())
	}
	return nil
}

// ValidateTrustDomain checks a trust domain name: lowercase DNS labels joined by dots, at most 253
// characters. Errors wrap ErrSPIFFEID.
func ValidateTrustDomain(td string) error {
	if td == "" {
		return fmt.Errorf("%w: trust domain is empty; use a DNS-like name such as acme.internal", ErrSPIFFEID)
	}
	if len(td) > maxTrustDomain {
		return fmt.Errorf("%w: trust domain is %d characters long; the limit is %d", ErrSPIFFEID, len(td), maxTrustDomain)
	}
	for label := range strings.SplitSeq(td, ".") {
		if err := checkLabel(label); err != nil {
			return fmt.Errorf("%w: trust domain %q: label %q %s; use lowercase DNS labels such as acme.internal",
				ErrSPIFFEID, td, label, err.Error())
		}
	}
	return nil
}

// checkLabel returns a short phrase describing what is wrong with label, or nil.
func checkLabel(label string) error {
	if label == "" {
		return errors.New("is empty")
	}
	for i := 0; i < len(label); i++ {
		c := label[i]
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9':
		case c == '-':
			if i == 0 || i == len(label)-1 {
				return errors.New("starts or ends with '-'")
			}
		case c >= 'A' && c <= 'Z':
			return errors.New("contains an uppercase letter")
		case c >= utf8.RuneSelf:
			// Show the character, not its first byte: "é", not "Ã".
			r, size := utf8.DecodeRuneInString(label[i:])
			if r == utf8.RuneError && size <= 1 {
				return fmt.Errorf("contains the byte %#x, which is not UTF-8 text", c)
			}
			return fmt.Errorf("contains %q (%U), which is not ASCII; names are ASCII only", r, r)
		default:
			return fmt.Errorf("contains %q", rune(c))
		}
	}
	// Checked after the characters, so that the length counts ASCII characters, not bytes.
	if len(label) > maxLabelLen {
		return fmt.Errorf("is %d characters long (limit %d)", len(label), maxLabelLen)
	}
	return nil
}

// ParseID parses a UTE SPIFFE ID. It is strict: no port, user info, query, fragment, percent
// encoding, trailing or doubled slashes, uppercase letters or path shapes other than the three UTE
// uses. Errors wrap ErrSPIFFEID.
func ParseID(uri string) (ID, error) {
	if len(uri) > maxIDLen {
		return ID{}, fmt.Errorf("%w: %d bytes long; the limit is %d", ErrSPIFFEID, len(uri), maxIDLen)
	}
	rest, ok := strings.CutPrefix(uri, spiffeScheme)
	if !ok {
		return ID{}, fmt.Errorf("%w: %q does not start with %q", ErrSPIFFEID, uri, spiffeScheme)
	}
	td, path, hasPath := strings.Cut(rest, "/")
	if err := ValidateTrustDomain(td); err != nil {
		return ID{}, err
	}
	if !hasPath {
		return AuthorityID(td), nil
	}
	segs := strings.Split(path, "/")
	var id ID
	switch {
	case len(segs) == 2 && segs[0] == "node":
		id = NodeID(td, segs[1])
	case len(segs) == 4 && segs[0] == "zone" && segs[2] == "agent":
		id = AgentID(td, segs[1], segs[3])
	default:
		return ID{}, fmt.Errorf("%w: %q has path /%s; want /node/<name> or /zone/<zone>/agent/<name>",
			ErrSPIFFEID, uri, path)
	}
	if err := id.Validate(); err != nil {
		return ID{}, err
	}
	return id, nil
}
