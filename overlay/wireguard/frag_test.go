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

// fragments6 is fragments for IPv6: each fragment is the fixed header, a Fragment header right
// after it (as Linux writes it for a UDP socket's datagram) and at most chunk bytes (a multiple
// of 8) of the datagram, the first starting with the UDP header.
func fragments6(tp Tuple, id uint32, payload, chunk int) [][]byte {
	whole := packet(tp, payload)
	hdr, data := whole[:40], whole[40:]
	var out [][]byte
	for off := 0; off < len(data); off += chunk {
		end := min(off+chunk, len(data))
		p := append(append([]byte(nil), hdr...), make([]byte, 8)...)
		p[6] = ipv6FragmentHeader
		p[40] = ProtoUDP
		om := uint16(off/8) << 3
		if end < len(data) {
			om |= 1
		}
		binary.BigEndian.PutUint16(p[42:44], om)
		binary.BigEndian.PutUint32(p[44:48], id)
		p = append(p, data[off:end]...)
		binary.BigEndian.PutUint16(p[4:6], uint16(len(p)-40))
		out = append(out, p)
	}
	return out
}

// fragFamily runs the fragment tests over IPv4 and IPv6: a and a2 are addresses of this node's
// agents, b a remote agent's.
type fragFamily struct {
	name      string
	a, a2, b  string
	fragments func(tp Tuple, id uint32, payload, chunk int) [][]byte
}

var fragFamilies = []fragFamily{
	{"ipv4", a1, "100.100.1.3", b1, func(tp Tuple, id uint32, payload, chunk int) [][]byte {
		return fragments(tp, uint16(id), payload, chunk)
	}},
	{"ipv6", "[fd00:100:1::2]", "[fd00:100:1::3]", "[fd00:100:1:0:100::2]", fragments6},
}

func eachFamily(t *testing.T, test func(t *testing.T, fam fragFamily, direct bool)) {
	for _, fam := range fragFamilies {
		t.Run(fam.name, func(t *testing.T) {
			bothReads(t, func(t *testing.T, direct bool) { test(t, fam, direct) })
		})
	}
}

