package version

import (
	"runtime"
	"strings"
	"testing"
)

func TestGet(t *testing.T) {
	old := Version
	defer func() { Version = old }()
	Version = ""
	i := Get()
	if i.Version == "" || i.Revision == "" || i.GoVersion != runtime.Version() {
		t.Fatalf("Get() = %+v", i)
	}
	Version = "v9.9.9"
	line := Get().String("proxy")
	if !strings.HasPrefix(line, "proxy v9.9.9 (revision ") || !strings.Contains(line, runtime.Version()) {
		t.Fatalf("String = %q", line)
	}
}
