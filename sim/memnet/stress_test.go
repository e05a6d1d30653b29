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
