package node

import (
	"context"
	"errors"
	"net/netip"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/overlay/dtl"
)

// TestListenAllTakesEveryAdmittedPort: a catch-all listener (the TUN interface's) receives
// flows to any port the policy admits, tunnel and same-node, TCP and UDP, with the port in
// LocalAddr and the provenance in WhoIs; a port's own listener still wins; admission is unchanged.
func TestListenAllTakesEveryAdmittedPort(t *testing.T) {
	nodes := threeNodes(t)
	ledger := agent(t, nodes["b"], "payments", "ledger")
	billing := agent(t, nodes["a"], "payments", "billing-api")
	batch := agent(t, nodes["b"], "payments", "billing-batch") // same node as ledger
	ctx := context.Background()

	// Without a listener the flow is refused as unreachable.
	_, err := billing.Dial(ctx, "tcp", "ledger.payments:8080")
	require.ErrorIs(t, err, dtl.ErrUnreachable)

	l, err := ledger.ListenAll()
	require.NoError(t, err)
	defer l.Close()
	_, err = ledger.ListenAll()
	require.ErrorIs(t, err, ErrAddrInUse)

	for _, src := range []*Agent{billing, batch} {
		c, err := src.Dial(ctx, "tcp", "ledger.payments:8080")
		require.NoError(t, err)
		sc, err := l.Accept()
		require.NoError(t, err)
		assert.Equal(t, netip.AddrPortFrom(ledger.IP(), 8080).String(), sc.LocalAddr().String())
		p, err := WhoIs(sc)
		require.NoError(t, err)
		assert.Equal(t, src.ID().String(), p.Agent)
		assert.Equal(t, src.IP(), p.SourceIP)
		assert.EqualValues(t, 8080, p.Destination.Port)
		werr := make(chan error, 1)
		go func() { _, err := c.Write([]byte("x")); werr <- err }() // same-node flows are synchronous pipes
		b := make([]byte, 1)
		_, err = sc.Read(b)
		require.NoError(t, err)
		require.NoError(t, <-werr)
		_ = c.Close()
		_ = sc.Close()
	}

	// The policy still decides: port 9090 is not allowed from billing-* to ledger.
	_, err = billing.Dial(ctx, "tcp", "ledger.payments:9090")
	var pe *RefusedError
	require.True(t, errors.As(err, &pe), "%v", err)
	assert.Equal(t, "policy", pe.Reason)

	// A port's own listener takes precedence over the catch-all.
	own, err := ledger.Listen("tcp", ":8080")
	require.NoError(t, err)
	defer own.Close()
	c, err := billing.Dial(ctx, "tcp", "ledger.payments:8080")
	require.NoError(t, err)
	defer c.Close()
	sc, err := own.Accept()
	require.NoError(t, err)
	_ = sc.Close()

	// UDP: the catch-all packet listener, with the port in the provenance.
	pl, err := ledger.ListenPacketAll()
	require.NoError(t, err)
	defer pl.Close()
	uc, err := billing.Dial(ctx, "udp", "ledger.payments:5353")
	require.NoError(t, err)
	defer uc.Close()
	_, err = uc.Write([]byte("query"))
	require.NoError(t, err)
	buf := make([]byte, 100)
	n, from, err := pl.ReadFrom(buf)
	require.NoError(t, err)
	assert.Equal(t, "query", string(buf[:n]))
	p, err := WhoIsPacket(pl, from)
	require.NoError(t, err)
	assert.EqualValues(t, 5353, p.Destination.Port)
	assert.Equal(t, billing.ID().String(), p.Agent)
	_, err = pl.WriteTo([]byte("answer"), from)
	require.NoError(t, err)
	n, err = uc.Read(buf)
	require.NoError(t, err)
	assert.Equal(t, "answer", string(buf[:n]))
}
