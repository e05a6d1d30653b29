package tunnel

import (
	"bytes"
	"errors"
	"io"
	"runtime"
	"testing"

	"github.com/quic-go/quic-go/quicvarint"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestPacketFrameRoundTrip(t *testing.T) {
	var wire []byte
	sizes := []int{0, 1, 63, 64, 1400, 16383, 16384, MaxPacketPayload}
	for i, n := range sizes {
		wire = appendPacketFrame(wire, pattern(n, byte(i)))
	}
	r := bytes.NewReader(wire)
	for i, n := range sizes {
		got, err := readPacketFrame(r, MaxPacketPayload)
		require.NoError(t, err)
		assert.Equal(t, pattern(n, byte(i)), got)
	}
	_, err := readPacketFrame(r, MaxPacketPayload)
	require.ErrorIs(t, err, io.EOF, "a clean end between frames")
	assert.Equal(t, []byte{0x7f, 0xff}, appendPacketFrame(nil, make([]byte, 16383))[:2], "length 16383: 2-byte varint")
	assert.Equal(t, []byte{0x80, 0x00, 0xff, 0xff}, appendPacketFrame(nil, make([]byte, MaxPacketPayload))[:4], "length 65535: 4-byte varint")
}

func TestReadPacketFrameRefusals(t *testing.T) {
	for name, tc := range map[string]struct {
		in   []byte
		want error
		read int // bytes consumed before the refusal
	}{
		"over the bound":     {quicvarint.Append(nil, MaxPacketPayload+1), ErrFrameTooLarge, 4},
		"largest varint":     {append(quicvarint.Append(nil, 1<<62-1), 1, 2, 3), ErrFrameTooLarge, 8},
		"non-minimal length": {[]byte{0x40, 0x01, 'x'}, ErrFrame, 2},
		"length cut":         {[]byte{0xc0, 0, 0}, ErrFrame, 3},
		"payload cut":        {[]byte{0x05, 'a', 'b'}, ErrFrame, 3},
	} {
		t.Run(name, func(t *testing.T) {
			r := bytes.NewReader(tc.in)
			_, err := readPacketFrame(r, MaxPacketPayload)
			require.ErrorIs(t, err, tc.want)
			assert.Equal(t, tc.read, len(tc.in)-r.Len())
		})
	}
}

// TestReadPacketFrameAllocationBound: a length over the bound is refused before any buffer is
// allocated for it, a frame claiming the bound costs what arrived of it (one first chunk), not the
// claim, and a whole frame less than twice its size.
func TestReadPacketFrameAllocationBound(t *testing.T) {
	allocated := func(in []byte) uint64 {
		const runs = 200
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		for range runs {
			_, _ = readPacketFrame(bytes.NewReader(in), MaxPacketPayload)
		}
		runtime.ReadMemStats(&after)
		return (after.TotalAlloc - before.TotalAlloc) / runs
	}
	assert.Less(t, allocated(quicvarint.Append(nil, 1<<62-1)), uint64(1024), "refused claim")
	assert.Less(t, allocated(quicvarint.Append(nil, MaxPacketPayload+1)), uint64(1024), "refused claim")
	assert.Less(t, allocated(append(quicvarint.Append(nil, MaxPacketPayload), 1, 2, 3)), uint64(firstChunk+1024), "claim of 64 KiB, 3 bytes sent")
	whole := appendPacketFrame(nil, make([]byte, MaxPacketPayload))
	assert.Less(t, allocated(whole), uint64(2*MaxPacketPayload+firstChunk), "whole frame at the bound")
}

// trickle returns at most one byte per Read, as a slow stream may.
type trickle struct{ r io.Reader }

func (t trickle) Read(p []byte) (int, error) { return t.r.Read(p[:min(len(p), 1)]) }

func TestReadPacketFrameFromTrickle(t *testing.T) {
	want := pattern(10000, 9)
	got, err := readPacketFrame(trickle{bytes.NewReader(appendPacketFrame(nil, want))}, MaxPacketPayload)
	require.NoError(t, err)
	assert.Equal(t, want, got)
	assert.Equal(t, len(want), cap(got), "grown to the frame's length, not past it")
}

// FuzzReadPacketFrame: whatever a peer writes on a packet flow's control stream, the reader
// returns whole frames within the bound, each the canonical encoding of exactly the bytes it
// consumed, or io.EOF at a frame boundary, or a frame error; it never panics and never reads
// past the frame it refuses or returns.
func FuzzReadPacketFrame(f *testing.F) {
	f.Add(uint16(MaxPacketPayload), appendPacketFrame(appendPacketFrame(nil, []byte("one")), pattern(1400, 1)))
	// Seeds stay small (a whole frame at the bound is tested above): the fuzzer slows to a crawl
	// minimizing 64 KiB inputs, and small limits reach the same bound checks.
	f.Add(uint16(300), appendPacketFrame(nil, pattern(300, 2)))
	f.Add(uint16(MaxPacketPayload), append(quicvarint.Append(nil, MaxPacketPayload), 1, 2, 3))
	f.Add(uint16(MaxPacketPayload), quicvarint.Append(nil, MaxPacketPayload+1))
	f.Add(uint16(100), appendPacketFrame(nil, pattern(101, 3)))
	f.Add(uint16(MaxPacketPayload), []byte{0x40, 0x01, 'x'})
	f.Add(uint16(MaxPacketPayload), []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	f.Add(uint16(MaxPacketPayload), []byte{0x80, 0x00, 0x10})
	f.Add(uint16(MaxPacketPayload), []byte{0x05, 'a', 'b'})
	f.Add(uint16(MaxPacketPayload), []byte{0x00})
	f.Add(uint16(0), []byte{})
	f.Fuzz(func(t *testing.T, limit uint16, in []byte) {
		r := bytes.NewReader(in)
		for {
			start := len(in) - r.Len()
			b, err := readPacketFrame(r, int(limit))
			end := len(in) - r.Len()
			if err != nil {
				switch {
				case errors.Is(err, io.EOF):
					if start != len(in) {
						t.Fatalf("EOF with %d bytes left", len(in)-start)
					}
				case errors.Is(err, ErrFrameTooLarge):
					if end-start > 8 {
						t.Fatalf("read %d bytes of a refused frame", end-start)
					}
				case errors.Is(err, ErrFrame):
				default:
					t.Fatalf("unexpected error class: %v", err)
				}
				return
			}
			if len(b) > int(limit) {
				t.Fatalf("returned %d bytes, limit %d", len(b), limit)
			}
			if !bytes.Equal(appendPacketFrame(nil, b), in[start:end]) {
				t.Fatalf("frame of %d bytes is not the %d bytes consumed", len(b), end-start)
			}
		}
	})
}
