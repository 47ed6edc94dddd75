package client_test

import (
	"bytes"
	"fmt"
	"log"

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
