package identity

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/x509"
	"encoding/base32"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
)

// ErrKeyPermissions is returned by ReadKey for a key file that group or others may access.
var ErrKeyPermissions = errors.New("key file permissions too open")

// ErrKeyFile marks a key file that is not a PKCS#8 PEM Ed25519 private key.
var ErrKeyFile = errors.New("invalid key file")

// KeyHashLen is the length in characters of a KeyHash: base32 of 20 bytes (160 bits) of SHA-256.
const KeyHashLen = 32

const (
	keyHashBytes = 20
	// maxKeyFile bounds what ReadKey will read: a PKCS#8 Ed25519 PEM is about 120 bytes.
	maxKeyFile = 16 << 10
	pemPrivKey = "PRIVATE KEY"
)

// b32 is the printable alphabet UTE uses for pins and tokens: RFC 4648 base32, lowercase, unpadded.
var b32 = base32.NewEncoding("abcdefghijklmnopqrstuvwxyz234567").WithPadding(base32.NoPadding)

// GenerateKey returns a fresh Ed25519 private key from crypto/rand.
func GenerateKey() (ed25519.PrivateKey, error) {
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate Ed25519 key: %w", err)
	}
	return priv, nil
}

// WriteKey stores key as a PKCS#8 PEM file with mode 0600. It writes a temporary file in the same
// directory, syncs it and renames it over path, so a crash leaves either the old key or the new one,
// never a torn file.
func WriteKey(path string, key ed25519.PrivateKey) error {
	if len(key) != ed25519.PrivateKeySize {
		return fmt.Errorf("write key %s: %w: not an Ed25519 private key", path, ErrKeyFile)
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return fmt.Errorf("write key %s: %w", path, err)
	}
	return WriteFileAtomic(path, pem.EncodeToMemory(&pem.Block{Type: pemPrivKey, Bytes: der}), 0o600)
}

// WriteFileAtomic writes data to path through a synced temporary file and a rename, then syncs the
// directory, so a crash leaves either the old file or the new one, never a torn one. mode is applied
// exactly, whatever the umask.
func WriteFileAtomic(path string, data []byte, mode os.FileMode) (err error) {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			_ = f.Close()
			_ = os.Remove(tmp)
		}
	}()
	if err = f.Chmod(mode); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if _, err = f.Write(data); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err = f.Sync(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err = f.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return RenameSync(tmp, path)
}

// RenameSync renames from to to and syncs the destination directory so the rename survives a crash.
func RenameSync(from, to string) error {
	if err := os.Rename(from, to); err != nil {
		return fmt.Errorf("install %s: %w", to, err)
	}
	return SyncDir(filepath.Dir(to))
}

// SyncDir syncs directory dir, so that the names created, renamed or removed in it survive a
// crash.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	defer func() { _ = d.Close() }()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	return nil
}

// ReadKey loads an Ed25519 private key written by WriteKey. It refuses a file whose mode grants any
// access to group or others, checking the opened file (not the path) so the check and the read see
// the same file.
func ReadKey(path string) (ed25519.PrivateKey, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read key: %w", err)
	}
	defer func() { _ = f.Close() }()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("read key %s: %w", path, err)
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("read key %s: %w: not a regular file", path, ErrKeyFile)
	}
	if perm := st.Mode().Perm(); perm&0o077 != 0 {
		return nil, fmt.Errorf("%w: key file %s is %s (mode %#o); run chmod 600 %s",
			ErrKeyPermissions, path, exposure(perm), perm, path)
	}
	data, err := io.ReadAll(io.LimitReader(f, maxKeyFile+1))
	if err != nil {
		return nil, fmt.Errorf("read key %s: %w", path, err)
	}
	if len(data) > maxKeyFile {
		return nil, fmt.Errorf("read key %s: %w: larger than %d bytes", path, ErrKeyFile, maxKeyFile)
	}
	key, err := ParseKeyPEM(data)
	if err != nil {
		return nil, fmt.Errorf("read key %s: %w", path, err)
	}
	return key, nil
}

