package daemon

import (
	"net"
	"net/netip"
	"os"
	"sync"
	"time"

	"github.com/ute-project/ute/node"
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

// attestUDP attests the owner of the local program's UDP socket (a sock_diag lookup through the
// interface's Diag), fingerprinted like any other.
func (t *tunIface) attestUDP(ta *tunAgent, src, dst netip.AddrPort) error {
	p, err := t.att.VerifyUDP(src, dst, ta.want)
	if err != nil {
		t.d.workloadRefusedVia("tun", ta.name, src, p, err)
	}
	return err
}
