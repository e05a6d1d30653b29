package node

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"time"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/overlay/dtl"
	"github.com/ute-project/ute/overlay/tunnel"
)

// Provenance is the verified DTL record of a flow, as the receiving node admitted it: who opened
// the flow, from which node and workload, where, with what trust. Everything in it was checked
// against the certificate chain and the session before the flow's first byte was delivered.
type Provenance struct {
	Agent       string // source agent SPIFFE ID
	AgentName   string
	Zone        string
	Node        string // SPIFFE ID of the node that attested the agent (the tunnel's peer)
	Fingerprint []byte // workload fingerprint (SHA-256), as in the agent certificate
	Region      string
	Trust       uint8
	Drift       dtl.DriftFlags
	SourceIP    netip.Addr // the source agent's overlay IP, from its certificate
	Destination dtl.Destination
	FlowID      uint64
	Seq         uint64
	IssuedAt    time.Time
	AgentSerial string // "serial:<decimal>" of the agent certificate
	NodeSerial  string // "serial:<decimal>" of the node certificate in the record's chain
	Local       bool   // the flow came from an agent of this same node (no tunnel)

	verified    bool
	chainCached bool              // the record named its chain by hash (docs/protocol.md §4)
	recordSize  int               // bytes of the record as received
	ids         []string          // revocation identities of the source: agent, agent serial, node, node serial
	labels      map[string]string // the source agent's certificate labels, for a policy reload
}

// newProvenance builds the provenance of an admitted record from its verified claims and chain.
// The source IP comes from the chain's verification, which dtl's session cache keeps with the
// chain, so a hash-only record gets it without parsing a certificate again.
func newProvenance(ok *dtl.Admitted) (*Provenance, error) {
	c := ok.Claims()
	id, err := identity.ParseID(ok.Agent.Agent)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", dtl.ErrConfig, err)
	}
	return &Provenance{
		Agent: ok.Agent.Agent, AgentName: id.Name, Zone: c.Zone, Node: ok.Agent.Node,
		Fingerprint: append([]byte(nil), ok.Agent.Fingerprint...), Region: c.Region, Trust: c.Trust,
		SourceIP: ok.Agent.OverlayIP, Drift: c.Drift, Destination: c.Destination, FlowID: c.FlowID, Seq: c.Seq,
		IssuedAt: c.IssuedAt, AgentSerial: ok.Agent.AgentSerial, NodeSerial: ok.Agent.NodeSerial, verified: true,
		chainCached: c.Chain == nil, ids: ok.Agent.RevocationIDs(), labels: ok.Agent.Labels,
	}, nil
}

// admissionProvenance is the provenance behind an admission (agent or directory flow).
func admissionProvenance(adm tunnel.Admission) *Provenance {
	switch info := adm.Info.(type) {
	case *Provenance:
		return info
	case *directoryFlow:
		return info.prov
	}
	return nil
}

// partialProvenance extracts the claims of a refused record for the audit log, marked unverified.
func partialProvenance(raw []byte) *Provenance {
	r, err := dtl.Parse(raw)
	if err != nil {
		return nil
	}
	c := r.Claims
	return &Provenance{Agent: c.Agent, Zone: c.Zone, Node: c.Node, Region: c.Region, Trust: c.Trust,
		Drift: c.Drift, Destination: c.Destination, FlowID: c.FlowID, Seq: c.Seq, IssuedAt: c.IssuedAt}
}

// WhoIs returns the verified provenance of an admitted flow accepted by an SDK listener. It looks
// through wrappers that expose NetConn (crypto/tls.Conn does).
func WhoIs(conn net.Conn) (*Provenance, error) {
	for range 8 {
		switch c := conn.(type) {
		case *tunnel.FlowConn:
			if adm, ok := c.Admission(); ok {
				if p, ok := adm.Info.(*Provenance); ok {
					return p, nil
				}
			}
			return nil, fmt.Errorf("%w: this side opened the flow", ErrNoProvenance)
		case *localConn:
			if c.prov != nil {
				return c.prov, nil
			}
			return nil, fmt.Errorf("%w: this side opened the flow", ErrNoProvenance)
		case *udpConn:
			return nil, fmt.Errorf("%w: this side opened the UDP flow; the listener has it (WhoIsPacket)", ErrNoProvenance)
		case interface{ NetConn() net.Conn }:
			conn = c.NetConn()
		default:
			return nil, fmt.Errorf("%w: %T is not a UTE flow", ErrNoProvenance, conn)
		}
	}
	return nil, fmt.Errorf("%w: too many wrappers", ErrNoProvenance)
}

type connKey struct{}

// ConnContext is an http.Server ConnContext hook that lets handlers call WhoIsRequest.
func ConnContext(ctx context.Context, c net.Conn) context.Context {
	return context.WithValue(ctx, connKey{}, c)
}

// WhoIsRequest returns the provenance of the flow an HTTP request arrived on; the server must set
// ConnContext: ConnContext.
func WhoIsRequest(r *http.Request) (*Provenance, error) {
	c, ok := r.Context().Value(connKey{}).(net.Conn)
	if !ok {
		return nil, fmt.Errorf("%w: set http.Server.ConnContext to node.ConnContext", ErrNoProvenance)
	}
	return WhoIs(c)
}
