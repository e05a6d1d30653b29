package wireguard

import (
	"bytes"
	"io"
	"net/netip"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestRequestVerdictRoundTrip(t *testing.T) {
	v6 := Tuple{Src: netip.MustParseAddr("fd00::1"), Dst: netip.MustParseAddr("fd00::2"), SrcPort: 9, DstPort: 53, Proto: ProtoUDP}
	var buf bytes.Buffer
	for i, tp := range []Tuple{out, v6} {
		b, err := AppendRequest(nil, Request{ID: uint32(i + 1), Tuple: tp, Record: []byte("record")})
		require.NoError(t, err)
		buf.Write(b)
		one, err := ParseRequest(b)
		require.NoError(t, err)
		require.Equal(t, tp, one.Tuple)
	}
	for i, tp := range []Tuple{out, v6} {
		r, err := ReadRequest(&buf)
		require.NoError(t, err)
		require.Equal(t, uint32(i+1), r.ID)
		require.Equal(t, tp, r.Tuple)
		require.Equal(t, []byte("record"), r.Record)
	}
	_, err := ReadRequest(&buf)
	require.ErrorIs(t, err, io.EOF)

	for _, v := range []Verdict{{ID: 7}, {ID: 8, Reject: []byte{0xa1, 0x01, 0x0b}}} {
		b, err := AppendVerdict(nil, v)
		require.NoError(t, err)
		got, err := ReadVerdict(bytes.NewReader(b))
		require.NoError(t, err)
		require.Equal(t, v.ID, got.ID)
		require.Equal(t, len(v.Reject), len(got.Reject))
	}
}

func TestWireRefusesMalformed(t *testing.T) {
	good, err := AppendRequest(nil, Request{ID: 1, Tuple: out, Record: []byte("r")})
	require.NoError(t, err)
	for name, b := range map[string][]byte{
		"short":         good[:10],
		"icmp":          func() []byte { c := append([]byte(nil), good...); c[4] = 1; return c }(),
		"empty record":  func() []byte { c := append([]byte(nil), good[:requestHeader]...); c[41], c[42] = 0, 0; return c }(),
		"length lies":   append(append([]byte(nil), good...), 0),
		"mixed address": func() []byte { c := append([]byte(nil), good...); c[23+10], c[23+11] = 0, 0; return c }(),
	} {
		_, err := ParseRequest(b)
		require.ErrorIs(t, err, ErrFrame, name)
	}
	_, err = ReadVerdict(bytes.NewReader([]byte{0, 0, 0, 1, 0, 0, 3, 1, 2, 3}))
	require.ErrorIs(t, err, ErrFrame)
	_, err = ReadHello(bytes.NewReader([]byte{0xff, 0xff}))
	require.ErrorIs(t, err, ErrFrame)
	var hb bytes.Buffer
	require.NoError(t, WriteHello(&hb, []byte("binding")))
	got, err := ReadHello(&hb)
	require.NoError(t, err)
	require.Equal(t, []byte("binding"), got)
}

func FuzzParseRequest(f *testing.F) {
	good, _ := AppendRequest(nil, Request{ID: 1, Tuple: out, Record: []byte("record")})
	f.Add(good)
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := ParseRequest(b)
		if err != nil {
			return
		}
		re, err := AppendRequest(nil, r)
		if err != nil {
			t.Fatalf("parsed request does not encode: %v", err)
		}
		if r2, err := ParseRequest(re); err != nil || r2.Tuple != r.Tuple {
			t.Fatalf("round trip: %v", err)
		}
	})
}

func FuzzReadVerdict(f *testing.F) {
	b, _ := AppendVerdict(nil, Verdict{ID: 3, Reject: []byte{1, 2}})
	f.Add(b)
	f.Add([]byte{0, 0, 0, 1, 0, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		_, _ = ReadVerdict(bytes.NewReader(b))
		_, _ = ReadHello(bytes.NewReader(b))
	})
}

func TestCutNoticeRoundTrip(t *testing.T) {
	v6 := Tuple{Src: netip.MustParseAddr("fd00::1"), Dst: netip.MustParseAddr("fd00::2"), SrcPort: 9, DstPort: 53, Proto: ProtoUDP}
	var buf bytes.Buffer
	for _, tp := range []Tuple{out, v6} {
		b, err := AppendCut(nil, tp)
		require.NoError(t, err)
		require.Len(t, b, CutNoticeSize)
		buf.Write(b)
	}
	for _, tp := range []Tuple{out, v6} {
		got, err := ReadCut(&buf)
		require.NoError(t, err)
		require.Equal(t, tp, got)
	}
	_, err := ReadCut(&buf)
	require.ErrorIs(t, err, io.EOF)

	good, err := AppendCut(nil, out)
	require.NoError(t, err)
	for name, b := range map[string][]byte{
		"short":         good[:CutNoticeSize-1],
		"long":          append(append([]byte(nil), good...), 0),
		"icmp":          func() []byte { c := append([]byte(nil), good...); c[0] = 1; return c }(),
		"mixed address": func() []byte { c := append([]byte(nil), good...); c[19+10], c[19+11] = 0, 0; return c }(),
	} {
		_, err := ParseCut(b)
		require.ErrorIs(t, err, ErrFrame, name)
	}
	_, err = ReadCut(bytes.NewReader(good[:5]))
	require.ErrorIs(t, err, ErrFrame, "a notice cut short is malformed, not a clean end")
	_, err = AppendCut(nil, Tuple{Src: out.Src, Dst: v6.Dst, Proto: ProtoTCP})
	require.ErrorIs(t, err, ErrFrame)
}

func FuzzParseCut(f *testing.F) {
	good, _ := AppendCut(nil, out)
	f.Add(good)
	v6, _ := AppendCut(nil, Tuple{Src: netip.MustParseAddr("fd00::1"), Dst: netip.MustParseAddr("fd00::2"), SrcPort: 9, DstPort: 53, Proto: ProtoUDP})
	f.Add(v6)
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		tp, err := ParseCut(b)
		if err != nil {
			return
		}
		re, err := AppendCut(nil, tp)
		if err != nil {
			t.Fatalf("parsed notice does not encode: %v", err)
		}
		if tp2, err := ParseCut(re); err != nil || tp2 != tp {
			t.Fatalf("round trip: %v", err)
		}
		_, _ = ReadCut(bytes.NewReader(b))
	})
}
