package tunnel

import (
	"context"
	"io"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// A flow closed by its opener first (STOP_SENDING and FIN) and then by the receiver gives its
// stream back to the opener: FlowConn.Close answers the peer's STOP_SENDING with CancelWrite, not
// Close, and quic-go must still count the stream as finished and grant a new one. With a limit of
// 4 streams, the 40 sequential flows below block on the fifth if a closed stream is never freed.
func TestClosedFlowsReturnStreamCredit(t *testing.T) {
	pki := newPKI(t, testTD)
	lim := fastLimits()
	lim.MaxIncomingFlows = 4
	a := startNode(t, pki, "a", pki.node(t, "a", "payments"), []string{"payments"}, "", withLimits(lim))
	b := startNode(t, pki, "b", pki.node(t, "b", "payments"), []string{"payments"}, "", withLimits(lim))
	tun, err := a.ep.Dial(ctxT(t), b.addr, b.id, "payments")
	require.NoError(t, err)
	for i := range 40 {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		c, err := tun.OpenFlow(ctx, rec(t, testRecord{Agent: "billing"}), nil, nil)
		cancel()
		require.NoError(t, err, "flow %d: a closed flow's stream was not given back", i)
		s := recvStream(t, b)
		require.NoError(t, c.Close())
		_, err = io.Copy(io.Discard, s) // the opener's FIN
		require.NoError(t, err)
		require.Eventually(t, func() bool { return peerStopped(s.str) }, 5*time.Second, time.Millisecond,
			"flow %d: the opener's STOP_SENDING never reset the receiver's send side", i)
		require.NoError(t, s.Close())
	}
	assert.Equal(t, uint64(40), b.ep.Stats().FlowsAdmitted)
}

// Close after CloseWrite must not cut the data still in flight: only the peer's STOP_SENDING
// makes Close use CancelWrite, which would discard it.
func TestCloseAfterCloseWriteDelivers(t *testing.T) {
	_, b, tun := pair(t, "payments")
	c, err := tun.OpenFlow(ctxT(t), rec(t, testRecord{Agent: "billing"}), nil, nil)
	require.NoError(t, err)
	s := recvStream(t, b)
	defer s.Close()
	const size = 4 << 20
	type result struct {
		sum [32]byte
		err error
	}
	received := make(chan result, 1)
	go func() {
		sum, err := digest(s)
		received <- result{sum, err}
	}()
	sent, err := sendRandom(c, size)
	require.NoError(t, err)
	require.NoError(t, c.CloseWrite())
	require.NoError(t, c.Close())
	select {
	case got := <-received:
		require.NoError(t, got.err)
		assert.Equal(t, sent, got.sum, "every byte written before Close arrives")
	case <-time.After(10 * time.Second):
		t.Fatal("the receiver never saw the end of the flow")
	}
}

// A stream handler that holds its flow does not hold up the admission of the next ones: streams
// are handed to a parked worker or to a new one, never queued behind a busy one.
func TestAdmissionNotHeldByBusyHandler(t *testing.T) {
	release := make(chan struct{})
	var held sync.WaitGroup
	held.Add(1)
	var once sync.Once
	streams := make(chan *FlowConn, 8)
	pki := newPKI(t, testTD)
	a := startNode(t, pki, "a", pki.node(t, "a", "payments"), []string{"payments"}, "")
	b := startNode(t, pki, "b", pki.node(t, "b", "payments"), []string{"payments"}, "", func(c *Config) {
		c.StreamHandler = func(fc *FlowConn) {
			first := false
			once.Do(func() { first = true })
			if first {
				held.Done()
				<-release // the first flow's handler blocks its worker
			}
			streams <- fc
		}
	})
	t.Cleanup(func() { close(release) })
	tun, err := a.ep.Dial(ctxT(t), b.addr, b.id, "payments")
	require.NoError(t, err)
	first, err := tun.OpenFlow(ctxT(t), rec(t, testRecord{Agent: "billing"}), nil, nil)
	require.NoError(t, err)
	defer first.Close()
	held.Wait()
	for i := range 5 {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		c, err := tun.OpenFlow(ctx, rec(t, testRecord{Agent: "billing"}), nil, nil)
		cancel()
		require.NoError(t, err, "flow %d waited for the busy handler", i)
		_ = c.Close()
		select {
		case s := <-streams:
			_ = s.Close()
		case <-time.After(5 * time.Second):
			t.Fatalf("flow %d admitted but never handed to its handler", i)
		}
	}
}

// After a burst, at most maxIdleAdmitters workers stay parked for the next flows; the others
// end. (Every worker ends with the endpoint: TestNoGoroutineLeak.)
func TestIdleAdmittersBounded(t *testing.T) {
	const burst = 3 * maxIdleAdmitters
	release := make(chan struct{})
	entered := make(chan struct{}, burst+1)
	pki := newPKI(t, testTD)
	a := startNode(t, pki, "a", pki.node(t, "a", "payments"), []string{"payments"}, "")
	b := startNode(t, pki, "b", pki.node(t, "b", "payments"), []string{"payments"}, "", func(c *Config) {
		c.StreamHandler = func(fc *FlowConn) {
			entered <- struct{}{}
			<-release // all burst flows hold a worker at once
			_ = fc.Close()
		}
	})
	tun, err := a.ep.Dial(ctxT(t), b.addr, b.id, "payments")
	require.NoError(t, err)
	var wg sync.WaitGroup
	for range burst {
		wg.Go(func() {
			c, err := tun.OpenFlow(ctxT(t), rec(t, testRecord{Agent: "billing"}), nil, nil)
			if assert.NoError(t, err) {
				_ = c.Close()
			}
		})
	}
	wg.Wait()
	for range burst {
		<-entered
	}
	assert.Zero(t, b.ep.idleAdmitters.Load(), "every worker is busy")
	close(release)
	require.Eventually(t, func() bool { return b.ep.idleAdmitters.Load() == maxIdleAdmitters },
		5*time.Second, 5*time.Millisecond, "parked workers: %d", b.ep.idleAdmitters.Load())
	// A parked worker takes the next flow.
	_, err = tun.OpenFlow(ctxT(t), rec(t, testRecord{Agent: "billing"}), nil, nil)
	require.NoError(t, err)
	b.stop()
	assert.Zero(t, b.ep.idleAdmitters.Load(), "no worker stays parked after Close")
}
