package proxy

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
)

// SOCKS5 constants (RFC 1928).
const (
	socksVersion      = 5
	socksNoAuth       = 0x00
	socksNoAcceptable = 0xff

	CmdConnect      = 1
	CmdBind         = 2
	CmdUDPAssociate = 3

	atypIPv4   = 1
	atypDomain = 3
	atypIPv6   = 4
)

// SOCKS5 reply codes.
const (
	ReplySucceeded          byte = 0x00
	ReplyGeneralFailure     byte = 0x01
	ReplyNotAllowed         byte = 0x02 // connection not allowed by ruleset
	ReplyNetworkUnreachable byte = 0x03
	ReplyHostUnreachable    byte = 0x04
	ReplyConnectionRefused  byte = 0x05
	ReplyCommandUnsupported byte = 0x07
	ReplyAddressUnsupported byte = 0x08
)

// Parser errors.
var (
	// ErrSOCKS: the client did not speak SOCKS5 as RFC 1928 says.
	ErrSOCKS = errors.New("proxy: malformed SOCKS5 request")
	// ErrSOCKSNoAuth: the client offered no method this proxy accepts (only "no authentication").
	ErrSOCKSNoAuth = errors.New("proxy: SOCKS5 client offers no acceptable authentication method")
	// ErrSOCKSCommand: BIND or UDP ASSOCIATE, which this proxy refuses.
	ErrSOCKSCommand = errors.New("proxy: SOCKS5 command not supported")
)

// SOCKSRequest is a parsed SOCKS5 request.
type SOCKSRequest struct {
	Cmd  byte
	Host string // domain name or IP literal
	Port uint16
	// Atyp is the address type the client used, kept for the reply.
	Atyp byte
}

// Target is host:port for Dial.
func (r SOCKSRequest) Target() string { return net.JoinHostPort(r.Host, strconv.Itoa(int(r.Port))) }

// ReadSOCKSGreeting reads the version/method selection message and reports whether "no
// authentication" is among the methods.
func ReadSOCKSGreeting(r io.Reader) error {
	var h [2]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return fmt.Errorf("%w: greeting: %w", ErrSOCKS, err)
	}
	if h[0] != socksVersion {
		return fmt.Errorf("%w: version %d, want 5 (is the client speaking SOCKS4 or HTTP?)", ErrSOCKS, h[0])
	}
	if h[1] == 0 {
		return fmt.Errorf("%w: greeting lists no methods", ErrSOCKS)
	}
	methods := make([]byte, h[1])
	if _, err := io.ReadFull(r, methods); err != nil {
		return fmt.Errorf("%w: greeting methods: %w", ErrSOCKS, err)
	}
	for _, m := range methods {
		if m == socksNoAuth {
			return nil
		}
	}
	return ErrSOCKSNoAuth
}

// ReadSOCKSRequest reads a request (after the greeting). A request for a command other than
// CONNECT is returned with ErrSOCKSCommand so that the caller can reply 0x07.
func ReadSOCKSRequest(r io.Reader) (SOCKSRequest, error) {
	var h [4]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return SOCKSRequest{}, fmt.Errorf("%w: request: %w", ErrSOCKS, err)
	}
	if h[0] != socksVersion {
		return SOCKSRequest{}, fmt.Errorf("%w: request version %d, want 5", ErrSOCKS, h[0])
	}
	if h[2] != 0 {
		return SOCKSRequest{}, fmt.Errorf("%w: reserved byte is %d, want 0", ErrSOCKS, h[2])
	}
	req := SOCKSRequest{Cmd: h[1], Atyp: h[3]}
	switch h[3] {
	case atypIPv4:
		var a [4]byte
		if _, err := io.ReadFull(r, a[:]); err != nil {
			return SOCKSRequest{}, fmt.Errorf("%w: IPv4 address: %w", ErrSOCKS, err)
		}
		req.Host = netip.AddrFrom4(a).String()
	case atypIPv6:
		var a [16]byte
		if _, err := io.ReadFull(r, a[:]); err != nil {
			return SOCKSRequest{}, fmt.Errorf("%w: IPv6 address: %w", ErrSOCKS, err)
		}
		req.Host = netip.AddrFrom16(a).Unmap().String()
	case atypDomain:
		var n [1]byte
		if _, err := io.ReadFull(r, n[:]); err != nil {
			return SOCKSRequest{}, fmt.Errorf("%w: domain length: %w", ErrSOCKS, err)
		}
		if n[0] == 0 {
			return SOCKSRequest{}, fmt.Errorf("%w: empty domain name", ErrSOCKS)
		}
		d := make([]byte, n[0])
		if _, err := io.ReadFull(r, d); err != nil {
			return SOCKSRequest{}, fmt.Errorf("%w: domain: %w", ErrSOCKS, err)
		}
		for _, c := range d {
			if c <= ' ' || c >= 0x7f || c == ':' || c == '/' {
				return SOCKSRequest{}, fmt.Errorf("%w: domain %q has a character a host name cannot hold", ErrSOCKS, d)
			}
		}
		req.Host = string(d)
	default:
		return SOCKSRequest{}, fmt.Errorf("%w: address type %d", ErrSOCKS, h[3])
	}
	var p [2]byte
	if _, err := io.ReadFull(r, p[:]); err != nil {
		return SOCKSRequest{}, fmt.Errorf("%w: port: %w", ErrSOCKS, err)
	}
	req.Port = binary.BigEndian.Uint16(p[:])
	if req.Port == 0 {
		return SOCKSRequest{}, fmt.Errorf("%w: port 0", ErrSOCKS)
	}
	if req.Cmd != CmdConnect {
		return req, fmt.Errorf("%w: command %d (only CONNECT, 1; UDP ASSOCIATE and BIND are refused)", ErrSOCKSCommand, req.Cmd)
	}
	return req, nil
}

// socksReply encodes a reply with bound address bnd (the zero value encodes 0.0.0.0:0).
func socksReply(code byte, bnd netip.AddrPort) []byte {
	b := []byte{socksVersion, code, 0}
	a := bnd.Addr().Unmap()
	switch {
	case a.Is6():
		b = append(b, atypIPv6)
		s := a.As16()
		b = append(b, s[:]...)
	case a.Is4():
		b = append(b, atypIPv4)
		s := a.As4()
		b = append(b, s[:]...)
	default:
		b = append(b, atypIPv4, 0, 0, 0, 0)
	}
	return binary.BigEndian.AppendUint16(b, bnd.Port())
}
