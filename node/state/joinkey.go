package state

import (
	"crypto/ed25519"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/ute-project/ute/identity"
)

// prefixJoinKey names the node key staged for a join: node.key.join-<token id>. The token id in
// the name ties the key to the one token it was sent with.
const prefixJoinKey = FileNodeKey + ".join-"

// ErrJoinPending means the directory holds the key staged for a join with another token, which
// may have completed at the authority: only a retry with that token can tell.
var ErrJoinPending = errors.New("node directory holds the key of a join that may have completed")

// JoinKeyFile is the path of the key staged in dir for a join with tokenID.
func JoinKeyFile(dir, tokenID string) string { return filepath.Join(dir, prefixJoinKey+tokenID) }

// JoinKey returns the node key a join with the token tokenID asks a certificate for: the key
// already staged for that token, or a new key staged (0600, synced, renamed into place) before it
// is returned; fresh says which. Staging it before the request is sent is what makes a join
// retryable: if the answer is lost after the authority issued the certificate, the retry sends a
// CSR for the same key and the authority answers with the certificates it already issued instead
// of refusing the token as used. SaveJoin consumes the staged key; DiscardJoinKey drops it when
// the authority refused the join for good.
//
// A key staged for another token is never reused nor replaced (ErrJoinPending): that join may
// have completed, and its key is the only way to collect its certificate. A directory that holds
// a node certificate is refused (ErrAlreadyJoined).
func (d *Dir) JoinKey(tokenID string) (key ed25519.PrivateKey, fresh bool, err error) {
	if err := checkTokenID(tokenID); err != nil {
		return nil, false, err
	}
	unlock, err := d.lock()
	if err != nil {
		return nil, false, err
	}
	defer unlock()
	if _, err := os.Stat(d.file(FileNodeCert)); err == nil {
		return nil, false, fmt.Errorf("%w: %s; use another --dir or remove it to rejoin", ErrAlreadyJoined, d.path)
	}
	staged, err := d.stagedJoinKeys()
	if err != nil {
		return nil, false, err
	}
	path := JoinKeyFile(d.path, tokenID)
	for _, other := range staged {
		if other != tokenID {
			return nil, false, fmt.Errorf("%w: %s holds the key staged for a join with token id %s, which may have completed at the authority; run the join again with that token (it collects the certificate if one was issued, or gets a refusal that clears the staged key), or remove %s if that join certainly never reached the authority",
				ErrJoinPending, d.path, other, JoinKeyFile(d.path, other))
		}
		if key, err := identity.ReadKey(path); err == nil {
			return key, false, nil
		}
		// A staged key that does not parse was damaged on disk after it was synced: no retry
		// can prove possession of it any more, so a new one is the only way forward.
		_ = os.Remove(path)
	}
	if key, err = identity.GenerateKey(); err != nil {
		return nil, false, err
	}
	if err := identity.WriteKey(path, key); err != nil {
		return nil, false, fmt.Errorf("stage the join key: %w", err)
	}
	return key, true, nil
}

// DiscardJoinKey removes the key staged for a join with tokenID. Call it only when that join
// certainly issued nothing the key could still collect: the authority refused it for good, or
// the request never left this host.
func (d *Dir) DiscardJoinKey(tokenID string) error {
	if err := checkTokenID(tokenID); err != nil {
		return err
	}
	unlock, err := d.lock()
	if err != nil {
		return err
	}
	defer unlock()
	return removeSync(JoinKeyFile(d.path, tokenID))
}

// HasStagedJoinKey reports whether the directory holds a key staged for any join.
func (d *Dir) HasStagedJoinKey() (bool, error) {
	staged, err := d.stagedJoinKeys()
	return len(staged) > 0, err
}

// stagedJoinKeys lists the token ids that have a key staged.
func (d *Dir) stagedJoinKeys() ([]string, error) {
	entries, err := os.ReadDir(d.path)
	if err != nil {
		return nil, fmt.Errorf("read node directory: %w", err)
	}
	var out []string
	for _, e := range entries {
		if id, ok := strings.CutPrefix(e.Name(), prefixJoinKey); ok && !strings.Contains(id, ".") {
			out = append(out, id)
		}
	}
	return out, nil
}

// dropJoinKeys removes every staged join key of a joined directory: node.key holds the key now.
func (d *Dir) dropJoinKeys() error {
	staged, err := d.stagedJoinKeys()
	if err != nil {
		return err
	}
	for _, id := range staged {
		if err := removeSync(JoinKeyFile(d.path, id)); err != nil {
			return err
		}
	}
	return nil
}

// removeSync removes path and syncs its directory, so the removal is durable; a missing file is
// not an error.
func removeSync(path string) error {
	if err := os.Remove(path); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return fmt.Errorf("remove %s: %w", path, err)
	}
	return identity.SyncDir(filepath.Dir(path))
}

// checkTokenID refuses a token id that could name another file: ids are base32.
func checkTokenID(id string) error {
	if id == "" || len(id) > 64 {
		return fmt.Errorf("token id %q: want 1 to 64 base32 characters", id)
	}
	for _, c := range id {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '2' && c <= '7') {
			return fmt.Errorf("token id %q: want base32 characters only", id)
		}
	}
	return nil
}
