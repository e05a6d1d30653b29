package attest

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
)

// Netlink sock_diag (linux/sock_diag.h, linux/inet_diag.h): an exact lookup of one TCP or UDP
// socket by its addresses. The kernel finds it in its hash table, where reading /proc/net/tcp
// walks every bucket (about 1 ms on this machine whatever the number of sockets).
const (
	netlinkSockDiag   = 4  // NETLINK_SOCK_DIAG
	sockDiagByFamily  = 20 // SOCK_DIAG_BY_FAMILY
	nlmsgHdrLen       = 16
	inetDiagReqLen    = 56 // struct inet_diag_req_v2
	inetDiagMsgLen    = 72 // struct inet_diag_msg
	inetDiagSockIDLen = 48
	diagBufLen        = 8192
)

// errDiagNotFound: the kernel has no such socket (ENOENT), as opposed to a failed query.
var errDiagNotFound = errors.New("sock_diag: no such socket")

// ErrDiagClosed is returned by a lookup on a closed Diag.
var ErrDiagClosed = errors.New("attest: sock_diag sockets closed")

// Diag is a few netlink sock_diag sockets opened once and reused by every lookup. A netlink
// socket answers for the network namespace it was created in, whichever thread later uses it:
// a Diag opened next to a TUN interface attests the sockets that live there from any goroutine,
// with no thread locked into the namespace and no hand-off per flow (on a 2-core VM the two
// context switches of that hand-off cost more than the lookup). It also saves the socket and
// close of a per-lookup socket. Safe for concurrent use; a lookup waits for a free socket.
type Diag struct {
	pool      chan *diagConn
	done      chan struct{}
	closeOnce sync.Once
	n         int
	seq       atomic.Uint32
}

// diagConn is one sock_diag socket and its buffers.
type diagConn struct {
	fd  int
	req [nlmsgHdrLen + inetDiagReqLen]byte
	buf [diagBufLen]byte
}

// OpenDiag opens n sock_diag sockets in the network namespace of the calling thread: call it
// where the sockets to attest live (the goroutine that created the interface, still on its
// thread).
func OpenDiag(n int) (*Diag, error) {
	n = max(n, 1)
	d := &Diag{pool: make(chan *diagConn, n), done: make(chan struct{}), n: n}
	for range n {
		c, err := newDiagConn()
		if err != nil {
			d.closeIdle()
			return nil, err
		}
		d.pool <- c
	}
	return d, nil
}

func newDiagConn() (*diagConn, error) {
	fd, err := syscall.Socket(syscall.AF_NETLINK, syscall.SOCK_DGRAM|syscall.SOCK_CLOEXEC, netlinkSockDiag)
	if err != nil {
		return nil, fmt.Errorf("sock_diag socket: %w", err)
	}
	// A lookup is one request and one answer; the timeout only bounds a kernel that never
	// answers.
	tv := syscall.Timeval{Sec: 1}
	if err := syscall.SetsockoptTimeval(fd, syscall.SOL_SOCKET, syscall.SO_RCVTIMEO, &tv); err != nil {
		_ = syscall.Close(fd)
		return nil, fmt.Errorf("sock_diag socket timeout: %w", err)
	}
	return &diagConn{fd: fd}, nil
}

// Close closes the sockets once the lookups under way have returned them.
func (d *Diag) Close() error {
	d.closeOnce.Do(func() {
		close(d.done)
		for range d.n {
			_ = syscall.Close((<-d.pool).fd)
		}
	})
	return nil
}

// closeIdle closes the sockets in the pool (OpenDiag's failure path, nothing lent out).
func (d *Diag) closeIdle() {
	for {
		select {
		case c := <-d.pool:
			_ = syscall.Close(c.fd)
		default:
			return
		}
	}
}

// lookup asks for the socket (proto, local -> remote). With a nil Diag it opens a socket for
// this one lookup, in the namespace of the thread it runs on.
func (d *Diag) lookup(proto uint8, local, remote netip.AddrPort) (sockInfo, error) {
	if d == nil {
		c, err := newDiagConn()
		if err != nil {
			return sockInfo{}, err
		}
		defer func() { _ = syscall.Close(c.fd) }()
		return c.lookup(1, proto, local, remote)
	}
	select {
	case <-d.done: // closing: never lend a socket Close is about to take
		return sockInfo{}, ErrDiagClosed
	default:
	}
	select {
	case c := <-d.pool:
		defer func() { d.pool <- c }()
		return c.lookup(d.seq.Add(1), proto, local, remote)
	case <-d.done:
		return sockInfo{}, ErrDiagClosed
	}
}

// lookup queries in the family of the addresses; an IPv4 pair is also looked for in its
// IPv4-mapped form, which is how an AF_INET6 socket talking IPv4 shows.
func (c *diagConn) lookup(seq uint32, proto uint8, local, remote netip.AddrPort) (sockInfo, error) {
	fam := uint8(syscall.AF_INET)
	if local.Addr().Unmap().Is6() || remote.Addr().Unmap().Is6() {
		fam = syscall.AF_INET6
	}
	s, err := c.query(seq, proto, fam, local, remote)
	if errors.Is(err, errDiagNotFound) && fam == syscall.AF_INET {
		m := func(a netip.AddrPort) netip.AddrPort {
			return netip.AddrPortFrom(netip.AddrFrom16(a.Addr().Unmap().As16()), a.Port())
		}
		return c.query(seq, proto, syscall.AF_INET6, m(local), m(remote))
	}
	return s, err
}

// maxStale bounds the answers to earlier, timed-out lookups skipped before this one's.
const maxStale = 4

func (c *diagConn) query(seq uint32, proto, fam uint8, local, remote netip.AddrPort) (sockInfo, error) {
	req := c.req[:]
	clear(req)
	ne := binary.NativeEndian
	ne.PutUint32(req[0:], uint32(len(req)))
	ne.PutUint16(req[4:], sockDiagByFamily)
	ne.PutUint16(req[6:], syscall.NLM_F_REQUEST)
	ne.PutUint32(req[8:], seq)
	r := req[nlmsgHdrLen:]
	r[0] = fam
	r[1] = proto
	ne.PutUint32(r[4:], 0xffffffff) // all states
	putSockID(r[8:8+inetDiagSockIDLen], fam, local, remote)
	if err := syscall.Sendto(c.fd, req, 0, &syscall.SockaddrNetlink{Family: syscall.AF_NETLINK}); err != nil {
		return sockInfo{}, fmt.Errorf("sock_diag send: %w", err)
	}
	for range maxStale + 1 {
		n, _, err := syscall.Recvfrom(c.fd, c.buf[:], 0)
		if err == syscall.EINTR {
			continue
		}
		if err != nil {
			return sockInfo{}, fmt.Errorf("sock_diag receive: %w", err)
		}
		// A reused socket may still hold the answer to an earlier lookup that timed out:
		// only the answer carrying this lookup's sequence number is this socket's.
		if n >= nlmsgHdrLen && ne.Uint32(c.buf[8:]) != seq {
			continue
		}
		return parseDiagReply(c.buf[:n])
	}
	return sockInfo{}, fmt.Errorf("sock_diag: no answer with sequence %d", seq)
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
