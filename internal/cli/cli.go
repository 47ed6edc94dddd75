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
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/tether-proxy/tether/internal/version"
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

// StringList is a repeatable string flag (--tls-cert); a YAML list sets it
// once per item.
type StringList []string

// String implements flag.Value.
func (l *StringList) String() string { return strings.Join(*l, ",") }

// Set implements flag.Value.
func (l *StringList) Set(s string) error { *l = append(*l, s); return nil }

// Reset implements Repeatable.
func (l *StringList) Reset() { *l = nil }

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
		return ring.Member{}, fmt.Errorf("%q: want ID=HOST:PORT[,weight=W]", s)
	}
	addr, opts, _ := strings.Cut(rest, ",")
	if err := checkHostPort(addr, false, false); err != nil {
		return ring.Member{}, fmt.Errorf("%q: %w", s, err)
	}
	m := ring.Member{ID: id, Addr: addr, Weight: 1}
	if opts != "" {
		k, v, _ := strings.Cut(opts, "=")
		if k != "weight" {
			return ring.Member{}, fmt.Errorf("%q: unknown option %q (only weight=W)", s, k)
		}
		w, err := strconv.ParseFloat(v, 64)
		if err != nil || w < 0 {
			return ring.Member{}, fmt.Errorf("%q: weight %q: want a number >= 0", s, v)
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

// ReadGossipKeyring reads a --gossip-key file: one key, or a keyring of
// several for rotation, each 16, 24 or 32 bytes. A file holding one key may
// be base64 text (as printed by `openssl rand -base64 32`) or the raw bytes;
// a keyring is one base64 key per line, the primary (used to encrypt)
// first, then keys still accepted from peers. Blank lines and lines
// starting with # are ignored.
func ReadGossipKeyring(path string) ([][]byte, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("--gossip-key: %w", err)
	}
	if validKeyLen(len(raw)) && !isBase64Text(raw) {
		return [][]byte{raw}, nil
	}
	var keys [][]byte
	seen := map[string]bool{}
	for i, line := range strings.Split(string(raw), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, err := base64.StdEncoding.DecodeString(line)
		if err != nil || !validKeyLen(len(k)) {
			return nil, fmt.Errorf("--gossip-key %s line %d: want a 16, 24 or 32-byte key in base64 (e.g. openssl rand -base64 32)", path, i+1)
		}
		if !seen[string(k)] {
			seen[string(k)] = true
			keys = append(keys, k)
		}
	}
	if len(keys) == 0 {
		return nil, fmt.Errorf("--gossip-key %s: no key in the file (want base64 keys, one per line, primary first; e.g. openssl rand -base64 32 > %s)", path, path)
	}
	return keys, nil
}

func validKeyLen(n int) bool { return n == 16 || n == 24 || n == 32 }

// isBase64Text reports whether b looks like base64 text rather than raw key
// bytes (a raw 24- or 32-byte key is almost never all base64 characters).
func isBase64Text(b []byte) bool {
	for _, c := range b {
		switch {
		case c >= 'A' && c <= 'Z', c >= 'a' && c <= 'z', c >= '0' && c <= '9',
			c == '+', c == '/', c == '=', c == '\n', c == '\r', c == ' ', c == '#':
		default:
			return false
		}
	}
	return true
}

// ParsePrefixes parses --trusted-proxies: comma-separated CIDRs or single
// addresses.
func ParsePrefixes(s string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, part := range strings.Split(s, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		if !strings.Contains(part, "/") {
			a, err := netip.ParseAddr(part)
			if err != nil {
				return nil, fmt.Errorf("trusted proxy %q: %w", part, err)
			}
			out = append(out, netip.PrefixFrom(a.Unmap(), a.Unmap().BitLen()))
			continue
		}
		p, err := netip.ParsePrefix(part)
		if err != nil {
			return nil, fmt.Errorf("trusted proxy %q: %w", part, err)
		}
		out = append(out, p.Masked())
	}
	return out, nil
}

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
	// Insecure allows unencrypted gossip on a non-loopback --gossip-bind.
	Insecure bool
}

// Keys reads the --gossip-key file (primary key first); nil (gossip
// unencrypted) when the flag is not set.
func (g GossipFlags) Keys() ([][]byte, error) {
	if g.KeyFile == "" {
		return nil, nil
	}
	return ReadGossipKeyring(g.KeyFile)
}

// ErrInsecureGossip means gossip would listen beyond loopback without a
// key: anyone who can reach the port could announce a gateway and receive
// its sessions.
var ErrInsecureGossip = errors.New("gossip on a non-loopback address needs --gossip-key")

