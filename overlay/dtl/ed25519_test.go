package dtl

import (
	"crypto/ed25519"
	"crypto/sha512"
	"encoding/binary"
	"math/big"
	"testing"

	"github.com/oasisprotocol/curve25519-voi/curve"
	voi "github.com/oasisprotocol/curve25519-voi/primitives/ed25519"
	"github.com/stretchr/testify/require"
)

// verdicts is what crypto/ed25519 and curve25519-voi (plain, and with the expanded key a
// session's chain cache holds) say of one signature.
func verdicts(pub, msg, sig []byte) (std, plain, expanded bool) {
	std = ed25519.Verify(pub, msg, sig)
	plain = voi.VerifyWithOptions(voi.PublicKey(pub), msg, sig, asStdlib)
	if x, err := voi.NewExpandedPublicKey(voi.PublicKey(pub)); err == nil {
		expanded = voi.VerifyExpandedWithOptions(x, msg, sig, asStdlib)
	}
	return std, plain, expanded
}

func requireSameEd25519Verdict(t *testing.T, what string, pub, msg, sig []byte) bool {
	t.Helper()
	std, plain, expanded := verdicts(pub, msg, sig)
	require.Equal(t, std, plain, "%s: crypto/ed25519 says %v, curve25519-voi %v", what, std, plain)
	require.Equal(t, std, expanded, "%s: crypto/ed25519 says %v, curve25519-voi with the expanded key %v", what, std, expanded)
	return std
}

// le32 is n as 32 little-endian bytes (an encoded scalar or field element).
func le32(n *big.Int) []byte {
	b := n.FillBytes(make([]byte, 32))
	for i, j := 0, 31; i < j; i, j = i+1, j-1 {
		b[i], b[j] = b[j], b[i]
	}
	return b
}

// Records are signed and verified with curve25519-voi (see asStdlib): it must give the bytes
// crypto/ed25519 gives and accept exactly what crypto/ed25519 accepts, including the encodings
// on which Ed25519 implementations are known to disagree.
func TestEd25519MatchesStdlib(t *testing.T) {
	for i := range 64 {
		var seed [32]byte
		binary.LittleEndian.PutUint64(seed[:], uint64(i)+1)
		priv := ed25519.NewKeyFromSeed(seed[:])
		pub := priv.Public().(ed25519.PublicKey)
		msg := sha512.New().Sum(seed[:])[:i*5%97]
		sig := ed25519.Sign(priv, msg)
		require.Equal(t, sig, voi.Sign(voi.PrivateKey(priv), msg), "signature %d", i)
		require.True(t, requireSameEd25519Verdict(t, "valid", pub, msg, sig))
		for _, bit := range []int{0, 7, 255, 256, 300, 511} { // R, then S
			bad := append([]byte(nil), sig...)
			bad[bit/8] ^= 1 << (bit % 8)
			require.False(t, requireSameEd25519Verdict(t, "flipped signature bit", pub, msg, bad))
		}
		badPub := append([]byte(nil), pub...)
		badPub[i%32] ^= 1
		requireSameEd25519Verdict(t, "flipped key bit", badPub, msg, sig)
		if len(msg) > 0 {
			badMsg := append([]byte(nil), msg...)
			badMsg[0] ^= 0x80
			require.False(t, requireSameEd25519Verdict(t, "flipped message bit", pub, badMsg, sig))
		}
	}

	// The edge encodings: scalars and field elements as little-endian numbers.
	p := new(big.Int).Sub(new(big.Int).Lsh(big.NewInt(1), 255), big.NewInt(19))
	l, _ := new(big.Int).SetString("27742317777372353535851937790883648493", 10)
	l.Add(l, new(big.Int).Lsh(big.NewInt(1), 252))
	one, zero := le32(big.NewInt(1)), make([]byte, 32)
	negZero := append([]byte(nil), one...)
	negZero[31] |= 0x80 // y = 1 with the sign bit of x = 0 set
	identityPlusP := le32(new(big.Int).Add(p, big.NewInt(1)))
	minusOne := le32(new(big.Int).Sub(p, big.NewInt(1))) // (0, -1), of order 2
	offCurve := []byte(nil)
	for y := int64(2); offCurve == nil; y++ {
		var c curve.CompressedEdwardsY
		var pt curve.EdwardsPoint
		enc := le32(big.NewInt(y))
		if _, err := c.SetBytes(enc); err == nil {
			if _, err := pt.SetCompressedY(&c); err != nil {
				offCurve = enc
			}
		}
	}
	cat := func(a, b []byte) []byte { return append(append([]byte(nil), a...), b...) }

	priv := ed25519.NewKeyFromSeed(make([]byte, 32))
	pub := priv.Public().(ed25519.PublicKey)
	msg := []byte("record")
	sig := ed25519.Sign(priv, msg)
	s := new(big.Int).SetBytes(reverse(sig[32:]))
	cases := []struct {
		name     string
		pub, sig []byte
	}{
		{"S + L, the same S not reduced", pub, cat(sig[:32], le32(new(big.Int).Add(s, l)))},
		{"S = L", pub, cat(sig[:32], le32(l))},
		{"small-order A (the identity), R the identity, S = 0", one, cat(one, zero)},
		{"non-canonical A (p + 1), R the identity, S = 0", identityPlusP, cat(one, zero)},
		{"non-canonical R (p + 1), A the identity, S = 0", one, cat(identityPlusP, zero)},
		{"A with x = 0 and its sign bit set", negZero, cat(one, zero)},
		{"A of order 2, R the identity, S = 0", minusOne, cat(one, zero)},
		{"A of order 2, R = A, S = 0", minusOne, cat(minusOne, zero)},
		{"A not on the curve", offCurve, sig},
	}
	for _, c := range cases {
		for _, m := range [][]byte{msg, []byte("another record"), nil} {
			requireSameEd25519Verdict(t, c.name, c.pub, m, c.sig)
		}
	}
	// The cases are not all refusals: crypto/ed25519 accepts a small-order and a non-canonical A.
	std, _, _ := verdicts(one, msg, cat(one, zero))
	require.True(t, std, "crypto/ed25519 accepts the identity as A")
	std, _, _ = verdicts(identityPlusP, msg, cat(one, zero))
	require.True(t, std, "crypto/ed25519 accepts a non-canonical A")
}

