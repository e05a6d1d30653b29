package identity

import (
	"bytes"
	"crypto/ed25519"
	"encoding/hex"
	"errors"
	"fmt"
)

// ErrHandover marks a key handover whose signature does not verify.
var ErrHandover = errors.New("key handover does not verify")

// Handover is a node key's statement, signed at renewal, that the next key succeeds it. Records
// the old key signed (audit heads) stay verifiable after the key is gone: a verifier that trusts
// the current key follows the handovers back to the key that signed them.
type Handover struct {
	From string `json:"from"` // hex Ed25519 public key of the retiring key
	To   string `json:"to"`   // hex Ed25519 public key of its successor
	Sig  string `json:"sig"`  // hex Ed25519 signature by From over handoverMessage(To)
}

func handoverMessage(to ed25519.PublicKey) []byte {
	return append([]byte("ute-key-handover-v1\x00"), to...)
}

// SignHandover signs, with the retiring key, that next succeeds it.
func SignHandover(retiring ed25519.PrivateKey, next ed25519.PublicKey) Handover {
	return Handover{
		From: hex.EncodeToString(retiring.Public().(ed25519.PublicKey)),
		To:   hex.EncodeToString(next),
		Sig:  hex.EncodeToString(ed25519.Sign(retiring, handoverMessage(next))),
	}
}

// Keys returns the two keys of a handover whose signature verifies.
func (h Handover) Keys() (from, to ed25519.PublicKey, err error) {
	f, ferr := hex.DecodeString(h.From)
	t, terr := hex.DecodeString(h.To)
	sig, serr := hex.DecodeString(h.Sig)
	if ferr != nil || terr != nil || serr != nil || len(f) != ed25519.PublicKeySize || len(t) != ed25519.PublicKeySize {
		return nil, nil, fmt.Errorf("%w: malformed", ErrHandover)
	}
	if !ed25519.Verify(f, handoverMessage(t), sig) {
		return nil, nil, fmt.Errorf("%w: signature by %s", ErrHandover, KeyHash(f)[:12])
	}
	return f, t, nil
}

// Predecessors returns current followed by every key that handed over, directly or through
// others, to current, most recent first. Handovers that do not verify or lead elsewhere are
// ignored: they prove nothing about current.
func Predecessors(current ed25519.PublicKey, history []Handover) []ed25519.PublicKey {
	out := []ed25519.PublicKey{current}
	for changed := true; changed; {
		changed = false
		for _, h := range history {
			from, to, err := h.Keys()
			if err != nil || containsKey(out, from) || !bytes.Equal(to, out[len(out)-1]) {
				continue
			}
			out = append(out, from)
			changed = true
		}
	}
	return out
}

func containsKey(keys []ed25519.PublicKey, k ed25519.PublicKey) bool {
	for _, x := range keys {
		if x.Equal(k) {
			return true
		}
	}
	return false
}
