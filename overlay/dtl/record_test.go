package dtl

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"math/big"
	"net"
	"testing"
	"time"

	"github.com/fxamacker/cbor/v2"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/veraison/go-cose"
)

type fixture struct {
	auth   *testAuthority
	n1, n2 *testNode
	alice  *testAgent // payments, on n1
	bob    *testAgent // payments, on n2
	carol  *testAgent // support, on n1
	now    time.Time
}

func newFixture(t testing.TB) *fixture {
	t.Helper()
	auth := newAuthority(t)
	n1, n2 := auth.node(t, "n1"), auth.node(t, "n2")
	exp := time.Now().Add(time.Hour)
	return &fixture{
		auth: auth, n1: n1, n2: n2,
		alice: n1.agent(t, "payments", "alice", exp),
		bob:   n2.agent(t, "payments", "bob", exp),
		carol: n1.agent(t, "support", "carol", exp),
		now:   time.Now(),
	}
}

func TestSignParseVerifyRoundTrip(t *testing.T) {
	f := newFixture(t)
	session := aad(t)
	c := claimsFor(f.alice, 1, f.now)
	c.Drift = DriftRegion | DriftDuplicate
	raw := mustSign(t, c, f.alice.key, session)

	rec, err := Parse(raw)
	require.NoError(t, err)
	require.NoError(t, rec.Verify(f.alice.key.Public().(ed25519.PublicKey), session))
	assert.Equal(t, raw, rec.Raw())

	want := *c
	want.IssuedAt = time.UnixMilli(c.IssuedAt.UnixMilli())
	got := rec.Claims
	assert.True(t, want.IssuedAt.Equal(got.IssuedAt))
	want.IssuedAt, got.IssuedAt = time.Time{}, time.Time{}
	assert.Equal(t, want, got)

	// A hash-only record is smaller than the chain-carrying one and parses the same way.
	h := c.Chain.Hash()
	c.Chain, c.ChainHash = nil, h[:]
	small := mustSign(t, c, f.alice.key, session)
	assert.Less(t, len(small), 300, "hash-only record should be compact")
	rec, err = Parse(small)
	require.NoError(t, err)
	assert.Equal(t, h[:], rec.Claims.ChainHash)
	assert.Nil(t, rec.Claims.Chain)
}

func TestVerifyRefusesOtherSession(t *testing.T) {
	f := newFixture(t)
	raw := mustSign(t, claimsFor(f.alice, 1, f.now), f.alice.key, aad(t))
	rec, err := Parse(raw)
	require.NoError(t, err)
	err = rec.Verify(f.alice.key.Public().(ed25519.PublicKey), aad(t))
	require.ErrorIs(t, err, ErrSignature)
}

func TestVerifyRefusesOtherKey(t *testing.T) {
	f := newFixture(t)
	session := aad(t)
	// Bob's key produces a perfectly valid COSE signature over Alice's claims; it must not pass as
	// Alice's.
	raw := mustSign(t, claimsFor(f.alice, 1, f.now), f.bob.key, session)
	rec, err := Parse(raw)
	require.NoError(t, err)
	require.ErrorIs(t, rec.Verify(f.alice.key.Public().(ed25519.PublicKey), session), ErrSignature)
	require.NoError(t, rec.Verify(f.bob.key.Public().(ed25519.PublicKey), session))
}

func TestVerifyRefusesTamperedClaims(t *testing.T) {
	f := newFixture(t)
	session := aad(t)
	raw := mustSign(t, claimsFor(f.alice, 1, f.now), f.alice.key, session)
	// Claim 9 (trust) = 90 is encoded 09 18 5a; raise it to 100 (09 18 64) in place.
	i := bytes.Index(raw, []byte{0x09, 0x18, 0x5a})
	require.Positive(t, i)
	tampered := bytes.Clone(raw)
	tampered[i+2] = 0x64
	rec, err := Parse(tampered)
	require.NoError(t, err, "the tampered record is still well-formed")
	assert.Equal(t, uint8(100), rec.Claims.Trust)
	require.ErrorIs(t, rec.Verify(f.alice.key.Public().(ed25519.PublicKey), session), ErrSignature)

	// Flipping the last signature bit is caught the same way.
	tampered = bytes.Clone(raw)
	tampered[len(tampered)-1] ^= 1
	rec, err = Parse(tampered)
	require.NoError(t, err)
	require.ErrorIs(t, rec.Verify(f.alice.key.Public().(ed25519.PublicKey), session), ErrSignature)
}

