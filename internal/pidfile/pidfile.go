// Package pidfile reads and writes pid files, and tells whether a process
// runs: what --pid-file, --supervise, their tests and the upgrade bench
// share.
package pidfile

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Write writes pid to path atomically (a reader never sees it half
// written).
func Write(path string, pid int) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(strconv.Itoa(pid)+"\n"), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// Read returns the pid in path.
func Read(path string) (int, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return 0, errors.New("pidfile: " + path + " holds no process ID")
	}
	return pid, nil
}

// RemoveIf removes path if it still names pid (after an upgrade it names
// the new process, which keeps it).
func RemoveIf(path string, pid int) {
	if got, err := Read(path); err == nil && got == pid {
		_ = os.Remove(path)
	}
}

// Alive reports whether pid runs (Linux /proc; a zombie does not).
func Alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// "pid (comm) S ...": the state follows the last ')'.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i < 0 || i+2 >= len(s) || s[i+2] != 'Z'
}

// Stop sends SIGTERM to pid, waits up to grace for it to exit, and kills it
// if it has not; it reports whether it had to. For processes that are not
// the caller's children (the new process of an upgrade), which cannot be
// waited for.
func Stop(pid int, grace time.Duration) (killed bool) {
	if !Alive(pid) {
		return false
	}
	_ = syscall.Kill(pid, syscall.SIGTERM)
	for deadline := time.Now().Add(grace); Alive(pid) && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
	}
	if !Alive(pid) {
		return false
	}
	_ = syscall.Kill(pid, syscall.SIGKILL)
	return true
}
