package memnet

import (
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// Many senders with latency and jitter: every packet is delivered, none stays in flight.
func TestEveryDelayedPacketIsDelivered(t *testing.T) {
	n := newNet(t, Link{Latency: time.Millisecond, Jitter: time.Millisecond})
	const hosts, per = 16, 300
	conns := make([]*Conn, hosts)
	for i := range conns {
		conns[i] = listen(t, n, i)
		c := conns[i]
		go func() {
			buf := make([]byte, 64)
			for {
				if _, _, err := c.ReadFrom(buf); err != nil {
					return
				}
			}
		}()
	}
	var wg sync.WaitGroup
	for i := range conns {
		wg.Go(func() {
			for k := range per {
				_, _ = conns[i].WriteTo([]byte("x"), conns[(i+k+1)%hosts].LocalAddr())
				if k%50 == 0 {
					time.Sleep(time.Millisecond)
				}
			}
		})
	}
	wg.Wait()
	require.Eventually(t, func() bool { st := n.Stats(); return st.Delivered == hosts*per }, 5*time.Second, 5*time.Millisecond,
		"stats %+v", n.Stats())
}

// Many senders at once to one receiver, over links spread across the network's shards: each
// link keeps its order (a fixed latency, no jitter), and every packet arrives.
func TestConcurrentLinksKeepTheirOrder(t *testing.T) {
	n := newNet(t, Link{Latency: time.Millisecond})
	const senders, per = 48, 200
	rx := listen(t, n, 0)
	conns := make([]*Conn, senders)
	for i := range conns {
		conns[i] = listen(t, n, i+1)
	}
	var wg sync.WaitGroup
	for i := range conns {
		wg.Go(func() {
			for k := range per {
				_, _ = conns[i].WriteTo([]byte{byte(k)}, rx.LocalAddr())
			}
		})
	}
	last := map[string]int{}
	buf := make([]byte, 8)
	for range senders * per {
		require.NoError(t, rx.SetReadDeadline(time.Now().Add(5*time.Second)))
		k, from, err := rx.ReadFrom(buf)
		require.NoError(t, err)
		require.Equal(t, 1, k)
		prev, seen := last[from.String()]
		if seen {
			require.Equal(t, (prev+1)%256, int(buf[0]), "packets from %s out of order", from)
		}
		last[from.String()] = int(buf[0])
	}
	wg.Wait()
	require.Len(t, last, senders)
	require.Equal(t, uint64(senders*per), n.Stats().Delivered)
}
