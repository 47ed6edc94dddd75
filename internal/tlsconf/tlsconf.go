// Package tlsconf builds the proxy's TLS configurations from files and
// reloads them: certificates chosen by SNI (--tls-cert/--tls-key pairs, the
// first the default), session-ticket keys shared by a fleet
// (--tls-ticket-keys) and the CA that verifies gateways (--gateway-ca). A
// reload that fails keeps what was serving.
package tlsconf

import (
	"bytes"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Pair is a certificate file and its private key file (PEM).
type Pair struct{ Cert, Key string }

// Server is the client-facing TLS configuration. Its methods are safe for
// concurrent use.
type Server struct {
	pairs      []Pair
	ticketFile string

	certs atomic.Pointer[[]tls.Certificate]
	// Two configurations share certificates and ticket keys: plain, and
	// one that negotiates http/1.1 for clients offering it (browsers,
	// wss). A client with other ALPN protocols, or none, is served
	// without ALPN instead of refused.
	plain, h1 *tls.Config
	mu        sync.Mutex // serialises reloads
}

// NewServer loads pairs (at least one) and, if ticketFile is set, the
// ticket keys; without a file each process makes its own random key, so
// only a client returning to the same proxy resumes.
func NewServer(pairs []Pair, ticketFile string) (*Server, error) {
	if len(pairs) == 0 {
		return nil, errors.New("tls: no certificate")
	}
	s := &Server{pairs: slices.Clone(pairs), ticketFile: ticketFile}
	s.plain = &tls.Config{MinVersion: tls.VersionTLS12, GetCertificate: s.getCertificate, GetConfigForClient: s.forClient}
	s.h1 = &tls.Config{MinVersion: tls.VersionTLS12, GetCertificate: s.getCertificate, NextProtos: []string{"http/1.1"}}
	if err := s.Reload(); err != nil {
		return nil, err
	}
	return s, nil
}

// Config is the configuration for the proxy's listener.
func (s *Server) Config() *tls.Config { return s.plain }

func (s *Server) forClient(hello *tls.ClientHelloInfo) (*tls.Config, error) {
	if slices.Contains(hello.SupportedProtos, "http/1.1") {
		return s.h1, nil
	}
	return nil, nil
}

// getCertificate picks the first certificate the client supports (its SNI
// name among the certificate's names, its signature schemes), else the
// first one.
func (s *Server) getCertificate(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	certs := *s.certs.Load()
	if len(certs) > 1 {
		for i := range certs {
			if hello.SupportsCertificate(&certs[i]) == nil {
				return &certs[i], nil
			}
		}
	}
	return &certs[0], nil
}

// Reload re-reads every certificate pair and the ticket keys. If any file
// is unreadable or invalid, nothing changes and the error names the file.
func (s *Server) Reload() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	certs := make([]tls.Certificate, 0, len(s.pairs))
	for _, p := range s.pairs {
		c, err := tls.LoadX509KeyPair(p.Cert, p.Key)
		if err != nil {
			return fmt.Errorf("tls: certificate %s with key %s: %w", p.Cert, p.Key, err)
		}
		if c.Leaf != nil && time.Now().After(c.Leaf.NotAfter) {
			return fmt.Errorf("tls: certificate %s expired on %s", p.Cert, c.Leaf.NotAfter.Format(time.DateOnly))
		}
		certs = append(certs, c)
	}
	var keys [][32]byte
	if s.ticketFile != "" {
		k, err := ReadTicketKeys(s.ticketFile)
		if err != nil {
			return err
		}
		keys = k
	} else if s.certs.Load() == nil {
		var k [32]byte
		if _, err := rand.Read(k[:]); err != nil {
			return err
		}
		keys = [][32]byte{k}
	}
	s.certs.Store(&certs)
	if keys != nil {
		s.plain.SetSessionTicketKeys(keys)
		s.h1.SetSessionTicketKeys(keys)
	}
	return nil
}

// Names describes the certificates in service: each one's names and expiry.
func (s *Server) Names() []string {
	var out []string
	for _, c := range *s.certs.Load() {
		if c.Leaf == nil {
			continue
		}
		names := append(slices.Clone(c.Leaf.DNSNames), ipStrings(c.Leaf)...)
		if len(names) == 0 {
			names = []string{c.Leaf.Subject.CommonName}
		}
		out = append(out, fmt.Sprintf("%s (until %s)", strings.Join(names, ","), c.Leaf.NotAfter.Format(time.DateOnly)))
	}
	return out
}

func ipStrings(c *x509.Certificate) []string {
	out := make([]string, len(c.IPAddresses))
	for i, ip := range c.IPAddresses {
		out[i] = ip.String()
	}
	return out
}

// ReadTicketKeys reads session-ticket keys: one base64-encoded 32-byte key
// per line (openssl rand -base64 32), the first encrypting new tickets and
// all of them accepted, so a fleet rotates by putting a new key first on
// every proxy, and removing the old one a ticket lifetime (7 days) later.
// Blank lines and lines starting with # are ignored.
func ReadTicketKeys(path string) ([][32]byte, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("tls: ticket keys: %w", err)
	}
	var keys [][32]byte
	for i, line := range bytes.Split(raw, []byte("\n")) {
		line = bytes.TrimSpace(line)
		if len(line) == 0 || line[0] == '#' {
			continue
		}
		b, err := base64.StdEncoding.DecodeString(string(line))
		if err != nil || len(b) != 32 {
			return nil, fmt.Errorf("tls: ticket keys %s line %d: want 32 bytes in base64 (openssl rand -base64 32)", path, i+1)
		}
		keys = append(keys, [32]byte(b))
	}
	if len(keys) == 0 {
		return nil, fmt.Errorf("tls: ticket keys %s: no key", path)
	}
	return keys, nil
}

// Gateway is the configuration for TLS to gateways (--gateway-tls):
// certificates verified against the CA file (the system roots if empty).
// The name verified is the gateway address's host, set per connection.
func Gateway(caFile string) (*tls.Config, error) {
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if caFile == "" {
		return cfg, nil
	}
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("tls: gateway CA: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("tls: gateway CA %s: no PEM certificate in it", caFile)
	}
	cfg.RootCAs = pool
	return cfg, nil
}
