package authority

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/tls"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/ute-project/ute/identity"
)

// serverName is the SNI the client sends. The authority's certificate carries a SPIFFE URI, not a
// DNS name, so the client authenticates it by key (pin or stored root), never by hostname.
const serverName = "ute-authority"

// JoinParams is what a joining node supplies.
type JoinParams struct {
	// Addr is the authority's UDP address, host:port.
	Addr string
	// Token is the printable join token.
	Token string
	// Key is the node's freshly generated key; only its CSR leaves the node.
	Key ed25519.PrivateKey
	// Name is the node name requested in the CSR.
	Name string
	// Region is the node's region; empty lets the authority pick the token's only region.
	Region string
	// HostFingerprint is the 32-byte host fingerprint digest placed in the CSR.
	HostFingerprint []byte
	// Advertise is the underlay address (host:port) other members reach this node at; the
	// authority records it and names it to other nodes of the same zones. Empty: none.
	Advertise string
	// Now is the clock used to check the returned certificate; nil means time.Now.
	Now func() time.Time
}

// Joined is what a successful join returns, all verified against the pinned authority key.
type Joined struct {
	Node      *identity.Certificate
	Authority *identity.Certificate
	// Issuer is the node's issuing certificate, for the issuing key identity.IssuerKey derives
	// from the node key; it signs the node's agents. IssuerCertDER is its DER.
	Issuer        *identity.Certificate
	IssuerCertDER []byte
	Policy        []byte
	NodeCertDER   []byte
	AuthorityDER  []byte
	AuthorityAddr string
	// Members are up to MaxMembers live members sharing a zone with this node (IDs are node IDs
	// of this trust domain, addresses pass ValidateAdvertise): bootstrap hints, to be verified at
	// the handshake like any peer.
	Members []Member
	// PolicyRelease is the authority-signed release of Policy (identity/record); nil from an
	// authority that predates releases.
	PolicyRelease []byte
}

// Join runs the join protocol against the authority at p.Addr. It refuses, with ErrPinMismatch and
// before sending anything, an authority whose TLS key does not match the token's pin.
func Join(ctx context.Context, p JoinParams) (*Joined, error) {
	tok, err := identity.ParseToken(p.Token)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrMalformedToken, err)
	}
	now := time.Now
	if p.Now != nil {
		now = p.Now
	}
	if p.Advertise != "" {
		if err := ValidateAdvertise(p.Advertise); err != nil {
			return nil, err
		}
	}
	csr, err := createCSR(p.Key, p.Name, p.Region, p.HostFingerprint)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrCSR, err)
	}
	issuerCSR, err := createIssuerCSR(p.Key, p.Name, p.Region, p.HostFingerprint)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrCSR, err)
	}
	verify := func(cs tls.ConnectionState) error {
		pub, err := peerKey(cs)
		if err != nil {
			return err
		}
		if !tok.MatchesKey(pub) {
			return fmt.Errorf("%w: the token pins authority key %s, but the server at %s presented key %s; check --authority, or ask this authority's operator for a token", ErrPinMismatch, tok.Pin, p.Addr, identity.KeyHash(pub))
		}
		return nil
	}
	resp, err := roundTrip(ctx, p.Addr, verify, nil, OpJoin, JoinRequest{TokenID: tok.ID, Secret: tok.Secret, CSR: csr, IssuerCSR: issuerCSR, Region: p.Region, Advertise: p.Advertise})
	if err != nil {
		return nil, err
	}
	j, err := checkIssued(resp, p.Key, now())
	if err != nil {
		return nil, err
	}
	if !tok.MatchesKey(j.Authority.PublicKey()) {
		return nil, fmt.Errorf("%w: the authority certificate returned does not carry the pinned key", ErrPinMismatch)
	}
	j.AuthorityAddr = p.Addr
	return j, nil
}

