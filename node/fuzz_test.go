package node

import (
	"bytes"
	"errors"
	"net/netip"
	"testing"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/overlay/dtl"
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

// FuzzListenKey: any listen network and address an SDK caller passes gives a key for a real port
// or an ErrUnsupported refusal, never a panic.
func FuzzListenKey(f *testing.F) {
	a := &Agent{id: identity.AgentID("acme.internal", "payments", "ledger"), ip: netip.MustParseAddr("100.100.1.5")}
	f.Add(uint8(dtl.ProtoTCP), "tcp", ":8080")
	f.Add(uint8(dtl.ProtoUDP), "udp", "100.100.1.5:53")
	f.Add(uint8(dtl.ProtoUDP), "udp6", "[::]:0")
	f.Add(uint8(dtl.ProtoTCP), "tcp4", "[::1%eth0]:99999")
	f.Add(uint8(dtl.ProtoICMP), "ip", "")
	f.Fuzz(func(t *testing.T, proto uint8, network, addr string) {
		k, err := a.listenKey(dtl.Proto(proto), network, addr)
		if err != nil {
			if !errors.Is(err, ErrUnsupported) {
				t.Fatalf("error does not wrap ErrUnsupported: %v", err)
			}
			return
		}
		if k.port == 0 || k.zone != "payments" || k.name != "ledger" {
			t.Fatalf("accepted %q %q as %+v", network, addr, k)
		}
	})
}
