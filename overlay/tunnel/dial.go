package tunnel

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/quic-go/quic-go"
)

// tlsAlertNoApplicationProtocol is the TLS alert a server sends when no offered ALPN matches.
const tlsAlertNoApplicationProtocol = 120

type dialCall struct {
	done chan struct{}
	t    *Tunnel
	err  error
}

// Dial returns the live tunnel to peerNodeID for zone, dialing peerAddr if there is none.
// Concurrent calls for the same (peer, zone) share one handshake. Transient failures are retried
// with jittered exponential backoff (Limits.DialAttempts); refusals are returned at once:
// ErrZoneNotServed, ErrZoneNotOffered, ErrPeerRefused, ErrPeerMismatch, ErrRefusedByPeer.
func (e *Endpoint) Dial(ctx context.Context, peerAddr netip.AddrPort, peerNodeID, zone string) (*Tunnel, error) {
	if !e.servesZone(zone) {
		return nil, fmt.Errorf("%w: %q (this node serves %v)", ErrZoneNotServed, zone, e.Zones())
	}
	key := tunnelKey{peerNodeID, zone}
	for {
		e.mu.Lock()
		if e.closed {
			e.mu.Unlock()
			return nil, ErrClosed
		}
		if t := e.live[key]; t != nil && t.Alive() && !t.Stale() && t.claim() {
			e.mu.Unlock()
			return t, nil
		}
		if c := e.dials[key]; c != nil {
			e.mu.Unlock()
			select {
			case <-c.done:
			case <-ctx.Done():
				return nil, fmt.Errorf("tunnel: dial %s zone %s: %w", peerNodeID, zone, ctx.Err())
			}
			// The leader's own context ending is no reason for this caller to fail; try again.
			if c.err != nil && (errors.Is(c.err, context.Canceled) || errors.Is(c.err, context.DeadlineExceeded)) && ctx.Err() == nil {
				continue
			}
			// Nor is the gate's refusal of a deferrable leader, for a caller that may wait.
			if errors.Is(c.err, ErrGateBusy) && !IsDeferrable(ctx) && ctx.Err() == nil {
				continue
			}
			if c.err != nil {
				return nil, c.err
			}
			if c.t.Alive() && !c.t.Stale() && c.t.claim() {
				return c.t, nil
			}
			continue
		}
		c := &dialCall{done: make(chan struct{})}
		e.dials[key] = c
		e.mu.Unlock()

		c.t, c.err = e.dialRetry(ctx, peerAddr, peerNodeID, zone)

		e.mu.Lock()
		delete(e.dials, key)
		e.mu.Unlock()
		close(c.done)
		if c.err == nil && c.t.Stale() {
			// SetCertificate ran after this handshake presented the old certificate: the peer
			// would check everything sent on the tunnel against the superseded one. Handshake
			// again with the new chain (the stale tunnel stays up for flows already on it).
			continue
		}
		return c.t, c.err
	}
}

func permanent(err error) bool {
	return errors.Is(err, ErrPeerRefused) || errors.Is(err, ErrPeerMismatch) ||
		errors.Is(err, ErrZoneNotOffered) || errors.Is(err, ErrRefusedByPeer) ||
		errors.Is(err, ErrZoneNotServed) || errors.Is(err, ErrClosed) || errors.Is(err, Err0RTT)
}

// backoff returns the delay before retry attempt (1-based): exponential, capped, with jitter in
// [d/2, d) so that many nodes reconnecting to a restarted peer do not move in lockstep.
func (l Limits) backoff(attempt int) time.Duration {
	d := l.BackoffBase << min(attempt-1, 30)
	if d <= 0 || d > l.BackoffMax {
		d = l.BackoffMax
	}
	half := d / 2
	return half + rand.N(d-half+1)
}

func (e *Endpoint) dialRetry(ctx context.Context, addr netip.AddrPort, nodeID, zone string) (*Tunnel, error) {
	var err error
	for attempt := 1; ; attempt++ {
		var t *Tunnel
		t, err = e.dialOnce(ctx, addr, nodeID, zone)
		if err == nil {
			return t, nil
		}
		if errors.Is(err, ErrGateBusy) {
			return nil, err // no handshake was tried: neither a failure to count nor one to retry
		}
		e.stats.dialFailures.Add(1)
		e.log.Warn("tunnel dial failed", "peer", nodeID, "addr", addr.String(), "zone", zone, "attempt", attempt, "err", err)
		if permanent(err) || attempt >= e.lim.DialAttempts || ctx.Err() != nil {
			break
		}
		timer := time.NewTimer(e.lim.backoff(attempt))
		select {
		case <-ctx.Done():
			timer.Stop()
			return nil, fmt.Errorf("tunnel: dial %s zone %s: %w (last error: %w)", nodeID, zone, ctx.Err(), err)
		case <-e.ctx.Done():
			timer.Stop()
			return nil, ErrClosed
		case <-timer.C:
		}
	}
	return nil, err
}

