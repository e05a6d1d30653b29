package tundev

import (
	"os"
	"runtime"
	"testing"

	"golang.org/x/sys/unix"
)

// inNetns runs fn on a dedicated OS thread moved into a fresh network namespace, so that the
// host's interfaces are never touched. The thread is never unlocked: the runtime discards it when
// the goroutine ends, and with it the namespace. Child processes started by fn (os/exec forks on
// the calling thread) inherit the namespace.
func inNetns(t *testing.T, fn func()) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (CAP_NET_ADMIN) to create network namespaces and TUN devices; CI runs as root")
	}
	done := make(chan any, 1)
	go func() {
		runtime.LockOSThread()
		defer func() { done <- recover() }()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			t.Errorf("unshare(CLONE_NEWNET): %v", err)
			return
		}
		fn()
	}()
	if p := <-done; p != nil {
		panic(p)
	}
}
