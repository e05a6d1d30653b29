//go:build linux

package tundev

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"sync"

	"golang.org/x/sys/unix"
)

// rtnl is a minimal rtnetlink client: the handful of requests the interface's life needs.
// Shelling out to `ip` would tie the daemon to iproute2 being installed and to parsing its
// output; the requests are small and fixed, so they are spoken directly.
type rtnl struct {
	mu  sync.Mutex
	fd  int
	seq uint32
	buf []byte
}

// errNoLink: no interface of that name or index.
var errNoLink = errors.New("no such interface")

func openRTNL() (*rtnl, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("tundev: rtnetlink socket: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		_ = unix.Close(fd)
		return nil, fmt.Errorf("tundev: rtnetlink bind: %w", err)
	}
	// Replies to our requests are small; a bound on the wait keeps a wedged kernel from
	// hanging the daemon's start or stop forever.
	tv := unix.Timeval{Sec: 5}
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	return &rtnl{fd: fd, buf: make([]byte, 1<<16)}, nil
}

func (r *rtnl) close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.fd < 0 {
		return nil
	}
	err := unix.Close(r.fd)
	r.fd = -1
	return err
}

// attr encodes one netlink attribute, padded to 4 bytes.
func attr(typ uint16, data []byte) []byte {
	l := unix.SizeofRtAttr + len(data)
	b := make([]byte, (l+3)&^3)
	binary.NativeEndian.PutUint16(b[0:], uint16(l))
	binary.NativeEndian.PutUint16(b[2:], typ)
	copy(b[unix.SizeofRtAttr:], data)
	return b
}

func u32(v uint32) []byte {
	b := make([]byte, 4)
	binary.NativeEndian.PutUint32(b, v)
	return b
}

// do sends one request and returns the payloads of the replies (without netlink headers) until
// the kernel's ack, its error, or NLMSG_DONE.
func (r *rtnl) do(typ uint16, flags uint16, body []byte) ([][]byte, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.fd < 0 {
		return nil, ErrClosed
	}
	r.seq++
	seq := r.seq
	msg := make([]byte, unix.NLMSG_HDRLEN+len(body))
	binary.NativeEndian.PutUint32(msg[0:], uint32(len(msg)))
	binary.NativeEndian.PutUint16(msg[4:], typ)
	binary.NativeEndian.PutUint16(msg[6:], flags|unix.NLM_F_REQUEST|unix.NLM_F_ACK)
	binary.NativeEndian.PutUint32(msg[8:], seq)
	copy(msg[unix.NLMSG_HDRLEN:], body)
	if err := unix.Sendto(r.fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return nil, fmt.Errorf("rtnetlink send: %w", err)
	}
	var out [][]byte
	for {
		n, _, err := unix.Recvfrom(r.fd, r.buf, 0)
		if err != nil {
			if errors.Is(err, unix.EINTR) {
				continue
			}
			return nil, fmt.Errorf("rtnetlink receive: %w", err)
		}
		msgs, err := splitMessages(r.buf[:n])
		if err != nil {
			return nil, err
		}
		for _, m := range msgs {
			if m.seq != seq {
				continue // a late reply to an earlier, timed-out request
			}
			switch m.typ {
			case unix.NLMSG_DONE:
				return out, nil
			case unix.NLMSG_ERROR:
				if len(m.data) < 4 {
					return nil, errors.New("rtnetlink: short error message")
				}
				if e := int32(binary.NativeEndian.Uint32(m.data)); e != 0 {
					return nil, unix.Errno(-e)
				}
				return out, nil
			default:
				out = append(out, append([]byte(nil), m.data...))
			}
		}
	}
}

type nlmsg struct {
	typ  uint16
	seq  uint32
	data []byte
}

