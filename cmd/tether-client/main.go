// Command tether-client is a small tether client for demos and smoke tests:
// it connects with a session key, prints which gateway served it and what
// client address that gateway saw, checks the echo, drops the connection the
// way a phone losing WiFi does (RST), and reconnects from another source
// address through another proxy.
package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"time"

	"github.com/tether-proxy/tether/internal/cli"
	"github.com/tether-proxy/tether/pkg/client"
	"github.com/tether-proxy/tether/pkg/proto"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

const usageHead = `Usage: tether-client --key KEY --via PROXY[,PROXY...] [--from IP[,IP...]] [--hops N]

Connects to tether with a hello frame carrying KEY, prints the gateway that
answered and the client address it saw, checks that a message echoes, then
drops the connection with a TCP reset and reconnects: hop i goes through the
i-th --via address and from the i-th --from address (both lists wrap around).
Exit status 0 means every hop reached the same gateway and echoed intact.
Any gateway that sends the reply frame of docs/gateway.md works; with --raw
only the echo is checked, for gateways that send no reply frame.

Flags:
`

type options struct {
	key, via, from string
	hops           int
	timeout        time.Duration
	raw            bool
}

func parseFlags(args []string, stderr io.Writer) (options, error) {
	var o options
	fs := flag.NewFlagSet("tether-client", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&o.key, "key", "", "session `KEY` to send (1..255 bytes; required)")
	fs.StringVar(&o.via, "via", "127.0.0.1:7000", "comma-separated proxy `ADDRS` (HOST:PORT) to connect through, one per hop in turn")
	fs.StringVar(&o.from, "from", "", "comma-separated local source `IPS`, one per hop in turn (e.g. 127.0.0.2,127.0.0.3 to play a WiFi→4G switch); empty lets the kernel choose")
	fs.IntVar(&o.hops, "hops", 2, "number of connections to make (`N`)")
	fs.DurationVar(&o.timeout, "timeout", 5*time.Second, "per-hop deadline (`DURATION`)")
	fs.BoolVar(&o.raw, "raw", false, "expect no reply frame: only check that the message echoes (a plain echo may return the hello too); the gateway cannot be named, so hops are not compared")
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), usageHead)
		cli.PrintFlags(fs.Output(), fs)
	}
	if err := cli.Parse(fs, args, stderr); err != nil {
		return o, err
	}
	if o.key == "" || len(o.key) > proto.MaxKeyLen {
		return o, errors.New("--key is required (1..255 bytes)")
	}
	if o.hops < 1 {
		return o, errors.New("--hops must be >= 1")
	}
	return o, nil
}

func run(args []string, stdout, stderr io.Writer) int {
	o, err := parseFlags(args, stderr)
	if code, ok := cli.FlagOutcome("tether-client", err, stderr); !ok {
		return code
	}
	vias := strings.Split(o.via, ",")
	froms := strings.Split(o.from, ",")
	first := ""
	ok := true
	for i := range o.hops {
		via, from := vias[i%len(vias)], froms[i%len(froms)]
		rep, err := hop(o, via, from, i+1)
		if err != nil {
			fmt.Fprintf(stdout, "hop %d: %s → proxy %s: FAILED: %v\n", i+1, fromLabel(from), via, err)
			ok = false
			continue
		}
		if o.raw {
			fmt.Fprintf(stdout, "hop %d: from %-9s → proxy %-15s → echo ok (raw: no reply frame)\n", i+1, fromLabel(from), via)
			continue
		}
		same := ""
		switch {
		case first == "":
			first = rep.Gateway
		case rep.Gateway == first:
			same = "  ✓ same gateway"
		default:
			same = "  ✗ DIFFERENT gateway (was " + first + ")"
			ok = false
		}
		fmt.Fprintf(stdout, "hop %d: from %-9s → proxy %-15s → gateway %s (session conns=%d), gateway saw client %s, echo ok%s\n",
			i+1, fromLabel(from), via, rep.Gateway, rep.Conns, rep.Client, same)
	}
	if !ok {
		return 1
	}
	return 0
}

func fromLabel(from string) string {
	if from == "" {
		return "(any)"
	}
	return from
}

// hop makes one connection: hello, reply, echo check, then an abortive close.
func hop(o options, via, from string, n int) (client.Reply, error) {
	nd := &net.Dialer{}
	if from != "" {
		ip := net.ParseIP(from)
		if ip == nil {
			return client.Reply{}, fmt.Errorf("--from %q is not an IP address", from)
		}
		nd.LocalAddr = &net.TCPAddr{IP: ip}
	}
	d := &client.Dialer{Proxies: []string{via}, Timeout: o.timeout, ReadReply: !o.raw, Net: nd}
	conn, err := d.Dial(context.Background(), o.key, nil)
	if err != nil {
		if !o.raw && (errors.Is(err, client.ErrNoReply) || errors.Is(err, client.ErrBadReply)) {
			return client.Reply{}, fmt.Errorf("no reply frame (is a gateway up? --raw for gateways that send none): %w", err)
		}
		return client.Reply{}, err
	}
	c := conn.Conn
	defer func() {
		if tc, ok := c.(*net.TCPConn); ok {
			_ = tc.SetLinger(0) // drop like a lost radio link: RST, no FIN
		}
		c.Close()
	}()
	_ = c.SetDeadline(time.Now().Add(o.timeout))
	msg := fmt.Appendf(nil, "message %d from %s", n, c.LocalAddr())
	frame, err := client.Hello(o.key, nil)
	if err != nil {
		return client.Reply{}, err
	}
	if _, err := c.Write(msg); err != nil {
		return client.Reply{}, err
	}
	rep := conn.Reply
	echo := make([]byte, len(msg))
	if _, err := io.ReadFull(c, echo); err != nil {
		return rep, fmt.Errorf("echo: %w", err)
	}
	if o.raw && !bytes.Equal(echo, msg) {
		// A plain echo server sends the hello back too.
		all := append(frame, msg...)
		if bytes.HasPrefix(all, echo) {
			rest := make([]byte, len(frame))
			if _, err := io.ReadFull(c, rest); err != nil {
				return rep, fmt.Errorf("echo: %w", err)
			}
			echo = append(echo, rest...)[len(frame):]
		}
	}
	if !bytes.Equal(echo, msg) {
		return rep, fmt.Errorf("echo mismatch: sent %q, got %q", msg, echo)
	}
	return rep, nil
}
