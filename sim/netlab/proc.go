package netlab

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"
)

// stopGrace is how long Stop waits after SIGTERM before SIGKILL.
const stopGrace = 5 * time.Second

// Proc is a long-running process started in a host. Its output is in LogPath.
type Proc struct {
	Host    *Host
	Name    string
	Args    []string
	LogPath string

	cmd  *exec.Cmd
	out  *os.File
	done chan struct{}

	mu  sync.Mutex
	err error // Wait's result, once done is closed
}

func (p *Proc) wait() {
	err := p.cmd.Wait()
	_ = p.out.Close()
	p.mu.Lock()
	p.err = err
	p.mu.Unlock()
	close(p.done)
}

// Pid is the process's id (ip netns exec execs the program, so this is the program itself).
func (p *Proc) Pid() int { return p.cmd.Process.Pid }

// Done is closed when the process has exited.
func (p *Proc) Done() <-chan struct{} { return p.done }

// Err is the process's exit error once it has exited (nil for exit 0), and nil before.
func (p *Proc) Err() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.err
}

// Exited reports whether the process has exited.
func (p *Proc) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Output returns what the process has written so far.
func (p *Proc) Output() string {
	b, _ := os.ReadFile(p.LogPath)
	return string(b)
}

// WaitOutput waits until the output contains s, the process exits, or ctx ends.
func (p *Proc) WaitOutput(ctx context.Context, s string) error {
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for {
		if strings.Contains(p.Output(), s) {
			return nil
		}
		select {
		case <-p.done:
			if strings.Contains(p.Output(), s) {
				return nil
			}
			return fmt.Errorf("%s in %s exited (%v) before printing %q; output: %s", p.Name, p.Host.Name, p.Err(), s, p.Output())
		case <-ctx.Done():
			return fmt.Errorf("%s in %s did not print %q: %w; output: %s", p.Name, p.Host.Name, s, ctx.Err(), p.Output())
		case <-t.C:
		}
	}
}

// Signal sends sig to the process.
func (p *Proc) Signal(sig syscall.Signal) error {
	if p.Exited() {
		return os.ErrProcessDone
	}
	return p.cmd.Process.Signal(sig)
}

// Stop sends SIGTERM to the process group, waits up to 5 s, then SIGKILLs it, and waits for it.
// It returns the exit error of a process that did not stop on SIGTERM in time.
func (p *Proc) Stop() error {
	if p.Exited() {
		return nil
	}
	pg := p.cmd.Process.Pid
	_ = syscall.Kill(-pg, syscall.SIGTERM)
	select {
	case <-p.done:
		_ = syscall.Kill(-pg, syscall.SIGKILL) // children that ignored SIGTERM
		return nil
	case <-time.After(stopGrace):
	}
	_ = syscall.Kill(-pg, syscall.SIGKILL)
	<-p.done
	return errors.New("netlab: " + p.Name + " in " + p.Host.Name + " did not stop on SIGTERM within 5 s")
}

// Kill SIGKILLs the process group and waits for the process.
func (p *Proc) Kill() {
	if p.Exited() {
		return
	}
	_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
	<-p.done
}
