package dtl

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/veraison/go-cose"
)

// The reference codec: the reflection-based CBOR (fxamacker/cbor) and COSE (veraison/go-cose)
// implementation this package used before its hand-written codec (cbor.go). The tests hold the two
// to the same bytes and the same verdicts, so the fast path cannot drift from the profile.

type wireClaims struct {
	Version     *uint64   `cbor:"1,keyasint,omitempty"`
	Zone        string    `cbor:"2,keyasint,omitempty"`
	Agent       string    `cbor:"3,keyasint,omitempty"`
	Chain       [][]byte  `cbor:"4,keyasint,omitempty"`
	ChainHash   []byte    `cbor:"5,keyasint,omitempty"`
	Node        string    `cbor:"6,keyasint,omitempty"`
	Fingerprint []byte    `cbor:"7,keyasint,omitempty"`
	Region      string    `cbor:"8,keyasint,omitempty"`
	Trust       *uint64   `cbor:"9,keyasint,omitempty"`
	Drift       *uint64   `cbor:"10,keyasint,omitempty"`
	Destination *wireDest `cbor:"11,keyasint,omitempty"`
	FlowID      *uint64   `cbor:"12,keyasint,omitempty"`
	Seq         *uint64   `cbor:"13,keyasint,omitempty"`
	IssuedAt    *uint64   `cbor:"14,keyasint,omitempty"`
}

type wireDest struct {
	Agent string  `cbor:"1,keyasint,omitempty"`
	Port  *uint64 `cbor:"2,keyasint,omitempty"`
	Proto *uint64 `cbor:"3,keyasint,omitempty"`
}

func refToWire(c *Claims) *wireClaims {
	w := &wireClaims{
		Version: u64(c.Version), Zone: c.Zone, Agent: c.Agent, ChainHash: c.ChainHash, Node: c.Node,
		Fingerprint: c.Fingerprint, Region: c.Region, Trust: u64(uint64(c.Trust)), Drift: u64(uint64(c.Drift)),
		Destination: &wireDest{Agent: c.Destination.Agent, Port: u64(uint64(c.Destination.Port)), Proto: u64(uint64(c.Destination.Proto))},
		FlowID:      u64(c.FlowID), Seq: u64(c.Seq), IssuedAt: u64(uint64(c.IssuedAt.UnixMilli())),
	}
	if c.Chain != nil {
		w.Chain = [][]byte{c.Chain.Node, c.Chain.Agent}
	}
	return w
}

func refMarshalClaims(c *Claims) []byte {
	b, err := encMode.Marshal(refToWire(c))
	if err != nil {
		panic(err)
	}
	return b
}

// refSign is Sign as go-cose does it.
func refSign(t testing.TB, c *Claims, key ed25519.PrivateKey, aad []byte) []byte {
	t.Helper()
	signer, err := cose.NewSigner(cose.AlgorithmEdDSA, key)
	require.NoError(t, err)
	msg := cose.Sign1Message{
		Headers: cose.Headers{Protected: cose.ProtectedHeader{cose.HeaderLabelAlgorithm: cose.AlgorithmEdDSA}},
		Payload: refMarshalClaims(c),
	}
	require.NoError(t, msg.Sign(rand.Reader, aad, signer))
	b, err := msg.MarshalCBOR()
	require.NoError(t, err)
	return b
}