// RenewParams is what a node supplies to renew its certificate.
type RenewParams struct {
	Addr      string
	Authority *identity.Certificate // the trust anchor received at join
	Current   *identity.Certificate // the node certificate presented over mutual TLS
	Key       ed25519.PrivateKey    // the current key, proving possession in the TLS handshake
	NewKey    ed25519.PrivateKey    // the key the renewed certificate is issued for
	// Advertise replaces the underlay address recorded for this node; empty keeps the recorded one.
	Advertise string
	Now       func() time.Time
}

// Renew obtains a new node certificate for p.NewKey, authenticating with the current certificate
// and key. The authority must present the root key received at join.
func Renew(ctx context.Context, p RenewParams) (*Joined, error) {
	if p.Authority == nil || p.Current == nil {
		return nil, errors.New("renew: authority and current certificates are required")
	}
	now := time.Now
	if p.Now != nil {
		now = p.Now
	}
	if p.Advertise != "" {
		if err := ValidateAdvertise(p.Advertise); err != nil {
			return nil, err
		}
	}
	tlsCert, err := identity.TLSCertificate(p.Key, p.Current)
	if err != nil {
		return nil, err
	}
	csr, err := createCSR(p.NewKey, p.Current.ID.Name, "", p.Current.Claims.Fingerprint)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrCSR, err)
	}
	issuerCSR, err := createIssuerCSR(p.NewKey, p.Current.ID.Name, "", p.Current.Claims.Fingerprint)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrCSR, err)
	}
	want := p.Authority.PublicKey()
	verify := func(cs tls.ConnectionState) error {
		pub, err := peerKey(cs)
		if err != nil {
			return err
		}
		if !pub.Equal(want) {
			return fmt.Errorf("%w: the server at %s presented key %s, not the authority key %s received at join", ErrPinMismatch, p.Addr, identity.KeyHash(pub), identity.KeyHash(want))
		}
		return nil
	}
	resp, err := roundTrip(ctx, p.Addr, verify, &tlsCert, OpRenew, RenewRequest{CSR: csr, IssuerCSR: issuerCSR, Advertise: p.Advertise})
	if err != nil {
		return nil, err
	}
	j, err := checkIssued(resp, p.NewKey, now())
	if err != nil {
		return nil, err
	}
	if !j.Authority.PublicKey().Equal(want) {
		return nil, fmt.Errorf("%w: renewal returned a different authority certificate", ErrPinMismatch)
	}
	if j.Node.ID != p.Current.ID {
		return nil, fmt.Errorf("%w: renewal returned %s for %s", ErrProtocol, j.Node.ID, p.Current.ID)
	}
	j.AuthorityAddr = p.Addr
	return j, nil
}

func peerKey(cs tls.ConnectionState) (ed25519.PublicKey, error) {
	if len(cs.PeerCertificates) == 0 {
		return nil, fmt.Errorf("%w: the server presented no certificate", ErrPinMismatch)
	}
	pub, ok := cs.PeerCertificates[0].PublicKey.(ed25519.PublicKey)
	if !ok {
		return nil, fmt.Errorf("%w: the server's key is %T, not Ed25519", ErrPinMismatch, cs.PeerCertificates[0].PublicKey)
	}
	return pub, nil
}

