//go:build unix

// Package procrun runs the external programs of tests and benchmarks —
// tether's own binaries, redis-server, haproxy, nginx, helpers — in one
// way: output read line by line, a channel that closes when the process
// has ended and all its output was read, and a stop that sends SIGTERM,
// then SIGKILL after a grace period. On Linux a started process dies with
// the process that started it, so a killed test leaves nothing behind.
package procrun

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"syscall"
	"time"
)

// Options says how to start a program.
type Options struct {
	// Env is added to this process's environment.
	Env []string
	// OnLine, if set, receives each line the program writes to stdout or
	// stderr, in order, from one goroutine.
	OnLine func(line string)
	// Dir is the working directory; "" means this process's.
	Dir string
}

// Proc is a started program. Its methods are safe for concurrent use.
type Proc struct {
	// Cmd is the running command (for its Process and ProcessState).
	Cmd  *exec.Cmd
	done chan struct{}
}

// Start runs path with args.
func Start(path string, args []string, o Options) (*Proc, error) {
	p := &Proc{Cmd: exec.Command(path, args...), done: make(chan struct{})}
	p.Cmd.Env = append(os.Environ(), o.Env...)
	p.Cmd.Dir = o.Dir
	p.Cmd.SysProcAttr = sysProcAttr()
	pr, pw := io.Pipe()
	p.Cmd.Stdout, p.Cmd.Stderr = pw, pw
	if err := p.Cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", path, err)
	}
	read := make(chan struct{})
	go func() {
		defer close(read)
		sc := bufio.NewScanner(pr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			if o.OnLine != nil {
				o.OnLine(sc.Text())
			}
		}
		_, _ = io.Copy(io.Discard, pr) // a line too long: keep the pipe flowing
	}()
	go func() { _ = p.Cmd.Wait(); pw.Close(); <-read; close(p.done) }()
	return p, nil
}

// Done is closed once the program has ended and its output was read.
func (p *Proc) Done() <-chan struct{} { return p.done }

// Exited reports whether the program has ended.
func (p *Proc) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// ExitCode is the program's exit status, -1 while it runs or if a signal
// ended it.
func (p *Proc) ExitCode() int {
	if !p.Exited() {
		return -1
	}
	return p.Cmd.ProcessState.ExitCode()
}

// Pid is the program's process ID.
func (p *Proc) Pid() int { return p.Cmd.Process.Pid }

// Signal sends sig to the program.
func (p *Proc) Signal(sig os.Signal) error { return p.Cmd.Process.Signal(sig) }

// Stop sends SIGTERM and waits up to grace, then kills the program; it
// reports whether the program had to be killed. Safe to call again.
func (p *Proc) Stop(grace time.Duration) (killed bool) {
	if p.Exited() {
		return false
	}
	_ = p.Cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		return false
	case <-time.After(grace):
		p.Kill()
		return true
	}
}

// Kill ends the program with SIGKILL (continuing it first if it was
// stopped) and waits for it.
func (p *Proc) Kill() {
	_ = p.Cmd.Process.Signal(syscall.SIGCONT)
	_ = p.Cmd.Process.Kill()
	<-p.done
}
