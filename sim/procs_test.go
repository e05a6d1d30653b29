package sim

import (
	"runtime"
	"testing"

	"github.com/stretchr/testify/assert"
)

// TestProcs: a simulation takes four schedulers per CPU unless GOMAXPROCS was set for the process,
// and the dial gate's size follows the CPUs, not the schedulers.
func TestProcs(t *testing.T) {
	t.Setenv("UTE_SIM_DIAL_SLOTS", "")
	t.Setenv("GOMAXPROCS", "")
	assert.Equal(t, 4*runtime.NumCPU(), Procs())

	t.Setenv("GOMAXPROCS", "3")
	assert.Equal(t, runtime.GOMAXPROCS(0), Procs(), "the operator's GOMAXPROCS stands")

	prev := runtime.GOMAXPROCS(runtime.NumCPU() * 8)
	t.Cleanup(func() { runtime.GOMAXPROCS(prev) })
	assert.Equal(t, 4*runtime.NumCPU(), dialSlots(), "more schedulers make no more handshake slots")
}
