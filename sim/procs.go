package sim

import (
	"os"
	"runtime"
)

// procsPerCPU is how many Go schedulers (GOMAXPROCS) a simulation process wants per CPU.
//
// Why more than one: the Go runtime keeps one timer heap per P, and when a timer that was reset
// while pending (every QUIC connection resets its timer on each packet it handles) comes due, the
// next scheduling pass on that P walks the whole heap. A 1,000-node simulation holds tens of
// thousands of pending timers (QUIC connections, dials waiting for a handshake slot, the daemons'
// loops), and with two Ps on two CPUs that walk took 50–66 % of the process's CPU in every minute
// profiled. Eight Ps on the same two CPUs split the heaps four ways: 21–26 %, and the first
// 1,000-node run so measured spread a revocation to every member in 0.75 s, against 1.66 and
// 1.80 s with two Ps (docs/benchmarks.md, "Timer heaps"). A real node holds a few dozen tunnels,
// so nothing here applies to the daemon.
const procsPerCPU = 4

// Procs is the GOMAXPROCS for a process that runs simulations: the GOMAXPROCS environment
// variable when it is set (the operator's choice stands), else procsPerCPU per CPU. The caller
// that owns the process applies it (runtime.GOMAXPROCS): `ute sim run` and the benchmark do; the
// package never changes it itself.
func Procs() int {
	if os.Getenv("GOMAXPROCS") != "" {
		return runtime.GOMAXPROCS(0)
	}
	return procsPerCPU * runtime.NumCPU()
}
