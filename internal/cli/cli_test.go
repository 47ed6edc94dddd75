package cli

import (
	"bytes"
	"errors"
	"flag"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"
)

func TestParseGateway(t *testing.T) {
	tests := []struct {
		in      string
		id      string
		addr    string
		weight  float64
		wantErr bool
	}{
		{in: "gw-1=127.0.1.1:9000", id: "gw-1", addr: "127.0.1.1:9000", weight: 1},
		{in: "gw-2=[::1]:9000,weight=2.5", id: "gw-2", addr: "[::1]:9000", weight: 2.5},
		{in: "gw-3=h:1,weight=0", id: "gw-3", addr: "h:1", weight: 0},
		{in: "=h:1", wantErr: true},
		{in: "gw", wantErr: true},
		{in: "gw=nohost", wantErr: true},
		{in: "gw=h:1,weight=-1", wantErr: true},
		{in: "gw=h:1,weight=x", wantErr: true},
		{in: "gw=h:1,color=red", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			m, err := ParseGateway(tt.in)
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v", err)
			}
			if err == nil && (m.ID != tt.id || m.Addr != tt.addr || m.Weight != tt.weight) {
				t.Fatalf("got %+v", m)
			}
		})
	}
}

func TestNewLogger(t *testing.T) {
	for _, f := range []string{"json", "console"} {
		if _, _, err := NewLogger("debug", f); err != nil {
			t.Fatal(err)
		}
	}
	if _, _, err := NewLogger("loud", "json"); err == nil {
		t.Fatal("bad level accepted")
	}
	if _, _, err := NewLogger("info", "xml"); err == nil {
		t.Fatal("bad format accepted")
	}
}

func TestApplyConfig(t *testing.T) {
	write := func(t *testing.T, body string) string {
		t.Helper()
		p := filepath.Join(t.TempDir(), "c.yaml")
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	type vals struct {
		listen string
		d      time.Duration
		join   string
		gws    GatewayList
		certs  StringList
	}
	newFS := func(v *vals) *flag.FlagSet {
		fs := flag.NewFlagSet("t", flag.ContinueOnError)
		fs.SetOutput(io.Discard)
		fs.StringVar(&v.listen, "listen", ":7000", "")
		fs.DurationVar(&v.d, "handshake-timeout", time.Second, "")
		fs.StringVar(&v.join, "join", "", "")
		fs.Var(&v.gws, "gateway", "")
		fs.Var(&v.certs, "tls-cert", "")
		fs.String("config", "", "")
		return fs
	}
	t.Run("values, lists, flags win", func(t *testing.T) {
		var v vals
		fs := newFS(&v)
		if err := fs.Parse([]string{"--listen", "127.0.0.1:1"}); err != nil {
			t.Fatal(err)
		}
		p := write(t, "listen: \":9999\"\nhandshake-timeout: 3s\njoin: [a:1, b:2]\ngateway:\n  - gw-1=h:1\n  - gw-2=h:2,weight=2\ntls-cert: [a.crt, \"b,c.crt\"]\n")
		if err := ApplyConfig(fs, p, SetOnCommandLine(fs), "config"); err != nil {
			t.Fatal(err)
		}
		if v.listen != "127.0.0.1:1" || v.d != 3*time.Second || v.join != "a:1,b:2" || len(v.gws) != 2 || v.gws[1].Weight != 2 ||
			len(v.certs) != 2 || v.certs[1] != "b,c.crt" {
			t.Fatalf("%+v", v)
		}
	})
	errs := []struct {
		name, body, want string
	}{
		{"unknown key", "listen: x\ncolour: red\n", `line 2: unknown key "colour"`},
		{"excluded key", "config: other.yaml\n", `unknown key "config"`},
		{"bad duration", "handshake-timeout: soon\n", "line 1: handshake-timeout"},
		{"bad gateway", "gateway: [nope]\n", "line 1: gateway"},
		{"duplicate", "listen: a\nlisten: b\n", "already set on line 1"},
		{"not a mapping", "- a\n- b\n", "want a mapping"},
		{"nested", "listen: {a: b}\n", "line 1: listen"},
		{"yaml syntax", "listen: [\n", "line 1: did not find expected node content"},
		// yaml.v3 itself blames line 1 (0-based start of the mapping) here.
		{"item in a mapping", "listen: a\n- x\n", "line 2: did not find expected key"},
		{"indented key", "listen: a\nadmin: b\n  log-level: c\n", "line 3: mapping values"},
		{"tab", "listen: a\n\tadmin: b\n", "line 2: found a tab"},
		{"unclosed flow", "listen: a\nadmin: b\ngateway: [a=1:2,\nlog-level: x\n", "line 3: did not find expected ','"},
		{"after a long flow", "gateway: [a=h:1,\n  b=h:2]\nlisten: a\nlisten b\nadmin: c\n", "line 4: could not find expected ':'"},
		{"unterminated quote", "listen: a\nadmin: \"x\n", "line 2: found unexpected end of stream"},
	}
	for _, tt := range errs {
		t.Run(tt.name, func(t *testing.T) {
			var v vals
			fs := newFS(&v)
			err := ApplyConfig(fs, write(t, tt.body), nil, "config")
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want it to contain %q", err, tt.want)
			}
		})
	}
	var v vals
	if err := ApplyConfig(newFS(&v), write(t, ""), nil); err != nil {
		t.Fatalf("empty file: %v", err)
	}
}

