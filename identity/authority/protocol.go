package authority

import (
	"encoding/binary"
	"fmt"
	"io"

	"github.com/fxamacker/cbor/v2"
)

// ALPN is the one application protocol the authority's QUIC endpoint speaks.
const ALPN = "ute-authority/1"

// Operation byte that opens a request frame.
const (
	OpJoin  byte = 1
	OpRenew byte = 2
	// OpWatch opens a long-lived stream of revocation records and policy releases (watch.go).
	OpWatch byte = 3
)

// Size caps of the wire protocol. A request larger than maxRequest is refused before it is read.
const (
	maxRequest       = 16 << 10
	maxResponse      = 4 << 20 // a policy and its signed release (each up to 1 MiB) fit
	maxCSR           = 8 << 10
	maxTokenPart     = 128
	maxRegion        = 64
	tokenSecretBytes = 32
)

// JoinRequest is sent by a joining node, after it has checked the authority's key against the
// token's pin. Encoding: deterministic CBOR map with integer keys (docs/identity.md has the CDDL).
type JoinRequest struct {
	TokenID string `cbor:"1,keyasint"`
	Secret  []byte `cbor:"2,keyasint"`
	CSR     []byte `cbor:"3,keyasint"`
	Region  string `cbor:"4,keyasint,omitempty"`
	// Advertise is the node's underlay address (host:port) other members reach it at; optional.
	Advertise string `cbor:"5,keyasint,omitempty"`
	// IssuerCSR asks for the node's issuing certificate, the CA of its agents, for the node's
	// issuing key (identity.IssuerKey). Required.
	IssuerCSR []byte `cbor:"6,keyasint,omitempty"`
}

// RenewRequest is sent over a connection authenticated by the node's current certificate.
type RenewRequest struct {
	CSR []byte `cbor:"1,keyasint"`
	// Advertise replaces the node's recorded underlay address; empty keeps the recorded one.
	Advertise string `cbor:"2,keyasint,omitempty"`
	// IssuerCSR asks for the issuing certificate that goes with the renewed node certificate.
	IssuerCSR []byte `cbor:"3,keyasint,omitempty"`
}

// Response answers both operations. On refusal only Code and Message are set.
type Response struct {
	Code          Code   `cbor:"1,keyasint"`
	Message       string `cbor:"2,keyasint,omitempty"`
	NodeCert      []byte `cbor:"3,keyasint,omitempty"`
	AuthorityCert []byte `cbor:"4,keyasint,omitempty"`
	Policy        []byte `cbor:"5,keyasint,omitempty"`
	// Members are a few live members of the node's zones (bootstrap peers for gossip).
	Members []Member `cbor:"6,keyasint,omitempty"`
	// PolicyRelease is the authority-signed release of Policy (COSE_Sign1, identity/record).
	PolicyRelease []byte `cbor:"7,keyasint,omitempty"`
	// Head is, on an accepted watch, the authority's last revocation sequence number. A watcher
	// holding more (the authority was restored from a backup) is sent every record from 1.
	Head uint64 `cbor:"8,keyasint,omitempty"`
	// IssuerCert is, on a join or renewal, the node's issuing certificate (DER): a CA limited to
	// path length 0 that signs the node's agents, issued with NodeCert and valid exactly as long.
	IssuerCert []byte `cbor:"9,keyasint,omitempty"`
}

// Member is a live node the authority names to a joining or renewing node: unexpired, unrevoked,
// sharing at least one zone with it, with an advertised address. It is a hint for finding the
// gossip pool, never a credential: the node still verifies the member's certificate at the
// handshake.
type Member struct {
	// ID is the member's node SPIFFE ID.
	ID string `cbor:"1,keyasint" json:"id"`
	// Addr is the underlay address the member advertised (host:port).
	Addr string `cbor:"2,keyasint" json:"addr"`
	// Zones are the zones the member shares with the requesting node, sorted.
	Zones []string `cbor:"3,keyasint" json:"zones"`
}

var (
	wireEnc cbor.EncMode
	wireDec cbor.DecMode
	// respDec decodes responses, which carry member lists (up to maxMembers members of up to
	// 64 zones each) and so need more room than requests.
	respDec cbor.DecMode
)

func init() {
	var err error
	if wireEnc, err = cbor.CoreDetEncOptions().EncMode(); err != nil {
		panic(err)
	}
	wireDec, err = cbor.DecOptions{
		DupMapKey:         cbor.DupMapKeyEnforcedAPF,
		IndefLength:       cbor.IndefLengthForbidden,
		TagsMd:            cbor.TagsForbidden,
		MaxNestedLevels:   4,
		MaxArrayElements:  16,
		MaxMapPairs:       16,
		ExtraReturnErrors: cbor.ExtraDecErrorUnknownField,
	}.DecMode()
	if err != nil {
		panic(err)
	}
	respDec, err = cbor.DecOptions{
		DupMapKey:         cbor.DupMapKeyEnforcedAPF,
		IndefLength:       cbor.IndefLengthForbidden,
		TagsMd:            cbor.TagsForbidden,
		MaxNestedLevels:   6,
		MaxArrayElements:  64,
		MaxMapPairs:       16,
		ExtraReturnErrors: cbor.ExtraDecErrorUnknownField,
	}.DecMode()
	if err != nil {
		panic(err)
	}
}

