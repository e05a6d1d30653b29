package wireguard

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/tun/tuntest"
)

// wgNode is a Device with its Filter over a channel TUN, on a real UDP socket on loopback.
type wgNode struct {
	ch        *tuntest.ChannelTUN
	f         *Filter
	dev       *Device
	kp        KeyPair
	delivered chan []byte
}

func startWGNode(t *testing.T, admit func(f *Filter, tp Tuple) error) *wgNode {
	t.Helper()
	n := &wgNode{ch: tuntest.NewChannelTUN(), kp: mustKeyPair(t), delivered: make(chan []byte, 64)}
	n.f = NewFilter(FilterConfig{Inner: n.ch.TUN(), Admit: func(_ context.Context, tp Tuple) error { return admit(n.f, tp) }})
	var err error
	n.dev, err = OpenDevice(DeviceConfig{TUN: n.f, Key: n.kp, Bind: conn.NewDefaultBind()})
	require.NoError(t, err)
	require.NotZero(t, n.dev.Port())
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			select {
			case p := <-n.ch.Inbound:
				select {
				case n.delivered <- p:
				case <-stop:
					return
				}
			case <-stop:
				return
			}
		}
	})
	t.Cleanup(func() {
		n.dev.Close()
		close(stop)
		wg.Wait()
	})
	return n
}

func (n *wgNode) endpoint() netip.AddrPort {
	return netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), n.dev.Port())
}

// TestDevicesCarryOnlyAdmittedFlows runs two real wireguard-go devices over loopback UDP, each
// behind its filter: an admitted tuple crosses, a tuple the receiver did not admit does not,
// and removing the peer (a revocation) stops the next packet.
func TestDevicesCarryOnlyAdmittedFlows(t *testing.T) {
	a := startWGNode(t, func(f *Filter, tp Tuple) error { f.AddOutbound(tp, nil); return nil })
	b := startWGNode(t, func(*Filter, Tuple) error { return fmt.Errorf("b opens nothing") })
	require.NoError(t, a.dev.Apply([]PeerSpec{{Node: "b", Key: b.kp.Public, Endpoint: b.endpoint(), AllowedIPs: prefixes(b1 + "/32")}}))
	require.NoError(t, b.dev.Apply([]PeerSpec{{Node: "a", Key: a.kp.Public, Endpoint: a.endpoint(), AllowedIPs: prefixes(a1 + "/32")}}))
	b.f.AddInbound(out, nil)

	syn := packet(out, 0)
	a.ch.Outbound <- syn
	expectPacket(t, b.delivered, syn)

	// A tuple b never admitted: a's filter lets it out (a admits everything here), wireguard-go
	// carries it, b's filter drops it.
	other := tcp(a1+":40001", b1+":8080")
	a.ch.Outbound <- packet(other, 0)
	expectNone(t, b.delivered, 300*time.Millisecond)
	require.Eventually(t, func() bool { return b.f.Stats().Unadmitted == 1 }, 2*time.Second, 10*time.Millisecond)

	require.True(t, b.dev.RemoveNode("a"))
	a.ch.Outbound <- packet(out, 1)
	expectNone(t, b.delivered, 300*time.Millisecond)
	require.Empty(t, b.dev.Peers())
}

// TestForeignKeyGetsNothing points a bare wireguard-go device, holding a valid WireGuard key that
// no UTE binding names, at a node: its handshake is never answered and none of its packets
// reaches the node's kernel side, not even for a tuple the node has admitted.
func TestForeignKeyGetsNothing(t *testing.T) {
	b := startWGNode(t, func(*Filter, Tuple) error { return fmt.Errorf("b opens nothing") })
	legit := mustKeyPair(t)
	require.NoError(t, b.dev.Apply([]PeerSpec{{Node: "a", Key: legit.Public, Endpoint: netip.MustParseAddrPort("127.0.0.1:9"), AllowedIPs: prefixes(a1 + "/32")}}))
	b.f.AddInbound(out, nil)

	foreign := mustKeyPair(t)
	fch := tuntest.NewChannelTUN()
	fdev := device.NewDevice(fch.TUN(), conn.NewDefaultBind(), device.NewLogger(device.LogLevelSilent, ""))
	t.Cleanup(fdev.Close)
	require.NoError(t, fdev.IpcSet(fmt.Sprintf("private_key=%s\nlisten_port=0\npublic_key=%s\nendpoint=%s\nallowed_ip=0.0.0.0/0\npersistent_keepalive_interval=1\n",
		foreign.Private.hex(), b.kp.Public.hex(), b.endpoint())))
	require.NoError(t, fdev.Up())
	for i := range 5 {
		fch.Outbound <- packet(out, i)
	}
	expectNone(t, b.delivered, 1500*time.Millisecond)
	cfg, err := fdev.IpcGet()
	require.NoError(t, err)
	require.Contains(t, cfg, "last_handshake_time_sec=0\n", "the node answered a foreign key's handshake")
	require.True(t, strings.Contains(cfg, "tx_bytes="), cfg)
	require.Zero(t, b.f.Stats().Unadmitted, "nothing of the foreign device got as far as the filter")
}