// Validate checks the gossip flags: a non-loopback --gossip-bind (0.0.0.0
// and a bare :PORT included) needs --gossip-key, or --gossip-insecure to
// accept unauthenticated gossip on a network the operator trusts.
func (g GossipFlags) Validate() error {
	if g.Bind == "" {
		if g.Join != "" || g.KeyFile != "" || g.NodeName != "" || g.Insecure {
			return errors.New("--join, --node-name, --gossip-key and --gossip-insecure need --gossip-bind")
		}
		return nil
	}
	if err := CheckAddr("gossip-bind", g.Bind, true, true); err != nil {
		return err
	}
	for _, j := range SplitList(g.Join) {
		if err := CheckAddr("join", j, false, false); err != nil {
			return err
		}
	}
	if g.KeyFile != "" {
		_, err := g.Keys()
		return err
	}
	if !g.Insecure && !IsLoopback(g.Bind) {
		return fmt.Errorf("%w: --gossip-bind %s accepts members from the network, and any member can announce a gateway and receive its clients' sessions. "+
			"Give --gossip-key FILE (openssl rand -base64 32 > FILE, the same file on every node), or --gossip-insecure on a network you trust", ErrInsecureGossip, g.Bind)
	}
	return nil
}

// ReloadKeys re-reads the --gossip-key keyring into a running gossip node
// (set is its SetKeys) on SIGHUP, and logs the outcome; a broken file keeps
// the running keyring.
func ReloadKeys(log *zap.Logger, g GossipFlags, set func([][]byte) error) {
	if g.KeyFile == "" || set == nil {
		log.Warn("SIGHUP: no --gossip-key to reload")
		return
	}
	keys, err := g.Keys()
	if err == nil {
		err = set(keys)
	}
	if err != nil {
		log.Error("SIGHUP: gossip keyring not reloaded; keeping the running one", zap.String("file", g.KeyFile), zap.Error(err))
		return
	}
	log.Info("SIGHUP: gossip keyring reloaded", zap.String("file", g.KeyFile), zap.Int("keys", len(keys)))
}

// WarnInsecureGossip logs, at every start, that gossip beyond loopback runs
// without a key (--gossip-insecure).
func WarnInsecureGossip(log *zap.Logger, g GossipFlags) {
	if g.KeyFile == "" && g.Exposed() {
		log.Warn("gossip is unencrypted and unauthenticated on a non-loopback address (--gossip-insecure): any host that reaches it can announce gateways and receive their sessions; set --gossip-key",
			zap.String("gossip_bind", g.Bind))
	}
}

// Exposed reports whether gossip listens beyond loopback.
func (g GossipFlags) Exposed() bool { return g.Bind != "" && !IsLoopback(g.Bind) }

// IsLoopback reports whether HOST:PORT names a loopback host (127.0.0.0/8,
// ::1 or localhost). An empty or unspecified host listens everywhere and is
// not loopback.
func IsLoopback(hostPort string) bool {
	host, _, err := net.SplitHostPort(hostPort)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.IsLoopback()
}

// Register adds the gossip flags to fs; nodeNameHelp says what the node name
// defaults to for this binary.
func (g *GossipFlags) Register(fs *flag.FlagSet, nodeNameHelp string) {
	fs.StringVar(&g.Bind, "gossip-bind", "", "join the gossip cluster, listening for memberlist traffic (TCP and UDP) on `HOST:PORT`; gossip is off when empty. A non-loopback address needs --gossip-key (or --gossip-insecure)")
	fs.StringVar(&g.Join, "join", "", "comma-separated gossip `ADDRS` (HOST:PORT) of nodes already in the cluster; retried with backoff until one answers. The first node needs none")
	fs.StringVar(&g.NodeName, "node-name", "", "unique gossip `NAME` of this node (default "+nodeNameHelp+"); a node restarted with the same name rejoins in its place")
	fs.StringVar(&g.KeyFile, "gossip-key", "", "`FILE` with the AES key(s) that encrypt and authenticate gossip: one 16, 24 or 32-byte key (raw or base64), or a keyring of base64 keys one per line, primary first, then keys still accepted (for rotation; SIGHUP re-reads it). Nodes without a key in common cannot join")
	fs.BoolVar(&g.Insecure, "gossip-insecure", false, "allow unencrypted, unauthenticated gossip on a non-loopback --gossip-bind (warned at every start): any host that reaches the port can announce gateways")
	fs.StringVar(&g.Profile, "gossip-profile", "lan", "`PROFILE` of memberlist timings: lan (failed node declared dead after ~5s) or local (~3s, more probe traffic)")
}

// Parse parses args like fs.Parse but prints the full usage only for
// --help: a mistyped flag gets one line from the caller, not a page.
//
// A value a flag rejects is reported as "--NAME: want FORM, got VALUE"
// (FORM from the flag's type: a duration like 2s, a whole number, ...),
// here and in ApplyConfig.
//
// Every binary gets --version: Parse prints the version line (to
// VersionOutput) and returns ErrVersion, which FlagOutcome turns into exit 0.
func Parse(fs *flag.FlagSet, args []string, stderr io.Writer) error {
	var showVersion *bool
	if fs.Lookup("version") == nil {
		showVersion = fs.Bool("version", false, "print the version, source revision and Go version, and exit")
	}
	explain(fs)
	fs.SetOutput(io.Discard)
	err := fs.Parse(args)
	fs.SetOutput(stderr)
	if errors.Is(err, flag.ErrHelp) {
		fs.Usage()
		return err
	}
	if err == nil && showVersion != nil && *showVersion {
		fmt.Fprintln(VersionOutput, version.Get().String(fs.Name()))
		return ErrVersion
	}
	if err != nil {
		var bad error
		fs.VisitAll(func(f *flag.Flag) {
			if ev, ok := f.Value.(*explained); ok && ev.err != nil && bad == nil {
				bad = ev.err
			}
		})
		if bad != nil {
			return bad
		}
		// Unknown flags and the like: say them with two dashes.
		return errors.New(strings.Replace(err.Error(), " -", " --", 1))
	}
	return nil
}