// checkIssued verifies a successful response: the node certificate chains to the returned
// authority certificate, is valid now and is for key.
func checkIssued(resp Response, key ed25519.PrivateKey, now time.Time) (*Joined, error) {
	ca, err := identity.ParseCertificate(resp.AuthorityCert)
	if err != nil {
		return nil, fmt.Errorf("%w: authority certificate: %w", ErrProtocol, err)
	}
	node, err := identity.ParseCertificate(resp.NodeCert)
	if err != nil {
		return nil, fmt.Errorf("%w: node certificate: %w", ErrProtocol, err)
	}
	if err := (identity.Verifier{Authority: ca}).VerifyNode(node, now); err != nil {
		return nil, fmt.Errorf("%w: issued certificate does not verify: %w", ErrProtocol, err)
	}
	if !bytes.Equal(node.PublicKey(), key.Public().(ed25519.PublicKey)) {
		return nil, fmt.Errorf("%w: issued certificate is not for this node's key", ErrProtocol)
	}
	issuer, err := checkIssuer(resp.IssuerCert, ca, node, key, now)
	if err != nil {
		return nil, err
	}
	if len(resp.Members) > MaxMembers {
		return nil, fmt.Errorf("%w: %d members, at most %d", ErrProtocol, len(resp.Members), MaxMembers)
	}
	for _, m := range resp.Members {
		id, err := identity.ParseID(m.ID)
		if err != nil || id.Kind != identity.KindNode || id.TrustDomain != ca.ID.TrustDomain {
			return nil, fmt.Errorf("%w: member %q is not a node of trust domain %s", ErrProtocol, m.ID, ca.ID.TrustDomain)
		}
		if err := ValidateAdvertise(m.Addr); err != nil {
			return nil, fmt.Errorf("%w: member %s: %w", ErrProtocol, m.ID, err)
		}
	}
	return &Joined{Node: node, Authority: ca, Issuer: issuer, IssuerCertDER: resp.IssuerCert, Policy: resp.Policy,
		NodeCertDER: resp.NodeCert, AuthorityDER: resp.AuthorityCert, Members: resp.Members, PolicyRelease: resp.PolicyRelease}, nil
}

// checkIssuer verifies the issuing certificate of a response: it chains to the authority, names
// this node and the serial of the node certificate it came with, and is for the issuing key
// derived from key.
func checkIssuer(der []byte, ca, node *identity.Certificate, key ed25519.PrivateKey, now time.Time) (*identity.Certificate, error) {
	if len(der) == 0 {
		return nil, fmt.Errorf("%w: the authority sent no issuing certificate; upgrade the authority", ErrProtocol)
	}
	issuer, err := identity.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("%w: issuing certificate: %w", ErrProtocol, err)
	}
	if err := (identity.Verifier{Authority: ca}).VerifyIssuer(issuer, now); err != nil {
		return nil, fmt.Errorf("%w: issuing certificate does not verify: %w", ErrProtocol, err)
	}
	ikey, err := identity.IssuerKey(key)
	if err != nil {
		return nil, err
	}
	if issuer.ID != node.ID || issuer.Claims.NodeSerial.Cmp(node.Serial()) != 0 || !issuer.PublicKey().Equal(ikey.Public()) {
		return nil, fmt.Errorf("%w: issuing certificate is not for this node certificate and key", ErrProtocol)
	}
	return issuer, nil
}

// Retries of a request the authority refused as busy. Busy means nothing was read or stored, so
// a retry is always safe; the backoff is short because the limits are about concurrency, and
// jittered so that a burst of joiners does not come back in lockstep.
const (
	busyAttempts   = 8
	busyMinBackoff = 25 * time.Millisecond
	busyMaxBackoff = time.Second
)

// roundTrip performs one request, retrying it (a few times, with backoff) while the authority
// answers ErrBusy.
func roundTrip(ctx context.Context, addr string, verify func(tls.ConnectionState) error, clientCert *tls.Certificate, op byte, req any) (Response, error) {
	backoff := busyMinBackoff
	for attempt := 1; ; attempt++ {
		resp, err := roundTripOnce(ctx, addr, verify, clientCert, op, req)
		if !errors.Is(err, ErrBusy) || attempt == busyAttempts {
			return resp, err
		}
		wait := backoff/2 + rand.N(backoff/2+1)
		backoff = min(2*backoff, busyMaxBackoff)
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return Response{}, fmt.Errorf("%w (gave up: %w)", err, ctx.Err())
		case <-t.C:
		}
	}
}

// busyError turns the authority's busy connection close into ErrBusy; other errors pass through.
func busyError(err error) error {
	var appErr *quic.ApplicationError
	if errors.As(err, &appErr) && appErr.Remote && appErr.ErrorCode == closeBusy {
		msg := appErr.ErrorMessage
		if msg == "" {
			msg = ErrBusy.Error()
		}
		return &RefusalError{Code: CodeBusy, Message: msg}
	}
	return err
}

