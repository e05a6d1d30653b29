package dtl

import (
	"bytes"
	"crypto/ed25519"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func FuzzParseRecord(f *testing.F) {
	fx := newFixture(f)
	session := aad(f)
	c := claimsFor(fx.alice, 1, fx.now)
	full := mustSign(f, c, fx.alice.key, session)
	h := c.Chain.Hash()
	c.Chain, c.ChainHash = nil, h[:]
	short := mustSign(f, c, fx.alice.key, session)
	f.Add(full)
	f.Add(short)
	f.Add(short[:len(short)/2])
	f.Add([]byte{0xd2, 0x84, 0x43, 0xa1, 0x01, 0x27, 0xa0, 0x40, 0x40})
	f.Add([]byte{0xd2, 0x84, 0x43, 0xa1, 0x01, 0x27, 0xa0, 0x41, 0xbf, 0x58, 0x40})
	f.Add([]byte{0xd2, 0x9f, 0xff})
	f.Add([]byte{})
	pub := fx.alice.key.Public().(ed25519.PublicKey)
	f.Fuzz(func(t *testing.T, b []byte) {
		// The hand-written decoder reaches the reflection codec's verdict, claims and signature
		// check on every input (reference_test.go).
		requireSameVerdict(t, b, pub, session)
		rec, err := Parse(b)
		if err != nil {
			require.Nil(t, rec)
			return
		}
		// Anything accepted is in the one deterministic form and re-encodes to the signed bytes.
		again, err := rec.Claims.Marshal()
		require.NoError(t, err)
		require.True(t, bytes.Equal(again, rec.payload), "claims re-encode differently")
		require.LessOrEqual(t, len(rec.Raw()), MaxRecordSize)
		// Verification of arbitrary accepted input must not panic; success is possible only for
		// the untouched seeds.
		if rec.Verify(pub, session) == nil {
			require.True(t, bytes.Equal(b, full) || bytes.Equal(b, short), "a mutated record verified")
		}
	})
}

func FuzzReadFrame(f *testing.F) {
	var buf bytes.Buffer
	_ = WriteFrame(&buf, FrameRecord, []byte("record bytes"))
	f.Add(buf.Bytes())
	rej, _ := EncodeReject(ReasonReplay, "again")
	buf.Reset()
	_ = WriteFrame(&buf, FrameReject, rej)
	f.Add(buf.Bytes())
	f.Add([]byte{2, 0, 0})
	f.Add([]byte{1, 0xff, 0xff, 0})
	f.Add([]byte{3, 0, 5, 1})
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, in []byte) {
		typ, body, err := ReadFrame(bytes.NewReader(in), MaxRecordSize)
		if err != nil {
			return
		}
		require.LessOrEqual(t, len(body), MaxRecordSize)
		var out bytes.Buffer
		require.NoError(t, WriteFrame(&out, typ, body))
		require.True(t, bytes.HasPrefix(in, out.Bytes()), "a frame re-encodes to the bytes it was read from")
		if typ == FrameReject {
			if r, err := DecodeReject(body); err == nil {
				require.LessOrEqual(t, len(r.Message), MaxRejectMessage)
			}
		}
	})
}

func FuzzParseDatagram(f *testing.F) {
	for _, id := range []uint64{0, 63, 64, 1 << 20, 1<<62 - 1} {
		b, _ := AppendDatagramHeader(nil, id)
		f.Add(append(b, 0x45, 0x00))
	}
	f.Add([]byte{0x40})
	f.Fuzz(func(t *testing.T, in []byte) {
		id, pkt, err := ParseDatagram(in)
		if err != nil {
			return
		}
		hdr, err := AppendDatagramHeader(nil, id)
		require.NoError(t, err)
		require.Equal(t, in, append(hdr, pkt...), "the flow id has exactly one encoding")
	})
}

func FuzzAdmit(f *testing.F) {
	e := newAdmitEnv(f)
	s := session(f, e.f.n1, "payments")
	seed := mustSign(f, claimsFor(e.f.alice, 1, e.now), e.f.alice.key, s.AAD)
	f.Add(seed)
	f.Add(seed[:100])
	e.now = e.now.Add(time.Millisecond)
	f.Fuzz(func(t *testing.T, in []byte) {
		s.Replay = &ReplayWindow{}
		ad, err := e.v.Admit(s, in)
		if err != nil {
			var d *Denial
			require.ErrorAs(t, err, &d)
			return
		}
		require.True(t, bytes.Equal(in, seed), "only the genuine record is admitted")
		require.Equal(t, e.f.alice.id(), ad.Agent.Agent)
	})
}