func TestReadGossipKeyring(t *testing.T) {
	dir := t.TempDir()
	k16 := "MDEyMzQ1Njc4OWFiY2RlZg==" // "0123456789abcdef"
	k32 := "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="
	raw24 := "\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a\x0b\x0c\x0d\x0e\x0f\x10\x11\x12\x13\x14\x15\x16\x17\xff"
	tests := []struct {
		name    string
		content string
		keys    int
		first   int // length of the primary key
		wantErr string
	}{
		{"one base64 key", k16 + "\n", 1, 16, ""},
		{"raw bytes", raw24, 1, 24, ""},
		{"keyring", "# rotation in progress\n" + k32 + "\n\n" + k16 + "\n", 2, 32, ""},
		{"duplicate keys count once", k16 + "\n" + k16 + "\n", 1, 16, ""},
		{"bad line", k16 + "\nnot-a-key\n", 0, 0, "line 2"},
		{"wrong length", "YWJj\n", 0, 0, "line 1"},
		{"empty", "# nothing\n", 0, 0, "no key"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := filepath.Join(dir, strings.ReplaceAll(tt.name, " ", "_"))
			if err := os.WriteFile(p, []byte(tt.content), 0o600); err != nil {
				t.Fatal(err)
			}
			keys, err := ReadGossipKeyring(p)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil || len(keys) != tt.keys || len(keys[0]) != tt.first {
				t.Fatalf("keys %d (first %d bytes), err %v", len(keys), len(keys[0]), err)
			}
		})
	}
}