// refParse is the former Parse: go-cose's decoder, the claims decoded by reflection and re-encoded
// to check that they were deterministic. Like Parse it also requires the record itself to be in
// its deterministic encoding (go-cose alone accepts longer length forms).
func refParse(b []byte) (*Claims, *cose.Sign1Message, error) {
	if len(b) > MaxRecordSize {
		return nil, nil, ErrTooLarge
	}
	if len(b) < 2 || b[0] != 0xd2 || b[1] != 0x84 {
		return nil, nil, ErrMalformed
	}
	var msg cose.Sign1Message
	if err := msg.UnmarshalCBOR(bytes.Clone(b)); err != nil {
		return nil, nil, classifyCBOR("COSE_Sign1", err)
	}
	if string(msg.Headers.RawProtected) != protectedHeaderBstr || string(msg.Headers.RawUnprotected) != emptyUnprotected ||
		msg.Payload == nil || len(msg.Signature) != ed25519.SignatureSize {
		return nil, nil, ErrMalformed
	}
	if again, err := msg.MarshalCBOR(); err != nil || !bytes.Equal(again, b) {
		return nil, nil, fmt.Errorf("%w: record not deterministic", ErrMalformed)
	}
	p := msg.Payload
	if len(p) == 0 || p[0]>>5 != 5 {
		return nil, nil, ErrMalformed
	}
	var w wireClaims
	if err := decMode.Unmarshal(p, &w); err != nil {
		return nil, nil, classifyCBOR("claims", err)
	}
	c, err := refToClaims(&w)
	if err != nil {
		return nil, nil, err
	}
	if re, err := encMode.Marshal(&w); err != nil || !bytes.Equal(re, p) {
		return nil, nil, fmt.Errorf("%w: claims not deterministic", ErrMalformed)
	}
	return c, &msg, nil
}

func refToClaims(w *wireClaims) (*Claims, error) {
	switch {
	case w.Version == nil, w.Trust == nil, w.Drift == nil, w.Destination == nil, w.Destination.Port == nil,
		w.Destination.Proto == nil, w.FlowID == nil, w.Seq == nil, w.IssuedAt == nil:
		return nil, ErrMissingClaim
	case *w.Version != Version1:
		return nil, ErrVersion
	case *w.Trust > MaxTrust, *w.Destination.Port > 0xffff, *w.Destination.Proto > 0xff, *w.IssuedAt > 1<<53:
		return nil, ErrMalformed
	}
	c := &Claims{
		Version: *w.Version, Zone: w.Zone, Agent: w.Agent, ChainHash: w.ChainHash, Node: w.Node,
		Fingerprint: w.Fingerprint, Region: w.Region, Trust: uint8(*w.Trust), Drift: DriftFlags(*w.Drift),
		Destination: Destination{Agent: w.Destination.Agent, Port: uint16(*w.Destination.Port), Proto: Proto(*w.Destination.Proto)},
		FlowID:      *w.FlowID, Seq: *w.Seq, IssuedAt: time.UnixMilli(int64(*w.IssuedAt)),
	}
	if w.Chain != nil {
		if len(w.Chain) != 2 {
			return nil, ErrMalformed
		}
		c.Chain = &CertChain{Node: w.Chain[0], Agent: w.Chain[1]}
	}
	if err := c.validate(); err != nil {
		return nil, err
	}
	return c, nil
}

// randomClaims draws valid claims that exercise every optional claim and every integer width.
func randomClaims(rng *mrand.Rand, a *testAgent) *Claims {
	widths := []uint64{0, 1, 23, 24, 255, 256, 65535, 65536, 1<<32 - 1, 1 << 32, 1<<62 - 1, 1<<64 - 1}
	pick := func() uint64 { return widths[rng.IntN(len(widths))] + uint64(rng.IntN(2)) }
	c := claimsFor(a, pick(), time.UnixMilli(int64(rng.Uint64N(1<<53))))
	c.FlowID = pick()
	c.Trust = uint8(rng.IntN(MaxTrust + 1))
	c.Drift = DriftFlags(rng.IntN(int(driftKnown) + 1))
	c.Destination.Port = uint16(rng.IntN(1 << 16))
	c.Destination.Proto = []Proto{ProtoICMP, ProtoTCP, ProtoUDP, ProtoICMPv6}[rng.IntN(4)]
	c.Destination.Agent = strings.Repeat("d", 1+rng.IntN(MaxNameLen))
	c.Zone = strings.Repeat("z", 1+rng.IntN(MaxZoneLen))
	if rng.IntN(3) == 0 {
		c.Region = ""
	} else {
		c.Region = strings.Repeat("é", rng.IntN(MaxRegionLen/2)+1)
	}
	switch rng.IntN(3) {
	case 0:
		h := c.Chain.Hash()
		c.Chain, c.ChainHash = nil, h[:]
	case 1:
		c.Chain = &CertChain{Node: make([]byte, 1+rng.IntN(MaxCertLen)), Agent: make([]byte, 1+rng.IntN(300))}
	}
	return c
}

