package daemon

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/ute-project/ute/node"
	"github.com/ute-project/ute/node/attest"
	"github.com/ute-project/ute/overlay/tunstack"
)

// acceptPackets demultiplexes the agent's admitted UDP flows (one catch-all packet listener)
// into one conn per flow, each originated to the local program by the stack.
func (t *tunIface) acceptPackets(ta *tunAgent) {
	flows := map[string]*tunPacketConn{}
	defer func() {
		for _, f := range flows {
			_ = f.Close()
		}
	}()
	buf := make([]byte, 65535)
	for {
		n, from, err := ta.pl.ReadFrom(buf)
		if err != nil {
			return
		}
		key := from.String()
		f := flows[key]
		if f == nil || f.isClosed() {
			p, err := node.WhoIsPacket(ta.pl, from)
			if err != nil {
				continue
			}
			if len(flows) >= 1024 {
				for k, f := range flows {
					if f.isClosed() {
						delete(flows, k)
					}
				}
			}
			f = newTunPacketConn(ta.pl, from, p)
			flows[key] = f
			t.mu.Lock()
			closed := t.closed
			if !closed {
				t.wg.Add(1)
			}
			t.mu.Unlock()
			if closed {
				return
			}
			port := addrPortOf(from).Port()
			go func() { defer t.wg.Done(); t.inbound(tunstack.UDP, ta, f, port) }()
		}
		f.push(append([]byte(nil), buf[:n]...))
	}
}

// tunPacketConn is one admitted inbound UDP flow as a connected datagram conn: Read returns the
// flow's datagrams, Write answers the flow.
type tunPacketConn struct {
	pl   net.PacketConn
	from net.Addr
	p    *node.Provenance
	in   chan []byte
	done chan struct{}
	once sync.Once

	mu       sync.Mutex
	deadline time.Time
}

func newTunPacketConn(pl net.PacketConn, from net.Addr, p *node.Provenance) *tunPacketConn {
	return &tunPacketConn{pl: pl, from: from, p: p, in: make(chan []byte, 64), done: make(chan struct{})}
}

func (c *tunPacketConn) prov() (*node.Provenance, error) { return c.p, nil }

func (c *tunPacketConn) push(b []byte) {
	select {
	case c.in <- b:
	case <-c.done:
	default: // a full queue drops, as a socket buffer would
	}
}

func (c *tunPacketConn) isClosed() bool {
	select {
	case <-c.done:
		return true
	default:
		return false
	}
}

func (c *tunPacketConn) Read(b []byte) (int, error) {
	c.mu.Lock()
	dl := c.deadline
	c.mu.Unlock()
	var timeout <-chan time.Time
	if !dl.IsZero() {
		tm := time.NewTimer(time.Until(dl))
		defer tm.Stop()
		timeout = tm.C
	}
	select {
	case p := <-c.in:
		return copy(b, p), nil
	case <-c.done:
		return 0, net.ErrClosed
	case <-timeout:
		return 0, os.ErrDeadlineExceeded
	}
}

func (c *tunPacketConn) Write(b []byte) (int, error) {
	if c.isClosed() {
		return 0, net.ErrClosed
	}
	return c.pl.WriteTo(b, c.from)
}

func (c *tunPacketConn) Close() error {
	c.once.Do(func() { close(c.done) })
	return nil
}

func (c *tunPacketConn) LocalAddr() net.Addr  { return c.pl.LocalAddr() }
func (c *tunPacketConn) RemoteAddr() net.Addr { return c.from }
func (c *tunPacketConn) SetDeadline(t time.Time) error {
	return c.SetReadDeadline(t)
}
func (c *tunPacketConn) SetReadDeadline(t time.Time) error {
	c.mu.Lock()
	c.deadline = t
	c.mu.Unlock()
	return nil
}
func (c *tunPacketConn) SetWriteDeadline(time.Time) error { return nil }

// attestUDP attests the owner of the local program's UDP socket: found by a sock_diag lookup
// of UDP (node/attest looks up TCP only), then fingerprinted by the attester like any other.
func (t *tunIface) attestUDP(ta *tunAgent, src, dst netip.AddrPort) error {
	inode, err := udpSocketInode(src, dst)
	var p attest.Process
	if err == nil {
		p, err = t.att.OwnerProcess(inode)
	}
	if err == nil && !p.Matches(ta.want.Digest) {
		err = fmt.Errorf("%w: pid %d runs %s (uid %d), not the enrolled workload %s (uid %d)",
			attest.ErrMismatch, p.PID, p.Exe, p.Workload.UID, ta.want.Exe, ta.want.UID)
	}
	if err != nil {
		t.d.workloadRefusedVia("tun", ta.name, src, p, err)
	}
	return err
}

// Netlink sock_diag for UDP (linux/inet_diag.h), an exact lookup.
const (
	diagNetlink   = 4  // NETLINK_SOCK_DIAG
	diagByFamily  = 20 // SOCK_DIAG_BY_FAMILY
	diagHdrLen    = 16
	diagReqLen    = 56 // struct inet_diag_req_v2
	diagMsgLen    = 72 // struct inet_diag_msg
	diagInodeOffs = 68
)

