package identity

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base32"
	"encoding/pem"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestKeyRoundTrip(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "node.key")
	k := mustKey(t)
	require.NoError(t, WriteKey(path, k))
	st, err := os.Stat(path)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), st.Mode().Perm())
	got, err := ReadKey(path)
	require.NoError(t, err)
	assert.True(t, k.Equal(got))

	// Overwrite is atomic and leaves no temporary files behind.
	k2 := mustKey(t)
	require.NoError(t, WriteKey(path, k2))
	got, err = ReadKey(path)
	require.NoError(t, err)
	assert.True(t, k2.Equal(got))
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	assert.Len(t, entries, 1)

	// Replacing a file that was world-readable yields a private file, not the old mode.
	open := filepath.Join(dir, "open.key")
	require.NoError(t, os.WriteFile(open, []byte("old"), 0o644))
	require.NoError(t, WriteKey(open, k))
	st, err = os.Stat(open)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), st.Mode().Perm())

	require.ErrorIs(t, WriteKey(filepath.Join(dir, "short.key"), k[:10]), ErrKeyFile)
	require.Error(t, WriteKey(filepath.Join(dir, "no-such-dir", "k"), k))
}

func TestReadKeyRefusesOpenPermissions(t *testing.T) {
	// Who may read the key is said exactly: 0640 exposes it to the group, not to "others".
	for mode, who := range map[os.FileMode]string{
		0o644: "readable by its group and by others",
		0o640: "readable by its group",
		0o604: "readable by others",
		0o620: "accessible by its group",
		0o660: "readable by its group",
		0o602: "accessible by others",
		0o622: "accessible by its group and by others",
	} {
		t.Run(mode.String(), func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "k")
			require.NoError(t, WriteKey(path, mustKey(t)))
			require.NoError(t, os.Chmod(path, mode))
			_, err := ReadKey(path)
			require.ErrorIs(t, err, ErrKeyPermissions)
			assert.Contains(t, err.Error(), "run chmod 600 "+path)
			assert.Contains(t, err.Error(), "key file "+path+" is "+who+" (mode 0"+formatOctal(mode)+")")
		})
	}
}

// A key file cut short (a full disk, a copy interrupted) is refused with the file's name.
func TestReadKeyTruncatedNamesFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "agent.key")
	require.NoError(t, WriteKey(path, mustKey(t)))
	data, err := os.ReadFile(path)
	require.NoError(t, err)
	for _, n := range []int{0, 20, len(data) / 2, len(data) - 30} {
		require.NoError(t, os.WriteFile(path, data[:n], 0o600))
		_, err := ReadKey(path)
		require.ErrorIs(t, err, ErrKeyFile, "cut at %d", n)
		assert.Contains(t, err.Error(), path, "cut at %d", n)
	}
}

func formatOctal(m os.FileMode) string {
	const digits = "01234567"
	return string([]byte{digits[(m>>6)&7], digits[(m>>3)&7], digits[m&7]})
}

func TestReadKeyRefusesBadFiles(t *testing.T) {
	dir := t.TempDir()
	write := func(name string, data []byte) string {
		p := filepath.Join(dir, name)
		require.NoError(t, os.WriteFile(p, data, 0o600))
		return p
	}
	ec, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	ecDER, err := x509.MarshalPKCS8PrivateKey(ec)
	require.NoError(t, err)
	good, err := x509.MarshalPKCS8PrivateKey(mustKey(t))
	require.NoError(t, err)
	goodPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: good})

	cases := map[string]string{
		"empty":     write("empty", nil),
		"garbage":   write("garbage", []byte("hello")),
		"ecdsa":     write("ec", pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: ecDER})),
		"wrongtype": write("cert", pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: good})),
		"trailing":  write("trail", append(append([]byte{}, goodPEM...), goodPEM...)),
		"huge":      write("huge", make([]byte, maxKeyFile+10)),
		"badder":    write("badder", pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: []byte{1, 2, 3}})),
	}
	for name, path := range cases {
		t.Run(name, func(t *testing.T) {
			_, err := ReadKey(path)
			require.ErrorIs(t, err, ErrKeyFile)
		})
	}
	_, err = ReadKey(dir)
	require.Error(t, err)
	_, err = ReadKey(filepath.Join(dir, "missing"))
	require.ErrorIs(t, err, os.ErrNotExist)
}

func TestKeyHash(t *testing.T) {
	k := ed25519.NewKeyFromSeed(make([]byte, ed25519.SeedSize))
	pub := k.Public().(ed25519.PublicKey)
	// Independent computation: the SPKI of an Ed25519 key is a fixed 12-byte prefix plus the key.
	spki := append([]byte{0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00}, pub...)
	sum := sha256.Sum256(spki)
	want := strings.ToLower(base32.StdEncoding.WithPadding(base32.NoPadding).EncodeToString(sum[:20]))

	h := KeyHash(pub)
	assert.Equal(t, want, h)
	assert.Len(t, h, KeyHashLen)
	other := mustKey(t).Public().(ed25519.PublicKey)
	assert.NotEqual(t, h, KeyHash(other))
	assert.True(t, PinMatches(h, pub))
	assert.False(t, PinMatches(h, other))
	assert.False(t, PinMatches(h[:31], pub))
}

func TestCheckKeyPair(t *testing.T) {
	key, err := GenerateKey()
	require.NoError(t, err)
	other, err := GenerateKey()
	require.NoError(t, err)
	ca, err := NewAuthority("acme.internal", key, time.Now().Add(-time.Minute), time.Hour)
	require.NoError(t, err)

	require.NoError(t, CheckKeyPair(key, "dir/x.key", ca, "dir/x.crt"))
	for _, k := range []ed25519.PrivateKey{other, nil, key[:10]} {
		err := CheckKeyPair(k, "dir/x.key", ca, "dir/x.crt")
		require.ErrorIs(t, err, ErrKeyMismatch)
		assert.Contains(t, err.Error(), "dir/x.key")
		assert.Contains(t, err.Error(), "dir/x.crt")
	}
	require.ErrorIs(t, CheckKeyPair(key, "dir/x.key", nil, "dir/x.crt"), ErrKeyMismatch)
}
