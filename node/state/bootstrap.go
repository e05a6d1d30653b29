package state

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"

	"github.com/ute-project/ute/identity"
)

// Bootstrap files: what the authority returned at join (and renewal) besides the identity.
const (
	// FileMembers lists bootstrap members: hints of where same-zone nodes were, each verified by
	// the tunnel handshake before use.
	FileMembers = "members.json"
	// FilePolicyRelease is the authority-signed policy release (identity/record), kept so that the
	// daemon can verify and store it in its revocation store on first start.
	FilePolicyRelease = "policy.release"
)

// Member is a bootstrap member: a node SPIFFE ID, its advertised underlay address and the zones
// it shares with this node.
type Member struct {
	ID    string   `json:"id"`
	Addr  string   `json:"addr"`
	Zones []string `json:"zones,omitempty"`
}

// SaveBootstrap writes the bootstrap members and, when not empty, the signed policy release.
func (d *Dir) SaveBootstrap(members []Member, release []byte) error {
	unlock, err := d.lock()
	if err != nil {
		return err
	}
	defer unlock()
	if members == nil {
		members = []Member{}
	}
	b, err := json.MarshalIndent(members, "", "  ")
	if err != nil {
		return fmt.Errorf("encode %s: %w", FileMembers, err)
	}
	if err := identity.WriteFileAtomic(d.file(FileMembers), append(b, '\n'), 0o644); err != nil {
		return err
	}
	if len(release) == 0 {
		return nil
	}
	return identity.WriteFileAtomic(d.file(FilePolicyRelease), release, 0o644)
}

// Members reads the bootstrap members; none when the file does not exist.
func (d *Dir) Members() ([]Member, error) {
	b, err := os.ReadFile(d.file(FileMembers))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", d.file(FileMembers), err)
	}
	var ms []Member
	if err := json.Unmarshal(b, &ms); err != nil {
		return nil, fmt.Errorf("%s is not a JSON list of {id, addr, zones}: %w; delete it to start without bootstrap members", d.file(FileMembers), err)
	}
	return ms, nil
}

// PolicyRelease reads the signed policy release saved at join; nil when there is none. The
// caller verifies it.
func (d *Dir) PolicyRelease() ([]byte, error) {
	b, err := os.ReadFile(d.file(FilePolicyRelease))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", d.file(FilePolicyRelease), err)
	}
	return b, nil
}