// A UDP datagram over the MTU leaves as fragments: the first is decided with its tuple (held
// while it is admitted), the later ones follow it, both ways, and replies come back whole.
func TestFilterFragmentsFollowTheirDatagram(t *testing.T) {
	eachFamily(t, func(t *testing.T, fam fragFamily, direct bool) {
		dns := udp(fam.a+":40000", fam.b+":53")
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
		frags := fam.fragments(dns, 0x10007, 4000, 1400)
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
		for _, p := range fam.fragments(dns, 8, 3000, 1400) {
			h.kernel(p)
			expectPacket(t, h.sent, p)
		}
		// A fragmented reply is delivered whole.
		for _, p := range fam.fragments(dns.Reverse(), 900, 4000, 1400) {
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
	eachFamily(t, func(t *testing.T, fam fragFamily, direct bool) {
		dns := udp(fam.a+":40000", fam.b+":53")
		refusedT := udp(fam.a+":40001", fam.b+":53")
		var h *harness
		var cut atomic.Bool
		h = newHarnessMode(t, FilterConfig{RefuseFor: time.Hour, Admit: func(_ context.Context, tp Tuple) error {
			if tp == refusedT || cut.Load() {
				return errors.New("refused")
			}
			h.f.AddOutbound(tp, nil)
			return nil
		}}, direct)
		frags := fam.fragments(dns, 7, 4000, 1400)
		h.kernel(frags[0])
		expectPacket(t, h.sent, frags[0])

		notFlow := h.f.Stats().NotFlow
		other := fam.fragments(dns, 8, 4000, 1400) // another identification: its first never left
		h.kernel(other[1])
		spoof := fam.fragments(udp(fam.a2+":40000", fam.b+":53"), 7, 4000, 1400) // another source, same id
		h.kernel(spoof[1])
		expectNone(t, h.sent, 100*time.Millisecond)
		require.Eventually(t, func() bool { return h.f.Stats().NotFlow == notFlow+2 }, 2*time.Second, 5*time.Millisecond)

		// Inbound: the peer sends later fragments of a datagram whose first never arrived, and
		// of the outbound datagram's identification (the other direction's table).
		h.deliver(fam.fragments(dns.Reverse(), 500, 4000, 1400)[1], frags[1])
		expectNone(t, h.delivered, 100*time.Millisecond)

		// The refused tuple's fragments: the first is refused, the later ones follow it out.
		for _, p := range fam.fragments(refusedT, 9, 4000, 1400) {
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

// with returns a copy of p changed by edit.
func with(p []byte, edit func(p []byte) []byte) []byte {
	return edit(append([]byte(nil), p...))
}

// Attacker's side, the shapes: on a tuple admitted both ways, a first fragment that does not hold
// the whole UDP header (RFC 7112), and every IPv6 fragment but the Fragment header straight after
// the fixed header with UDP straight after it, is dropped and counted in either direction, and
// the later fragments of such a datagram are dropped with it. Each batch ends with a packet that
// passes: nothing before it passed, and the counts are exact.
func TestFilterFragmentShapesDropped(t *testing.T) {
	dns4 := udp(a1+":40000", b1+":53")
	dns6 := udp("[fd00:100:1::2]:40000", "[fd00:100:1:0:100::2]:53")
	f4 := fragments(dns4, 7, 4000, 1400)
	f6 := fragments6(dns6, 0x10007, 4000, 1400)
	setLen4 := func(n int) func([]byte) []byte {
		return func(p []byte) []byte { binary.BigEndian.PutUint16(p[2:4], uint16(n)); return p }
	}
	setLen6 := func(n int) func([]byte) []byte {
		return func(p []byte) []byte { binary.BigEndian.PutUint16(p[4:6], uint16(n)); return p }
	}
	// ext inserts an 8-byte extension header of type typ at off, linking it into the chain.
	ext := func(off int, typ uint8) func([]byte) []byte {
		return func(p []byte) []byte {
			prev := 6
			if off > 40 {
				prev = 40 // the Fragment header's next header
			}
			h := []byte{p[prev], 0, 0, 0, 0, 0, 0, 0}
			p[prev] = typ
			p = append(p[:off], append(h, p[off:]...)...)
			binary.BigEndian.PutUint16(p[4:6], uint16(len(p)-40))
			return p
		}
	}
	mapped := func(p []byte) []byte {
		m := netip.AddrFrom16(netip.MustParseAddr(a1).As16()) // ::ffff:100.100.1.2
		copy(p[8:24], m.AsSlice())
		return p
	}
	cases := []struct {
		name string
		bad  [][]byte // dropped, in this order; each counted in NotFlow
		good []byte   // passes after them
	}{
		{"ipv4 first fragment with 4 bytes of UDP, then its later fragment", [][]byte{
			with(f4[0][:24], setLen4(24)), f4[1]}, packet(dns4, 10)},
		{"ipv4 first fragment whose total length hides the UDP header", [][]byte{
			with(f4[0], setLen4(26)), f4[1]}, packet(dns4, 10)},
		{"ipv4 first fragment with no payload", [][]byte{with(f4[0][:20], setLen4(20))}, packet(dns4, 10)},
		{"ipv6 first fragment with 4 bytes of UDP, then its later fragment", [][]byte{
			with(f6[0][:52], setLen6(12)), f6[1]}, packet(dns6, 10)},
		{"ipv6 first fragment with no payload", [][]byte{with(f6[0][:48], setLen6(8))}, packet(dns6, 10)},
		{"ipv6 Fragment header cut short", [][]byte{with(f6[0][:44], setLen6(4))}, packet(dns6, 10)},
		{"ipv6 first fragment whose payload length hides the UDP header", [][]byte{
			with(f6[0], setLen6(12)), f6[1]}, packet(dns6, 10)},
		{"ipv6 fragment longer than the packet", [][]byte{with(f6[0], setLen6(len(f6[0])-40+8)), f6[1]}, packet(dns6, 10)},
		{"ipv6 Hop-by-Hop header before the Fragment header", [][]byte{
			with(f6[0], ext(40, 0)), with(f6[1], ext(40, 0))}, packet(dns6, 10)},
		{"ipv6 Routing header before the Fragment header", [][]byte{with(f6[0], ext(40, 43))}, packet(dns6, 10)},
		{"ipv6 Destination Options after the Fragment header", [][]byte{with(f6[0], ext(48, 60)), f6[1]}, packet(dns6, 10)},
		{"ipv6 Fragment header after the Fragment header", [][]byte{with(f6[0], ext(48, ipv6FragmentHeader))}, packet(dns6, 10)},
		{"ipv6 fragment of a TCP segment", [][]byte{with(f6[0], func(p []byte) []byte { p[40] = ProtoTCP; return p })}, packet(dns6, 10)},
		{"ipv6 fragment with IPv4-mapped addresses", [][]byte{with(f6[0], mapped)}, packet(dns6, 10)},
		// After a first fragment passed: later fragments of another datagram that share its
		// identification's low 16 bits, or name another next header.
		{"ipv6 later fragments that do not match the first's identification or next header", [][]byte{
			with(f6[1], func(p []byte) []byte { binary.BigEndian.PutUint32(p[44:48], 0x7); return p }),
			with(f6[1], func(p []byte) []byte { p[40] = ProtoTCP; return p }),
		}, f6[2]},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, FilterConfig{RefuseFor: time.Hour, Admit: func(context.Context, Tuple) error {
				return errors.New("every other tuple is refused")
			}})
			h.f.AddOutbound(dns4, nil)
			h.f.AddOutbound(dns6, nil)
			// Outbound. The last case sends its first fragment ahead, so that its datagram is known.
			if tc.good[0]>>4 == 6 && tc.good[6] == ipv6FragmentHeader {
				h.kernel(f6[0])
				expectPacket(t, h.sent, f6[0])
			}
			notFlow := h.f.Stats().NotFlow
			for _, p := range tc.bad {
				h.kernel(p)
			}
			h.kernel(tc.good)
			expectPacket(t, h.sent, tc.good)
			require.Equal(t, notFlow+uint64(len(tc.bad)), h.f.Stats().NotFlow)
			require.Zero(t, h.f.Stats().Refused, "no bad shape reached admission")

			// Inbound: the same shapes from the peer, on the reply tuple.
			rev := make([][]byte, 0, len(tc.bad)+2)
			if tc.good[0]>>4 == 6 && tc.good[6] == ipv6FragmentHeader {
				h.deliver(reverseFrag(f6[0]))
				expectPacket(t, h.delivered, reverseFrag(f6[0]))
			}
			for _, p := range tc.bad {
				rev = append(rev, reverseFrag(p))
			}
			notFlow = h.f.Stats().NotFlow
			h.deliver(append(rev, reverseFrag(tc.good))...)
			expectPacket(t, h.delivered, reverseFrag(tc.good))
			expectNone(t, h.delivered, 50*time.Millisecond)
			require.Equal(t, notFlow+uint64(len(tc.bad)), h.f.Stats().NotFlow)
		})
	}
}

// reverseFrag swaps the addresses and (in a first fragment, or a whole packet) the ports of an
// IPv4 or IPv6 packet built by packet, fragments or fragments6: the same packet, sent the
// other way.
func reverseFrag(p []byte) []byte {
	p = append([]byte(nil), p...)
	var l4 int
	switch p[0] >> 4 {
	case 4:
		s := [4]byte(p[12:16])
		copy(p[12:16], p[16:20])
		copy(p[16:20], s[:])
		l4 = int(p[0]&0x0f) * 4
		if binary.BigEndian.Uint16(p[6:8])&0x1fff != 0 {
			return p
		}
	case 6:
		s := [16]byte(p[8:24])
		copy(p[8:24], p[24:40])
		copy(p[24:40], s[:])
		l4 = 40
		if p[6] == ipv6FragmentHeader {
			if binary.BigEndian.Uint16(p[42:44])>>3 != 0 {
				return p
			}
			l4 = 48
		}
	}
	if len(p) >= l4+4 {
		sp := [2]byte(p[l4 : l4+2])
		copy(p[l4:l4+2], p[l4+2:l4+4])
		copy(p[l4+2:l4+4], sp[:])
	}
	return p
}

// An IPv6 atomic fragment (offset 0, no more fragments) is a whole datagram (RFC 6946): it is
// decided by its own tuple, both ways, and never names a datagram that later fragments could
// follow.
func TestFilterIPv6AtomicFragment(t *testing.T) {
	dns := udp("[fd00:100:1::2]:40000", "[fd00:100:1:0:100::2]:53")
	fresh := udp("[fd00:100:1::2]:40001", "[fd00:100:1:0:100::2]:53")
	asked := make(chan Tuple, 1)
	h := newHarness(t, FilterConfig{RefuseFor: time.Hour, Admit: func(_ context.Context, tp Tuple) error {
		asked <- tp
		return errors.New("refused")
	}})
	h.f.AddOutbound(dns, nil)
	atomic := fragments6(dns, 0x2a, 100, 1400)
	require.Len(t, atomic, 1)
	require.Zero(t, binary.BigEndian.Uint16(atomic[0][42:44]), "offset 0, no more fragments")
	h.kernel(atomic[0])
	expectPacket(t, h.sent, atomic[0])
	h.deliver(reverseFrag(atomic[0]))
	expectPacket(t, h.delivered, reverseFrag(atomic[0]))

	// A later fragment claiming the atomic fragment's identification is not followed.
	later := fragments6(dns, 0x2a, 4000, 1400)[1]
	notFlow := h.f.Stats().NotFlow
	h.kernel(later)
	h.deliver(reverseFrag(later))
	h.kernel(packet(dns, 1))
	expectPacket(t, h.sent, packet(dns, 1))
	expectNone(t, h.delivered, 50*time.Millisecond)
	require.Equal(t, notFlow+2, h.f.Stats().NotFlow)
	require.Zero(t, h.f.Stats().Fragments)

	// An atomic fragment of a tuple not admitted asks for that tuple, and is refused with it.
	h.kernel(fragments6(fresh, 0x2b, 100, 1400)[0])
	select {
	case tp := <-asked:
		require.Equal(t, fresh, tp)
	case <-time.After(5 * time.Second):
		t.Fatal("the atomic fragment's tuple was never asked for")
	}
	expectNone(t, h.sent, 100*time.Millisecond)
	require.Eventually(t, func() bool { return h.f.Stats().Refused == 1 }, 2*time.Second, 5*time.Millisecond)
}

// len is the number of datagrams ft follows.
func (ft *fragTable) len() int {
	ft.mu.Lock()
	defer ft.mu.Unlock()
	return len(ft.m)
}

// The followed datagrams are bounded, IPv4 and IPv6 together, and forgotten after fragFollow.
func TestFragTableBoundedAndExpires(t *testing.T) {
	var ft fragTable
	k := keyOf(udp(a1+":1", b1+":2"))
	now := time.Now().UnixNano()
	for i := range maxFrags + 10 {
		ft.remember(fragKey{id: uint32(i), proto: ProtoUDP, v6: i%2 == 1}, k, now)
	}
	require.Equal(t, maxFrags, ft.len())
	_, ok := ft.lookup(fragKey{id: uint32(maxFrags + 5), proto: ProtoUDP, v6: true}, now)
	require.False(t, ok, "over the bound a datagram is not followed")
	got, ok := ft.lookup(fragKey{id: 3, proto: ProtoUDP, v6: true}, now)
	require.True(t, ok)
	require.Equal(t, k, got)
	_, ok = ft.lookup(fragKey{id: 3, proto: ProtoUDP}, now)
	require.False(t, ok, "the same identification in the other family is another datagram")
	later := now + int64(fragFollow) + 1
	_, ok = ft.lookup(fragKey{id: 4, proto: ProtoUDP}, later)
	require.False(t, ok, "past fragFollow the rest of a datagram is dropped")
	ft.sweep(later)
	require.Zero(t, ft.len())
}

// Through the filter: over maxFrags datagrams under way in one direction, the first fragment of
// a new one still passes (its tuple is admitted), but its later fragments are dropped.
func TestFilterFragmentTableFull(t *testing.T) {
	for _, fam := range fragFamilies {
		t.Run(fam.name, func(t *testing.T) {
			dns := udp(fam.a+":40000", fam.b+":53")
			h := newHarness(t, FilterConfig{})
			h.f.AddOutbound(dns, nil)
			now := h.f.coarse.Load()
			for i := range maxFrags {
				fk, k, kind := fragmentOf(fam.fragments(dns, uint32(1000+i), 3000, 1400)[0])
				require.Equal(t, fragFirst, kind)
				h.f.fragOut.remember(fk, k, now)
			}
			frags := fam.fragments(dns, 99, 3000, 1400)
			h.kernel(frags[0])
			expectPacket(t, h.sent, frags[0])
			notFlow := h.f.Stats().NotFlow
			h.kernel(frags[1])
			h.kernel(packet(dns, 1))
			expectPacket(t, h.sent, packet(dns, 1))
			require.Equal(t, notFlow+1, h.f.Stats().NotFlow)
		})
	}
}

func TestTupleOfKey(t *testing.T) {
	for _, tp := range []Tuple{udp(a1+":40000", b1+":53"), udp("[fd00::1]:5", "[fd00::2]:6"), tcp(a1+":1", b1+":2")} {
		require.Equal(t, tp, tupleOf(keyOf(tp)))
	}
}

// FuzzFragment: any bytes, never a panic; what fragmentOf follows is exactly an IPv4 UDP
// fragment or an IPv6 Fragment header straight after the fixed header with UDP after it; a first
// fragment's tuple is read from a UDP header that lies whole within the declared length, and
// agrees with parseKey where both read it; a later fragment is never read for ports.
func FuzzFragment(f *testing.F) {
	for _, p := range fragments(udp(a1+":40000", b1+":53"), 7, 3000, 1400) {
		f.Add(p)
	}
	for _, p := range fragments6(udp("[fd00::1]:40000", "[fd00::2]:53"), 0x10007, 3000, 1400) {
		f.Add(p)
	}
	f.Add(fragments6(udp("[fd00::1]:1", "[fd00::2]:2"), 1, 10, 1400)[0]) // atomic
	f.Add(packet(udp(a1+":1", b1+":2"), 10))
	f.Add(packet(udp("[fd00::1]:1", "[fd00::2]:2"), 10))
	f.Add([]byte{0x45})
	f.Add([]byte{0x60})
	f.Fuzz(func(t *testing.T, p []byte) {
		fk, k, kind := fragmentOf(p)
		if isFragment(p) != (kind != fragNone) {
			t.Fatalf("isFragment %v for kind %d", isFragment(p), kind)
		}
		if kind == fragNone || kind == fragBad {
			if fk != (fragKey{}) || k != (key{}) {
				t.Fatalf("kind %d returned a key", kind)
			}
			return
		}
		v4 := p[0]>>4 == 4
		var l4, end int
		var om uint16
		switch {
		case v4:
			if len(p) < 20 || p[9] != ProtoUDP || binary.BigEndian.Uint16(p[6:8])&0x3fff == 0 {
				t.Fatalf("% x called a fragment", p[:min(len(p), 20)])
			}
			if kind == fragWhole || fk.v6 {
				t.Fatal("IPv4 atomic or IPv6 key")
			}
			l4, end = int(p[0]&0x0f)*4, min(len(p), int(binary.BigEndian.Uint16(p[2:4])))
			om = binary.BigEndian.Uint16(p[6:8]) & 0x1fff
		case p[0]>>4 == 6:
			if len(p) < 48 || p[6] != ipv6FragmentHeader || p[40] != ProtoUDP || v4Mapped(p[8:24]) || v4Mapped(p[24:40]) {
				t.Fatalf("% x called a fragment", p[:min(len(p), 48)])
			}
			if kind != fragWhole && !fk.v6 {
				t.Fatal("IPv4 key for IPv6")
			}
			l4, end = 48, 40+int(binary.BigEndian.Uint16(p[4:6]))
			if end > len(p) {
				t.Fatal("truncated packet followed")
			}
			om = binary.BigEndian.Uint16(p[42:44]) >> 3
		default:
			t.Fatalf("version %d called a fragment", p[0]>>4)
		}
		if (kind == fragLater) != (om != 0) {
			t.Fatalf("kind %d for offset %d", kind, om)
		}
		if kind == fragLater {
			if k != (key{}) {
				t.Fatal("a later fragment was read for ports")
			}
			return
		}
		if l4+udpHeaderLen > end || k.proto != ProtoUDP ||
			k.sport != binary.BigEndian.Uint16(p[l4:]) || k.dport != binary.BigEndian.Uint16(p[l4+2:]) {
			t.Fatalf("tuple %+v from a UDP header at %d, declared end %d", k, l4, end)
		}
		if kind == fragFirst && (k.src != fk.src || k.dst != fk.dst) {
			t.Fatal("tuple and datagram disagree on addresses")
		}
		if v4 {
			if pk, ok := parseKey(p); !ok || pk != k {
				t.Fatalf("parseKey %+v %v, fragmentOf %+v", pk, ok, k)
			}
		}
	})
}
