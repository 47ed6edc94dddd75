package pidfile

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

func TestWriteReadRemove(t *testing.T) {
	p := filepath.Join(t.TempDir(), "x.pid")
	if err := Write(p, 4242); err != nil {
		t.Fatal(err)
	}
	if pid, err := Read(p); err != nil || pid != 4242 {
		t.Fatalf("Read = %d, %v", pid, err)
	}
	RemoveIf(p, 1) // names another process: kept
	if _, err := os.Stat(p); err != nil {
		t.Fatal("removed a pid file naming another process")
	}
	RemoveIf(p, 4242)
	if _, err := os.Stat(p); !os.IsNotExist(err) {
		t.Fatal("pid file naming this process not removed")
	}
	os.WriteFile(p, []byte("garbage\n"), 0o644)
	if _, err := Read(p); err == nil {
		t.Fatal("garbage read as a pid")
	}
}

func TestAlive(t *testing.T) {
	if !Alive(os.Getpid()) {
		t.Fatal("this process is not alive")
	}
	if Alive(1 << 30) {
		t.Fatal("a pid that cannot exist is alive")
	}
}

func TestStop(t *testing.T) {
	cmd := exec.Command("sleep", "30")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Wait()
	if killed := Stop(cmd.Process.Pid, 5*time.Second); killed || Alive(cmd.Process.Pid) {
		t.Fatalf("sleep after SIGTERM: killed %v, alive %v", killed, Alive(cmd.Process.Pid))
	}
}