// udpSocketInode returns the inode of the UDP socket bound to local that would receive a
// datagram from remote: the socket a program sent src -> dst from (connected or not). The
// kernel's UDP lookup takes the sockid's source as the datagram's source, so remote goes there
// ("swapped for historical reasons", net/ipv4/udp_diag.c); the other order is tried as well.
func udpSocketInode(local, remote netip.AddrPort) (uint64, error) {
	ino, err := udpDiag(remote, local)
	if err == nil {
		return ino, nil
	}
	if ino2, err2 := udpDiag(local, remote); err2 == nil {
		return ino2, nil
	}
	return 0, err
}

func udpDiag(src, dst netip.AddrPort) (uint64, error) {
	fam := uint8(syscall.AF_INET)
	if src.Addr().Unmap().Is6() || dst.Addr().Unmap().Is6() {
		fam = syscall.AF_INET6
	}
	fd, err := syscall.Socket(syscall.AF_NETLINK, syscall.SOCK_DGRAM|syscall.SOCK_CLOEXEC, diagNetlink)
	if err != nil {
		return 0, fmt.Errorf("%w: sock_diag socket: %w", attest.ErrNoOwner, err)
	}
	defer func() { _ = syscall.Close(fd) }()
	tv := syscall.Timeval{Sec: 1}
	_ = syscall.SetsockoptTimeval(fd, syscall.SOL_SOCKET, syscall.SO_RCVTIMEO, &tv)
	req := make([]byte, diagHdrLen+diagReqLen)
	ne := binary.NativeEndian
	ne.PutUint32(req[0:], uint32(len(req)))
	ne.PutUint16(req[4:], diagByFamily)
	ne.PutUint16(req[6:], syscall.NLM_F_REQUEST)
	ne.PutUint32(req[8:], 1)
	r := req[diagHdrLen:]
	r[0] = fam
	r[1] = syscall.IPPROTO_UDP
	ne.PutUint32(r[4:], 0xffffffff) // all states
	id := r[8:56]
	binary.BigEndian.PutUint16(id[0:], src.Port())
	binary.BigEndian.PutUint16(id[2:], dst.Port())
	put := func(b []byte, a netip.Addr) {
		if fam == syscall.AF_INET {
			v := a.Unmap().As4()
			copy(b, v[:])
			return
		}
		v := a.As16()
		copy(b, v[:])
	}
	put(id[4:20], src.Addr())
	put(id[20:36], dst.Addr())
	ne.PutUint32(id[40:], 0xffffffff) // INET_DIAG_NOCOOKIE
	ne.PutUint32(id[44:], 0xffffffff)
	if err := syscall.Sendto(fd, req, 0, &syscall.SockaddrNetlink{Family: syscall.AF_NETLINK}); err != nil {
		return 0, fmt.Errorf("%w: sock_diag send: %w", attest.ErrNoOwner, err)
	}
	buf := make([]byte, 8192)
	n, _, err := syscall.Recvfrom(fd, buf, 0)
	if err != nil {
		return 0, fmt.Errorf("%w: sock_diag receive: %w", attest.ErrNoOwner, err)
	}
	return parseUDPDiagReply(buf[:n])
}

// errNoUDPSocket: the kernel has no such UDP socket.
var errNoUDPSocket = errors.New("no such UDP socket")

// parseUDPDiagReply reads one sock_diag answer: the socket's inode, or why not.
func parseUDPDiagReply(b []byte) (uint64, error) {
	ne := binary.NativeEndian
	if len(b) < diagHdrLen {
		return 0, fmt.Errorf("%w: sock_diag: short reply (%d bytes)", attest.ErrNoOwner, len(b))
	}
	l := int(ne.Uint32(b[0:]))
	if l < diagHdrLen || l > len(b) {
		return 0, fmt.Errorf("%w: sock_diag: reply length %d of %d bytes", attest.ErrNoOwner, l, len(b))
	}
	body := b[diagHdrLen:l]
	switch ne.Uint16(b[4:]) {
	case syscall.NLMSG_ERROR:
		if len(body) < 4 {
			return 0, fmt.Errorf("%w: sock_diag: short error", attest.ErrNoOwner)
		}
		return 0, fmt.Errorf("%w: %w: %w", attest.ErrNoOwner, errNoUDPSocket, syscall.Errno(-int32(ne.Uint32(body))))
	case diagByFamily:
		if len(body) < diagMsgLen {
			return 0, fmt.Errorf("%w: sock_diag: short inet_diag_msg (%d bytes)", attest.ErrNoOwner, len(body))
		}
		return uint64(ne.Uint32(body[diagInodeOffs:])), nil
	}
	return 0, fmt.Errorf("%w: sock_diag: unexpected message type %d", attest.ErrNoOwner, ne.Uint16(b[4:]))
}