func TestGossipFlagsValidate(t *testing.T) {
	key := filepath.Join(t.TempDir(), "key")
	if err := os.WriteFile(key, []byte("MDEyMzQ1Njc4OWFiY2RlZg==\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		g    GossipFlags
		ok   bool
	}{
		{"off", GossipFlags{}, true},
		{"loopback without key", GossipFlags{Bind: "127.0.0.1:7946"}, true},
		{"localhost without key", GossipFlags{Bind: "localhost:7946"}, true},
		{"ipv6 loopback without key", GossipFlags{Bind: "[::1]:7946"}, true},
		{"all interfaces without key", GossipFlags{Bind: "0.0.0.0:7946"}, false},
		{"bare port without key", GossipFlags{Bind: ":7946"}, false},
		{"private address without key", GossipFlags{Bind: "10.0.0.5:7946"}, false},
		{"hostname without key", GossipFlags{Bind: "gw.internal:7946"}, false},
		{"private address, insecure", GossipFlags{Bind: "10.0.0.5:7946", Insecure: true}, true},
		{"private address with key", GossipFlags{Bind: "10.0.0.5:7946", KeyFile: key}, true},
		{"missing key file", GossipFlags{Bind: "10.0.0.5:7946", KeyFile: key + ".nope"}, false},
		{"join without bind", GossipFlags{Join: "10.0.0.5:7946"}, false},
		{"insecure without bind", GossipFlags{Insecure: true}, false},
	}
	for _, tt := range tests {
		err := tt.g.Validate()
		if (err == nil) != tt.ok {
			t.Errorf("%s: err = %v", tt.name, err)
		}
		if !tt.ok && !tt.g.Insecure && tt.g.KeyFile == "" && tt.g.Bind != "" && !errors.Is(err, ErrInsecureGossip) {
			t.Errorf("%s: err = %v, want ErrInsecureGossip", tt.name, err)
		}
	}
}

func TestParsePrefixes(t *testing.T) {
	ps, err := ParsePrefixes("10.0.0.0/8, 127.0.0.1,::1")
	if err != nil || len(ps) != 3 || ps[1].Bits() != 32 || ps[2].Bits() != 128 {
		t.Fatalf("%v %v", ps, err)
	}
	for _, bad := range []string{"10.0.0.0/33", "nope", "1.2.3.4/x"} {
		if _, err := ParsePrefixes(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

// TestApplyConfigAfterParse: the flag wrappers Parse installs (for clear
// value errors) keep lists working in the config file.
func TestApplyConfigAfterParse(t *testing.T) {
	var gws GatewayList
	var d time.Duration
	fs := flag.NewFlagSet("t", flag.ContinueOnError)
	fs.Var(&gws, "gateway", "")
	fs.DurationVar(&d, "dial-timeout", time.Second, "")
	if err := Parse(fs, nil, io.Discard); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "c.yaml")
	if err := os.WriteFile(path, []byte("gateway:\n  - a=10.0.0.1:1\n  - b=10.0.0.2:1\ndial-timeout: 5\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	err := ApplyConfig(fs, path, nil)
	if len(gws) != 2 || err == nil || !strings.Contains(err.Error(), `line 4: dial-timeout: want a duration like 2s`) {
		t.Fatalf("gateways %v, err %v", gws, err)
	}
	if err := Parse(fs, []string{"--dial-timeout", "x"}, io.Discard); err == nil || err.Error() != `--dial-timeout: want a duration like 2s, 500ms or 1m30s, got "x"` {
		t.Fatalf("flag error: %v", err)
	}
}

func TestVersionFlag(t *testing.T) {
	var out bytes.Buffer
	old := VersionOutput
	VersionOutput = &out
	defer func() { VersionOutput = old }()
	fs := flag.NewFlagSet("proxy", flag.ContinueOnError)
	fs.String("listen", ":7000", "")
	err := Parse(fs, []string{"--version"}, io.Discard)
	if !errors.Is(err, ErrVersion) {
		t.Fatalf("Parse(--version) = %v", err)
	}
	if code, ok := FlagOutcome("proxy", err, io.Discard); code != 0 || ok {
		t.Fatalf("FlagOutcome after --version: %d %v", code, ok)
	}
	if !strings.HasPrefix(out.String(), "proxy ") || !strings.Contains(out.String(), "revision ") || !strings.Contains(out.String(), runtime.Version()) {
		t.Fatalf("--version printed %q", out.String())
	}
	cfg := filepath.Join(t.TempDir(), "c.yaml")
	if err := os.WriteFile(cfg, []byte("version: true\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := ApplyConfig(fs, cfg, nil); err == nil {
		t.Fatal("version accepted in a config file")
	}
}
