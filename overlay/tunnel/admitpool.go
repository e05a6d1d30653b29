package tunnel

import (
	"time"

	"github.com/quic-go/quic-go"
)

// Admission workers. Every inbound flow stream is admitted on a goroutine of its own, so that a
// slow or silent peer never holds up the accept loop. A new goroutine per stream starts on a small
// stack, and admission (Ed25519 verification is its deepest point) grows it, copying the stack,
// on every flow. So the goroutine that admitted a stream does not end: it parks and takes the next
// stream of any tunnel of the endpoint, its stack already grown. streamLoop hands a stream to a
// parked worker when there is one and starts a new worker otherwise; it never waits for one. At
// most maxIdleAdmitters workers stay parked (more exit when they finish), and every worker exits
// when the endpoint closes, so the endpoint's WaitGroup still owns all of them.

// maxIdleAdmitters bounds the workers kept parked between flows: enough for the streams that
// arrive together on a busy node, few enough that their stacks (a few KiB each) do not matter.
const maxIdleAdmitters = 16

// streamJob is one accepted stream waiting for admission, with its first-frame deadline.
type streamJob struct {
	t          *Tunnel
	str        *quic.Stream
	firstFrame time.Duration
}

// dispatch runs j's admission on a parked worker, or on a new one. It reports false when the
// endpoint is closing and nothing was started.
func (e *Endpoint) dispatch(j streamJob) bool {
	select {
	case e.jobs <- j:
		return true
	default:
	}
	return e.spawn(func() { e.admitWorker(j) })
}

// admitWorker admits j, then further streams handed to it, until too many workers are parked or
// the endpoint closes.
func (e *Endpoint) admitWorker(j streamJob) {
	for {
		j.t.handleStream(j.str, j.firstFrame)
		j = streamJob{} // a parked worker must not keep a closed tunnel's connection reachable
		if e.idleAdmitters.Add(1) > maxIdleAdmitters {
			e.idleAdmitters.Add(-1)
			return
		}
		select {
		case j = <-e.jobs:
			e.idleAdmitters.Add(-1)
		case <-e.ctx.Done():
			e.idleAdmitters.Add(-1)
			return
		}
	}
}