// exposure says who besides the owner may use a key file of mode perm: "readable by its group",
// "readable by others", "readable by its group and by others", or "accessible" for write or
// execute bits only.
func exposure(perm os.FileMode) string {
	var who []string
	read := false
	for _, c := range []struct {
		bits os.FileMode
		name string
	}{{0o070, "its group"}, {0o007, "others"}} {
		if perm&c.bits != 0 {
			who = append(who, c.name)
			read = read || perm&c.bits&0o444 != 0
		}
	}
	verb := "accessible"
	if read {
		verb = "readable"
	}
	return verb + " by " + strings.Join(who, " and by ")
}

// CheckKeyPair refuses key, with ErrKeyMismatch, unless it is the private key of the public key
// cert names: a key file that was replaced must never be used, nor certified again by a renewal
// (whoever can write the file would take over the identity). keyPath
// and certPath only name the two files in the error, which is what an operator must look at: one
// of them was replaced.
func CheckKeyPair(key ed25519.PrivateKey, keyPath string, cert *Certificate, certPath string) error {
	if cert == nil || cert.X509 == nil {
		return fmt.Errorf("%w: no certificate in %s to check %s against", ErrKeyMismatch, certPath, keyPath)
	}
	if len(key) != ed25519.PrivateKeySize || !cert.PublicKey().Equal(key.Public()) {
		return fmt.Errorf("%w: %s holds key %s but %s certifies key %s; one of the two files was replaced: restore the original key, or remove the identity and add or join it again",
			ErrKeyMismatch, keyPath, shortKeyHash(key), certPath, cert.KeyHash()[:12])
	}
	return nil
}

func shortKeyHash(key ed25519.PrivateKey) string {
	if len(key) != ed25519.PrivateKeySize {
		return "(malformed)"
	}
	return KeyHash(key.Public().(ed25519.PublicKey))[:12]
}

// ParseKeyPEM decodes a PKCS#8 PEM Ed25519 private key.
func ParseKeyPEM(data []byte) (ed25519.PrivateKey, error) {
	block, rest := pem.Decode(data)
	if block == nil || block.Type != pemPrivKey {
		return nil, fmt.Errorf("%w: no %q PEM block found", ErrKeyFile, pemPrivKey)
	}
	if len(block.Headers) != 0 {
		return nil, fmt.Errorf("%w: PEM headers (encrypted keys) are not supported", ErrKeyFile)
	}
	if len(pemTrim(rest)) != 0 {
		return nil, fmt.Errorf("%w: unexpected data after the key", ErrKeyFile)
	}
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrKeyFile, err)
	}
	priv, ok := k.(ed25519.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("%w: key is %T, want Ed25519", ErrKeyFile, k)
	}
	return priv, nil
}

func pemTrim(b []byte) []byte {
	for len(b) > 0 && (b[0] == '\n' || b[0] == '\r' || b[0] == ' ' || b[0] == '\t') {
		b = b[1:]
	}
	return b
}

// KeyHash returns the printable pin of a public key: the first 160 bits of SHA-256 over the
// key's SubjectPublicKeyInfo DER, in lowercase unpadded base32 (KeyHashLen characters). Join tokens
// carry the authority's KeyHash so a joining node trusts nothing it has not pinned.
func KeyHash(pub ed25519.PublicKey) string {
	spki, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		// Only a malformed key length gets here; hashing the raw bytes keeps the result a pin that
		// matches no well-formed key rather than a panic.
		spki = append([]byte("invalid-ed25519-key:"), pub...)
	}
	sum := sha256.Sum256(spki)
	return b32.EncodeToString(sum[:keyHashBytes])
}

// PinMatches reports, in constant time, whether pub's KeyHash equals pin.
func PinMatches(pin string, pub ed25519.PublicKey) bool {
	return subtle.ConstantTimeCompare([]byte(pin), []byte(KeyHash(pub))) == 1
}
