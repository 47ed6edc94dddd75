//go:build unix

package procrun

import (
	"slices"
	"sync"
	"testing"
	"time"
)

func TestLinesAndExitCode(t *testing.T) {
	var mu sync.Mutex
	var lines []string
	p, err := Start("/bin/sh", []string{"-c", "echo one; echo two >&2; echo $TETHER_T; exit 3"},
		Options{Env: []string{"TETHER_T=three"}, OnLine: func(l string) { mu.Lock(); lines = append(lines, l); mu.Unlock() }})
	if err != nil {
		t.Fatal(err)
	}
	<-p.Done()
	mu.Lock()
	defer mu.Unlock()
	if p.ExitCode() != 3 || !slices.Equal(lines, []string{"one", "two", "three"}) {
		t.Fatalf("exit %d, lines %q", p.ExitCode(), lines)
	}
}

func TestStop(t *testing.T) {
	polite, err := Start("/bin/sleep", []string{"60"}, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if polite.Stop(10*time.Second) || !polite.Exited() {
		t.Fatal("sleep needed a SIGKILL")
	}
	ready := make(chan struct{}, 1)
	stubborn, err := Start("/bin/sh", []string{"-c", "trap '' TERM; echo ready; while :; do sleep 0.1; done"},
		Options{OnLine: func(string) { ready <- struct{}{} }})
	if err != nil {
		t.Fatal(err)
	}
	<-ready // the trap is in place
	if !stubborn.Stop(200*time.Millisecond) || !stubborn.Exited() {
		t.Fatal("a program ignoring SIGTERM was not killed")
	}
	if stubborn.Stop(time.Second) {
		t.Fatal("a second Stop killed again")
	}
}
