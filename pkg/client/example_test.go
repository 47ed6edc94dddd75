package client_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log"
	"net"
	"time"

	"github.com/tether-proxy/tether/pkg/client"
)

// The first bytes a client sends, and the reply frame the reference
// gateway answers with.
func ExampleReadReply() {
	hello, err := client.Hello("user-42", nil)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("hello % x\n", hello)

	frame, _ := client.AppendReply(nil, client.Reply{Gateway: "gw-2", Key: "user-42", Conns: 1, Client: "100.64.1.2:40000"})
	rep, _, err := client.ReadReply(bytes.NewReader(frame))
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("served by %s, which saw %s\n", rep.Gateway, rep.Client)
	// Output:
	// hello 00 00 00 09 01 07 75 73 65 72 2d 34 32
	// served by gw-2, which saw 100.64.1.2:40000
}

// fakeGateway stands in for a proxy and its gateway: it answers each hello
// with a reply frame.
func fakeGateway() (addr string, stop func()) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				buf := make([]byte, 300)
				n, _ := c.Read(buf)
				if n == 0 {
					return
				}
				rep, _ := client.AppendReply(nil, client.Reply{Gateway: "gw-1", Key: "user-42", Conns: 1})
				c.Write(rep)
				io.Copy(io.Discard, c)
			}()
		}
	}()
	return ln.Addr().String(), func() { ln.Close() }
}

// A session that stays up: Run dials through the proxies in turn, serves
// each connection, and after a break dials again with full-jitter backoff
// (a close without any byte is "come back later"), until its context ends.
func ExampleSession() {
	addr, stop := fakeGateway()
	defer stop()
	ctx, cancel := context.WithCancel(context.Background())
	s := &client.Session{
		Dialer: &client.Dialer{Proxies: []string{addr}, ReadReply: true},
		Key:    "user-42",
		OnDisconnect: func(err error, retryIn time.Duration) {
			log.Printf("disconnected (%v); back in %v", err, retryIn)
		},
	}
	err := s.Run(ctx, func(ctx context.Context, c *client.Conn) error {
		fmt.Println("connected to", c.Reply.Gateway)
		cancel() // an app would read and write here until the connection breaks
		return nil
	})
	fmt.Println(err)
	// Output:
	// connected to gw-1
	// context canceled
}
