package tunnel

import (
	"bytes"
	"errors"
	"runtime"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/overlay/dtl"
)

// FuzzReadFlowOpen: the receiver's first-frame handling never panics, never reads past the frame
// it returns, and refuses with one of the tunnel's frame errors.
func FuzzReadFlowOpen(f *testing.F) {
	f.Add([]byte{byte(dtl.FrameRecord), 0, 3, 'a', 'b', 'c', 'p', 'a', 'y'})
	f.Add([]byte{byte(dtl.FrameRecord), 0, 0})
	f.Add([]byte{byte(dtl.FrameAccept), 0, 0})
	f.Add([]byte{byte(dtl.FrameReject), 0, 1, 0xa0})
	f.Add([]byte{byte(dtl.FrameRecord), 0xff, 0xff, 1, 2})
	f.Add([]byte{9, 9, 9})
	f.Add([]byte{byte(dtl.FrameRecord)})
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, in []byte) {
		r := bytes.NewReader(in)
		rec, err := readFlowOpen(r, dtl.MaxRecordSize)
		consumed := len(in) - r.Len()
		if err != nil {
			if !errors.Is(err, ErrFrame) && !errors.Is(err, ErrFrameTooLarge) {
				t.Fatalf("unexpected error class: %v", err)
			}
			if consumed > dtl.FrameHeaderLen+dtl.MaxRecordSize {
				t.Fatalf("read %d bytes of a refused frame", consumed)
			}
			return
		}
		if len(rec) == 0 || len(rec) > dtl.MaxRecordSize {
			t.Fatalf("accepted a %d-byte record", len(rec))
		}
		if consumed != dtl.FrameHeaderLen+len(rec) {
			t.Fatalf("consumed %d bytes for a %d-byte record: read past the frame", consumed, len(rec))
		}
	})
}

// FuzzReadVerdict: whatever a hostile receiver answers, the opener gets accept, a typed
// rejection or a frame error, never a panic.
func FuzzReadVerdict(f *testing.F) {
	body, _ := dtl.EncodeReject(dtl.ReasonPolicy, "no")
	f.Add(append([]byte{byte(dtl.FrameReject), 0, byte(len(body))}, body...))
	f.Add([]byte{byte(dtl.FrameAccept), 0, 0})
	f.Add([]byte{byte(dtl.FrameAccept), 0, 1, 0})
	f.Add([]byte{byte(dtl.FrameRecord), 0, 0})
	f.Add([]byte{byte(dtl.FrameReject), 0, 2, 0xa1, 0x01})
	f.Fuzz(func(t *testing.T, in []byte) {
		err := readVerdict(bytes.NewReader(in))
		var rej *RejectedError
		if err != nil && !errors.As(err, &rej) && !errors.Is(err, ErrFrame) {
			t.Fatalf("unexpected error class: %v", err)
		}
	})
}

// TestNoGoroutineLeak: after Close every goroutine the endpoints started has returned.
func TestNoGoroutineLeak(t *testing.T) {
	scenario := func() {
		a, b, tun := pair(t, "payments")
		c, err := tun.OpenFlow(ctxT(t), rec(t, testRecord{Agent: "x"}), nil, nil)
		require.NoError(t, err)
		_ = recvStream(t, b)
		id := tun.NewFlowID()
		_, err = tun.OpenPacketFlow(ctxT(t), id, rec(t, testRecord{Agent: "x", Kind: uint8(KindPacket), Flow: id}), nil, nil)
		require.NoError(t, err)
		_ = recvPacketFlow(t, b)
		_ = c
		a.stop()
		b.stop()
	}
	// The first run starts process-wide helpers (the race detector's, quic-go's lazily started
	// ones) that live on; measure against a second run.
	scenario()
	time.Sleep(100 * time.Millisecond)
	before := runtime.NumGoroutine()
	scenario()
	// Polled by hand: assert.Eventually runs its condition on a goroutine of its own.
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > before && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if n := runtime.NumGoroutine(); n > before {
		t.Errorf("goroutines before %d, after Close %d", before, n)
		buf := make([]byte, 1<<20)
		t.Logf("%s", buf[:runtime.Stack(buf, true)])
	}
}