// roundTripOnce dials addr over one quic.Transport, checks the server with verify during the
// handshake (so nothing is sent to a server that fails it), sends one request and reads the
// response.
func roundTripOnce(ctx context.Context, addr string, verify func(tls.ConnectionState) error, clientCert *tls.Certificate, op byte, req any) (Response, error) {
	raddr, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		return Response{}, fmt.Errorf("authority address %q: %w", addr, err)
	}
	udp, err := net.ListenUDP("udp", nil)
	if err != nil {
		return Response{}, fmt.Errorf("dial authority: %w", err)
	}
	tr := &quic.Transport{Conn: udp}
	defer func() {
		_ = tr.Close()
		_ = udp.Close()
	}()
	tlsConf := &tls.Config{
		MinVersion: tls.VersionTLS13,
		NextProtos: []string{ALPN},
		ServerName: serverName,
		// The authority is authenticated by its key in VerifyConnection, not by a CA and hostname.
		InsecureSkipVerify:     true,
		VerifyConnection:       verify,
		SessionTicketsDisabled: true,
	}
	if clientCert != nil {
		tlsConf.Certificates = []tls.Certificate{*clientCert}
	}
	ctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	wait := handshakeTimeout
	if dl, ok := ctx.Deadline(); ok && time.Until(dl) < wait {
		wait = time.Until(dl)
	}
	conn, err := tr.Dial(ctx, raddr, tlsConf, &quic.Config{HandshakeIdleTimeout: handshakeTimeout, MaxIdleTimeout: requestTimeout})
	if err != nil {
		if errors.Is(err, ErrPinMismatch) {
			return Response{}, pinError(err)
		}
		if isTimeout(err) {
			return Response{}, &noAnswerError{addr: addr, wait: wait, cause: err}
		}
		return Response{}, &notSentError{err: fmt.Errorf("connect to authority at %s: %w", addr, busyError(err))}
	}
	defer func() { _ = conn.CloseWithError(closeOK, "") }()
	if conn.ConnectionState().Used0RTT {
		return Response{}, fmt.Errorf("%w: connection used 0-RTT", ErrProtocol)
	}
	str, err := conn.OpenStreamSync(ctx)
	if err != nil {
		return Response{}, &notSentError{err: fmt.Errorf("open stream to authority at %s: %w", addr, busyError(err))}
	}
	if dl, ok := ctx.Deadline(); ok {
		_ = str.SetDeadline(dl)
	}
	if err := writeFrame(str, op, req); err != nil {
		return Response{}, fmt.Errorf("send request to authority at %s: %w", addr, busyError(err))
	}
	_ = str.Close()
	body, err := readFrame(str, maxResponse)
	if err != nil {
		return Response{}, fmt.Errorf("read response from authority at %s: %w", addr, busyError(err))
	}
	resp, err := DecodeResponse(body)
	if err != nil {
		return Response{}, err
	}
	if resp.Code != CodeOK {
		return Response{}, errOf(resp.Code, resp.Message)
	}
	return resp, nil
}

// pinError digs our pin-mismatch message out of the layers quic-go and crypto/tls add around a
// VerifyConnection error (a transport error whose text starts "CRYPTO_ERROR 0x12a (local):"),
// so that the operator reads which pin was expected and which key the server showed, nothing else.
func pinError(err error) error {
	cur := err
	for {
		var kids []error
		switch u := cur.(type) {
		case interface{ Unwrap() error }:
			kids = []error{u.Unwrap()}
		case interface{ Unwrap() []error }:
			kids = u.Unwrap()
		}
		var next error
		for _, k := range kids {
			if k != nil && errors.Is(k, ErrPinMismatch) {
				next = k
				break
			}
		}
		// Stop at the error that wraps the bare sentinel: it carries the explanation.
		if next == nil || next == ErrPinMismatch {
			return cur
		}
		cur = next
	}
}
