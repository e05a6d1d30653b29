package identity

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func testCSRInfo() CSRInfo {
	return CSRInfo{Name: "n1", Region: "eu-west-1", Fingerprint: sha256.Sum256([]byte("host"))}
}

func TestCSRRoundTrip(t *testing.T) {
	k := mustKey(t)
	der, err := CreateCSR(k, testCSRInfo())
	require.NoError(t, err)
	csr, err := ParseCSR(der)
	require.NoError(t, err)
	assert.Equal(t, testCSRInfo(), csr.Info)
	assert.True(t, csr.PublicKey.Equal(k.Public()))

	// Name and region are optional; the fingerprint is not.
	der, err = CreateCSR(k, CSRInfo{Fingerprint: testCSRInfo().Fingerprint})
	require.NoError(t, err)
	csr, err = ParseCSR(der)
	require.NoError(t, err)
	assert.Empty(t, csr.Info.Name)

	_, err = CreateCSR(k, CSRInfo{Name: "n1"})
	require.ErrorIs(t, err, ErrMalformedCSR)
	_, err = CreateCSR(k, CSRInfo{Name: "N1", Fingerprint: testCSRInfo().Fingerprint})
	require.ErrorIs(t, err, ErrMalformedCSR)
}

// resign replaces the CSR's signature with one made by signer over the unchanged request body:
// a request for a key the requester does not hold.
func resign(t testing.TB, der []byte, signer ed25519.PrivateKey) []byte {
	t.Helper()
	var outer struct {
		TBS asn1.RawValue
		Alg pkix.AlgorithmIdentifier
		Sig asn1.BitString
	}
	rest, err := asn1.Unmarshal(der, &outer)
	require.NoError(t, err)
	require.Empty(t, rest)
	sig := ed25519.Sign(signer, outer.TBS.FullBytes)
	outer.Sig = asn1.BitString{Bytes: sig, BitLength: len(sig) * 8}
	out, err := asn1.Marshal(outer)
	require.NoError(t, err)
	return out
}

func TestParseCSRRefusesKeyNotHeld(t *testing.T) {
	victim, attacker := mustKey(t), mustKey(t)
	der, err := CreateCSR(victim, testCSRInfo())
	require.NoError(t, err)
	forged := resign(t, der, attacker)
	_, err = ParseCSR(forged)
	require.ErrorIs(t, err, ErrCSRSignature)

	// Sanity: re-signing with the right key gives a valid request, so the refusal above is about
	// the key and nothing else.
	_, err = ParseCSR(resign(t, der, victim))
	require.NoError(t, err)
}

func TestParseCSRRefusals(t *testing.T) {
	k := mustKey(t)
	ext, err := testCSRInfo().marshal()
	require.NoError(t, err)
	ec, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	mk := func(key any, exts ...pkix.Extension) []byte {
		der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
			Subject: pkix.Name{CommonName: "n1"}, ExtraExtensions: exts}, key)
		require.NoError(t, err)
		return der
	}
	cases := []struct {
		name string
		der  []byte
		want error
	}{
		{"garbage", []byte{0x30, 0x03, 1, 2, 3}, ErrMalformedCSR},
		{"oversize", make([]byte, MaxCSRSize+1), ErrMalformedCSR},
		{"ecdsa key", mk(ec, pkix.Extension{Id: OIDCSRInfo, Value: ext}), ErrKeyAlgorithm},
		{"no extension", mk(k), ErrMalformedCSR},
		{"extra extension", mk(k, pkix.Extension{Id: OIDCSRInfo, Value: ext}, pkix.Extension{Id: asn1.ObjectIdentifier{1, 2, 3}, Value: []byte{5, 0}}), ErrMalformedCSR},
		{"critical extension", mk(k, pkix.Extension{Id: OIDCSRInfo, Critical: true, Value: ext}), ErrMalformedCSR},
		{"unknown field", mk(k, pkix.Extension{Id: OIDCSRInfo, Value: mustHex("a1 09 01")}), ErrMalformedCSR},
		{"short fingerprint", mk(k, pkix.Extension{Id: OIDCSRInfo, Value: mustHex("a1 03 41 00")}), ErrMalformedCSR},
		{"name mismatch", mk(k, pkix.Extension{Id: OIDCSRInfo, Value: func() []byte {
			i := testCSRInfo()
			i.Name = "n2"
			b, _ := i.marshal()
			return b
		}()}), ErrMalformedCSR},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := ParseCSR(c.der)
			require.ErrorIs(t, err, c.want)
		})
	}
}

func FuzzParseCSR(f *testing.F) {
	k := ed25519.NewKeyFromSeed(make([]byte, 32))
	der, err := CreateCSR(k, testCSRInfo())
	if err != nil {
		f.Fatal(err)
	}
	f.Add(der)
	f.Add(der[:len(der)/2])
	f.Add([]byte{0x30, 0x00})
	f.Fuzz(func(t *testing.T, b []byte) {
		csr, err := ParseCSR(b)
		if err != nil {
			if !errorsIsAny(err, ErrMalformedCSR, ErrCSRSignature) {
				t.Fatalf("unexpected error class: %v", err)
			}
			return
		}
		// Anything accepted carries a valid proof of possession and a valid request.
		require.NoError(t, csr.Info.validate())
		require.Len(t, csr.PublicKey, ed25519.PublicKeySize)
	})
}
