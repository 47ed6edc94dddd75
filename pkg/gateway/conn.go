package gateway

import (
	"io"
	"net"
	"sync"
	"time"
)

// Conn is a connection from a tether proxy whose handshake is done. Read
// returns the bytes that followed the hello frame (in order, including any
// that arrived with it); for an HTTP request nothing was consumed and Read
// returns the request from its first byte. Close is idempotent.
type Conn struct {
	raw     net.Conn
	l       *Listener
	key     string
	client  net.Addr
	payload []byte
	http    bool

	mu      sync.Mutex
	pending []byte // read past the hello during the handshake
	closed  bool
}

var _ net.Conn = (*Conn)(nil)

// Key is the session key: from the hello frame, or from the proxy's key
// TLV when the client's bytes are not a hello (an HTTP upgrade routed by
// header, cookie or query).
func (c *Conn) Key() string { return c.key }

// ClientAddr is the client's address: from a trusted proxy's PROXY header,
// else the TCP peer (a LOCAL header also means the TCP peer).
func (c *Conn) ClientAddr() net.Addr { return c.client }

// Payload is the application bytes inside the hello frame (nil for HTTP or
// when the key came from the TLV alone). The slice is the caller's.
func (c *Conn) Payload() []byte { return c.payload }

// HTTP reports whether the client's bytes are an HTTP request, left
// unread for the application.
func (c *Conn) HTTP() bool { return c.http }

// Read reads what the client sent after its hello.
func (c *Conn) Read(b []byte) (int, error) {
	c.mu.Lock()
	if len(c.pending) > 0 {
		n := copy(b, c.pending)
		c.pending = c.pending[n:]
		if len(c.pending) == 0 {
			c.pending = nil
		}
		c.mu.Unlock()
		return n, nil
	}
	c.mu.Unlock()
	return c.raw.Read(b)
}

// WriteTo copies what the client sends to w until EOF; between two TCP
// connections (an echo, a relay) Linux moves the bytes with splice(2).
func (c *Conn) WriteTo(w io.Writer) (int64, error) {
	c.mu.Lock()
	p := c.pending
	c.pending = nil
	c.mu.Unlock()
	var n int64
	if len(p) > 0 {
		m, err := w.Write(p)
		n += int64(m)
		if err != nil {
			return n, err
		}
	}
	if rf, ok := w.(io.ReaderFrom); ok {
		m, err := rf.ReadFrom(c.raw)
		return n + m, err
	}
	m, err := io.Copy(w, c.raw)
	return n + m, err
}

// ReadFrom writes what r yields to the connection; from another *Conn or a
// TCP connection it splices.
func (c *Conn) ReadFrom(r io.Reader) (int64, error) {
	if src, ok := r.(*Conn); ok {
		return src.WriteTo(c.raw)
	}
	if rf, ok := c.raw.(io.ReaderFrom); ok {
		return rf.ReadFrom(r)
	}
	return io.Copy(c.raw, r)
}

// Write writes to the client.
func (c *Conn) Write(b []byte) (int, error) { return c.raw.Write(b) }

// Close closes the connection.
func (c *Conn) Close() error {
	if !c.markClosed() {
		return nil
	}
	return c.raw.Close()
}

// CloseWrite half-closes the connection (FIN toward the client, through the
// proxy) when it is TCP.
func (c *Conn) CloseWrite() error {
	if cw, ok := c.raw.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return c.raw.Close()
}

// abort closes with a reset (the proxy then ends the client's session at
// once); it reports whether this call closed the connection.
func (c *Conn) abort() bool {
	if !c.markClosed() {
		return false
	}
	abortConn(c.raw)
	return true
}

func (c *Conn) markClosed() bool {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return false
	}
	c.closed = true
	c.mu.Unlock()
	if c.l != nil {
		c.l.forget(c)
	}
	return true
}

// LocalAddr is the gateway's end of the TCP connection.
func (c *Conn) LocalAddr() net.Addr { return c.raw.LocalAddr() }

// RemoteAddr is the TCP peer: the tether proxy. ClientAddr is the client.
func (c *Conn) RemoteAddr() net.Addr { return c.raw.RemoteAddr() }

// SetDeadline sets the read and write deadlines.
func (c *Conn) SetDeadline(t time.Time) error { return c.raw.SetDeadline(t) }

// SetReadDeadline sets the read deadline.
func (c *Conn) SetReadDeadline(t time.Time) error { return c.raw.SetReadDeadline(t) }

// SetWriteDeadline sets the write deadline.
func (c *Conn) SetWriteDeadline(t time.Time) error { return c.raw.SetWriteDeadline(t) }

// NetConn returns the underlying connection (a *net.TCPConn for TCP
// listeners), for socket options. Reading from it skips bytes Read would
// still return.
func (c *Conn) NetConn() net.Conn { return c.raw }

// abortConn closes c with RST when it is TCP.
func abortConn(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetLinger(0)
	}
	_ = c.Close()
}
