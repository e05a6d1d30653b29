package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/ute-project/ute/node"
	"github.com/ute-project/ute/node/config"
	nodedaemon "github.com/ute-project/ute/node/daemon"
	"github.com/ute-project/ute/overlay/dtl"
	"github.com/ute-project/ute/overlay/tunnel"
)

// demoDuplicateConfirm is the demo nodes' duplicate-identity confirmation time. A real node waits
// 45 s (longer than QUIC's idle timeout, so that a node restarted on another port is not its own
// duplicate); the demo restarts no node, and keeps the scenario to a few seconds.
const demoDuplicateConfirm = 1500 * time.Millisecond

// stolenCredentials is scenario 4: a misconfigured toolchain exposed node a's saved credentials
// (its node directory: keys, certificates, agents), and an attacker runs them from another
// endpoint. The credentials are valid, so the copy's handshake succeeds; node b sees one
// identity live at two addresses, collects a signed presence proof from each process and sends
// them to the authority, which verifies them itself and revokes the identity for every node.
// Both copies' sessions end; the attacker's flow to ledger is refused.
func (d *demo) stolenCredentials(ctx context.Context) {
	a, b := d.daemons["a"], d.daemons["b"]
	aID := a.Node().ID().String()
	thiefDir := filepath.Join(d.dir, "a-exposed-copy")
	if err := copyTree(filepath.Join(d.dir, "a"), thiefDir); err != nil {
		d.failf("copy node a's credentials: %v", err)
		return
	}
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		d.failf("attacker socket: %v", err)
		return
	}
	d.sockets = append(d.sockets, pc)
	t0 := time.Now()
	thief, err := nodedaemon.Start(ctx, nodedaemon.Options{Dir: thiefDir, Config: config.Default(), PacketConn: pc, NoAuthority: true,
		Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		d.failf("attacker's copy of node a: %v", err)
		return
	}
	d.daemons["a-copy"] = thief
	fmt.Fprintf(d.out, "  attacker copied node a's saved credentials (%s) and runs them from udp %s\n", filepath.Base(thiefDir), pc.LocalAddr())
	if err := thief.Node().AddPeer(node.Peer{Node: "b", Addr: b.Addr()}); err != nil {
		d.failf("attacker: %v", err)
		return
	}
	if _, err := thief.Node().Tunnel(ctx, "b", "payments"); err != nil {
		d.failf("the copy's handshake with node b (valid credentials) failed: %v", err)
		return
	}
	fmt.Fprintf(d.out, "           the copy's handshake with node b succeeds: the stolen credentials are valid (%s)\n", time.Since(t0).Round(time.Millisecond))
	// Node a, still running, dials b as it would for its next flow: b now holds tunnels of one
	// identity from two addresses.
	aAddr := a.Addr().String()
	for inbound := false; !inbound; {
		for _, tn := range b.Node().Endpoint().Tunnels() {
			if tn.Peer().NodeID != aID || !tn.Alive() {
				continue
			}
			if tn.Outbound() {
				_ = tn.Close() // b's own dial to a: make a dial b, as a copy and the original each do
			} else if tn.RemoteAddr().String() == aAddr {
				inbound = true
			}
		}
		if !inbound {
			_, _ = a.Node().Tunnel(ctx, "b", "payments")
		}
		if time.Since(t0) > 10*time.Second {
			d.failf("node a never held a tunnel to b next to its copy")
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
	for b.EvidenceSubmitted(aID) == 0 {
		if time.Since(t0) > 20*time.Second {
			d.failf("node b saw node a's identity twice but the authority never revoked it (b's score of a: %d)", b.TrustScore(aID))
			return
		}
		time.Sleep(2 * time.Millisecond)
	}
	seq := b.EvidenceSubmitted(aID)
	blocked := time.Since(t0)
	for !a.Node().Revoked(aID) {
		if time.Since(t0) > 20*time.Second {
			d.failf("node a never learned that its identity was revoked")
			return
		}
		time.Sleep(2 * time.Millisecond)
	}
	// Every session of the identity ends: b holds no live tunnel with either process.
	for live := true; live; {
		live = false
		for _, tn := range b.Node().Endpoint().Tunnels() {
			live = live || (tn.Peer().NodeID == aID && tn.Alive())
		}
		if live && time.Since(t0) > 20*time.Second {
			d.failf("node b still holds a session of the revoked identity %s", aID)
			return
		}
		time.Sleep(2 * time.Millisecond)
	}
	fmt.Fprintf(d.out, "  ok       node b saw %s live at two addresses, proved it with both processes' signed presence proofs;\n", aID)
	fmt.Fprintf(d.out, "           the authority verified them and revoked the identity (record seq %d) %s after the copy's first handshake\n", seq, blocked.Round(time.Millisecond))
	fmt.Fprintf(d.out, "           (duplicate confirmation %s, presence overlap 1 s); every session of the identity was terminated\n", demoDuplicateConfirm)
	billing, err := thief.Node().Agent("payments", "billing-api")
	if err != nil {
		d.failf("the copy's billing-api: %v", err)
		return
	}
	d.expectRefused("attacker's copy: billing-api.payments → ledger.payments:8080", &d.servers["ledger"].received, errIdentityRevoked, func() error {
		cctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		defer cancel()
		c, err := billing.Dial(cctx, "tcp", "ledger.payments:8080")
		if err == nil {
			_, _ = c.Write([]byte("GET / HTTP/1.0\r\n\r\n"))
			_ = c.Close()
			return nil
		}
		if errors.Is(err, dtl.ErrRevoked) || errors.Is(err, tunnel.ErrRefusedByPeer) {
			return fmt.Errorf("%w: %w", errIdentityRevoked, err)
		}
		return err
	})
}

// errIdentityRevoked marks a refusal because the identity is revoked (refused by the local node
// or by the peer's handshake or admission).
var errIdentityRevoked = errors.New("identity revoked")

// copyTree copies the regular files of a node directory (not its sockets), keeping their
// permissions: what a backup or a build cache that swept up the directory would hold. The node is
// running, so a file listed may be gone when it is read (the audit log's head is written to a
// temporary file and renamed): such a file is skipped, as a sweeping copy would miss it.
func copyTree(from, to string) error {
	return filepath.WalkDir(from, func(p string, e fs.DirEntry, err error) error {
		if err != nil {
			if p != from && errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		rel, err := filepath.Rel(from, p)
		if err != nil {
			return err
		}
		dst := filepath.Join(to, rel)
		if e.IsDir() {
			return os.MkdirAll(dst, 0o700)
		}
		if !e.Type().IsRegular() {
			return nil
		}
		info, err := e.Info()
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if err != nil {
			return err
		}
		in, err := os.Open(p)
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if err != nil {
			return err
		}
		defer func() { _ = in.Close() }()
		out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, info.Mode().Perm())
		if err != nil {
			return err
		}
		_, err = io.Copy(out, in)
		return errors.Join(err, out.Close())
	})
}

// trustDenied shows TrustFlow's first action: billing-api's identity was replayed (scenario 1)
// and used by another executable (scenario 2); the signed trust events of node b (the replays)
// and node a (the workload) bring its score below the zone's min_trust on every node, so even
// its allowed flow is refused with reason "trust" until the penalty decays.
func (d *demo) trustDenied(ctx context.Context) {
	const billing = "spiffe://demo.internal/zone/payments/agent/billing-api"
	a := d.daemons["a"]
	t0 := time.Now()
	for a.TrustScore(billing) >= 50 {
		if time.Since(t0) > 3*time.Second {
			d.failf("billing-api kept trust %d after the replays and the workload swap", a.TrustScore(billing))
			return
		}
		time.Sleep(2 * time.Millisecond)
	}
	agent, err := d.nodes["a"].Agent("payments", "billing-api")
	if err != nil {
		d.failf("billing-api: %v", err)
		return
	}
	fmt.Fprintf(d.out, "           billing-api's trust is now %d at node a and %d at node b (signed trust events, gossiped); zone payments needs 50\n",
		a.TrustScore(billing), d.daemons["b"].TrustScore(billing))
	d.expectRefused(fmt.Sprintf("billing-api.payments (trust %d) → ledger.payments:8080, an allowed flow", a.TrustScore(billing)),
		&d.servers["ledger"].received, dtl.ErrTrust, func() error {
			c, err := agent.Dial(ctx, "tcp", "ledger.payments:8080")
			if err == nil {
				_ = c.Close()
			}
			return err
		})
}
