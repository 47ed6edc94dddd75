package main

import (
	"errors"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"

	"go.uber.org/zap"

	"github.com/tether-proxy/tether/internal/pidfile"
	"golang.org/x/sys/unix"
)

// envSupervised marks a proxy started by --supervise, which must not
// supervise again.
const envSupervised = "TETHER_SUPERVISED"

// supervise is --supervise: a tiny PID 1 for containers. It runs the proxy
// as its child with the same flags, forwards SIGTERM, SIGINT, SIGHUP and
// SIGUSR2 to the process --pid-file names (after an upgrade, the new one),
// reaps every orphan, and exits with the proxy's status once the process
// the pid file names has exited. As a child subreaper it also adopts the
// new process of an upgrade when the old one exits, so SIGUSR2 works in a
// container whose main process this is.
func supervise(args []string, pidFile string, sigs <-chan os.Signal, log *zap.Logger) int {
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		log.Error("supervise: cannot become a child subreaper", zap.Error(err))
		return 1
	}
	chld := make(chan os.Signal, 16)
	signal.Notify(chld, syscall.SIGCHLD)
	if exeErr != nil {
		log.Error("supervise: cannot tell which executable to start", zap.Error(exeErr))
		return 1
	}
	_ = os.Remove(pidFile) // a stale file must not name an unrelated process
	proc, err := os.StartProcess(exePath, append([]string{os.Args[0]}, withoutSupervise(args)...), &os.ProcAttr{
		Env:   append(os.Environ(), envSupervised+"=1"),
		Files: []*os.File{os.Stdin, os.Stdout, os.Stderr},
	})
	if err != nil {
		log.Error("supervise: cannot start the proxy", zap.Error(err))
		return 1
	}
	log.Info("supervise: started the proxy", zap.Int("pid", proc.Pid), zap.Int("supervisor_pid", os.Getpid()))
	// known are the proxy processes seen, oldest first: the first child
	// and every pid the pid file named. Signals go to the one the pid
	// file names if it runs, else to the newest that runs (a failed
	// upgrade may leave the file naming a dead one for a moment).
	known := []int{proc.Pid}
	learn := func() {
		if pid, err := pidfile.Read(pidFile); err == nil && pid > 0 && !slices.Contains(known, pid) {
			known = append(known, pid)
		}
	}
	target := func() int {
		learn()
		if pid, err := pidfile.Read(pidFile); err == nil && pidfile.Alive(pid) {
			return pid
		}
		for i := len(known) - 1; i >= 0; i-- {
			if pidfile.Alive(known[i]) {
				return known[i]
			}
		}
		return 0
	}
	code := 0
	for {
		select {
		case sig := <-sigs:
			pid := target()
			if pid == 0 {
				continue
			}
			if err := syscall.Kill(pid, sig.(syscall.Signal)); err != nil {
				log.Warn("supervise: cannot forward a signal", zap.String("signal", sig.String()), zap.Int("pid", pid), zap.Error(err))
			}
		case <-chld:
			learn() // before the reaping: an upgraded proxy has named its successor
			for {
				var ws syscall.WaitStatus
				pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil)
				if errors.Is(err, syscall.ECHILD) {
					// Nothing left below: the last proxy's status is ours.
					log.Info("supervise: the proxy exited", zap.Int("code", code))
					return code
				}
				if pid <= 0 || err != nil {
					break
				}
				if !slices.Contains(known, pid) {
					continue // an orphan reaped
				}
				code = ws.ExitStatus()
				if ws.Signaled() {
					code = 128 + int(ws.Signal())
				}
				known = slices.DeleteFunc(known, func(p int) bool { return p == pid })
				if next := target(); next != 0 {
					log.Info("supervise: the proxy was upgraded", zap.Int("old_pid", pid), zap.Int("pid", next))
				}
			}
		}
	}
}

// withoutSupervise drops --supervise from the proxy's arguments.
func withoutSupervise(args []string) []string {
	out := make([]string, 0, len(args))
	for _, a := range args {
		name, _, _ := strings.Cut(strings.TrimLeft(a, "-"), "=")
		if strings.HasPrefix(a, "-") && name == "supervise" {
			continue
		}
		out = append(out, a)
	}
	return out
}
