//go:build e2e

package e2e

import (
	"bytes"
	"crypto/sha256"
	"crypto/tls"
	"encoding/base64"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/tether-proxy/tether/internal/stub"
	"github.com/tether-proxy/tether/internal/testcert"
	"github.com/tether-proxy/tether/internal/testenv"
	"github.com/tether-proxy/tether/pkg/proto"
)

// tlsSetup is a throwaway CA, a proxy certificate for proxy.test and
// 127.0.0.1 on disk, and a ticket-key file, as an operator would have.
type tlsSetup struct {
	ca                      *testcert.CA
	leaf                    *testcert.Leaf
	dir, cert, key, tickets string
}

func newTLSSetup(t *testing.T) *tlsSetup {
	t.Helper()
	ca, err := testcert.NewCA("tether e2e CA")
	if err != nil {
		t.Fatal(err)
	}
	s := &tlsSetup{ca: ca, dir: t.TempDir()}
	s.issue(t, "proxy-1")
	k := make([]byte, 32)
	for i := range k {
		k[i] = byte(i * 7)
	}
	s.tickets = filepath.Join(s.dir, "tickets")
	if err := os.WriteFile(s.tickets, []byte(base64.StdEncoding.EncodeToString(k)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return s
}

// issue writes a new certificate with common name cn over the files.
func (s *tlsSetup) issue(t *testing.T, cn string) {
	t.Helper()
	leaf, err := s.ca.Issue(cn, "proxy.test", "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	s.leaf = leaf
	if s.cert, s.key, err = leaf.Write(s.dir, "proxy"); err != nil {
		t.Fatal(err)
	}
}

func (s *tlsSetup) args() []string {
	return []string{"--tls-cert", s.cert, "--tls-key", s.key, "--tls-ticket-keys", s.tickets}
}

// client is a TLS client configuration trusting the CA; cache, if set,
// keeps session tickets.
func (s *tlsSetup) client(cache tls.ClientSessionCache) *tls.Config {
	return &tls.Config{RootCAs: s.ca.Pool(), ServerName: "proxy.test", ClientSessionCache: cache}
}

// tlsSession is session over TLS: it connects from src, handshakes, sends
// the hello and a message, reads the reply and the echo, and closes.
func tlsSession(via, src, key string, cfg *tls.Config) (stub.Reply, tls.ConnectionState, error) {
	c, err := tlsOpen(via, src, key, cfg)
	if err != nil {
		return stub.Reply{}, tls.ConnectionState{}, err
	}
	defer c.Close()
	rep := c.reply
	msg := []byte("tls echo " + key)
	if _, err := c.Write(msg); err != nil {
		return rep, c.ConnectionState(), err
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, msg) {
		return rep, c.ConnectionState(), fmt.Errorf("echo %q: %v", got, err)
	}
	return rep, c.ConnectionState(), nil
}

type tlsConn struct {
	*tls.Conn
	reply stub.Reply
}

// tlsOpen opens a TLS session and reads the gateway's reply.
func tlsOpen(via, src, key string, cfg *tls.Config) (*tlsConn, error) {
	d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
	c, err := tls.DialWithDialer(&d, "tcp", via, cfg)
	if err != nil {
		return nil, err
	}
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	h, _ := proto.AppendHello(nil, []byte(key), nil)
	if _, err := c.Write(h); err != nil {
		c.Close()
		return nil, err
	}
	rep, _, err := stub.ReadReply(c)
	if err != nil {
		c.Close()
		return nil, err
	}
	return &tlsConn{Conn: c, reply: rep}, nil
}

// tlsProxies starts three gateways and two TLS proxies over them.
func tlsProxies(t *testing.T, s *tlsSetup) (a, b *proc) {
	t.Helper()
	gws := []*proc{gatewayStub(t, 1, 0), gatewayStub(t, 2, 0), gatewayStub(t, 3, 0)}
	extra := append(s.args(), "--key-from", "hello,cookie:sid,query:sid")
	return proxyFor(t, gws, extra...), proxyFor(t, gws, extra...)
}

// TestTLSWiFiTo4G: 30 keys over TLS from 127.0.0.2 through one proxy, then
// from 127.0.0.3 through the other: every key on the same gateway, which
// sees the client's new address; the same for WebSockets over wss:// with
// the key in a cookie; a cleartext client on the TLS port gets nothing.
func TestTLSWiFiTo4G(t *testing.T) {
	s := newTLSSetup(t)
	a, b := tlsProxies(t, s)
	for _, key := range keyList("tls", 30) {
		r1, _, err := tlsSession(a.addr, "127.0.0.2", key, s.client(nil))
		if err != nil {
			t.Fatalf("%s via the first proxy: %v", key, err)
		}
		r2, _, err := tlsSession(b.addr, "127.0.0.3", key, s.client(nil))
		if err != nil {
			t.Fatalf("%s via the second proxy: %v", key, err)
		}
		if r1.Gateway != r2.Gateway {
			t.Errorf("%s: gateway %s on WiFi, %s on 4G", key, r1.Gateway, r2.Gateway)
		}
		if !strings.HasPrefix(r1.Client, "127.0.0.2:") || !strings.HasPrefix(r2.Client, "127.0.0.3:") {
			t.Errorf("%s: the gateway saw clients %s and %s", key, r1.Client, r2.Client)
		}
	}
	wssCfg := s.client(nil)
	for _, key := range keyList("wss", 10) {
		r1, _, got1, err := wsSessionTLS(a.addr, "127.0.0.2", key, wssCfg)
		if err != nil {
			t.Fatalf("wss %s via the first proxy: %v", key, err)
		}
		r2, _, _, err := wsSessionTLS(b.addr, "127.0.0.3", key, wssCfg)
		if err != nil {
			t.Fatalf("wss %s via the second proxy: %v", key, err)
		}
		if r1.Gateway != r2.Gateway || !strings.HasPrefix(r2.Client, "127.0.0.3:") {
			t.Errorf("wss %s: gateway %s then %s, client %s", key, r1.Gateway, r2.Gateway, r2.Client)
		}
		if bytes.Contains(got1, []byte("127.0.1.")) {
			t.Errorf("wss %s: a gateway address reached the client", key)
		}
	}
	// Cleartext on the TLS port: closed with zero bytes, counted.
	c, err := net.Dial("tcp", a.addr)
	if err != nil {
		t.Fatal(err)
	}
	h, _ := proto.AppendHello(nil, []byte("plain"), nil)
	c.Write(h)
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if got, _ := io.ReadAll(c); len(got) != 0 {
		t.Fatalf("a cleartext client got %q", got)
	}
	c.Close()
	waitFor(t, 5*time.Second, "the cleartext client counted", func() bool {
		return metrics(t, a)[`tether_handshake_failures_total{reason="tls"}`] == 1
	})
	t.Logf("30 TLS keys and 10 wss keys kept their gateway across two proxies and two client addresses")
}

// TestTLSCertificateRotation: with 30 TLS sessions open, the certificate
// files are replaced and SIGHUP reloads them: new handshakes get the new
// certificate and every open session still echoes. A broken replacement
// keeps the new certificate serving, with one error line and a count.
func TestTLSCertificateRotation(t *testing.T) {
	s := newTLSSetup(t)
	gw := gatewayStub(t, 1, 0)
	p := proxyFor(t, []*proc{gw}, s.args()...)
	var open []*tlsConn
	for _, key := range keyList("rot", 30) {
		c, err := tlsOpen(p.addr, "127.0.0.2", key, s.client(nil))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		open = append(open, c)
	}
	served := func() string {
		_, st, err := tlsSession(p.addr, "127.0.0.3", "probe", s.client(nil))
		if err != nil {
			t.Fatal(err)
		}
		return st.PeerCertificates[0].Subject.CommonName
	}
	if cn := served(); cn != "proxy-1" {
		t.Fatalf("certificate %s before rotation", cn)
	}
	s.issue(t, "proxy-2")
	if err := p.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	waitLog(t, p, "SIGHUP: reloaded TLS certificates", 5*time.Second)
	if cn := served(); cn != "proxy-2" {
		t.Fatalf("certificate %s after rotation, want proxy-2", cn)
	}
	for i, c := range open {
		msg := []byte(fmt.Sprintf("after rotation %d", i))
		c.Write(msg)
		got := make([]byte, len(msg))
		if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, msg) {
			t.Fatalf("open session %d after rotation: %q %v", i, got, err)
		}
	}
	if err := os.WriteFile(s.cert, []byte("-----BEGIN CERTIFICATE-----\ngarbage\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	waitLog(t, p, "SIGHUP: TLS files rejected; the certificates in service stay", 5*time.Second)
	if cn := served(); cn != "proxy-2" {
		t.Fatalf("certificate %s after a broken replacement, want proxy-2 still", cn)
	}
	if n := p.logCount("SIGHUP: TLS files rejected; the certificates in service stay", ""); n != 1 {
		t.Errorf("%d error lines for one broken reload, want 1", n)
	}
	if got := metrics(t, p)["tether_tls_reload_errors_total"]; got != 1 {
		t.Errorf("tls_reload_errors_total = %v, want 1", got)
	}
}

// TestTLSResumeOnOtherProxy: a client that reconnects to the other proxy
// resumes its TLS session there (the proxies share --tls-ticket-keys).
func TestTLSResumeOnOtherProxy(t *testing.T) {
	s := newTLSSetup(t)
	a, b := tlsProxies(t, s)
	cfg := s.client(tls.NewLRUClientSessionCache(8))
	_, st, err := tlsSession(a.addr, "127.0.0.2", "resume", cfg)
	if err != nil || st.DidResume {
		t.Fatalf("first connection: resumed %v, %v", st.DidResume, err)
	}
	_, st, err = tlsSession(b.addr, "127.0.0.3", "resume", cfg)
	if err != nil || !st.DidResume {
		t.Fatalf("reconnect to the other proxy: resumed %v, %v", st.DidResume, err)
	}
	if got := metrics(t, b)[`tether_tls_handshakes_total{resumed="true"}`]; got != 1 {
		t.Errorf("second proxy counted %v resumed handshakes, want 1", got)
	}
}

// TestBrowserHTTPSAndWSS: headless Chromium loads the gateway stub's page
// over https through a TLS proxy (the test CA's certificate trusted by its
// key's hash), the page opens wss://, reconnects, and both WebSockets
// report the same gateway.
func TestBrowserHTTPSAndWSS(t *testing.T) {
	chromium := testenv.Need(t, "chromium")
	s := newTLSSetup(t)
	gws := []*proc{gatewayStub(t, 1, 0), gatewayStub(t, 2, 0), gatewayStub(t, 3, 0)}
	p := proxyFor(t, gws, append(s.args(), "--key-from", "cookie:sid,query:sid")...)
	spki := sha256.Sum256(s.leaf.Cert.RawSubjectPublicKeyInfo)
	log := browse(t, chromium, "https://"+p.addr+"/?sid=browser-tls-1", "browser-wss.png",
		chromedp.Flag("ignore-certificate-errors-spki-list", base64.StdEncoding.EncodeToString(spki[:])))
	gw, conns := sameGatewayTwice(t, log, "browser-tls-1")
	if got := metrics(t, p)[`tether_tls_handshakes_total{resumed="false"}`] + metrics(t, p)[`tether_tls_handshakes_total{resumed="true"}`]; got < 3 {
		t.Errorf("%v TLS handshakes for a page and two WebSockets", got)
	}
	t.Logf("browser over https: both wss:// connections on gateway %s (conns %s)", gw, conns)
}

// TestTLSBehindHAProxyPassthrough: HAProxy (the example configuration,
// TCP passthrough with send-proxy-v2) in front of two TLS proxies: TLS
// clients from two addresses keep their gateway, which sees each client's
// real address, and resume their TLS session whichever proxy HAProxy picks.
func TestTLSBehindHAProxyPassthrough(t *testing.T) {
	s := newTLSSetup(t)
	gws := []*proc{gatewayStub(t, 1, 0), gatewayStub(t, 2, 0), gatewayStub(t, 3, 0)}
	extra := append(s.args(), "--proxy-protocol-in", "require", "--trusted-proxies", "127.0.0.1/32")
	a, b := proxyFor(t, gws, extra...), proxyFor(t, gws, extra...)
	lb := testenv.StartHAProxy(t, haproxyCfg,
		"TETHER_PROXY1="+a.addr, "TETHER_PROXY2="+b.addr,
		"TETHER_ADMIN1_PORT="+portOf(a.admin), "TETHER_ADMIN2_PORT="+portOf(b.admin))
	lb.WaitServers(t, "UP", "proxy1", "proxy2")
	cache := tls.NewLRUClientSessionCache(64)
	resumed := 0
	for _, key := range keyList("slb-tls", 20) {
		var gw string
		for hop, src := range []string{"127.0.0.2", "127.0.0.3"} {
			rep, st, err := tlsSession(lb.Bind, src, key, s.client(cache))
			if err != nil {
				t.Fatalf("%s hop %d: %v", key, hop, err)
			}
			if !strings.HasPrefix(rep.Client, src+":") {
				t.Errorf("%s: the gateway saw %s, the client is %s", key, rep.Client, src)
			}
			if hop == 0 {
				gw = rep.Gateway
			} else if rep.Gateway != gw {
				t.Errorf("%s: gateway %s then %s", key, gw, rep.Gateway)
			}
			if st.DidResume {
				resumed++
			}
		}
	}
	if resumed < 20 {
		t.Errorf("%d of 40 connections resumed their TLS session, want at least 20 (every second one)", resumed)
	}
	t.Logf("20 keys × 2 addresses through HAProxy passthrough: same gateway, real client address; %d of 40 handshakes resumed", resumed)
}