// splitMessages splits one datagram into netlink messages; a malformed length is an error.
func splitMessages(b []byte) ([]nlmsg, error) {
	var out []nlmsg
	for len(b) >= unix.NLMSG_HDRLEN {
		l := int(binary.NativeEndian.Uint32(b[0:]))
		if l < unix.NLMSG_HDRLEN || l > len(b) {
			return nil, fmt.Errorf("rtnetlink: bad message length %d of %d", l, len(b))
		}
		out = append(out, nlmsg{
			typ:  binary.NativeEndian.Uint16(b[4:]),
			seq:  binary.NativeEndian.Uint32(b[8:]),
			data: b[unix.NLMSG_HDRLEN:l],
		})
		al := (l + 3) &^ 3
		if al > len(b) {
			break
		}
		b = b[al:]
	}
	return out, nil
}

// attrs splits a run of netlink attributes; a malformed length is an error.
func attrs(b []byte) (map[uint16][]byte, error) {
	out := map[uint16][]byte{}
	for len(b) >= unix.SizeofRtAttr {
		l := int(binary.NativeEndian.Uint16(b[0:]))
		t := binary.NativeEndian.Uint16(b[2:]) &^ (unix.NLA_F_NESTED | unix.NLA_F_NET_BYTEORDER)
		if l < unix.SizeofRtAttr || l > len(b) {
			return nil, fmt.Errorf("rtnetlink: bad attribute length %d of %d", l, len(b))
		}
		out[t] = b[unix.SizeofRtAttr:l]
		al := (l + 3) &^ 3
		if al > len(b) {
			break
		}
		b = b[al:]
	}
	return out, nil
}

// linkInfo is what the interface's life needs to know about an existing link.
type linkInfo struct {
	index     int32
	flags     uint32
	name      string
	kind      string // IFLA_INFO_KIND: "tun" for TUN and TAP devices
	persist   bool
	queues    uint32 // IFLA_TUN_NUM_QUEUES: file descriptors attached (multi-queue devices only)
	hasQueues bool
	carrier   bool // IFLA_CARRIER: a TUN device has carrier while a descriptor is attached
}

// inUse: some process holds the TUN device open. A non-persistent device exists only while one
// does; a single-queue device reports no queue count, but has carrier exactly while attached.
func (li linkInfo) inUse() bool {
	return !li.persist || li.carrier || (li.hasQueues && li.queues > 0)
}

// parseLink decodes an RTM_NEWLINK payload (ifinfomsg and attributes).
func parseLink(b []byte) (linkInfo, error) {
	if len(b) < unix.SizeofIfInfomsg {
		return linkInfo{}, errors.New("rtnetlink: short link message")
	}
	li := linkInfo{
		index: int32(binary.NativeEndian.Uint32(b[4:])),
		flags: binary.NativeEndian.Uint32(b[8:]),
	}
	as, err := attrs(b[unix.SizeofIfInfomsg:])
	if err != nil {
		return linkInfo{}, err
	}
	if c := as[unix.IFLA_CARRIER]; len(c) >= 1 {
		li.carrier = c[0] != 0
	}
	if n, ok := as[unix.IFLA_IFNAME]; ok {
		li.name = unix.ByteSliceToString(n)
	}
	if info, ok := as[unix.IFLA_LINKINFO]; ok {
		ias, err := attrs(info)
		if err != nil {
			return linkInfo{}, err
		}
		li.kind = unix.ByteSliceToString(ias[unix.IFLA_INFO_KIND])
		if data, ok := ias[unix.IFLA_INFO_DATA]; ok && li.kind == "tun" {
			das, err := attrs(data)
			if err != nil {
				return linkInfo{}, err
			}
			if p := das[unix.IFLA_TUN_PERSIST]; len(p) >= 1 {
				li.persist = p[0] != 0
			}
			if q := das[unix.IFLA_TUN_NUM_QUEUES]; len(q) >= 4 {
				li.queues = binary.NativeEndian.Uint32(q)
				li.hasQueues = true
			}
		}
	}
	return li, nil
}

