package node

import (
	"context"
	"fmt"
	"net"

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
	rec, err := a.sign(aad, n.localFlow.Add(1), n.localSeqs.Add(1), dtl.Destination{Agent: dst.name, Port: dst.port, Proto: dtl.ProtoTCP})
	if err != nil {
		return nil, err
	}
	self := n.cert.ID.String()
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
	if !l.deliver(&localConn{Conn: server, local: adm.Local, remote: src, prov: p}) {
		_ = client.Close()
		return nil, refused(addr, "admission", "limit", fmt.Errorf("%w: listener backlog full or closed", dtl.ErrLimit))
	}
	return &localConn{Conn: client, local: src, remote: adm.Local}, nil
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
