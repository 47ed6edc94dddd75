//go:build linux

package main

import (
	"crypto/tls"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/tether-proxy/tether/internal/testcert"
)

// tlsSection measures TLS termination: tether and HAProxy with the same
// ECDSA P-256 certificate, the same key exchange (X25519) and cipher suite
// (TLS_AES_128_GCM_SHA256), in front of the same echo gateway, in the same
// rounds. The load generator's own TLS work is the same for both.
func tlsSection(b *strings.Builder, o options) error {
	progress("TLS: handshakes per second and bulk, tether vs HAProxy terminating TLS")
	ca, err := testcert.NewCA("tether bench CA")
	if err != nil {
		return err
	}
	leaf, err := ca.Issue("bench", "127.0.0.1")
	if err != nil {
		return err
	}
	certFile, keyFile, err := leaf.Write(o.tmp, "bench")
	if err != nil {
		return err
	}
	combined := filepath.Join(o.tmp, "bench.pem")
	if err := os.WriteFile(combined, append(append([]byte{}, leaf.CertPEM...), leaf.KeyPEM...), 0o600); err != nil {
		return err
	}
	e := &env{o: o}
	defer e.stop()
	stub, err := e.start("gateway-stub", "127.0.1.1", filepath.Join(o.bin, "gateway-stub"),
		"--id", "gw", "--proxy-protocol", "optional", "--log-level", "warn", "--echo-buffer", "16384")
	if err != nil {
		return err
	}
	tp, err := e.start("tether-tls", "127.0.0.1", filepath.Join(o.bin, "proxy"),
		append(proxyArgs(stub.addr, "off"), "--tls-cert", certFile, "--tls-key", keyFile)...)
	if err != nil {
		return err
	}
	hp, err := startHAProxyTLS(o.tmp, stub.addr, combined)
	if err != nil {
		return err
	}
	e.procs = append(e.procs, hp)
	client := &tls.Config{RootCAs: ca.Pool(), ServerName: "127.0.0.1", MinVersion: tls.VersionTLS13,
		CurvePreferences: []tls.CurveID{tls.X25519}}
	targets := []target{{name: "tether", addr: tp.addr, p: tp}, {name: "haproxy", addr: hp.addr, p: hp}}
	suites := map[string]string{}
	for _, t := range targets {
		tlsTargets.Store(t.addr, client)
		defer tlsTargets.Delete(t.addr)
		c, err := open(t.addr, sources[0], "probe")
		if err != nil {
			return fmt.Errorf("%s: %w", t.name, err)
		}
		st := c.(*tls.Conn).ConnectionState()
		suites[t.name] = tls.CipherSuiteName(st.CipherSuite) + ", " + tls.VersionName(st.Version)
		reset(c)
	}
	fmt.Fprintf(b, "## TLS termination\n\ntether (`--tls-cert`, Go's crypto/tls) and HAProxy %s (`bind ... ssl crt`, OpenSSL) terminate TLS with the same ECDSA P-256 certificate in front of the same echo gateway; the client offers only X25519 and TLS 1.3 (negotiated: tether %s; HAProxy %s). \"Handshakes\" are new connections: full TLS handshake (no resumption), hello, reply, reset, 32 workers; the load generator's TLS work is the same for both and shares the 2 cores. %d rounds, alternating; medians.\n\n",
		haproxyVersion(), suites["tether"], suites["haproxy"], o.rounds)
	fmt.Fprintf(b, "| metric | tether | HAProxy | tether / HAProxy |\n|---|---|---|---|\n")
	rate, err := rounds(targets, o.rounds, func(t target) (float64, error) { v, _, err := connRate(t.addr, 32, o.rateFor, 500000); return v, err })
	if err != nil {
		return err
	}
	fmt.Fprintf(b, "| TLS handshakes / s | %.0f | %.0f | **%.2f** |\n", median(rate["tether"]), median(rate["haproxy"]), median(rate["tether"])/median(rate["haproxy"]))
	cpu := map[string]time.Duration{}
	moved := map[string]int64{}
	bulkBytes := o.bulkBytes / 2
	res, err := rounds(targets, o.rounds, func(t target) (float64, error) {
		before, _ := statsOf(t.p.Pid())
		v, err := bulk(t.addr, 8, bulkBytes, 0)
		after, _ := statsOf(t.p.Pid())
		cpu[t.name] += after.cpu - before.cpu
		moved[t.name] += 2 * bulkBytes
		return v, err
	})
	if err != nil {
		return err
	}
	mib := func(v float64) string { return fmt.Sprintf("%.0f MiB/s", v/(1<<20)) }
	fmt.Fprintf(b, "| TLS bulk echo, 8 streams (each way) | %s | %s | **%.2f** |\n", mib(median(res["tether"])), mib(median(res["haproxy"])), median(res["tether"])/median(res["haproxy"]))
	gib := func(n string) float64 { return cpu[n].Seconds() / (float64(moved[n]) / (1 << 30)) }
	fmt.Fprintf(b, "| CPU seconds per GiB moved (TLS bulk) | %.2f | %.2f | %.2f (lower is better) |\n", gib("tether"), gib("haproxy"), gib("tether")/gib("haproxy"))
	n := 1000
	if o.quick {
		n = 50
	}
	for _, t := range targets {
		rss, fds, err := idleCost(t.addr, t.p.Pid(), n, 2*time.Second, false)
		if err != nil {
			return fmt.Errorf("%s idle TLS: %w", t.name, err)
		}
		fmt.Fprintf(b, "| idle TLS session, %s (%d sessions) | %.1f KiB, %.2f fds | | |\n", t.name, n, rss/1024, fds)
	}
	fmt.Fprintf(b, "\n")
	return nil
}

// startHAProxyTLS runs HAProxy terminating TLS with the combined PEM.
func startHAProxyTLS(dir, server, pem string) (*proc, error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	bind := fmt.Sprintf("127.0.0.1:%d", port)
	cfg := fmt.Sprintf(`global
    maxconn 9000
    ssl-default-bind-ciphersuites TLS_AES_128_GCM_SHA256
    ssl-default-bind-options ssl-min-ver TLSv1.2
defaults
    mode tcp
    timeout connect 5s
    timeout client 10m
    timeout server 10m
    option tcp-smart-accept
    option tcp-smart-connect
frontend fe
    bind %s ssl crt %s curves X25519
    default_backend be
backend be
    server s1 %s
`, bind, pem, server)
	path := filepath.Join(dir, fmt.Sprintf("haproxy-tls-%d.cfg", port))
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		return nil, err
	}
	return startProc("haproxy-tls", bind, false, haproxyBin(), "-db", "-f", path)
}
