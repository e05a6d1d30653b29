package daemon

import (
	"context"
	"fmt"
	"runtime"
	"sync"

	"golang.org/x/sys/unix"
)

// nsRunner runs socket lookups in the network namespace the TUN interface was created in:
// sock_diag answers for the namespace of the thread that asks, and the daemon's goroutines run
// on any thread. In a daemon that runs in one namespace as a whole this changes nothing; a
// daemon whose interface was created from a thread moved into another namespace (the in-process
// tests, or an embedder) still attests the sockets that live next to its interface. Comparing
// with /proc/self/ns/net to skip it is not enough: that is the main thread's namespace, and a
// goroutine locked to the main thread may have moved it.
type nsRunner struct {
	ctx  context.Context
	reqs chan func()
	wg   sync.WaitGroup
}

const nsWorkers = 2

// newNSRunner captures the calling thread's network namespace.
func newNSRunner(ctx context.Context) (*nsRunner, error) {
	fd, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("daemon: tun namespace: %w", err)
	}
	defer func() { _ = unix.Close(fd) }()
	r := &nsRunner{ctx: ctx, reqs: make(chan func())}
	ready := make(chan error, nsWorkers)
	for range nsWorkers {
		r.wg.Add(1)
		go func() {
			defer r.wg.Done()
			// Never unlocked: the runtime ends the thread with the goroutine, so no other
			// goroutine ever runs in the namespace it switched to.
			runtime.LockOSThread()
			if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
				ready <- err
				return
			}
			ready <- nil
			for {
				select {
				case <-ctx.Done():
					return
				case f := <-r.reqs:
					f()
				}
			}
		}()
	}
	for range nsWorkers {
		if err := <-ready; err != nil {
			return nil, fmt.Errorf("daemon: tun namespace: setns: %w", err)
		}
	}
	return r, nil
}

// run calls f in the namespace and waits for it.
func (r *nsRunner) run(ctx context.Context, f func()) error {
	if r == nil {
		f()
		return nil
	}
	done := make(chan struct{})
	select {
	case r.reqs <- func() { defer close(done); f() }:
	case <-ctx.Done():
		return ctx.Err()
	case <-r.ctx.Done():
		return r.ctx.Err()
	}
	<-done
	return nil
}

// close waits for the workers; they stop when the context given to newNSRunner ends.
func (r *nsRunner) close() {
	if r != nil {
		r.wg.Wait()
	}
}