func TestAADMustBeExporterSized(t *testing.T) {
	f := newFixture(t)
	c := claimsFor(f.alice, 1, f.now)
	for _, a := range [][]byte{nil, {}, make([]byte, 31), make([]byte, 64)} {
		_, err := Sign(c, f.alice.key, a)
		require.ErrorIs(t, err, ErrAAD)
	}
	rec, err := Parse(mustSign(t, c, f.alice.key, aad(t)))
	require.NoError(t, err)
	require.ErrorIs(t, rec.Verify(f.alice.key.Public().(ed25519.PublicKey), nil), ErrAAD)
}

// signPayload wraps arbitrary claim bytes in a validly signed COSE_Sign1, so that decode refusals are
// tested on records an attacker holding a key could really produce.
func signPayload(t testing.TB, payload []byte, key ed25519.PrivateKey, session []byte, hdr cose.Headers) []byte {
	t.Helper()
	signer, err := cose.NewSigner(cose.AlgorithmEdDSA, key)
	require.NoError(t, err)
	b, err := cose.Sign1(rand.Reader, signer, hdr, payload, session)
	require.NoError(t, err)
	return b
}

func edHeaders() cose.Headers {
	return cose.Headers{Protected: cose.ProtectedHeader{cose.HeaderLabelAlgorithm: cose.AlgorithmEdDSA}}
}

// claimMap decodes a valid claims payload into a generic map for editing.
func claimMap(t testing.TB, c *Claims) map[uint64]cbor.RawMessage {
	t.Helper()
	b, err := c.Marshal()
	require.NoError(t, err)
	var m map[uint64]cbor.RawMessage
	require.NoError(t, cbor.Unmarshal(b, &m))
	return m
}

func encodeMap(t testing.TB, m any) []byte {
	t.Helper()
	b, err := encMode.Marshal(m)
	require.NoError(t, err)
	return b
}

