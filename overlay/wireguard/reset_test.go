package wireguard

import (
	"context"
	"encoding/binary"
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// seg is a TCP packet of tp with the given sequence fields and payload length.
func seg(tp Tuple, seq, ack uint32, flags uint8, payload int) []byte {
	p := packet(tp, payload)
	ipLen := 20
	if !tp.Src.Is4() {
		ipLen = 40
	}
	binary.BigEndian.PutUint32(p[ipLen+4:], seq)
	binary.BigEndian.PutUint32(p[ipLen+8:], ack)
	p[ipLen+12] = 5 << 4 // packet leaves it unset for IPv6
	p[ipLen+13] = flags
	return p
}

// rstFields checks p is a well-formed RST (both checksums verify, computed here independently
// of the filter's code) and returns its tuple, sequence, acknowledgement and flags.
func rstFields(t *testing.T, p []byte) (Tuple, uint32, uint32, uint8) {
	t.Helper()
	tp, ok := ParseTuple(p)
	require.True(t, ok)
	require.Equal(t, ProtoTCP, tp.Proto)
	csum := func(words ...[]byte) uint16 {
		var s uint64
		for _, b := range words {
			for i := 0; i+1 < len(b); i += 2 {
				s += uint64(b[i])<<8 | uint64(b[i+1])
			}
		}
		for s>>16 != 0 {
			s = s&0xffff + s>>16
		}
		return uint16(s)
	}
	var l4, pseudo []byte
	if tp.Src.Is4() {
		require.Len(t, p, 40)
		require.Equal(t, uint16(0xffff), csum(p[:20]), "IPv4 header checksum")
		l4 = p[20:]
		pseudo = append(append([]byte{}, p[12:20]...), 0, 6, 0, 20)
	} else {
		require.Len(t, p, 60)
		l4 = p[40:]
		pseudo = append(append([]byte{}, p[8:40]...), 0, 0, 0, 20, 0, 0, 0, 6)
	}
	require.Equal(t, uint16(0xffff), csum(pseudo, l4), "TCP checksum")
	require.Equal(t, byte(5<<4), l4[12])
	return tp, binary.BigEndian.Uint32(l4[4:8]), binary.BigEndian.Uint32(l4[8:12]), l4[13]
}

// TestFilterCutResetsTCP: removing an established TCP tuple writes toward the local end a RST
// whose sequence number is the end of the newest segment the remote sent (the local RCV.NXT,
// the only one Linux accepts) and whose ACK is the end of the local side's newest segment; no
// packet of the tuple passes afterwards, and a packet the local side still sends is answered
// by a RST carrying its own ACK number, while a new SYN on the tuple goes to admission.
func TestFilterCutResetsTCP(t *testing.T) {
	for _, tc := range []struct{ name, local, remote string }{
		{"ipv4", a1 + ":40000", b1 + ":8080"},
		{"ipv6", "[fd00::1]:40000", "[fd00::2]:8080"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			admits := make(chan Tuple, 4)
			h := newHarness(t, FilterConfig{Admit: func(_ context.Context, tp Tuple) error {
				admits <- tp
				return errRefused
			}})
			out := tcp(tc.local, tc.remote)
			h.f.AddOutbound(out, "flow")
			syn := seg(out, 1000, 0, tcpSYN, 0)
			h.kernel(syn)
			expectPacket(t, h.sent, syn)
			synack := seg(out.Reverse(), 5000, 1001, tcpSYN|tcpACK, 0)
			h.deliver(synack)
			expectPacket(t, h.delivered, synack)
			req := seg(out, 1001, 5001, tcpACK|0x08, 100)
			h.kernel(req)
			expectPacket(t, h.sent, req)
			resp := seg(out.Reverse(), 5001, 1101, tcpACK|0x08, 700)
			h.deliver(resp)
			expectPacket(t, h.delivered, resp)

			info, ok := h.f.Remove(out)
			require.True(t, ok)
			require.Equal(t, "flow", info)
			// The RST was written before Remove returned.
			select {
			case p := <-h.delivered:
				tp, seq, ack, flags := rstFields(t, p)
				require.Equal(t, out.Reverse(), tp, "from the remote end to the local end")
				require.Equal(t, uint32(5701), seq, "the local side's RCV.NXT")
				require.Equal(t, uint32(1101), ack)
				require.Equal(t, uint8(tcpRST|tcpACK), flags)
			case <-time.After(time.Second):
				t.Fatal("no reset reached the local side")
			}
			require.Equal(t, uint64(1), h.f.Stats().Resets)

			// Nothing of the flow passes any more, either way.
			h.deliver(seg(out.Reverse(), 5701, 1101, tcpACK, 100))
			// The local side answers a stray segment: reset again, with its own ACK number.
			h.kernel(seg(out, 1101, 5650, tcpACK, 0))
			select {
			case p := <-h.delivered:
				tp, seq, _, flags := rstFields(t, p)
				require.Equal(t, out.Reverse(), tp)
				require.Equal(t, uint32(5650), seq)
				require.Equal(t, uint8(tcpRST), flags)
			case <-time.After(time.Second):
				t.Fatal("no reset answered the local segment")
			}
			expectNone(t, h.sent, 100*time.Millisecond)
			expectNone(t, h.delivered, 50*time.Millisecond)
			require.Empty(t, admits, "a segment of a cut connection is not a new flow")

			// A new connection on the same tuple (SYN without ACK) is admitted afresh, not reset.
			h.kernel(seg(out, 9000, 0, tcpSYN, 0))
			select {
			case tp := <-admits:
				require.Equal(t, out, tp)
			case <-time.After(time.Second):
				t.Fatal("the new SYN was not sent to admission")
			}
			expectNone(t, h.delivered, 50*time.Millisecond)
		})
	}
}