func (e *Endpoint) dialOnce(ctx context.Context, addr netip.AddrPort, nodeID, zone string) (*Tunnel, error) {
	var (
		mu       sync.Mutex
		verified *Peer
		verr     error
		local    *tls.Certificate
	)
	tc := e.baseTLS(func(c *tls.Certificate) {
		mu.Lock()
		local = c
		mu.Unlock()
	})
	tc.NextProtos = []string{ALPN(zone)}
	tc.VerifyConnection = func(cs tls.ConnectionState) error {
		var err error
		var peer Peer
		switch {
		case cs.NegotiatedProtocol != ALPN(zone):
			err = fmt.Errorf("%w: %q negotiated %q", ErrZoneNotOffered, zone, cs.NegotiatedProtocol)
		default:
			peer, err = e.verifyPeer(zone, cs)
			if err == nil && peer.NodeID != nodeID {
				err = fmt.Errorf("%w: dialed %s, certificate proves %s", ErrPeerMismatch, nodeID, peer.NodeID)
			}
		}
		mu.Lock()
		defer mu.Unlock()
		if err != nil {
			verr = err
			if errors.Is(err, ErrPeerRefused) || errors.Is(err, ErrPeerMismatch) {
				_ = e.refused(zone, net.UDPAddrFromAddrPort(addr), err)
			}
			return err
		}
		verified = &peer
		return nil
	}
	release, err := e.acquireDial(ctx, addr, nodeID, zone)
	if err != nil {
		return nil, err
	}
	defer release()
	hctx, cancel := context.WithTimeout(ctx, e.lim.HandshakeTimeout)
	defer cancel()
	qc := e.qconf.Clone()
	qc.MaxIncomingUniStreams = 1 // the server's ready stream
	conn, err := e.tr.Dial(hctx, net.UDPAddrFromAddrPort(addr), tc, qc)
	mu.Lock()
	peer, vErr, presented := verified, verr, local
	mu.Unlock()
	if err != nil {
		if vErr != nil {
			return nil, vErr
		}
		return nil, classifyDialErr(nodeID, zone, err)
	}
	if peer == nil || presented == nil {
		_ = conn.CloseWithError(codeNoPeer, "peer not verified")
		return nil, fmt.Errorf("%w: handshake finished without verification", ErrPeerRefused)
	}
	if err := awaitReady(hctx, conn); err != nil {
		_ = conn.CloseWithError(codeShutdown, "no ready signal")
		return nil, classifyDialErr(nodeID, zone, err)
	}
	return e.newTunnel(conn, *peer, presented, zone, true)
}

// awaitReady waits for the server's ready stream (see readyByte).
func awaitReady(ctx context.Context, conn *quic.Conn) error {
	s, err := conn.AcceptUniStream(ctx)
	if err != nil {
		return err
	}
	if d, ok := ctx.Deadline(); ok {
		_ = s.SetReadDeadline(d)
	}
	var b [2]byte
	n, err := io.ReadFull(s, b[:1])
	if err != nil {
		return fmt.Errorf("reading ready signal: %w", err)
	}
	if n != 1 || b[0] != readyByte {
		return fmt.Errorf("%w: bad ready signal", ErrFrame)
	}
	return nil
}

func classifyDialErr(nodeID, zone string, err error) error {
	var te *quic.TransportError
	if errors.As(err, &te) && te.ErrorCode.IsCryptoError() && te.Remote {
		if te.ErrorCode == quic.TransportErrorCode(0x100+tlsAlertNoApplicationProtocol) {
			return fmt.Errorf("%w: %s does not serve zone %q: %w", ErrZoneNotOffered, nodeID, zone, err)
		}
		return fmt.Errorf("%w: %s zone %q: %w", ErrRefusedByPeer, nodeID, zone, err)
	}
	var ae *quic.ApplicationError
	if errors.As(err, &ae) && ae.Remote && ae.ErrorCode == codeNoPeer {
		return fmt.Errorf("%w: %s zone %q: %w", ErrRefusedByPeer, nodeID, zone, err)
	}
	return fmt.Errorf("tunnel: dial %s zone %q: %w", nodeID, zone, err)
}
