package wireguard

import (
	"context"
	"encoding/binary"
	"errors"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func udp(src, dst string) Tuple {
	tp := tcp(src, dst)
	tp.Proto = ProtoUDP
	return tp
}

// fragments splits the IPv4 UDP datagram of tp carrying payload bytes into fragments whose IP
// payload is at most chunk bytes (a multiple of 8), as the kernel does for a datagram over the
// MTU: the first carries the UDP header, every one but the last has more-fragments set.
func fragments(tp Tuple, id uint16, payload, chunk int) [][]byte {
	whole := packet(tp, payload)
	hdr, data := whole[:20], whole[20:]
	var out [][]byte
	for off := 0; off < len(data); off += chunk {
		end := min(off+chunk, len(data))
		p := append(append([]byte(nil), hdr...), data[off:end]...)
		binary.BigEndian.PutUint16(p[2:4], uint16(len(p)))
		binary.BigEndian.PutUint16(p[4:6], id)
		fo := uint16(off / 8)
		if end < len(data) {
			fo |= 0x2000
		}
		binary.BigEndian.PutUint16(p[6:8], fo)
		out = append(out, p)
	}
	return out
}

// A UDP datagram over the MTU leaves as fragments: the first is decided with its tuple (held
// while it is admitted), the later ones follow it, both ways, and replies come back whole.
func TestFilterFragmentsFollowTheirDatagram(t *testing.T) {
	bothReads(t, func(t *testing.T, direct bool) {
		dns := udp(a1+":40000", b1+":53")
		decide := make(chan error)
		var h *harness
		h = newHarnessMode(t, FilterConfig{Admit: func(_ context.Context, tp Tuple) error {
			require.Equal(t, dns, tp, "a later fragment never starts an admission of its own tuple")
			err := <-decide
			if err == nil {
				h.f.AddOutbound(tp, nil)
			}
			return err
		}}, direct)
		frags := fragments(dns, 7, 4000, 1400)
		require.Len(t, frags, 3)
		for _, p := range frags {
			h.kernel(p)
		}
		expectNone(t, h.sent, 100*time.Millisecond)
		require.Eventually(t, func() bool { return h.f.Stats().Held == 3 }, 2*time.Second, 5*time.Millisecond,
			"the later fragments are held with their datagram's tuple")
		decide <- nil
		for _, p := range frags {
			expectPacket(t, h.sent, p)
		}
		// The next datagram of the admitted tuple passes at once, fragments included.
		for _, p := range fragments(dns, 8, 3000, 1400) {
			h.kernel(p)
			expectPacket(t, h.sent, p)
		}
		// A fragmented reply is delivered whole.
		for _, p := range fragments(dns.Reverse(), 900, 4000, 1400) {
			h.deliver(p)
			expectPacket(t, h.delivered, p)
		}
		require.Equal(t, uint64(6), h.f.Stats().Fragments)
	})
}

// Attacker's side: a later fragment is let through only as part of a datagram whose first
// fragment its tuple let through, in the same direction, from the same source to the same
// destination with the same identification; a refused or removed tuple's fragments stay out.
func TestFilterFragmentsWithoutTheirFirstAreDropped(t *testing.T) {
	bothReads(t, func(t *testing.T, direct bool) {
		dns := udp(a1+":40000", b1+":53")
		refusedT := udp(a1+":40001", b1+":53")
		var h *harness
		var cut atomic.Bool
		h = newHarnessMode(t, FilterConfig{RefuseFor: time.Hour, Admit: func(_ context.Context, tp Tuple) error {
			if tp == refusedT || cut.Load() {
				return errors.New("refused")
			}
			h.f.AddOutbound(tp, nil)
			return nil
		}}, direct)
		frags := fragments(dns, 7, 4000, 1400)
		h.kernel(frags[0])
		expectPacket(t, h.sent, frags[0])

		notFlow := h.f.Stats().NotFlow
		other := fragments(dns, 8, 4000, 1400) // another identification: its first never left
		h.kernel(other[1])
		spoof := fragments(udp("100.100.1.3:40000", b1+":53"), 7, 4000, 1400) // another source, same id
		h.kernel(spoof[1])
		expectNone(t, h.sent, 100*time.Millisecond)
		require.Eventually(t, func() bool { return h.f.Stats().NotFlow == notFlow+2 }, 2*time.Second, 5*time.Millisecond)

		// Inbound: the peer sends later fragments of a datagram whose first never arrived, and
		// of the outbound datagram's identification (the other direction's table).
		h.deliver(fragments(dns.Reverse(), 500, 4000, 1400)[1], frags[1])
		expectNone(t, h.delivered, 100*time.Millisecond)

		// The refused tuple's fragments: the first is refused, the later ones follow it out.
		for _, p := range fragments(refusedT, 9, 4000, 1400) {
			h.kernel(p)
		}
		expectNone(t, h.sent, 200*time.Millisecond)
		require.Eventually(t, func() bool { return h.f.Stats().Refused == 3 }, 2*time.Second, 5*time.Millisecond)

		// Cut (its agent revoked: removed, admission now refused): the rest of a datagram
		// already under way asks for admission like any packet of the tuple, and is refused.
		cut.Store(true)
		_, removed := h.f.Remove(dns)
		require.True(t, removed)
		refusals := h.f.Stats().Refusals
		h.kernel(frags[1])
		expectNone(t, h.sent, 200*time.Millisecond)
		require.Eventually(t, func() bool { return h.f.Stats().Refusals == refusals+1 }, 2*time.Second, 5*time.Millisecond)
	})
}

// len is the number of datagrams ft follows.
func (ft *fragTable) len() int {
	ft.mu.Lock()
	defer ft.mu.Unlock()
	return len(ft.m)
}

// The followed datagrams are bounded and forgotten after fragFollow.
func TestFragTableBoundedAndExpires(t *testing.T) {
	var ft fragTable
	k := keyOf(udp(a1+":1", b1+":2"))
	now := time.Now().UnixNano()
	for i := range maxFrags + 10 {
		ft.remember(fragKey{id: uint16(i), proto: ProtoUDP}, k, now)
	}
	require.Equal(t, maxFrags, ft.len())
	_, ok := ft.lookup(fragKey{id: uint16(maxFrags + 5), proto: ProtoUDP}, now)
	require.False(t, ok, "over the bound a datagram is not followed")
	got, ok := ft.lookup(fragKey{id: 3, proto: ProtoUDP}, now)
	require.True(t, ok)
	require.Equal(t, k, got)
	later := now + int64(fragFollow) + 1
	_, ok = ft.lookup(fragKey{id: 3, proto: ProtoUDP}, later)
	require.False(t, ok, "past fragFollow the rest of a datagram is dropped")
	ft.sweep(later)
	require.Zero(t, ft.len())
}

func TestTupleOfKey(t *testing.T) {
	for _, tp := range []Tuple{udp(a1+":40000", b1+":53"), udp("[fd00::1]:5", "[fd00::2]:6"), tcp(a1+":1", b1+":2")} {
		require.Equal(t, tp, tupleOf(keyOf(tp)))
	}
}

// FuzzIPv4Fragment: any bytes, never a panic; what it calls a fragment is an IPv4 UDP header
// with more-fragments or an offset, and a later fragment (first false) is never parsed for ports.
func FuzzIPv4Fragment(f *testing.F) {
	for _, p := range fragments(udp(a1+":40000", b1+":53"), 7, 3000, 1400) {
		f.Add(p)
	}
	f.Add(packet(udp(a1+":1", b1+":2"), 10))
	f.Add([]byte{0x45})
	f.Fuzz(func(t *testing.T, p []byte) {
		fk, first, ok := ipv4Fragment(p)
		if !ok {
			return
		}
		if len(p) < 20 || p[0]>>4 != 4 || p[9] != ProtoUDP || binary.BigEndian.Uint16(p[6:8])&0x3fff == 0 {
			t.Fatalf("% x called a fragment", p[:min(len(p), 20)])
		}
		if first != (binary.BigEndian.Uint16(p[6:8])&0x1fff == 0) {
			t.Fatalf("first %v for offset field %#x", first, binary.BigEndian.Uint16(p[6:8]))
		}
		if fk.src != [4]byte(p[12:16]) || fk.dst != [4]byte(p[16:20]) {
			t.Fatal("addresses")
		}
		_ = netip.AddrFrom4(fk.src)
	})
}