// TestFilterCutResetsSynSent: a tuple cut before its SYN was answered gets a RST that
// acknowledges the SYN (the only one a SYN-SENT socket accepts); a UDP tuple gets nothing.
func TestFilterCutResetsSynSent(t *testing.T) {
	h := newHarness(t, FilterConfig{})
	out := tcp(a1+":40001", b1+":8080")
	h.f.AddOutbound(out, nil)
	syn := seg(out, 777, 0, tcpSYN, 0)
	h.kernel(syn)
	expectPacket(t, h.sent, syn)
	udp := Tuple{Src: out.Src, Dst: out.Dst, SrcPort: 5353, DstPort: 53, Proto: ProtoUDP}
	h.f.AddOutbound(udp, nil)
	require.Equal(t, 2, h.f.RemoveMatching(func(Tuple, any) bool { return true }))
	select {
	case p := <-h.delivered:
		tp, _, ack, flags := rstFields(t, p)
		require.Equal(t, out.Reverse(), tp)
		require.Equal(t, uint32(778), ack)
		require.Equal(t, uint8(tcpRST|tcpACK), flags)
	case <-time.After(time.Second):
		t.Fatal("no reset")
	}
	expectNone(t, h.delivered, 50*time.Millisecond)
}

// TestFilterInboundCutResetsServer: for a tuple a peer's agent opened, the local end is the
// destination (a server here), and the RST goes to it.
func TestFilterInboundCutResetsServer(t *testing.T) {
	h := newHarness(t, FilterConfig{})
	in := tcp(b1+":40002", a1+":8080")
	h.f.AddInbound(in, nil)
	req := seg(in, 300, 900, tcpACK, 50)
	h.deliver(req)
	expectPacket(t, h.delivered, req)
	_, ok := h.f.Remove(in)
	require.True(t, ok)
	select {
	case p := <-h.delivered:
		tp, seq, _, flags := rstFields(t, p)
		require.Equal(t, in, tp, "from the remote client to the local server")
		require.Equal(t, uint32(350), seq)
		require.Equal(t, uint8(tcpRST), flags, "no local segment seen: no ACK")
	case <-time.After(time.Second):
		t.Fatal("no reset")
	}
}

// TestFilterRemoveIfOnlyWhatMatchRemoves: a cut a peer asks for removes (and resets) a tuple
// only when its admission info is the asker's; otherwise the tuple stays and keeps passing.
func TestFilterRemoveIfOnlyWhatMatchRemoves(t *testing.T) {
	h := newHarness(t, FilterConfig{})
	in := tcp(b1+":40003", a1+":8080")
	h.f.AddInbound(in, "node-b")
	req := seg(in, 300, 900, tcpACK, 50)
	h.deliver(req)
	expectPacket(t, h.delivered, req)
	isC := func(info any) bool { return info == "node-c" }
	found, removed := h.f.RemoveIf(in, isC)
	require.True(t, found)
	require.False(t, removed, "node-c's cut of node-b's tuple")
	expectNone(t, h.delivered, 50*time.Millisecond)
	more := seg(in, 350, 900, tcpACK, 10)
	h.deliver(more)
	expectPacket(t, h.delivered, more)

	found, removed = h.f.RemoveIf(tcp(b1+":40004", a1+":8080"), isC)
	require.False(t, found)
	require.False(t, removed)

	found, removed = h.f.RemoveIf(in, func(info any) bool { return info == "node-b" })
	require.True(t, found)
	require.True(t, removed)
	select {
	case p := <-h.delivered:
		tp, seq, _, flags := rstFields(t, p)
		require.Equal(t, in, tp)
		require.Equal(t, uint32(360), seq)
		require.NotZero(t, flags&tcpRST)
	case <-time.After(time.Second):
		t.Fatal("no reset")
	}
	require.Zero(t, h.f.Stats().Flows)
}

func FuzzTCPSegment(f *testing.F) {
	tp := tcp(a1+":1", b1+":2")
	f.Add(seg(tp, 1, 2, tcpSYN|tcpACK, 10))
	f.Add(seg(tcp("[fd00::1]:1", "[fd00::2]:2"), 1, 2, tcpFIN, 3))
	f.Add(packet(Tuple{Src: tp.Src, Dst: tp.Dst, SrcPort: 1, DstPort: 2, Proto: ProtoUDP}, 4))
	f.Add([]byte{0x45, 0, 0, 20})
	f.Fuzz(func(t *testing.T, p []byte) {
		tp, ok := ParseTuple(p)
		if !ok || tp.Proto != ProtoTCP {
			return
		}
		if _, _, _, span, ok := tcpSegment(p); ok && span > uint32(len(p))+2 {
			t.Fatalf("span %d beyond a %d-byte packet", span, len(p))
		}
		if r := rstReply(p, tp); r != nil {
			rstFields(t, r[rstHeadroom:])
		}
	})
}

var errRefused = errors.New("refused by test")
