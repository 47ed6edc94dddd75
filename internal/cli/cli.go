// Package cli holds what the tether binaries share on the command line:
// logger setup, the --gateway flag syntax, and "listening" announcements
// that scripts and tests wait on.
package cli

import (
	"flag"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/tether-proxy/tether/pkg/ring"
)

// NewLogger builds the process logger: format is json (production) or
// console (humans), level one of debug, info, warn, error.
func NewLogger(level, format string) (*zap.Logger, error) {
	lvl, err := zapcore.ParseLevel(level)
	if err != nil {
		return nil, fmt.Errorf("--log-level %q: want debug, info, warn or error", level)
	}
	var cfg zap.Config
	switch format {
	case "json":
		cfg = zap.NewProductionConfig()
		cfg.Sampling = nil // every failed handshake is counted; keep every line too
		cfg.EncoderConfig.TimeKey = "ts"
		cfg.EncoderConfig.EncodeTime = zapcore.ISO8601TimeEncoder
	case "console":
		cfg = zap.NewDevelopmentConfig()
		cfg.EncoderConfig.EncodeTime = zapcore.TimeEncoderOfLayout("15:04:05.000")
	default:
		return nil, fmt.Errorf("--log-format %q: want json or console", format)
	}
	cfg.Level = zap.NewAtomicLevelAt(lvl)
	cfg.DisableStacktrace = true
	cfg.DisableCaller = true
	cfg.OutputPaths = []string{"stderr"}
	return cfg.Build()
}

// GatewayList is the repeatable --gateway ID=HOST:PORT[,weight=W] flag.
type GatewayList []ring.Member

// String implements flag.Value.
func (g *GatewayList) String() string {
	parts := make([]string, len(*g))
	for i, m := range *g {
		parts[i] = fmt.Sprintf("%s=%s,weight=%g", m.ID, m.Addr, m.Weight)
	}
	return strings.Join(parts, " ")
}

// Set implements flag.Value.
func (g *GatewayList) Set(s string) error {
	m, err := ParseGateway(s)
	if err != nil {
		return err
	}
	*g = append(*g, m)
	return nil
}

// ParseGateway parses ID=HOST:PORT[,weight=W]; the weight defaults to 1.
func ParseGateway(s string) (ring.Member, error) {
	id, rest, ok := strings.Cut(s, "=")
	if !ok || id == "" {
		return ring.Member{}, fmt.Errorf("gateway %q: want ID=HOST:PORT[,weight=W]", s)
	}
	addr, opts, _ := strings.Cut(rest, ",")
	if _, _, err := net.SplitHostPort(addr); err != nil {
		return ring.Member{}, fmt.Errorf("gateway %q: address: %w", s, err)
	}
	m := ring.Member{ID: id, Addr: addr, Weight: 1}
	if opts != "" {
		k, v, _ := strings.Cut(opts, "=")
		if k != "weight" {
			return ring.Member{}, fmt.Errorf("gateway %q: unknown option %q (only weight=W)", s, k)
		}
		w, err := strconv.ParseFloat(v, 64)
		if err != nil || w < 0 {
			return ring.Member{}, fmt.Errorf("gateway %q: weight %q: want a number >= 0", s, v)
		}
		m.Weight = w
	}
	return m, nil
}

// PrintFlags writes fs's flags the way this project documents them: with
// two dashes, the argument name, the help text and the default.
func PrintFlags(w io.Writer, fs *flag.FlagSet) {
	fs.VisitAll(func(f *flag.Flag) {
		name, usage := flag.UnquoteUsage(f)
		line := "  --" + f.Name
		if name != "" {
			line += " " + name
		}
		fmt.Fprintln(w, line)
		for _, l := range strings.Split(usage, "\n") {
			fmt.Fprintln(w, "        "+l)
		}
		if f.DefValue != "" && f.DefValue != "0" && f.DefValue != "[]" && f.DefValue != "false" {
			fmt.Fprintf(w, "        (default %s)\n", f.DefValue)
		}
	})
}