// errNoIssuerCSR is what a node from before issuing certificates hears: it asked for a node
// certificate only, and node certificates no longer sign agents.
var errNoIssuerCSR = fmt.Errorf("the request carries no issuing-key CSR (key 6 of a join, 3 of a renewal, at most %d bytes); upgrade ute on the node, then join again", maxCSR)

// DecodeJoinRequest strictly decodes and validates a join request body. It is the parser of
// untrusted bytes on the authority's unauthenticated path.
func DecodeJoinRequest(b []byte) (JoinRequest, error) {
	var req JoinRequest
	if len(b) > maxRequest {
		return req, fmt.Errorf("%w: join request of %d bytes exceeds %d", ErrProtocol, len(b), maxRequest)
	}
	if err := wireDec.Unmarshal(b, &req); err != nil {
		return JoinRequest{}, fmt.Errorf("%w: join request: %w", ErrProtocol, err)
	}
	switch {
	case req.TokenID == "" || len(req.TokenID) > maxTokenPart || len(req.Secret) == 0 || len(req.Secret) > maxTokenPart:
		return JoinRequest{}, fmt.Errorf("%w: token id or secret missing or longer than %d", ErrMalformedToken, maxTokenPart)
	case len(req.CSR) == 0 || len(req.CSR) > maxCSR:
		return JoinRequest{}, fmt.Errorf("%w: CSR missing or longer than %d bytes", ErrCSR, maxCSR)
	case len(req.IssuerCSR) == 0 || len(req.IssuerCSR) > maxCSR:
		return JoinRequest{}, fmt.Errorf("%w: %w", ErrCSR, errNoIssuerCSR)
	case len(req.Region) > maxRegion:
		return JoinRequest{}, fmt.Errorf("%w: region longer than %d", ErrTokenRegion, maxRegion)
	}
	if req.Advertise != "" {
		if err := ValidateAdvertise(req.Advertise); err != nil {
			return JoinRequest{}, err
		}
	}
	return req, nil
}

// DecodeRenewRequest strictly decodes and validates a renewal request body.
func DecodeRenewRequest(b []byte) (RenewRequest, error) {
	var req RenewRequest
	if len(b) > maxRequest {
		return req, fmt.Errorf("%w: renew request of %d bytes exceeds %d", ErrProtocol, len(b), maxRequest)
	}
	if err := wireDec.Unmarshal(b, &req); err != nil {
		return RenewRequest{}, fmt.Errorf("%w: renew request: %w", ErrProtocol, err)
	}
	if len(req.CSR) == 0 || len(req.CSR) > maxCSR {
		return RenewRequest{}, fmt.Errorf("%w: CSR missing or longer than %d bytes", ErrCSR, maxCSR)
	}
	if len(req.IssuerCSR) == 0 || len(req.IssuerCSR) > maxCSR {
		return RenewRequest{}, fmt.Errorf("%w: %w", ErrCSR, errNoIssuerCSR)
	}
	if req.Advertise != "" {
		if err := ValidateAdvertise(req.Advertise); err != nil {
			return RenewRequest{}, err
		}
	}
	return req, nil
}

// DecodeResponse strictly decodes a response body.
func DecodeResponse(b []byte) (Response, error) {
	var resp Response
	if len(b) > maxResponse {
		return Response{}, fmt.Errorf("%w: response of %d bytes exceeds %d", ErrProtocol, len(b), maxResponse)
	}
	if err := respDec.Unmarshal(b, &resp); err != nil {
		return Response{}, fmt.Errorf("%w: response: %w", ErrProtocol, err)
	}
	return resp, nil
}

// writeFrame writes [op byte if non-zero][u32 length][body].
func writeFrame(w io.Writer, op byte, v any) error {
	body, err := wireEnc.Marshal(v)
	if err != nil {
		return fmt.Errorf("encode frame: %w", err)
	}
	buf := make([]byte, 0, 5+len(body))
	if op != 0 {
		buf = append(buf, op)
	}
	buf = binary.BigEndian.AppendUint32(buf, uint32(len(body)))
	buf = append(buf, body...)
	_, err = w.Write(buf)
	return err
}

// readFrame reads one length-prefixed body of at most limit bytes.
func readFrame(r io.Reader, limit int) ([]byte, error) {
	var hdr [4]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, fmt.Errorf("%w: read frame length: %w", ErrProtocol, err)
	}
	n := binary.BigEndian.Uint32(hdr[:])
	if n > uint32(limit) {
		return nil, fmt.Errorf("%w: frame of %d bytes exceeds %d", ErrProtocol, n, limit)
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(r, body); err != nil {
		return nil, fmt.Errorf("%w: read frame body: %w", ErrProtocol, err)
	}
	return body, nil
}

// readOp reads the operation byte of a request.
func readOp(r io.Reader) (byte, error) {
	var op [1]byte
	if _, err := io.ReadFull(r, op[:]); err != nil {
		return 0, fmt.Errorf("%w: read operation: %w", ErrProtocol, err)
	}
	if op[0] != OpJoin && op[0] != OpRenew && op[0] != OpWatch && op[0] != OpEvidence {
		return 0, fmt.Errorf("%w: unknown operation %d", ErrProtocol, op[0])
	}
	return op[0], nil
}
