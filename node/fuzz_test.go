package node

import (
	"bytes"
	"errors"
	"testing"
)

// FuzzReadDirectory: a directory message from a peer never panics, every refusal wraps
// ErrBadDirectory, and anything accepted is within the limits and can be sent on again.
func FuzzReadDirectory(f *testing.F) {
	ok, err := EncodeDirectory([][]byte{{0x30, 0x03, 0x02, 0x01, 0x01}, bytes.Repeat([]byte{7}, 40)})
	if err != nil {
		f.Fatal(err)
	}
	empty, _ := EncodeDirectory(nil)
	f.Add(ok)
	f.Add(empty)
	f.Add(ok[:len(ok)-3])
	f.Add([]byte{0, 0, 0, 1, 0x80})
	f.Add([]byte{0xff, 0xff, 0xff, 0xff})
	f.Add([]byte{0, 0, 0, 2, 0x9f, 0xff})
	f.Add([]byte{0, 0, 0, 3, 0x81, 0x41, 0x00})
	f.Fuzz(func(t *testing.T, b []byte) {
		certs, err := ReadDirectory(bytes.NewReader(b))
		if err != nil {
			if !errors.Is(err, ErrBadDirectory) {
				t.Fatalf("error does not wrap ErrBadDirectory: %v", err)
			}
			return
		}
		if _, err := EncodeDirectory(certs); err != nil {
			t.Fatalf("accepted list does not re-encode: %v", err)
		}
		if len(certs) > MaxDirectoryEntries {
			t.Fatalf("accepted %d entries", len(certs))
		}
	})
}
