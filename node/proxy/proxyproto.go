package proxy

import (
	"encoding/binary"
	"fmt"
	"net/netip"

	"github.com/ute-project/ute/node"
)

// PROXY protocol v2 (haproxy's proxy-protocol.txt, section 2.2), optionally sent by the
// forwarder before the flow's bytes so that a server that speaks it learns its caller without
// asking the local API.
var proxyV2Sig = [12]byte{'\r', '\n', '\r', '\n', 0, '\r', '\n', 'Q', 'U', 'I', 'T', '\n'}

// TLV types in the range the specification leaves to applications (0xE0..0xEF).
const (
	TLVAgent = 0xE0 // the caller's agent SPIFFE ID
	TLVNode  = 0xE1 // the SPIFFE ID of the node that attested it
)

// maxTLV bounds one TLV value (SPIFFE IDs are at most 2,048 bytes).
const maxTLV = 2048

// proxyV2Header encodes the header for a flow from src to dst (both overlay addresses; the
// source port is 0 because records carry none) with the caller's identities as TLVs.
func proxyV2Header(src, dst netip.AddrPort, p *node.Provenance) ([]byte, error) {
	s, d := src.Addr().Unmap(), dst.Addr().Unmap()
	if !s.IsValid() || !d.IsValid() {
		return nil, fmt.Errorf("proxy: PROXY header: no overlay address (%s -> %s)", src, dst)
	}
	if s.Is4() != d.Is4() {
		return nil, fmt.Errorf("proxy: PROXY header: %s and %s are of different families", s, d)
	}
	var tlvs []byte
	for _, t := range []struct {
		typ byte
		v   string
	}{{TLVAgent, p.Agent}, {TLVNode, p.Node}} {
		if len(t.v) > maxTLV {
			return nil, fmt.Errorf("proxy: PROXY header: TLV %#x is %d bytes", t.typ, len(t.v))
		}
		tlvs = append(tlvs, t.typ)
		tlvs = binary.BigEndian.AppendUint16(tlvs, uint16(len(t.v)))
		tlvs = append(tlvs, t.v...)
	}
	h := append([]byte(nil), proxyV2Sig[:]...)
	h = append(h, 0x21) // version 2, command PROXY
	var addrs []byte
	if s.Is4() {
		h = append(h, 0x11) // AF_INET, STREAM
		a, b := s.As4(), d.As4()
		addrs = append(append(addrs, a[:]...), b[:]...)
	} else {
		h = append(h, 0x21) // AF_INET6, STREAM
		a, b := s.As16(), d.As16()
		addrs = append(append(addrs, a[:]...), b[:]...)
	}
	addrs = binary.BigEndian.AppendUint16(addrs, src.Port())
	addrs = binary.BigEndian.AppendUint16(addrs, dst.Port())
	h = binary.BigEndian.AppendUint16(h, uint16(len(addrs)+len(tlvs)))
	return append(append(h, addrs...), tlvs...), nil
}