// ErrVersion means --version was given and the version line printed: the
// binary exits 0 without doing anything else.
var ErrVersion = errors.New("cli: version printed")

// VersionOutput is where --version prints (standard output).
var VersionOutput io.Writer = os.Stdout

// FlagOutcome turns the result of a binary's flag parsing into what the
// binary does next: go on (ok), or exit with code — 0 after --help (the
// usage was printed) or --version, 2 after a bad flag, printed here with a
// hint.
func FlagOutcome(name string, err error, stderr io.Writer) (code int, ok bool) {
	switch {
	case err == nil:
		return 0, true
	case errors.Is(err, flag.ErrHelp), errors.Is(err, ErrVersion):
		return 0, false
	}
	fmt.Fprintf(stderr, "%s: %v\nRun %s --help for the flags.\n", name, err, name)
	return 2, false
}

// explained wraps a flag's value so that a rejected value is reported with
// the flag's name and the form it wants.
type explained struct {
	flag.Value
	name string
	err  error
}

// IsBoolFlag keeps --flag (without =true) working for bool flags.
func (e *explained) IsBoolFlag() bool {
	b, ok := e.Value.(interface{ IsBoolFlag() bool })
	return ok && b.IsBoolFlag()
}

// Get implements flag.Getter.
func (e *explained) Get() any {
	if g, ok := e.Value.(flag.Getter); ok {
		return g.Get()
	}
	return nil
}

func (e *explained) Set(s string) error {
	err := e.Value.Set(s)
	if err == nil {
		return nil
	}
	e.err = valueError("--"+e.name, e.Value, s, err)
	return e.err
}

// explain wraps every flag of fs once.
func explain(fs *flag.FlagSet) {
	fs.VisitAll(func(f *flag.Flag) {
		if _, done := f.Value.(*explained); !done {
			f.Value = &explained{Value: f.Value, name: f.Name}
		}
	})
}

// valueError says what form a flag (label "--name", or a config key) wants,
// by the type of its value.
func valueError(label string, v flag.Value, got string, err error) error {
	var want string
	if g, ok := v.(flag.Getter); ok {
		switch g.Get().(type) {
		case time.Duration:
			want = "a duration like 2s, 500ms or 1m30s"
		case int, int64, uint, uint64:
			want = "a whole number"
		case float64:
			want = "a number"
		case bool:
			want = "true or false"
		}
	}
	if want == "" {
		return fmt.Errorf("%s: %w", label, err)
	}
	return fmt.Errorf("%s: want %s, got %q", label, want, got)
}

// CheckAddr checks a HOST:PORT flag value: the port a number in 0..65535
// (1..65535 unless zeroOK), and a host unless emptyHostOK (":7000" listens
// everywhere, but proxies cannot connect to it).
func CheckAddr(name, addr string, emptyHostOK, zeroOK bool) error {
	if err := checkHostPort(addr, emptyHostOK, zeroOK); err != nil {
		return fmt.Errorf("--%s %q: %w", name, addr, err)
	}
	return nil
}

func checkHostPort(addr string, emptyHostOK, zeroOK bool) error {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return errors.New("want HOST:PORT")
	}
	n, err := strconv.Atoi(port)
	if err != nil || n < 0 || n > 65535 || (n == 0 && !zeroOK) {
		lo := 1
		if zeroOK {
			lo = 0
		}
		return fmt.Errorf("port %q is not a number in %d..65535", port, lo)
	}
	if host == "" && !emptyHostOK {
		return errors.New("needs a host (a name or an address others can connect to)")
	}
	return nil
}

// Secret returns a token given either inline (--NAME) or in a file
// (--NAME-file, which keeps it out of ps and shell history): the file's
// content with surrounding whitespace trimmed. Both, or an empty file, is
// an error; neither is "".
func Secret(name, inline, file string) (string, error) {
	if file == "" {
		return inline, nil
	}
	if inline != "" {
		return "", fmt.Errorf("--%s and --%s-file: give one", name, name)
	}
	b, err := os.ReadFile(file)
	if err != nil {
		return "", fmt.Errorf("--%s-file: %w", name, err)
	}
	s := strings.TrimSpace(string(b))
	if s == "" {
		return "", fmt.Errorf("--%s-file %s is empty", name, file)
	}
	if strings.ContainsAny(s, "\r\n\t ") {
		return "", fmt.Errorf("--%s-file %s: a token is one word without spaces or line breaks", name, file)
	}
	return s, nil
}
