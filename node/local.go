package node

import (
	"context"
	"fmt"
	"net"
	"sync/atomic"

	"github.com/ute-project/ute/overlay/dtl"
	"github.com/ute-project/ute/overlay/tunnel"
)

// localConn is one end of a same-node flow. Same-node flows take the same admission path as
// tunnel flows (signed record, chain, signature with a node-local session binding, zone,
// revocation, policy, trust, freshness, replay) and are refused for the same reasons; only the
// tunnel is missing.
type localConn struct {
	net.Conn
	local, remote net.Addr
	prov          *Provenance // set on the accepting side
	untrack       func()      // stops revocation tracking of the pair
	aborted       *atomic.Bool
}

// Read and Write report a revocation as tunnel.ErrFlowAborted, as tunnel flows do, rather than
// the end-of-stream a closed net.Pipe would show.
func (c *localConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	return n, c.wrap("read", err)
}

func (c *localConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	return n, c.wrap("write", err)
}

func (c *localConn) wrap(op string, err error) error {
	if err != nil && c.aborted != nil && c.aborted.Load() {
		return &net.OpError{Op: op, Net: "ute", Addr: c.remote, Err: tunnel.ErrFlowAborted}
	}
	return err
}

func (c *localConn) Close() error {
	if c.untrack != nil {
		c.untrack()
	}
	return c.Conn.Close()
}

func (c *localConn) LocalAddr() net.Addr  { return c.local }
func (c *localConn) RemoteAddr() net.Addr { return c.remote }

func (a *Agent) dialLocal(ctx context.Context, addr string, dst destination) (net.Conn, error) {
	n := a.n
	if err := ctx.Err(); err != nil {
		return nil, refused(addr, "admission", "canceled", err)
	}
	zone := a.id.Zone
	aad := n.localBinding(zone)
	rec, err := a.sign(aad, n.localFlow.Add(1), n.localSeqs.Add(1), dtl.Destination{Agent: dst.name, Port: dst.port, Proto: dtl.ProtoTCP}, false)
	if err != nil {
		return nil, err
	}
	self := n.certificate().ID.String()
	adm, prov, err := n.admitRecord(zone, self, aad, rec)
	n.auditVerdict(ctx, self, zone, prov, err)
	if err != nil {
		d := dtl.Deny(err)
		return nil, refused(addr, "admission", d.Reason, err)
	}
	p, ok := adm.Info.(*Provenance)
	if !ok {
		return nil, refused(addr, "admission", "unreachable", fmt.Errorf("%w: not an agent destination", dtl.ErrUnreachable))
	}
	p.Local = true
	n.mu.Lock()
	l := n.listeners[listenKey{zone, dst.name, dst.port}]
	n.mu.Unlock()
	if l == nil {
		return nil, refused(addr, "admission", "unreachable", fmt.Errorf("%w: %s stopped listening", dtl.ErrUnreachable, dst.name))
	}
	client, server := net.Pipe()
	src := tcpAddr(a.ip, 0)
	f := &liveFlow{ids: p.ids}
	untrack := func() { n.untrackFlow(f) }
	aborted := &atomic.Bool{}
	sc := &localConn{Conn: server, local: adm.Local, remote: src, prov: p, untrack: untrack, aborted: aborted}
	cc := &localConn{Conn: client, local: src, remote: adm.Local, untrack: untrack, aborted: aborted}
	f.abort = func() { aborted.Store(true); _ = cc.Close(); _ = sc.Close() }
	n.trackFlow(f)
	if !l.deliver(sc) {
		_ = cc.Close()
		return nil, refused(addr, "admission", "limit", fmt.Errorf("%w: listener backlog full or closed", dtl.ErrLimit))
	}
	if n.isRevoked(f.ids...) {
		f.abort()
		return nil, refused(addr, "admission", "revoked", fmt.Errorf("%w: %s was revoked while dialing", dtl.ErrRevoked, a.id))
	}
	return cc, nil
}

// handleStream receives every admitted tunnel flow (tunnel.Config.StreamHandler).
func (n *Node) handleStream(fc *tunnel.FlowConn) {
	adm, _ := fc.Admission()
	n.track(fc.Tunnel())
	switch info := adm.Info.(type) {
	case *directoryFlow:
		if !n.spawn(func() { n.serveDirectory(fc, info) }) {
			_ = fc.Close()
		}
	case *Provenance:
		// A revocation between admission and this point missed the flow in the flow table sweep.
		if n.isRevoked(info.ids...) {
			fc.Abort()
			return
		}
		n.mu.Lock()
		l := n.listeners[listenKey{info.Zone, info.Destination.Agent, info.Destination.Port}]
		n.mu.Unlock()
		if l == nil {
			_ = fc.Close()
			return
		}
		l.deliver(fc)
	default:
		_ = fc.Close()
	}
}
