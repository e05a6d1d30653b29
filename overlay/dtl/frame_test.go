package dtl

import (
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestFrameRoundTrip(t *testing.T) {
	var buf bytes.Buffer
	rej, err := EncodeReject(ReasonReplay, "sequence 4 already admitted")
	require.NoError(t, err)
	frames := []struct {
		t    FrameType
		body []byte
	}{
		{FrameRecord, bytes.Repeat([]byte{0xab}, 1500)},
		{FrameAccept, nil},
		{FrameReject, rej},
		{FrameRecord, make([]byte, MaxFrameBody)},
	}
	for _, f := range frames {
		require.NoError(t, WriteFrame(&buf, f.t, f.body))
	}
	buf.WriteString("payload after the frames")
	for _, f := range frames {
		typ, body, err := ReadFrame(&buf, MaxFrameBody)
		require.NoError(t, err)
		assert.Equal(t, f.t, typ)
		assert.Equal(t, len(f.body), len(body))
		assert.True(t, bytes.Equal(f.body, body))
	}
	assert.Equal(t, "payload after the frames", buf.String(), "ReadFrame must not read past its frame")
}

func TestReadFrameRefusals(t *testing.T) {
	valid := func(t FrameType, n int) []byte {
		var b bytes.Buffer
		if err := WriteFrame(&b, t, bytes.Repeat([]byte{1}, n)); err != nil {
			panic(err)
		}
		return b.Bytes()
	}
	cases := []struct {
		name string
		in   []byte
		max  int
		want error
	}{
		{"empty stream", nil, MaxRecordSize, io.EOF},
		{"header cut", []byte{1, 0}, MaxRecordSize, ErrTruncated},
		{"body cut", valid(FrameRecord, 100)[:50], MaxRecordSize, ErrTruncated},
		{"unknown type", []byte{9, 0, 0}, MaxRecordSize, ErrFrameType},
		{"type zero", []byte{0, 0, 0}, MaxRecordSize, ErrFrameType},
		{"declares more than the cap", valid(FrameRecord, MaxRecordSize+1), MaxRecordSize, ErrTooLarge},
		{"huge declared length with no body", []byte{1, 0xff, 0xff}, MaxRecordSize, ErrTooLarge},
		{"accept with a body", valid(FrameAccept, 1), MaxRecordSize, ErrMalformed},
		{"garbage text", []byte("GET / HTTP/1.1\r\n"), MaxRecordSize, ErrFrameType},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := ReadFrame(bytes.NewReader(tc.in), tc.max)
			require.ErrorIs(t, err, tc.want)
		})
	}
}

type failingWriter struct{}

var errDiskGone = errors.New("stream reset")

func (failingWriter) Write([]byte) (int, error) { return 0, errDiskGone }

func TestWriteFrameRefusals(t *testing.T) {
	require.ErrorIs(t, WriteFrame(io.Discard, FrameType(7), nil), ErrFrameType)
	require.ErrorIs(t, WriteFrame(io.Discard, FrameRecord, make([]byte, MaxFrameBody+1)), ErrTooLarge)
	require.ErrorIs(t, WriteFrame(failingWriter{}, FrameAccept, nil), errDiskGone)
}

func TestRejectBody(t *testing.T) {
	long := strings.Repeat("é", 200) // 400 bytes, two per rune
	b, err := EncodeReject(ReasonPolicy, long)
	require.NoError(t, err)
	rej, err := DecodeReject(b)
	require.NoError(t, err)
	assert.Equal(t, ReasonPolicy, rej.Code)
	assert.Len(t, rej.Message, MaxRejectMessage)
	assert.Contains(t, rej.Error(), "(policy)")

	for name, in := range map[string][]byte{
		"no code":      {0xa1, 0x02, 0x61, 'x'},
		"unknown key":  {0xa2, 0x01, 0x01, 0x05, 0x01},
		"code too big": {0xa1, 0x01, 0x19, 0x01, 0x00},
		"not a map":    {0x01},
		"duplicate":    {0xa2, 0x01, 0x01, 0x01, 0x02},
		"empty":        nil,
	} {
		t.Run(name, func(t *testing.T) {
			_, err := DecodeReject(in)
			require.Error(t, err)
		})
	}
}

func TestDatagramHeader(t *testing.T) {
	for _, id := range []uint64{0, 1, 63, 64, 16383, 16384, 1<<30 - 1, 1 << 30, 1<<62 - 1} {
		b, err := AppendDatagramHeader([]byte{}, id)
		require.NoError(t, err)
		b = append(b, "packet"...)
		got, pkt, err := ParseDatagram(b)
		require.NoError(t, err, "id %d", id)
		assert.Equal(t, id, got)
		assert.Equal(t, "packet", string(pkt))
	}
	_, err := AppendDatagramHeader(nil, 1<<62)
	require.ErrorIs(t, err, ErrMalformed)

	_, _, err = ParseDatagram(nil)
	require.ErrorIs(t, err, ErrTruncated)
	_, _, err = ParseDatagram([]byte{0xc0, 0, 0})
	require.ErrorIs(t, err, ErrTruncated)
	_, _, err = ParseDatagram([]byte{0x40, 0x05}) // 5 in two bytes
	require.ErrorIs(t, err, ErrMalformed)
}
