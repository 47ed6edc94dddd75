// Package version tells which build of tether is running: the release
// version (set at build time), the source revision and the Go release,
// read from the build information Go embeds in every binary.
package version

import (
	"fmt"
	"runtime"
	"runtime/debug"
)

// Version is the release version, set at build time:
//
//	go build -ldflags "-X github.com/tether-proxy/tether/internal/version.Version=v0.1.0"
//
// (make build does it from git describe). Empty means the module version
// from the build information, else "dev".
var Version string

// Revision is the source revision, set at build time where the build
// information has none (a container build without .git); empty means the
// VCS revision Go stamped into the binary.
var Revision string

// Info is one build's identity.
type Info struct {
	// Version is the release version ("dev" for an unversioned build).
	Version string
	// Revision is the source commit ("unknown" if not recorded), with
	// "-dirty" when built from a modified tree.
	Revision string
	// GoVersion is the Go release that built the binary.
	GoVersion string
}

// Get returns the running binary's Info.
func Get() Info {
	i := Info{Version: Version, Revision: Revision, GoVersion: runtime.Version()}
	bi, ok := debug.ReadBuildInfo()
	if ok {
		if i.Version == "" && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
			i.Version = bi.Main.Version
		}
		if i.Revision == "" {
			dirty := false
			for _, s := range bi.Settings {
				switch s.Key {
				case "vcs.revision":
					i.Revision = s.Value
				case "vcs.modified":
					dirty = s.Value == "true"
				}
			}
			if i.Revision != "" && dirty {
				i.Revision += "-dirty"
			}
		}
	}
	if i.Version == "" {
		i.Version = "dev"
	}
	if i.Revision == "" {
		i.Revision = "unknown"
	}
	return i
}

// String is the --version line: "PROG VERSION (revision REV, GOVERSION OS/ARCH)".
func (i Info) String(prog string) string {
	return fmt.Sprintf("%s %s (revision %s, %s %s/%s)", prog, i.Version, i.Revision, i.GoVersion, runtime.GOOS, runtime.GOARCH)
}