func TestParseRefusals(t *testing.T) {
	f := newFixture(t)
	session := aad(t)
	valid := claimsFor(f.alice, 1, f.now)
	validPayload, err := valid.Marshal()
	require.NoError(t, err)
	require.Equal(t, byte(0xad), validPayload[0], "13-entry map expected")

	without := func(key uint64) []byte {
		m := claimMap(t, valid)
		delete(m, key)
		return encodeMap(t, m)
	}
	with := func(key uint64, v any) []byte {
		m := claimMap(t, valid)
		raw, err := encMode.Marshal(v)
		require.NoError(t, err)
		m[key] = raw
		return encodeMap(t, m)
	}
	h := valid.Chain.Hash()

	cases := []struct {
		name    string
		payload []byte
		want    error
	}{
		{"unknown claim", with(15, "surprise"), ErrUnknownClaim},
		{"unknown destination field", with(KeyDestination, map[int]any{1: "ledger", 2: 443, 3: 6, 4: "x"}), ErrUnknownClaim},
		{"duplicate key", append([]byte{0xae}, append(bytes.Clone(validPayload[1:]), 0x02, 0x61, 'x')...), ErrDuplicateKey},
		{"indefinite-length map", append(append([]byte{0xbf}, validPayload[1:]...), 0xff), ErrIndefinite},
		{"version 2", with(KeyVersion, 2), ErrVersion},
		{"no version", without(KeyVersion), ErrMissingClaim},
		{"no zone", without(KeyZone), ErrMissingClaim},
		{"no agent", without(KeyAgent), ErrMissingClaim},
		{"no chain nor hash", without(KeyChain), ErrMissingClaim},
		{"chain and hash", with(KeyChainHash, h[:]), ErrMalformed},
		{"short chain hash", func() []byte {
			m := claimMap(t, valid)
			delete(m, KeyChain)
			m[KeyChainHash] = encodeMap(t, h[:31])
			return encodeMap(t, m)
		}(), ErrMalformed},
		{"chain of one", with(KeyChain, [][]byte{f.alice.der}), ErrMalformed},
		{"no node", without(KeyNode), ErrMissingClaim},
		{"no fingerprint", without(KeyFingerprint), ErrMissingClaim},
		{"short fingerprint", with(KeyFingerprint, []byte{1, 2, 3}), ErrMalformed},
		{"fingerprint as array", with(KeyFingerprint, make([]int, 32)), ErrMalformed},
		{"no trust", without(KeyTrust), ErrMissingClaim},
		{"trust 101", with(KeyTrust, 101), ErrMalformed},
		{"negative trust", with(KeyTrust, -1), ErrMalformed},
		{"no drift", without(KeyDrift), ErrMissingClaim},
		{"unknown drift bit", with(KeyDrift, 1<<7), ErrMalformed},
		{"no destination", without(KeyDestination), ErrMissingClaim},
		{"destination port 70000", with(KeyDestination, map[int]any{1: "ledger", 2: 70000, 3: 6}), ErrMalformed},
		{"destination protocol 99", with(KeyDestination, map[int]any{1: "ledger", 2: 1, 3: 99}), ErrMalformed},
		{"no flow id", without(KeyFlowID), ErrMissingClaim},
		{"no sequence", without(KeySeq), ErrMissingClaim},
		{"no issued-at", without(KeyIssuedAt), ErrMissingClaim},
		{"zone as bytes", with(KeyZone, []byte("payments")), ErrMalformed},
		{"zone too long", with(KeyZone, string(bytes.Repeat([]byte("z"), 64))), ErrTooLarge},
		{"zone with control char", with(KeyZone, "pay\nments"), ErrMalformed},
		{"agent not spiffe", with(KeyAgent, "https://evil/agent"), ErrMalformed},
		{"text key", func() []byte {
			m := map[any]cbor.RawMessage{}
			for k, v := range claimMap(t, valid) {
				m[k] = v
			}
			delete(m, uint64(KeyZone))
			m["2"] = encodeMap(t, "payments")
			return encodeMap(t, m)
		}(), ErrUnknownClaim},
		{"non-shortest integer", func() []byte {
			// Claim 1 (version) = 1 encoded as a two-byte integer (01 18 01) instead of 01 01.
			b := bytes.Clone(validPayload)
			require.Equal(t, []byte{0x01, 0x01}, b[1:3])
			return append([]byte{b[0], 0x01, 0x18, 0x01}, b[3:]...)
		}(), ErrMalformed},
		{"unsorted keys", func() []byte {
			// Move claim 1 to the end: still a valid map, but not the deterministic encoding.
			b := bytes.Clone(validPayload)
			return append(append([]byte{b[0]}, b[3:]...), 0x01, 0x01)
		}(), ErrMalformed},
		{"not a map", encodeMap(t, []int{1, 2}), ErrMalformed},
		{"tagged value", with(KeyIssuedAt, cbor.Tag{Number: 1, Content: 5}), ErrMalformed},
		{"trailing bytes", append(bytes.Clone(validPayload), 0x00), ErrMalformed},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			raw := signPayload(t, tc.payload, f.alice.key, session, edHeaders())
			_, err := Parse(raw)
			require.ErrorIs(t, err, tc.want)
			assert.NotContains(t, err.Error(), "\n")
		})
	}
}

