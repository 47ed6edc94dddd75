package directory_test

import (
	"context"
	"fmt"
	"log"

	"github.com/tether-proxy/tether/pkg/directory"
	"github.com/tether-proxy/tether/pkg/ring"
)

// A dispatch service finds the gateway that holds a user's session before
// it pushes a message there. This directory knows the fleet from a static
// list, as proxies started with --gateway flags do; a real one would
// usually join gossip (GossipBind, Join) and read bindings (Redis).
func Example() {
	dir, err := directory.New(directory.Config{
		Gateways: []ring.Member{
			{ID: "gw-1", Addr: "10.0.1.1:9000", Weight: 1},
			{ID: "gw-2", Addr: "10.0.1.2:9000", Weight: 1},
			{ID: "gw-3", Addr: "10.0.1.3:9000", Weight: 1},
		},
	})
	if err != nil {
		log.Fatal(err)
	}
	defer dir.Close()

	ans, err := dir.Lookup(context.Background(), "user-42")
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(ans.Key, "is on", ans.Gateway, "at", ans.Addr, "by", ans.Source)
	// Output: user-42 is on gw-2 at 10.0.1.2:9000 by ring
}

// A batch of up to directory.MaxKeys keys is answered in order (with Redis,
// in one round trip).
func ExampleDirectory_LookupMany() {
	dir, err := directory.New(directory.Config{
		Gateways: []ring.Member{{ID: "gw-1", Addr: "10.0.1.1:9000", Weight: 1}, {ID: "gw-2", Addr: "10.0.1.2:9000", Weight: 1}},
	})
	if err != nil {
		log.Fatal(err)
	}
	defer dir.Close()

	answers, err := dir.LookupMany(context.Background(), []string{"alice", "bob", "carol"})
	if err != nil {
		log.Fatal(err)
	}
	for _, a := range answers {
		fmt.Println(a.Key, a.Gateway)
	}
	// Output:
	// alice gw-2
	// bob gw-1
	// carol gw-1
}
