package attest

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"syscall"
)

// Netlink sock_diag (linux/sock_diag.h, linux/inet_diag.h): an exact lookup of one TCP socket by
// its 4-tuple. The kernel finds it in its hash table, where reading /proc/net/tcp walks every
// bucket (about 1 ms on this machine whatever the number of sockets).
const (
	netlinkSockDiag   = 4  // NETLINK_SOCK_DIAG
	sockDiagByFamily  = 20 // SOCK_DIAG_BY_FAMILY
	nlmsgHdrLen       = 16
	inetDiagReqLen    = 56 // struct inet_diag_req_v2
	inetDiagMsgLen    = 72 // struct inet_diag_msg
	inetDiagSockIDLen = 48
)

// errDiagNotFound: the kernel has no such socket (ENOENT), as opposed to a failed query.
var errDiagNotFound = errors.New("sock_diag: no such socket")

// diagSocket asks the kernel for the inode and uid of the TCP socket local -> remote.
func diagSocket(local, remote netip.AddrPort) (sockInfo, error) {
	fam := uint8(syscall.AF_INET)
	if local.Addr().Is6() || remote.Addr().Is6() {
		fam = syscall.AF_INET6
	}
	s, err := diagQuery(fam, local, remote)
	if errors.Is(err, errDiagNotFound) && fam == syscall.AF_INET {
		// An AF_INET6 socket connected to an IPv4 address shows the mapped form.
		m := func(a netip.AddrPort) netip.AddrPort {
			return netip.AddrPortFrom(netip.AddrFrom16(a.Addr().As16()), a.Port())
		}
		return diagQuery(syscall.AF_INET6, m(local), m(remote))
	}
	return s, err
}

func diagQuery(fam uint8, local, remote netip.AddrPort) (sockInfo, error) {
	fd, err := syscall.Socket(syscall.AF_NETLINK, syscall.SOCK_DGRAM|syscall.SOCK_CLOEXEC, netlinkSockDiag)
	if err != nil {
		return sockInfo{}, fmt.Errorf("sock_diag socket: %w", err)
	}
	defer func() { _ = syscall.Close(fd) }()
	tv := syscall.Timeval{Sec: 1}
	_ = syscall.SetsockoptTimeval(fd, syscall.SOL_SOCKET, syscall.SO_RCVTIMEO, &tv)
	req := make([]byte, nlmsgHdrLen+inetDiagReqLen)
	ne := binary.NativeEndian
	ne.PutUint32(req[0:], uint32(len(req)))
	ne.PutUint16(req[4:], sockDiagByFamily)
	ne.PutUint16(req[6:], syscall.NLM_F_REQUEST)
	ne.PutUint32(req[8:], 1) // seq
	r := req[nlmsgHdrLen:]
	r[0] = fam
	r[1] = syscall.IPPROTO_TCP
	ne.PutUint32(r[4:], 0xffffffff) // all states
	putSockID(r[8:8+inetDiagSockIDLen], fam, local, remote)
	if err := syscall.Sendto(fd, req, 0, &syscall.SockaddrNetlink{Family: syscall.AF_NETLINK}); err != nil {
		return sockInfo{}, fmt.Errorf("sock_diag send: %w", err)
	}
	buf := make([]byte, 8192)
	n, _, err := syscall.Recvfrom(fd, buf, 0)
	if err != nil {
		return sockInfo{}, fmt.Errorf("sock_diag receive: %w", err)
	}
	return parseDiagReply(buf[:n])
}

// putSockID writes struct inet_diag_sockid: ports and addresses in network order, no interface,
// no cookie (INET_DIAG_NOCOOKIE).
func putSockID(b []byte, fam uint8, local, remote netip.AddrPort) {
	binary.BigEndian.PutUint16(b[0:], local.Port())
	binary.BigEndian.PutUint16(b[2:], remote.Port())
	put := func(dst []byte, a netip.Addr) {
		if fam == syscall.AF_INET {
			v := a.Unmap().As4()
			copy(dst, v[:])
			return
		}
		v := a.As16()
		copy(dst, v[:])
	}
	put(b[4:20], local.Addr())
	put(b[20:36], remote.Addr())
	binary.NativeEndian.PutUint32(b[40:], 0xffffffff)
	binary.NativeEndian.PutUint32(b[44:], 0xffffffff)
}

// parseDiagReply reads one netlink answer: an inet_diag_msg (its inode and uid) or an error.
func parseDiagReply(b []byte) (sockInfo, error) {
	ne := binary.NativeEndian
	if len(b) < nlmsgHdrLen {
		return sockInfo{}, fmt.Errorf("sock_diag: short reply (%d bytes)", len(b))
	}
	l := int(ne.Uint32(b[0:]))
	typ := ne.Uint16(b[4:])
	if l < nlmsgHdrLen || l > len(b) {
		return sockInfo{}, fmt.Errorf("sock_diag: reply length %d of %d bytes", l, len(b))
	}
	body := b[nlmsgHdrLen:l]
	switch typ {
	case syscall.NLMSG_ERROR:
		if len(body) < 4 {
			return sockInfo{}, errors.New("sock_diag: short error message")
		}
		code := -int32(ne.Uint32(body))
		if syscall.Errno(code) == syscall.ENOENT {
			return sockInfo{}, errDiagNotFound
		}
		return sockInfo{}, fmt.Errorf("sock_diag: %w", syscall.Errno(code))
	case sockDiagByFamily:
		if len(body) < inetDiagMsgLen {
			return sockInfo{}, fmt.Errorf("sock_diag: short inet_diag_msg (%d bytes)", len(body))
		}
		// struct inet_diag_msg: idiag_uid at 64, idiag_inode at 68.
		return sockInfo{inode: uint64(ne.Uint32(body[68:])), uid: ne.Uint32(body[64:]), hasUID: true}, nil
	}
	return sockInfo{}, fmt.Errorf("sock_diag: unexpected message type %d", typ)
}
