package tunstack

import (
	"net/netip"
	"testing"
)

// FuzzFilter feeds arbitrary bytes to the packet filter: every packet is accepted or counted
// as dropped, never a panic, and nothing whose source is not local is accepted.
func FuzzFilter(f *testing.F) {
	f.Add(synFrom(netip.AddrPortFrom(agentA, 1), netip.AddrPortFrom(remote, 80)))
	f.Add(synFrom(netip.AddrPortFrom(spoofIP, 1), netip.AddrPortFrom(remote, 80)))
	f.Add([]byte{0x60, 0, 0, 0, 0, 0, 6, 64})
	f.Add([]byte{})
	st := &Stack{}
	st.SetLocal([]netip.Addr{agentA})
	f.Fuzz(func(t *testing.T, b []byte) {
		before := st.Stats()
		_, ok := st.filter(b)
		after := st.Stats()
		dropped := after.Spoofed + after.Unsupported + after.Malformed - before.Spoofed - before.Unsupported - before.Malformed
		if ok == (dropped == 1) {
			t.Fatalf("accepted=%v but %d drops counted", ok, dropped)
		}
		if ok && len(b) >= 20 && b[0]>>4 == 4 && netip.AddrFrom4([4]byte(b[12:16])) != agentA {
			t.Fatalf("accepted a packet from %v", netip.AddrFrom4([4]byte(b[12:16])))
		}
	})
}