func reverse(b []byte) []byte {
	out := make([]byte, len(b))
	for i := range b {
		out[len(b)-1-i] = b[i]
	}
	return out
}

// FuzzEd25519MatchesStdlib signs with a seed, changes the key, message or signature by the
// fuzzer's bytes, and requires both libraries to give the same signature and verdicts.
func FuzzEd25519MatchesStdlib(f *testing.F) {
	f.Add(make([]byte, 32), []byte("record"), []byte{}, []byte{})
	f.Add(make([]byte, 32), []byte{}, []byte{0, 1}, []byte{})
	f.Add([]byte("0123456789abcdef0123456789abcdef"), []byte("flow"), []byte{}, []byte{63, 0x80})
	f.Add([]byte("0123456789abcdef0123456789abcdef"), []byte("flow"), []byte{31, 0x80}, []byte{32, 1})
	f.Fuzz(func(t *testing.T, seed, msg, pubEdit, sigEdit []byte) {
		if len(seed) != ed25519.SeedSize {
			return
		}
		priv := ed25519.NewKeyFromSeed(seed)
		pub := append([]byte(nil), priv.Public().(ed25519.PublicKey)...)
		sig := ed25519.Sign(priv, msg)
		require.Equal(t, sig, voi.Sign(voi.PrivateKey(priv), msg))
		// Edits are (index, xor mask) pairs.
		for i := 0; i+1 < len(pubEdit); i += 2 {
			pub[int(pubEdit[i])%len(pub)] ^= pubEdit[i+1]
		}
		for i := 0; i+1 < len(sigEdit); i += 2 {
			sig[int(sigEdit[i])%len(sig)] ^= sigEdit[i+1]
		}
		requireSameEd25519Verdict(t, "fuzzed", pub, msg, sig)
	})
}