// TestCodecMatchesReference holds the hand-written encoder to the reflection codec byte for byte
// (claims, chain hash and the signed record, Ed25519 being deterministic), and the decoder to the
// claims it was given.
func TestCodecMatchesReference(t *testing.T) {
	f := newFixture(t)
	session := aad(t)
	rng := mrand.New(mrand.NewPCG(1, 2))
	for i := range 500 {
		c := randomClaims(rng, f.alice)
		got, err := c.Marshal()
		require.NoError(t, err)
		require.Equal(t, refMarshalClaims(c), got, "claims encoding, case %d", i)
		if c.Chain != nil {
			b, err := encMode.Marshal([][]byte{c.Chain.Node, c.Chain.Agent})
			require.NoError(t, err)
			require.Equal(t, sha256.Sum256(b), c.Chain.Hash())
		}
		raw := mustSign(t, c, f.alice.key, session)
		require.Equal(t, refSign(t, c, f.alice.key, session), raw, "record, case %d", i)

		rec, err := Parse(raw)
		require.NoError(t, err)
		require.NoError(t, rec.Verify(f.alice.key.Public().(ed25519.PublicKey), session))
		want, _, err := refParse(raw)
		require.NoError(t, err)
		assert.True(t, want.IssuedAt.Equal(rec.Claims.IssuedAt))
		g := rec.Claims
		want.IssuedAt, g.IssuedAt = time.Time{}, time.Time{}
		require.Equal(t, *want, g, "case %d", i)
	}
}

// TestParseAgreesWithReferenceOnMutations flips, inserts and deletes bytes of valid records and
// requires both decoders to reach the same verdict, and the same claims when they accept.
func TestParseAgreesWithReferenceOnMutations(t *testing.T) {
	f := newFixture(t)
	session := aad(t)
	rng := mrand.New(mrand.NewPCG(3, 4))
	pub := f.alice.key.Public().(ed25519.PublicKey)
	for range 200 {
		raw := mustSign(t, randomClaims(rng, f.alice), f.alice.key, session)
		for range 40 {
			m := bytes.Clone(raw)
			i := rng.IntN(len(m))
			switch rng.IntN(3) {
			case 0:
				m[i] = byte(rng.IntN(256))
			case 1:
				m = append(m[:i], m[i+1:]...)
			default:
				m = append(m[:i], append([]byte{byte(rng.IntN(256))}, m[i:]...)...)
			}
			requireSameVerdict(t, m, pub, session)
		}
	}
}

func requireSameVerdict(t *testing.T, b []byte, pub ed25519.PublicKey, session []byte) {
	t.Helper()
	rec, err := Parse(b)
	want, msg, refErr := refParse(b)
	if refErr != nil {
		require.Error(t, err, "accepted what the reference refuses (%v): %x", refErr, b)
		require.Nil(t, rec)
		require.NotEqual(t, ReasonInternal, CodeOf(err), "%v", err)
		return
	}
	require.NoError(t, err, "refused what the reference accepts: %x", b)
	g := rec.Claims
	require.True(t, want.IssuedAt.Equal(g.IssuedAt))
	want.IssuedAt, g.IssuedAt = time.Time{}, time.Time{}
	require.Equal(t, *want, g)
	v, err := cose.NewVerifier(cose.AlgorithmEdDSA, pub)
	require.NoError(t, err)
	refOK := msg.Verify(session, v) == nil
	require.Equal(t, refOK, rec.Verify(pub, session) == nil, "signature verdicts differ")
	if !refOK {
		require.True(t, errors.Is(rec.Verify(pub, session), ErrSignature))
	}
}
