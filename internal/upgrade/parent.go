//go:build linux

package upgrade

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/tether-proxy/tether/pkg/proxy"
)

// reason labels an upgrade failure for tether_upgrade_failures_total.
func reason(err error) string {
	for _, r := range []struct {
		err  error
		name string
	}{{ErrStart, "start"}, {ErrExited, "exited"}, {ErrNotReady, "not_ready"}, {ErrRefused, "refused"}, {ErrLost, "lost"}} {
		if errors.Is(err, r.err) {
			return r.name
		}
	}
	if errors.Is(err, context.Canceled) {
		return "cancelled"
	}
	return "other"
}

// Run upgrades old to a new process started from cfg.Exe. It returns nil
// once the new process serves and holds every session old could pass (the
// caller then drains what is left and exits), or an error, after which
// old serves exactly as before (ErrLost: it accepts again; the sessions
// already handed are lost with the new process). Cancelling ctx (a stop
// signal) abandons the upgrade the same way.
func Run(ctx context.Context, old Old, cfg Config) (Result, error) {
	res, err := run(ctx, old, cfg)
	if cfg.Metrics != nil {
		if err != nil {
			cfg.Metrics.Failures.WithLabelValues(reason(err)).Inc()
		} else {
			cfg.Metrics.Listeners.WithLabelValues("sent").Add(float64(res.Listeners))
		}
	}
	return res, err
}

func run(ctx context.Context, old Old, cfg Config) (Result, error) {
	log := cfg.Logger
	if log == nil {
		log = zap.NewNop()
	}
	started := time.Now()
	lns, err := old.Listeners()
	if err != nil {
		return Result{}, fmt.Errorf("%w: listeners: %v", ErrStart, err)
	}
	defer func() {
		for _, l := range lns {
			l.File.Close()
		}
	}()
	child, err := spawn(cfg)
	if err != nil {
		return Result{}, err
	}
	stop := context.AfterFunc(ctx, func() { child.c.close() }) // unblocks every wait below
	defer stop()
	res := Result{PID: child.cmd.Process.Pid, Listeners: len(lns)}
	log.Info("upgrade: started the new process", zap.Int("pid", res.PID), zap.String("exe", cfg.Exe))

	// Phase 1: the new process builds itself and says it is ready.
	deadline := started.Add(cfg.Timeout)
	flags, fds := make([]string, len(lns)), make([]int, len(lns))
	for i, l := range lns {
		fd, err := rawFD(l.File)
		if err != nil {
			return res, child.fail(fmt.Errorf("%w: listener %s: %v", ErrStart, l.Name, err))
		}
		flags[i], fds[i] = l.Name+"="+l.Flag, fd
	}
	snap := old.Snapshot()
	st := message{Type: typeState, Version: Version, Started: started, Listeners: flags, Snapshot: &snap}
	if err := child.c.send(st, fds, time.Until(deadline)); err != nil {
		return res, child.fail(fmt.Errorf("%w: %v", ErrExited, err))
	}
	m, extra, err := child.c.recv(time.Until(deadline))
	closeAll(extra)
	switch {
	case ctx.Err() != nil:
		return res, child.fail(ctx.Err())
	case errors.Is(err, os.ErrDeadlineExceeded):
		return res, child.fail(fmt.Errorf("%w (%v, --upgrade-timeout)", ErrNotReady, cfg.Timeout))
	case err != nil:
		return res, child.fail(fmt.Errorf("%w: %v", ErrExited, err))
	case m.Type == typeRefuse:
		return res, child.fail(fmt.Errorf("%w: %s", ErrRefused, m.Reason))
	case m.Type != typeReady:
		return res, child.fail(fmt.Errorf("%w: it said %q instead of ready", ErrRefused, m.Type))
	}

	// Phase 2: the new process accepts; sessions move over in batches
	// until this process holds none (or the timeout).
	old.StopAccepting()
	srv := old.Server()
	lost := func(err error) (Result, error) {
		child.kill() // before anything resumes here: never two processes on one socket
		if rerr := old.ResumeAccepting(lns); rerr != nil {
			log.Error("upgrade: cannot accept again after the new process failed", zap.Error(rerr))
		}
		return res, child.fail(fmt.Errorf("%w: %v (%d sessions it held are lost)", ErrLost, err, res.Sessions))
	}
	if err := child.c.send(message{Type: typeGo, LastConn: srv.LastConnID()}, nil, 5*time.Second); err != nil {
		return lost(err)
	}
	// Wait until it serves and the pid file names it: only then may this
	// process go on (and, at its exit, leave the pid file alone).
	if m, extra, err := child.c.recv(min(10*time.Second, cfg.Timeout)); err != nil || m.Type != typeServing {
		closeAll(extra)
		if err == nil {
			err = fmt.Errorf("it said %q instead of serving", m.Type)
		}
		return lost(err)
	}
	send := func(batch []proxy.HandedSession) error {
		m := message{Type: typeSessions, Sessions: make([]proxy.SessionState, len(batch)), FDCounts: make([]int, len(batch))}
		var fds []int
		for i, h := range batch {
			m.Sessions[i], m.FDCounts[i] = h.State, len(h.FDs)
			fds = append(fds, h.FDs...)
		}
		if err := child.c.send(m, fds, 5*time.Second); err != nil {
			child.kill()
			return err
		}
		ack, extra, err := child.c.recv(min(10*time.Second, cfg.Timeout))
		closeAll(extra)
		switch {
		case err != nil:
			err = fmt.Errorf("no ack: %w", err)
		case ack.Type != typeAck || ack.N != len(batch):
			err = fmt.Errorf("ack of %d sessions for a batch of %d", ack.N, len(batch))
		}
		if err != nil {
			// The batch resumes here once this returns: the new process
			// must be gone first, or both would move its bytes.
			child.kill()
		}
		return err
	}
	deadline = time.Now().Add(cfg.Timeout)
	hctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		n, err := srv.HandOff(hctx, MaxFDs, send)
		res.Sessions += n
		switch {
		case ctx.Err() != nil:
			return lost(ctx.Err())
		case errors.Is(err, context.DeadlineExceeded):
		case err != nil:
			return lost(err)
		}
		if srv.Active() == 0 || hctx.Err() != nil {
			break
		}
		// Connections still in their handshake become sessions soon;
		// meanwhile the new process learns of membership changes.
		select {
		case <-old.Changes():
			if err := child.c.send(message{Type: typeMembers, Snapshot: ptr(old.Snapshot())}, nil, 5*time.Second); err != nil {
				return lost(err)
			}
		case <-child.exited:
			return lost(fmt.Errorf("it exited (%v)", child.err))
		case <-tick.C:
		case <-hctx.Done():
		}
	}
	res.Left = srv.Active()

	// Phase 3: the gossip identity moves last, so the new process had
	// current members all along. It must still be there to take it.
	if err := child.c.send(message{Type: typeMembers, Snapshot: ptr(old.Snapshot())}, nil, 5*time.Second); err != nil {
		return lost(err)
	}
	select {
	case <-child.exited:
		return lost(fmt.Errorf("it exited (%v)", child.err))
	default:
	}
	old.ReleaseGossip()
	if err := child.c.send(message{Type: typeReleased, N: res.Sessions}, nil, 5*time.Second); err != nil {
		log.Error("upgrade: the new process failed as gossip was handed to it; this process serves again, without gossip until restarted", zap.Error(err))
		return lost(err)
	}
	child.c.close()
	res.Took = time.Since(started)
	return res, nil
}

