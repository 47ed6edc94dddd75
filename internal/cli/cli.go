// Package cli holds what the tether binaries share on the command line:
// logger setup, the --gateway flag syntax, and "listening" announcements
// that scripts and tests wait on.
package cli

import (
	"encoding/base64"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/tether-proxy/tether/pkg/ring"
)

// ParseLevel parses --log-level.
func ParseLevel(level string) (zapcore.Level, error) {
	lvl, err := zapcore.ParseLevel(level)
	if err != nil {
		return lvl, fmt.Errorf("--log-level %q: want debug, info, warn or error", level)
	}
	return lvl, nil
}

// NewLogger builds the process logger: format is json (production) or
// console (humans), level one of debug, info, warn, error. The returned
// level can be changed while the process runs (SIGHUP reload).
func NewLogger(level, format string) (*zap.Logger, zap.AtomicLevel, error) {
	lvl, err := ParseLevel(level)
	if err != nil {
		return nil, zap.AtomicLevel{}, err
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
		return nil, zap.AtomicLevel{}, fmt.Errorf("--log-format %q: want json or console", format)
	}
	cfg.Level = zap.NewAtomicLevelAt(lvl)
	cfg.DisableStacktrace = true
	cfg.DisableCaller = true
	cfg.OutputPaths = []string{"stderr"}
	log, err := cfg.Build()
	return log, cfg.Level, err
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

// ReadGossipKey reads a memberlist encryption key file: base64 text (as
// printed by `openssl rand -base64 32`) or raw bytes, 16, 24 or 32 bytes
// long after decoding.
func ReadGossipKey(path string) ([]byte, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("--gossip-key: %w", err)
	}
	text := strings.TrimSpace(string(raw))
	if k, err := base64.StdEncoding.DecodeString(text); err == nil && validKeyLen(len(k)) {
		return k, nil
	}
	if validKeyLen(len(raw)) {
		return raw, nil
	}
	return nil, fmt.Errorf("--gossip-key %s: want a 16, 24 or 32-byte key, raw or base64 (e.g. openssl rand -base64 32 > %s)", path, path)
}

func validKeyLen(n int) bool { return n == 16 || n == 24 || n == 32 }

// SplitList splits a comma-separated flag value, dropping empty items.
func SplitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

// GossipFlags are the memberlist flags both binaries share.
type GossipFlags struct {
	Bind, Join, NodeName, KeyFile, Profile string
}

// Key reads the --gossip-key file; nil (gossip unencrypted) when the flag
// is not set.
func (g GossipFlags) Key() ([]byte, error) {
	if g.KeyFile == "" {
		return nil, nil
	}
	return ReadGossipKey(g.KeyFile)
}

// Register adds the gossip flags to fs; nodeNameHelp says what the node name
// defaults to for this binary.
func (g *GossipFlags) Register(fs *flag.FlagSet, nodeNameHelp string) {
	fs.StringVar(&g.Bind, "gossip-bind", "", "join the gossip cluster, listening for memberlist traffic (TCP and UDP) on `HOST:PORT`; gossip is off when empty")
	fs.StringVar(&g.Join, "join", "", "comma-separated gossip `ADDRS` (HOST:PORT) of nodes already in the cluster; retried with backoff until one answers. The first node needs none")
	fs.StringVar(&g.NodeName, "node-name", "", "unique gossip `NAME` of this node (default "+nodeNameHelp+"); a node restarted with the same name rejoins in its place")
	fs.StringVar(&g.KeyFile, "gossip-key", "", "`FILE` holding a 16, 24 or 32-byte AES key (raw or base64) that encrypts gossip; nodes with another key cannot join")
	fs.StringVar(&g.Profile, "gossip-profile", "lan", "`PROFILE` of memberlist timings: lan (failed node declared dead after ~5s) or local (~3s, more probe traffic)")
}

// Parse parses args like fs.Parse but prints the full usage only for
// --help: a mistyped flag gets one line from the caller, not a page.
func Parse(fs *flag.FlagSet, args []string, stderr io.Writer) error {
	fs.SetOutput(io.Discard)
	err := fs.Parse(args)
	fs.SetOutput(stderr)
	if errors.Is(err, flag.ErrHelp) {
		fs.Usage()
	}
	return err
}
