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

// admitLocal signs a record for a same-node flow to dst and runs it through the admission every
// tunnel flow takes, auditing the verdict; TCP and UDP same-node dials share it so that neither
// can skip a check the other makes.
func (a *Agent) admitLocal(ctx context.Context, addr string, dst dtl.Destination) (tunnel.Admission, *Provenance, error) {
	n := a.n
	if err := ctx.Err(); err != nil {
		return tunnel.Admission{}, nil, refused(addr, "admission", "canceled", err)
	}
	zone := a.id.Zone
	aad := n.localBinding(zone)
	rec, err := a.sign(aad, n.localFlow.Add(1), n.localSeqs.Add(1), dst)
	if err != nil {
		return tunnel.Admission{}, nil, err
	}
	self := n.certificate().ID.String()
	adm, prov, err := n.admitRecord(zone, self, aad, rec)
	n.auditVerdict(ctx, self, zone, prov, err)
	if err != nil {
		return tunnel.Admission{}, nil, refused(addr, "admission", dtl.Deny(err).Reason, err)
	}
	p, ok := adm.Info.(*Provenance)
	if !ok {
		return tunnel.Admission{}, nil, refused(addr, "admission", "unreachable", fmt.Errorf("%w: not an agent destination", dtl.ErrUnreachable))
	}
	p.Local = true
	return adm, p, nil
}

func (a *Agent) dialLocal(ctx context.Context, addr string, dst destination) (net.Conn, error) {
	n := a.n
	zone := a.id.Zone
	adm, p, err := a.admitLocal(ctx, addr, dtl.Destination{Agent: dst.name, Port: dst.port, Proto: dtl.ProtoTCP})
	if err != nil {
		return nil, err
	}
	n.mu.Lock()
	l := n.streamListenerLocked(zone, dst.name, dst.port)
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
		l := n.streamListenerLocked(info.Zone, info.Destination.Agent, info.Destination.Port)
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