func ifinfo(index int32, flags, change uint32) []byte {
	b := make([]byte, unix.SizeofIfInfomsg)
	b[0] = unix.AF_UNSPEC
	binary.NativeEndian.PutUint32(b[4:], uint32(index))
	binary.NativeEndian.PutUint32(b[8:], flags)
	binary.NativeEndian.PutUint32(b[12:], change)
	return b
}

func (r *rtnl) linkByName(name string) (linkInfo, error) {
	body := append(ifinfo(0, 0, 0), attr(unix.IFLA_IFNAME, append([]byte(name), 0))...)
	msgs, err := r.do(unix.RTM_GETLINK, 0, body)
	if errors.Is(err, unix.ENODEV) {
		return linkInfo{}, errNoLink
	}
	if err != nil {
		return linkInfo{}, fmt.Errorf("get link %s: %w", name, err)
	}
	if len(msgs) == 0 {
		return linkInfo{}, errNoLink
	}
	return parseLink(msgs[0])
}

func (r *rtnl) linkByIndex(index int32) (linkInfo, error) {
	msgs, err := r.do(unix.RTM_GETLINK, 0, ifinfo(index, 0, 0))
	if errors.Is(err, unix.ENODEV) {
		return linkInfo{}, errNoLink
	}
	if err != nil {
		return linkInfo{}, fmt.Errorf("get link %d: %w", index, err)
	}
	if len(msgs) == 0 {
		return linkInfo{}, errNoLink
	}
	return parseLink(msgs[0])
}

func (r *rtnl) setUp(index int32) error {
	_, err := r.do(unix.RTM_NEWLINK, 0, ifinfo(index, unix.IFF_UP, unix.IFF_UP))
	return err
}

func (r *rtnl) delLink(index int32) error {
	_, err := r.do(unix.RTM_DELLINK, 0, ifinfo(index, 0, 0))
	return err
}

func family(a netip.Addr) uint8 {
	if a.Is4() {
		return unix.AF_INET
	}
	return unix.AF_INET6
}

func (r *rtnl) addr(add bool, index int32, p netip.Prefix) error {
	b := make([]byte, unix.SizeofIfAddrmsg)
	b[0] = family(p.Addr())
	b[1] = uint8(p.Bits())
	if p.Addr().Is6() {
		b[2] = unix.IFA_F_NODAD // the interface is point-to-point and ours: no duplicate to detect
	}
	b[3] = unix.RT_SCOPE_UNIVERSE
	binary.NativeEndian.PutUint32(b[4:], uint32(index))
	a := p.Addr().AsSlice()
	b = append(b, attr(unix.IFA_LOCAL, a)...)
	b = append(b, attr(unix.IFA_ADDRESS, a)...)
	if add {
		_, err := r.do(unix.RTM_NEWADDR, unix.NLM_F_CREATE|unix.NLM_F_EXCL, b)
		return err
	}
	_, err := r.do(unix.RTM_DELADDR, 0, b)
	return err
}

func (r *rtnl) route(add bool, index int32, p netip.Prefix) error {
	p = p.Masked()
	b := make([]byte, unix.SizeofRtMsg)
	b[0] = family(p.Addr())
	b[1] = uint8(p.Bits())
	b[4] = unix.RT_TABLE_MAIN
	b[5] = unix.RTPROT_STATIC
	b[6] = unix.RT_SCOPE_LINK
	b[7] = unix.RTN_UNICAST
	b = append(b, attr(unix.RTA_DST, p.Addr().AsSlice())...)
	b = append(b, attr(unix.RTA_OIF, u32(uint32(index)))...)
	if add {
		// EXCL: a route for the same CIDR through another interface is a conflict to report,
		// never one to take over silently.
		_, err := r.do(unix.RTM_NEWROUTE, unix.NLM_F_CREATE|unix.NLM_F_EXCL, b)
		return err
	}
	_, err := r.do(unix.RTM_DELROUTE, 0, b)
	return err
}