func TestParseRefusesOtherCOSEProfiles(t *testing.T) {
	f := newFixture(t)
	session := aad(t)
	payload, err := claimsFor(f.alice, 1, f.now).Marshal()
	require.NoError(t, err)
	valid := signPayload(t, payload, f.alice.key, session, edHeaders())
	_, err = Parse(valid)
	require.NoError(t, err)

	withCty := edHeaders()
	withCty.Protected[cose.HeaderLabelContentType] = "application/cbor"
	withUnprotected := edHeaders()
	withUnprotected.Unprotected = cose.UnprotectedHeader{cose.HeaderLabelKeyID: []byte("k")}

	withoutSig := bytes.Clone(valid)
	withoutSig = withoutSig[:len(withoutSig)-66] // drop the 64-byte signature bstr (58 40 ...)
	withoutSig = append(withoutSig, 0x41, 0x00)

	cases := []struct {
		name string
		raw  []byte
		want error
	}{
		{"extra protected header", signPayload(t, payload, f.alice.key, session, withCty), ErrMalformed},
		{"non-empty unprotected header", signPayload(t, payload, f.alice.key, session, withUnprotected), ErrMalformed},
		{"other algorithm", func() []byte {
			// Same structure, protected header {1: -7}; the signature itself is irrelevant.
			b := bytes.Clone(valid)
			i := bytes.Index(b, []byte{0x43, 0xa1, 0x01, 0x27})
			b[i+3] = 0x26
			return b
		}(), ErrMalformed},
		{"untagged", valid[1:], ErrMalformed},
		{"wrong tag", append([]byte{0xd8, 0x62}, valid[1:]...), ErrMalformed},
		{"short signature", withoutSig, ErrMalformed},
		{"empty", nil, ErrMalformed},
		{"trailing garbage", append(bytes.Clone(valid), 0xff), ErrMalformed},
		{"oversize", append(bytes.Clone(valid), make([]byte, MaxRecordSize)...), ErrTooLarge},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse(tc.raw)
			require.ErrorIs(t, err, tc.want)
		})
	}
}

func TestSignRefusesInvalidClaims(t *testing.T) {
	f := newFixture(t)
	session := aad(t)
	big := claimsFor(f.alice, 1, f.now)
	big.Chain = &CertChain{Node: make([]byte, MaxCertLen+1), Agent: f.alice.der}
	_, err := Sign(big, f.alice.key, session)
	require.ErrorIs(t, err, ErrTooLarge)

	noDest := claimsFor(f.alice, 1, f.now)
	noDest.Destination.Agent = ""
	_, err = Sign(noDest, f.alice.key, session)
	require.ErrorIs(t, err, ErrMissingClaim)

	future := claimsFor(f.alice, 1, f.now)
	future.Version = 2
	_, err = Sign(future, f.alice.key, session)
	require.ErrorIs(t, err, ErrVersion)

	_, err = Sign(claimsFor(f.alice, 1, f.now), f.alice.key[:32], session)
	require.Error(t, err)

	// Two maximal certificates fit the record cap.
	max := claimsFor(f.alice, 1, f.now)
	max.Chain = &CertChain{Node: make([]byte, MaxCertLen), Agent: make([]byte, MaxCertLen)}
	b, err := Sign(max, f.alice.key, session)
	require.NoError(t, err)
	require.LessOrEqual(t, len(b), MaxRecordSize)
}

func TestExporterBindsToConnection(t *testing.T) {
	key := newKey(t)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour), DNSNames: []string{"n1"}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	require.NoError(t, err)
	pool := x509.NewCertPool()
	leaf, err := x509.ParseCertificate(der)
	require.NoError(t, err)
	pool.AddCert(leaf)
	srvCfg := &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}, MinVersion: tls.VersionTLS13}
	cliCfg := &tls.Config{RootCAs: pool, ServerName: "n1", MinVersion: tls.VersionTLS13}

	handshake := func() (client, server tls.ConnectionState) {
		a, b := net.Pipe()
		t.Cleanup(func() { _ = a.Close(); _ = b.Close() })
		srv := tls.Server(b, srvCfg)
		done := make(chan error, 1)
		go func() { done <- srv.Handshake() }()
		cli := tls.Client(a, cliCfg)
		require.NoError(t, cli.Handshake())
		require.NoError(t, <-done)
		return cli.ConnectionState(), srv.ConnectionState()
	}
	c1, s1 := handshake()
	c2, _ := handshake()

	e1, err := Exporter(c1)
	require.NoError(t, err)
	require.Len(t, e1, ExporterLen)
	es1, err := Exporter(s1)
	require.NoError(t, err)
	assert.Equal(t, e1, es1, "both ends of one connection derive the same binding")
	e2, err := Exporter(c2)
	require.NoError(t, err)
	assert.NotEqual(t, e1, e2, "two connections never share a binding")

	_, err = Exporter(tls.ConnectionState{})
	require.Error(t, err)
}
