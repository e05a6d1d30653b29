package membership

import (
	"bytes"
	"errors"
	"io"
	"testing"
)

// FuzzParseMessage: a gossip message parses to a bounded record or fails with ErrMalformed.
func FuzzParseMessage(f *testing.F) {
	f.Add(encodeMessage([]byte("record")))
	f.Add([]byte{})
	f.Add([]byte{msgRecord})
	f.Add([]byte{7, 1, 2})
	f.Fuzz(func(t *testing.T, in []byte) {
		raw, err := parseMessage(in, 1024)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("unexpected error %v", err)
			}
			return
		}
		if len(raw) == 0 || len(raw) > 1024 || !bytes.Equal(encodeMessage(raw), in) {
			t.Fatalf("bad parse of %x", in)
		}
	})
}

// FuzzParseState: a push/pull state parses to bounded records that re-encode to the same bytes,
// or fails with ErrMalformed.
func FuzzParseState(f *testing.F) {
	good, _ := encodeState([][]byte{[]byte("a"), []byte("bcd")}, 0, 1<<20)
	f.Add(good)
	f.Add([]byte{stateVersion, 0, 0, 0, 0})
	f.Add([]byte{stateVersion, 0xff, 0xff, 0xff, 0xff})
	f.Add([]byte{stateVersion, 0, 0, 0, 1, 0, 0, 0, 0})
	f.Add([]byte{2})
	f.Fuzz(func(t *testing.T, in []byte) {
		recs, err := parseState(in, 1<<16, 512)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("unexpected error %v", err)
			}
			return
		}
		for _, r := range recs {
			if len(r) == 0 || len(r) > 512 {
				t.Fatalf("record of %d bytes", len(r))
			}
		}
		again, skipped := encodeState(recs, 0, 1<<16)
		if skipped != 0 || !bytes.Equal(again, in) {
			t.Fatal("state does not re-encode to the same bytes")
		}
	})
}

// FuzzReadPushRecord: a record push yields bounded records, a clean io.EOF, or ErrMalformed,
// and never reads past the record it returns.
func FuzzReadPushRecord(f *testing.F) {
	var b bytes.Buffer
	_ = writePushRecord(&b, []byte("record"))
	f.Add(b.Bytes())
	f.Add([]byte{})
	f.Add([]byte{0, 0, 0, 0})
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 1})
	f.Add([]byte{0, 0})
	f.Fuzz(func(t *testing.T, in []byte) {
		r := bytes.NewReader(in)
		for {
			before := r.Len()
			raw, err := readPushRecord(r, 256)
			if errors.Is(err, io.EOF) {
				return
			}
			if err != nil {
				if !errors.Is(err, ErrMalformed) {
					t.Fatalf("unexpected error %v", err)
				}
				return
			}
			if len(raw) == 0 || len(raw) > 256 || before-r.Len() != 4+len(raw) {
				t.Fatalf("record of %d bytes consumed %d", len(raw), before-r.Len())
			}
		}
	})
}
