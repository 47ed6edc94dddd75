package main

import (
	"strings"
	"testing"
)

func TestWithoutSupervise(t *testing.T) {
	got := withoutSupervise([]string{"--supervise", "--listen", ":7000", "-supervise=true", "--pid-file", "p", "supervise"})
	if strings.Join(got, " ") != "--listen :7000 --pid-file p supervise" {
		t.Fatalf("withoutSupervise = %v", got)
	}
}
