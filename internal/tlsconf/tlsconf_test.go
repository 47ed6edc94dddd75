package tlsconf

import (
	"crypto/tls"
	"encoding/base64"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/tether-proxy/tether/internal/testcert"
)

func pair(t *testing.T, ca *testcert.CA, dir, name string, hosts ...string) Pair {
	t.Helper()
	leaf, err := ca.Issue(name, hosts...)
	if err != nil {
		t.Fatal(err)
	}
	c, k, err := leaf.Write(dir, name)
	if err != nil {
		t.Fatal(err)
	}
	return Pair{Cert: c, Key: k}
}

// serve runs a TLS echo of one byte on cfg and returns its address.
func serve(t *testing.T, cfg *tls.Config) string {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				b := make([]byte, 1)
				if _, err := c.Read(b); err == nil {
					c.Write(b)
				}
			}()
		}
	}()
	return ln.Addr().String()
}

func handshake(t *testing.T, addr string, cfg *tls.Config) tls.ConnectionState {
	t.Helper()
	c, err := tls.Dial("tcp", addr, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte("x"))
	if _, err := c.Read(make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
	return c.ConnectionState()
}

func TestSNIAndALPN(t *testing.T) {
	dir := t.TempDir()
	ca, _ := testcert.NewCA("ca")
	s, err := NewServer([]Pair{pair(t, ca, dir, "default", "a.test"), pair(t, ca, dir, "b", "b.test")}, "")
	if err != nil {
		t.Fatal(err)
	}
	addr := serve(t, s.Config())
	tests := []struct {
		sni, wantCN string
		alpn        []string
		wantProto   string
	}{
		{"b.test", "b", nil, ""},
		{"a.test", "default", []string{"http/1.1"}, "http/1.1"},
		{"b.test", "b", []string{"h2", "http/1.1"}, "http/1.1"},
		{"b.test", "b", []string{"tether"}, ""}, // an unknown protocol is served without ALPN
	}
	for _, tt := range tests {
		st := handshake(t, addr, &tls.Config{RootCAs: ca.Pool(), ServerName: tt.sni, NextProtos: tt.alpn})
		if cn := st.PeerCertificates[0].Subject.CommonName; cn != tt.wantCN || st.NegotiatedProtocol != tt.wantProto {
			t.Errorf("SNI %s ALPN %v: certificate %s, protocol %q; want %s, %q", tt.sni, tt.alpn, cn, st.NegotiatedProtocol, tt.wantCN, tt.wantProto)
		}
	}
	// No SNI at all: the first certificate.
	st := handshake(t, addr, &tls.Config{InsecureSkipVerify: true})
	if cn := st.PeerCertificates[0].Subject.CommonName; cn != "default" {
		t.Errorf("no SNI: certificate %s, want default", cn)
	}
}

func TestReloadKeepsOldOnError(t *testing.T) {
	dir := t.TempDir()
	ca, _ := testcert.NewCA("ca")
	p := pair(t, ca, dir, "one", "x.test")
	s, err := NewServer([]Pair{p}, "")
	if err != nil {
		t.Fatal(err)
	}
	addr := serve(t, s.Config())
	if err := os.WriteFile(p.Cert, []byte("not a certificate"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := s.Reload(); err == nil || !strings.Contains(err.Error(), p.Cert) {
		t.Fatalf("Reload with a broken file = %v, want an error naming it", err)
	}
	if cn := handshake(t, addr, &tls.Config{RootCAs: ca.Pool(), ServerName: "x.test"}).PeerCertificates[0].Subject.CommonName; cn != "one" {
		t.Fatalf("after a failed reload: %s", cn)
	}
	leaf, _ := ca.Issue("two", "x.test")
	if _, _, err := leaf.Write(dir, "one"); err != nil {
		t.Fatal(err)
	}
	if err := s.Reload(); err != nil {
		t.Fatal(err)
	}
	if cn := handshake(t, addr, &tls.Config{RootCAs: ca.Pool(), ServerName: "x.test"}).PeerCertificates[0].Subject.CommonName; cn != "two" {
		t.Fatalf("after a good reload: %s, want two", cn)
	}
}

// TestSharedTicketKeysResumeAcrossServers: a session ticket from one
// server resumes on another with the same key file.
func TestSharedTicketKeysResumeAcrossServers(t *testing.T) {
	dir := t.TempDir()
	ca, _ := testcert.NewCA("ca")
	p := pair(t, ca, dir, "srv", "r.test")
	keys := filepath.Join(dir, "tickets")
	k := base64.StdEncoding.EncodeToString(make([]byte, 32))
	os.WriteFile(keys, []byte("# current first\n"+k+"\n"), 0o600)
	var addrs []string
	for range 2 {
		s, err := NewServer([]Pair{p}, keys)
		if err != nil {
			t.Fatal(err)
		}
		addrs = append(addrs, serve(t, s.Config()))
	}
	client := &tls.Config{RootCAs: ca.Pool(), ServerName: "r.test", ClientSessionCache: tls.NewLRUClientSessionCache(4)}
	if handshake(t, addrs[0], client).DidResume {
		t.Fatal("first handshake resumed")
	}
	if !handshake(t, addrs[1], client).DidResume {
		t.Fatal("the other server did not resume the session")
	}
}

func TestReadTicketKeysErrors(t *testing.T) {
	dir := t.TempDir()
	for name, body := range map[string]string{
		"empty":      "# nothing\n",
		"short":      base64.StdEncoding.EncodeToString(make([]byte, 16)) + "\n",
		"not base64": "!!!\n",
	} {
		path := filepath.Join(dir, name)
		os.WriteFile(path, []byte(body), 0o600)
		if _, err := ReadTicketKeys(path); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
}
