package daemon

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/node"
)

// A local program may accept an inbound flow and ask whois before the daemon has written the
// flow's entry (the kernel completes the handshake inside DialFrom). While a flow from that
// address is being originated, a miss waits for it; with none under way it answers at once.
func TestTUNWhoIsWaitsForFlowBeingOriginated(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	ti := &tunIface{ctx: ctx, whois: map[netip.AddrPort]*node.Provenance{}, dialing: map[netip.Addr]int{}, whoisChanged: make(chan struct{})}
	d := &Daemon{tun: ti}
	src := netip.MustParseAddrPort("100.100.1.1:23818")

	start := time.Now()
	_, ok := d.tunWhoIs(src)
	assert.False(t, ok)
	assert.Less(t, time.Since(start), 100*time.Millisecond, "nothing being originated: no wait")

	ti.originating(src.Addr())
	want := &node.Provenance{Agent: "spiffe://example/agent/billing-api"}
	got := make(chan *node.Provenance, 1)
	go func() { p, _ := d.tunWhoIs(src); got <- p }()
	select {
	case p := <-got:
		t.Fatalf("answered %v while the flow was still being originated", p)
	case <-time.After(100 * time.Millisecond):
	}
	ti.originated(src.Addr(), src, want)
	select {
	case p := <-got:
		require.Same(t, want, p)
	case <-time.After(5 * time.Second):
		t.Fatal("whois did not answer once the entry was written")
	}

	// A flow that was not accepted locally ends the wait with a miss.
	other := netip.MustParseAddrPort("100.100.1.2:4000")
	ti.originating(other.Addr())
	go func() { p, _ := d.tunWhoIs(other); got <- p }()
	time.Sleep(50 * time.Millisecond)
	ti.originated(other.Addr(), netip.AddrPort{}, nil)
	select {
	case p := <-got:
		assert.Nil(t, p)
	case <-time.After(time.Second):
		t.Fatal("whois kept waiting after the flow was refused")
	}
	assert.Empty(t, ti.dialing, "no flow left counted as being originated")
}
