package node

import (
	"errors"
	"fmt"
	"regexp"
	"time"

	"github.com/ute-project/ute/overlay/dtl"
	"github.com/ute-project/ute/overlay/tunnel"
)

// reasonSkew is RefusedError.Reason when a peer refused this node's record as stale or in the
// future: the two clocks differ by more than the freshness window.
const reasonSkew = "skew"

// issuedRE reads the measured offset out of the peer's refusal message, as dtl.CheckFresh words
// it ("issued 2m0s ago", "issued 2m0s ahead of this node's clock"); TestClockOffsetReadsCheckFresh
// pins that wording.
var issuedRE = regexp.MustCompile(`issued (\S+) (ago|ahead)`)

// clockOffset finds a stale or future refusal in err and returns this node's clock minus the
// refusing peer's, as the peer measured it (up to the network delay): positive when this node
// is ahead. ok is false when err holds no such refusal; known is false when the peer's message
// did not state the offset.
func clockOffset(err error) (offset time.Duration, known, ok bool) {
	var rej *tunnel.RejectedError
	if !errors.As(err, &rej) || (rej.Code != dtl.ReasonStale && rej.Code != dtl.ReasonFuture) {
		return 0, false, false
	}
	m := issuedRE.FindStringSubmatch(rej.Message)
	if m == nil {
		return 0, false, true
	}
	d, perr := time.ParseDuration(m[1])
	stale := rej.Code == dtl.ReasonStale
	if perr != nil || d < 0 || stale != (m[2] == "ago") {
		return 0, false, true // the message contradicts the code, or states no duration
	}
	if stale { // the record looked old to the peer: this node is behind
		d = -d
	}
	return d, true, true
}

// skewRefused is the RefusedError for a record refused for the clocks' skew, or nil when err is
// not such a refusal.
func skewRefused(addr, stage string, err error) error {
	off, known, ok := clockOffset(err)
	if !ok {
		return nil
	}
	return &RefusedError{Addr: addr, Stage: stage, Reason: reasonSkew, ClockOffset: off, OffsetKnown: known, Err: err}
}

func (e *RefusedError) skewText() string {
	if !e.OffsetKnown {
		return "this node's clock and the peer's differ by more than the freshness window"
	}
	if e.ClockOffset >= 0 {
		return fmt.Sprintf("this node's clock is %s ahead of the peer's", e.ClockOffset)
	}
	return fmt.Sprintf("this node's clock is %s behind the peer's", -e.ClockOffset)
}
