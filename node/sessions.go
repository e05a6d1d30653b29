package node

import "github.com/ute-project/ute/overlay/tunnel"

// A tunnel's admission session (its replay window and chain cache) lives as long as the tunnel.
// Before, the session was dropped after twice the freshness window idle (60 s by default) while
// the sender still named its chain by hash, so the first flow after a pause was refused as
// chain-unknown and audited as a denial before the sender resent the full chain. The sender's
// dtl.KnownChains is per tunnel too, so both sides now forget together: at eviction (same
// bound) and when the tunnel closes. Keeping the replay window meanwhile is safe (it only
// refuses more) and costs about 1 KiB per live tunnel. Sessions no tunnel owns (same-node
// flows, a record racing the tunnel's close) are still swept when idle.

// bindSessionLocked creates or marks t's session as owned by t; n.mu is held.
func (n *Node) bindSessionLocked(t *tunnel.Tunnel) {
	n.sessionLocked(t.Zone(), t.Peer().NodeID, t.Exporter(), n.now()).bound = true
}

// dropSessionLocked forgets t's session once t has closed; n.mu is held.
func (n *Node) dropSessionLocked(t *tunnel.Tunnel) {
	key := string(t.Exporter())
	if s := n.sessions[key]; s != nil && s.bound {
		delete(n.sessions, key)
	}
}