func ptr[T any](v T) *T { return &v }

// child is a started new process.
type child struct {
	cmd    *exec.Cmd
	c      *conn
	exited chan struct{} // closed when it ended; err is its exit status
	err    error
	log    *zap.Logger
}

// spawn starts the new process with its end of the upgrade socket as fd 3.
func spawn(cfg Config) (*child, error) {
	c, theirs, err := socketPair()
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrStart, err)
	}
	cmd := exec.Command(cfg.Exe, cfg.Args...)
	cmd.Env = append(withoutFD(cfg.Env), EnvFD+"=3")
	cmd.ExtraFiles = []*os.File{theirs}
	cmd.Stdout, cmd.Stderr = cfg.Stdout, cfg.Stderr
	err = cmd.Start()
	theirs.Close()
	if err != nil {
		c.close()
		return nil, fmt.Errorf("%w: %v", ErrStart, err)
	}
	ch := &child{cmd: cmd, c: c, exited: make(chan struct{}), log: cfg.Logger}
	go func() { ch.err = cmd.Wait(); close(ch.exited) }()
	return ch, nil
}

// kill ends the new process and waits until it is gone (its descriptors
// closed); safe to call again.
func (ch *child) kill() {
	select {
	case <-ch.exited:
		return
	default:
	}
	_ = ch.cmd.Process.Signal(syscall.SIGKILL)
	<-ch.exited
}

// fail ends a failed upgrade: the new process is killed unless it already
// exited, and err names how it ended.
func (ch *child) fail(err error) error {
	ch.c.close()
	select {
	case <-ch.exited:
	case <-time.After(time.Second): // it may be exiting after its refusal
		ch.kill()
	}
	if ch.err != nil && !errors.Is(err, ErrNotReady) && !errors.Is(err, ErrLost) {
		err = fmt.Errorf("%w (%v)", err, ch.err)
	}
	return err
}

// rawFD is f's descriptor number, without os.File.Fd's side effect of
// making the (shared) socket blocking.
func rawFD(f *os.File) (int, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return -1, err
	}
	fd := -1
	err = rc.Control(func(u uintptr) { fd = int(u) })
	return fd, err
}

// withoutFD drops EnvFD from env (a process that was itself started by an
// upgrade must not pass its stale value on).
func withoutFD(env []string) []string {
	out := make([]string, 0, len(env)+1)
	for _, kv := range env {
		if !strings.HasPrefix(kv, EnvFD+"=") {
			out = append(out, kv)
		}
	}
	return out
}
