package stub

import (
	"context"
	_ "embed"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/coder/websocket"
	"go.uber.org/zap"

	"github.com/tether-proxy/tether/pkg/gateway"
)

// The stub answers HTTP too, for clients routed by header, cookie or query
// (--key-from on the proxy): a WebSocket upgrade gets the same JSON as the
// binary reply in its first text message and then an echo of every message;
// GET / serves a small page whose script does exactly that from a browser.

type connKey struct{}

// httpConn is a gateway connection handed to the stub's HTTP server; done
// tells the stub the server is through with it.
type httpConn struct {
	*gateway.Conn
	done chan struct{}
	once sync.Once
}

func (c *httpConn) Close() error {
	c.once.Do(func() { close(c.done) })
	return c.Conn.Close()
}

// oneConnListener hands connections to an http.Server one at a time.
type oneConnListener struct {
	ch     chan net.Conn
	closed chan struct{}
	addr   net.Addr
	once   sync.Once
}

func (l *oneConnListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.ch:
		return c, nil
	case <-l.closed:
		return nil, net.ErrClosed
	}
}
func (l *oneConnListener) Close() error   { l.once.Do(func() { close(l.closed) }); return nil }
func (l *oneConnListener) Addr() net.Addr { return l.addr }

// serveHTTP hands c to the stub's HTTP server and waits until the server is
// done with it, so Shutdown's accounting stays per connection.
func (s *Server) serveHTTP(c *gateway.Conn) {
	s.httpOnce.Do(func() {
		s.httpLn = &oneConnListener{ch: make(chan net.Conn), closed: make(chan struct{}), addr: c.LocalAddr()}
		s.httpSrv = &http.Server{
			Handler:           http.HandlerFunc(s.httpHandler),
			ReadHeaderTimeout: s.cfg.HandshakeTimeout,
			ConnContext: func(ctx context.Context, c net.Conn) context.Context {
				return context.WithValue(ctx, connKey{}, c)
			},
		}
		go func() { _ = s.httpSrv.Serve(s.httpLn) }()
	})
	if s.httpLn == nil {
		return // shutting down before any HTTP connection came
	}
	hc := &httpConn{Conn: c, done: make(chan struct{})}
	select {
	case s.httpLn.ch <- hc:
	case <-s.httpLn.closed:
		return
	}
	<-hc.done
}

func (s *Server) httpHandler(w http.ResponseWriter, r *http.Request) {
	hc, _ := r.Context().Value(connKey{}).(*httpConn)
	key, client := "", r.RemoteAddr
	if hc != nil {
		key, client = hc.Key(), hc.ClientAddr().String()
	}
	if key == "" {
		if ck, err := r.Cookie("sid"); err == nil {
			key = ck.Value
		} else {
			key = r.URL.Query().Get("sid")
		}
	}
	if r.Header.Get("Upgrade") == "" {
		if r.URL.Path == "/tether.js" {
			w.Header().Set("Content-Type", "text/javascript; charset=utf-8")
			_, _ = w.Write(tetherJS)
			return
		}
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		_, _ = w.Write([]byte(page))
		return
	}
	ws, err := websocket.Accept(w, r, &websocket.AcceptOptions{InsecureSkipVerify: true})
	if err != nil {
		s.log.Debug("websocket upgrade failed", zap.Error(err))
		return
	}
	defer ws.CloseNow()
	rep := s.reply(key, client)
	ctx, cancel := context.WithTimeout(r.Context(), 24*time.Hour)
	defer cancel()
	body, _ := json.Marshal(rep)
	if err := ws.Write(ctx, websocket.MessageText, body); err != nil {
		return
	}
	for {
		typ, msg, err := ws.Read(ctx)
		if err != nil {
			if !errors.Is(err, context.Canceled) && websocket.CloseStatus(err) == -1 {
				s.log.Debug("websocket read", zap.Error(err))
			}
			return
		}
		if err := ws.Write(ctx, typ, msg); err != nil {
			return
		}
	}
}

// tetherJS is clients/js/tether.js (a test keeps the copy identical): the
// page's WebSocket is the client library's TetherSocket.
//
//go:embed tether.js
var tetherJS []byte

// page is what a browser gets: it loads the tether client library (through
// the proxy, with the same key in the query), opens a TetherSocket to the
// same address, shows the gateway's reply, drops the connection once, and
// shows the reply of the reconnection the library makes.
const page = `<!doctype html>
<html><head><meta charset="utf-8"><title>tether gateway stub</title></head>
<body>
<h1>tether gateway stub</h1>
<pre id="log"></pre>
<script type="module">
const log = (s) => { document.getElementById("log").textContent += s + "\n"; };
const { TetherSocket } = await import("/tether.js" + location.search);
const key = new URLSearchParams(location.search).get("sid");
const scheme = location.protocol === "https:" ? "wss://" : "ws://";
const sock = new TetherSocket(scheme + location.host + "/ws", { key });
let round = 0;
sock.addEventListener("message", (ev) => {
  round++;
  const rep = JSON.parse(ev.data);
  log("connection " + round + ": gateway " + rep.gateway + " key " + rep.key + " conns " + rep.conns);
  document.title = "gateway " + rep.gateway + " round " + round;
  if (round < 2) { sock.reconnect(); } else { log("done"); sock.close(); }
});
sock.addEventListener("close", (ev) => { if (round < 2) log("closed; back in " + Math.round(ev.retryInMs) + " ms"); });
</script>
</body></html>
`
