package sim

import (
	"flag"
	"os"
	"runtime"
	"testing"
)

// TestMain gives a benchmark run the schedulers a simulation wants (Procs) before the testing
// package reads GOMAXPROCS: it names each benchmark after that count and sets it again for every
// -test.cpu entry, so setting it inside the benchmark left the name ending in the count at start.
// Test runs (make test) keep the default: their timings were measured with it.
func TestMain(m *testing.M) {
	flag.Parse()
	if f := flag.Lookup("test.bench"); f != nil && f.Value.String() != "" {
		runtime.GOMAXPROCS(Procs())
	}
	os.Exit(m.Run())
}
