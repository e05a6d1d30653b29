package daemon

import (
	"encoding/binary"
	"errors"
	"syscall"
	"testing"

	"github.com/ute-project/ute/node/attest"
)

func udpDiagReply(typ uint16, body []byte) []byte {
	b := make([]byte, diagHdrLen+len(body))
	binary.NativeEndian.PutUint32(b, uint32(len(b)))
	binary.NativeEndian.PutUint16(b[4:], typ)
	copy(b[diagHdrLen:], body)
	return b
}

// FuzzUDPDiagReply: any bytes give an inode or an ErrNoOwner error, never a panic.
func FuzzUDPDiagReply(f *testing.F) {
	msg := make([]byte, diagMsgLen)
	binary.NativeEndian.PutUint32(msg[diagInodeOffs:], 4242)
	f.Add(udpDiagReply(diagByFamily, msg))
	f.Add(udpDiagReply(syscall.NLMSG_ERROR, []byte{0xfe, 0xff, 0xff, 0xff}))
	f.Add([]byte{1, 2, 3})
	f.Fuzz(func(t *testing.T, b []byte) {
		ino, err := parseUDPDiagReply(b)
		if err != nil && !errors.Is(err, attest.ErrNoOwner) {
			t.Fatalf("error without ErrNoOwner: %v", err)
		}
		if err != nil && ino != 0 {
			t.Fatalf("inode %d with error %v", ino, err)
		}
	})
}

func TestUDPDiagReply(t *testing.T) {
	msg := make([]byte, diagMsgLen)
	binary.NativeEndian.PutUint32(msg[diagInodeOffs:], 4242)
	ino, err := parseUDPDiagReply(udpDiagReply(diagByFamily, msg))
	if err != nil || ino != 4242 {
		t.Fatalf("inode %d, %v", ino, err)
	}
	_, err = parseUDPDiagReply(udpDiagReply(syscall.NLMSG_ERROR, []byte{0xfe, 0xff, 0xff, 0xff})) // -ENOENT
	if !errors.Is(err, errNoUDPSocket) || !errors.Is(err, attest.ErrNoOwner) || !errors.Is(err, syscall.ENOENT) {
		t.Fatalf("ENOENT: %v", err)
	}
	if _, err := parseUDPDiagReply(udpDiagReply(diagByFamily, msg[:10])); !errors.Is(err, attest.ErrNoOwner) {
		t.Fatalf("short message: %v", err)
	}
}
