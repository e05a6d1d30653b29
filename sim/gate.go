package sim

import (
	"context"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"time"
)

// dialGate paces the tunnel handshakes of every node of a run (tunnel.DialGate): at most
// `slots` at once, and none started with less than minLeft of its caller's deadline left, since
// a handshake that cannot finish in time is CPU taken from the ones that can. Without it,
// hundreds of simultaneous first contacts on two cores all pass the handshake timeout, are
// retried, and discovery never completes (measured: 100 nodes stuck at 50–80 members each).
type dialGate struct {
	slots   chan struct{}
	minLeft time.Duration
}

func newDialGate(slots int, minLeft time.Duration) *dialGate {
	return &dialGate{slots: make(chan struct{}, max(slots, 1)), minLeft: minLeft}
}

var errNoTimeLeft = fmt.Errorf("too little time left for a handshake")

func (g *dialGate) Acquire(ctx context.Context) (func(), error) {
	select {
	case g.slots <- struct{}{}:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	if dl, ok := ctx.Deadline(); ok && time.Until(dl) < g.minLeft {
		<-g.slots
		return nil, fmt.Errorf("%w: %w", errNoTimeLeft, context.DeadlineExceeded)
	}
	return func() { <-g.slots }, nil
}

// dialSlots is how many tunnel handshakes may run at once in the whole run: a few per CPU, so
// that each finishes well inside the handshake timeout. UTE_SIM_DIAL_SLOTS overrides it.
func dialSlots() int {
	if n, _ := strconv.Atoi(os.Getenv("UTE_SIM_DIAL_SLOTS")); n > 0 {
		return n
	}
	return 4 * runtime.GOMAXPROCS(0)
}
