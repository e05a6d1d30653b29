package node

import (
	"context"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// largeDatagram is n bytes that differ from every other (n, tag) pair.
func largeDatagram(n int, tag byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*31) ^ tag
	}
	return b
}

// TestUDPLargeDatagrams: an agent's UDP datagrams far larger than a QUIC datagram (which holds
// about 1,200 bytes) arrive whole at the listener, and its answers of the same size come back
// whole, across two nodes and on one node. They travel on the flow's control stream, which does
// not lose them, so no resend is needed; a small datagram before them keeps using QUIC
// datagrams.
func TestUDPLargeDatagrams(t *testing.T) {
	ns := threeNodes(t)
	a, b := ns["a"], ns["b"]
	ledger := agent(t, b, "payments", "ledger")
	pc, err := ledger.ListenPacket("udp", ":5353")
	require.NoError(t, err)
	t.Cleanup(func() { _ = pc.Close() })

	for name, from := range map[string]*Agent{
		"two nodes": agent(t, a, "payments", "billing-api"),
		"same node": agent(t, b, "payments", "billing-batch"),
	} {
		t.Run(name, func(t *testing.T) {
			c, err := from.Dial(context.Background(), "udp", "ledger.payments:5353")
			require.NoError(t, err)
			defer func() { _ = c.Close() }()
			buf := make([]byte, 65535)
			for i, n := range []int{20000, 65507, 1400} {
				msg := largeDatagram(n, byte(i))
				k, err := c.Write(msg)
				require.NoError(t, err)
				require.Equal(t, n, k)
				require.NoError(t, pc.SetReadDeadline(time.Now().Add(10*time.Second)))
				k, addr, err := pc.ReadFrom(buf)
				require.NoError(t, err, "the %d-byte datagram", n)
				require.Equal(t, n, k)
				assert.Equal(t, msg, buf[:k])
				assert.Equal(t, from.IP(), addr.(*net.UDPAddr).AddrPort().Addr())

				reply := largeDatagram(n, ^byte(i))
				_, err = pc.WriteTo(reply, addr)
				require.NoError(t, err)
				require.NoError(t, c.SetReadDeadline(time.Now().Add(10*time.Second)))
				k, err = c.Read(buf)
				require.NoError(t, err, "the %d-byte answer", n)
				require.Equal(t, n, k)
				assert.Equal(t, reply, buf[:k])
			}
			_, err = c.Write(make([]byte, 65536))
			require.Error(t, err, "no UDP datagram is that large")
		})
	}
}
