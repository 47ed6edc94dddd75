package main

import (
	"bytes"
	"io"
	"strings"
	"testing"
)

func TestFlagErrors(t *testing.T) {
	gw := []string{"--gateway", "gw-1=127.0.1.1:9000"}
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"no gateways", nil, "no gateways"},
		{"bad gateway", []string{"--gateway", "nope"}, "ID=HOST:PORT"},
		{"bad pp mode", append(gw, "--proxy-protocol-out", "v1"), "--proxy-protocol-out"},
		{"max hello", append(gw, "--max-hello", "2"), "--max-hello"},
		{"max tries", append(gw, "--max-tries", "0"), "--max-tries"},
		{"stray arg", append(gw, "extra"), "unexpected argument"},
		{"bad log level", append(gw, "--log-level", "loud"), "--log-level"},
		{"pp-in without trusted", append(gw, "--proxy-protocol-in", "require"), "--trusted-proxies"},
		{"pp-in bad mode", append(gw, "--proxy-protocol-in", "maybe"), "--proxy-protocol-in"},
		{"bad trusted", append(gw, "--proxy-protocol-in", "optional", "--trusted-proxies", "10.0.0.0/99"), "--trusted-proxies"},
		{"bad redis url", append(gw, "--redis", "http://x"), "--redis"},
		{"gossip flag without bind", append(gw, "--join", "127.0.0.1:7946"), "--gossip-bind"},
		{"listen port out of range", append(gw, "--listen", "127.0.0.1:99999", "--check-config"), `port "99999"`},
		{"bad duration", append(gw, "--dial-timeout", "5"), `--dial-timeout: want a duration like 2s`},
		{"bad number", append(gw, "--max-tries", "three"), `--max-tries: want a whole number, got "three"`},
		{"supervise without pid file", append(gw, "--supervise"), `--supervise needs --pid-file`},
		{"zero upgrade timeout", append(gw, "--upgrade-timeout", "0s"), `--upgrade-timeout must be > 0`},
		{"gateway without host", []string{"--gateway", "gw-1=:9000"}, "needs a host"},
		{"join port out of range", append(gw, "--gossip-bind", "127.0.0.1:0", "--join", "127.0.0.1:70000"), `--join "127.0.0.1:70000"`},
		{"public gossip without key", append(gw, "--gossip-bind", "0.0.0.0:7946"), "--gossip-key"},
		{"all-interfaces gossip without key", append(gw, "--gossip-bind", ":7946"), "--gossip-insecure"},
		{"bad gossip key file", append(gw, "--gossip-bind", "127.0.0.1:0", "--gossip-key", "/nonexistent"), "--gossip-key"},
		{"public admin without token", append(gw, "--admin", "0.0.0.0:7100"), "--admin-token"},
		{"token and token file", append(gw, "--admin-token", "a", "--admin-token-file", "/dev/null"), "give one"},
		{"missing token file", append(gw, "--lookup-token-file", "/nonexistent"), "--lookup-token-file"},
		{"empty token file", append(gw, "--lookup-token-file", "/dev/null"), "is empty"},
		{"lookup token is the admin token", append(gw, "--admin-token", "same", "--lookup-token", "same"), "must not be able to drain"},
		{"missing config", append(gw, "--config", "/nonexistent.yaml"), "config"},
		{"bad key-from", append(gw, "--key-from", "cookie:"), "--key-from"},
		{"bad no-key", append(gw, "--no-key", "guess"), "--no-key"},
		{"negative event loops", append(gw, "--event-loops", "-1"), "--event-loops"},
		{"duplicate id", []string{"--gateway", "a=h:1", "--gateway", "a=h:2", "--listen", "127.0.0.1:0"}, "duplicate"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stderr bytes.Buffer
			code := run(tt.args, nil, io.Discard, &stderr)
			if code == 0 || !strings.Contains(stderr.String(), tt.want) {
				t.Fatalf("exit %d, stderr %q, want it to mention %q", code, stderr.String(), tt.want)
			}
		})
	}
}

func TestHelpListsEveryFlag(t *testing.T) {
	var stderr bytes.Buffer
	if code := run([]string{"--help"}, nil, io.Discard, &stderr); code != 0 {
		t.Fatalf("--help exit %d", code)
	}
	for _, f := range []string{"--listen", "--admin", "--gateway", "--proxy-protocol-out", "--handshake-timeout",
		"--max-hello", "--max-tries", "--dial-timeout", "--gateway-cooldown", "--max-conns", "--drain-timeout",
		"--log-level", "--log-format", "--proxy-protocol-in", "--trusted-proxies", "--redis", "--binding-ttl",
		"--redis-timeout", "--config", "--check-config", "--admin-token", "--no-park", "--park-after", "--event-loops", "--key-from", "--no-key", "--pprof", "--client-keepalive", "--gossip-bind", "--join", "--node-name", "--gossip-key", "--gossip-profile",
		"--admin-token-file", "--lookup-token", "--lookup-token-file"} {
		if out := stderr.String(); !strings.Contains(out, "  "+f+" ") && !strings.Contains(out, "  "+f+"\n") {
			t.Errorf("--help does not document %s", f)
		}
	}
}

func TestMergeSeeds(t *testing.T) {
	got := mergeSeeds([]string{"a:1", "b:2"}, []string{"b:2", "c:3", "a:1"})
	if strings.Join(got, ",") != "a:1,b:2,c:3" {
		t.Fatalf("mergeSeeds = %v", got)
	}
}
