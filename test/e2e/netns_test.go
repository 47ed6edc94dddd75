//go:build e2e && linux

package e2e

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tether-proxy/tether/internal/stub"
	"github.com/tether-proxy/tether/internal/testenv"
	"github.com/tether-proxy/tether/pkg/proto"
)

// The network-namespace lab: every node is a host of its own (a network
// namespace with one veth on a shared bridge, addresses from the
// benchmarking range 198.18.0.0/15), so a phone that loses its address
// gets no RST for its old connections and a proxy host can lose its link,
// as on a real network. The bridge's own address, 198.18.0.1, is the
// operator's vantage point: the test process scrapes admin APIs from it.
const (
	labPrefix = "tt-"   // namespaces this test creates
	labBridge = "ttbr0" // the switch
	labVeth   = "ttv"   // host-side veth names: ttv0, ttv1, ...
	labNet    = "198.18.0."
	labLock   = "/run/tether-e2e-netns.lock"
)

// netLab is one run's namespaces; destroy removes them (also after a
// failure), and newNetLab removes whatever a killed run left behind.
type netLab struct {
	t    *testing.T
	ip   string
	nss  []string
	lock *os.File
}

// newNetLab needs root (network namespaces); without it the test is
// skipped, except with CI=true, where it must run.
func newNetLab(t *testing.T) *netLab {
	t.Helper()
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("the network-namespace test needs root, and CI=true requires it to run")
		}
		t.Skip("needs root for network namespaces (make test runs it as root; CI=true requires it)")
	}
	l := &netLab{t: t, ip: testenv.Need(t, "ip")}
	// One lab at a time on a machine: the names and addresses are fixed.
	// The lock dies with its holder, so a killed run frees it.
	f, err := os.OpenFile(labLock, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	l.lock = f
	t.Cleanup(l.destroy)
	l.sweep() // what a killed run left
	l.run("link", "add", labBridge, "type", "bridge")
	l.run("addr", "add", labNet+"1/24", "dev", labBridge)
	l.run("link", "set", labBridge, "up")
	return l
}

// run runs ip with args, failing the test on an error.
func (l *netLab) run(args ...string) {
	l.t.Helper()
	if out, err := exec.Command(l.ip, args...).CombinedOutput(); err != nil {
		l.t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// sweep deletes every namespace and link of this lab's names.
func (l *netLab) sweep() {
	out, _ := exec.Command(l.ip, "netns", "list").Output()
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) > 0 && strings.HasPrefix(f[0], labPrefix) {
			_ = exec.Command(l.ip, "netns", "delete", f[0]).Run()
		}
	}
	out, _ = exec.Command(l.ip, "-o", "link", "show").Output()
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		name, _, _ := strings.Cut(strings.TrimSuffix(f[1], ":"), "@")
		if name == labBridge || strings.HasPrefix(name, labVeth) {
			_ = exec.Command(l.ip, "link", "delete", name).Run()
		}
	}
}

func (l *netLab) destroy() {
	l.sweep()
	if l.lock != nil {
		_ = unix.Flock(int(l.lock.Fd()), unix.LOCK_UN)
		l.lock.Close()
	}
}

// host creates a namespace NAME on the bridge with address 198.18.0.N
// and returns the namespace's name.
func (l *netLab) host(name string, n int) string {
	l.t.Helper()
	ns := labPrefix + name
	veth := fmt.Sprintf("%s%d", labVeth, len(l.nss))
	l.run("netns", "add", ns)
	l.nss = append(l.nss, ns)
	l.run("-n", ns, "link", "set", "lo", "up")
	l.run("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
	l.run("link", "set", veth, "master", labBridge, "up")
	l.run("-n", ns, "addr", "add", fmt.Sprintf("%s%d/24", labNet, n), "dev", "eth0")
	l.run("-n", ns, "link", "set", "eth0", "up")
	return ns
}

// start runs a tether binary inside ns.
func (l *netLab) start(ns, name string, args ...string) *proc {
	l.t.Helper()
	return startCmd(l.t, name, l.ip, append([]string{"netns", "exec", ns, filepath.Join(binDir, name)}, args...)...)
}

// dialFrom connects from inside namespace ns (local address from, port
// chosen by the kernel): the socket is created by a thread switched into
// ns, and stays there.
func dialFrom(ns, from, to string) (*net.TCPConn, error) {
	type result struct {
		c   net.Conn
		err error
	}
	done := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			done <- result{nil, err}
			return
		}
		defer orig.Close()
		target, err := os.Open("/run/netns/" + ns)
		if err != nil {
			done <- result{nil, err}
			return
		}
		defer target.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			done <- result{nil, fmt.Errorf("setns %s: %w", ns, err)}
			return
		}
		d := net.Dialer{Timeout: 3 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}}
		c, err := d.Dial("tcp", to)
		// Back to the test's namespace; if that fails the thread is
		// left locked and dies with this goroutine.
		if unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET) == nil {
			runtime.UnlockOSThread()
		}
		done <- result{c, err}
	}()
	r := <-done
	if r.err != nil {
		return nil, r.err
	}
	return r.c.(*net.TCPConn), nil
}

// phoneSession is one open session of the phone.
type phoneSession struct {
	key   string
	c     *net.TCPConn
	reply stub.Reply
}

// open starts a session for key from the phone's address through the SLB
// and reads the gateway's reply.
func openFrom(ns, from, slb, key string) (*phoneSession, error) {
	c, err := dialFrom(ns, from, slb)
	if err != nil {
		return nil, err
	}
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	h, _ := proto.AppendHello(nil, []byte(key), nil)
	if _, err := c.Write(h); err != nil {
		c.Close()
		return nil, err
	}
	rep, raw, err := stub.ReadReply(c)
	if err != nil {
		c.Close()
		return nil, err
	}
	if strings.Contains(string(raw), labNet+"2") { // gateways are 198.18.0.2x
		c.Close()
		return nil, fmt.Errorf("the client saw a gateway address: %q", raw)
	}
	_ = c.SetDeadline(time.Time{})
	return &phoneSession{key: key, c: c, reply: rep}, nil
}

// echo checks the session still carries bytes both ways within d.
func (s *phoneSession) echo(d time.Duration) error {
	_ = s.c.SetDeadline(time.Now().Add(d))
	defer s.c.SetDeadline(time.Time{})
	msg := []byte("ping:" + s.key)
	if _, err := s.c.Write(msg); err != nil {
		return err
	}
	got := make([]byte, len(msg))
	_, err := readFull(s.c, got)
	if err == nil && string(got) != string(msg) {
		err = fmt.Errorf("echo %q", got)
	}
	return err
}

// TestMultiHost: phone, HAProxy (the SLB), two proxies, three gateways and
// Redis, each a host of its own. (1) The phone's address is deleted and a
// new one added: its old connections get no RST; it reconnects from the
// new address to the same gateways, which see the new address and reset
// the stale sessions (newest wins), gone from the proxies within seconds.
// (2) A proxy host loses its link: HAProxy takes it out, and the clients
// it carried reconnect through the other proxy to the same gateways.
func TestMultiHost(t *testing.T) {
	lab := newNetLab(t)
	slbNS := lab.host("slb", 10)
	pxNS := []string{lab.host("proxy1", 11), lab.host("proxy2", 12)}
	gwNS := []string{lab.host("gw1", 21), lab.host("gw2", 22), lab.host("gw3", 23)}
	redisNS := lab.host("redis", 30)
	phone := lab.host("phone", 100)

	redisAddr := labNet + "30:6379"
	rd := testenv.Start(t, nil, lab.ip, "netns", "exec", redisNS, testenv.Need(t, "redis-server"),
		"--bind", labNet+"30", "--port", "6379", "--save", "", "--appendonly", "no")
	waitFor(t, 10*time.Second, "redis in its namespace", func() bool {
		c, err := net.DialTimeout("tcp", redisAddr, 200*time.Millisecond)
		if err == nil {
			c.Close()
		}
		return err == nil
	}, rd.Output)

	var gws []*proc
	for i, ns := range gwNS {
		gws = append(gws, lab.start(ns, "gateway-stub", "--id", fmt.Sprintf("gw-%d", i+1),
			"--listen", fmt.Sprintf("%s2%d:9000", labNet, i+1), "--proxy-protocol", "require",
			"--trusted-proxies", labNet+"11/32,"+labNet+"12/32"))
	}
	tok := tokenFile(t, "admin", "lab-admin-token")
	var proxies []*proc
	for i, ns := range pxNS {
		ip := fmt.Sprintf("%s1%d", labNet, i+1)
		args := []string{"--listen", ip + ":7000", "--admin", ip + ":7100", "--admin-token-file", tok,
			"--redis", "redis://" + redisAddr, "--proxy-protocol-in", "require", "--trusted-proxies", labNet + "10/32",
			"--drain-timeout", "1s"}
		for j, g := range gws {
			args = append(args, "--gateway", fmt.Sprintf("gw-%d=%s", j+1, g.addr))
		}
		proxies = append(proxies, lab.start(ns, "proxy", args...))
	}
	slb := labNet + "10:7000"
	lb := testenv.StartHAProxyAt(t, haproxyCfg, slb, []string{lab.ip, "netns", "exec", slbNS},
		"TETHER_PROXY1="+proxies[0].addr, "TETHER_PROXY2="+proxies[1].addr,
		"TETHER_ADMIN1_PORT=7100", "TETHER_ADMIN2_PORT=7100")
	lb.WaitServers(t, "UP", "proxy1", "proxy2")

	// 20 keys connect from the phone's first address.
	const keys = 20
	oldIP, newIP := labNet+"100", labNet+"101"
	first := make([]*phoneSession, keys)
	for i := range first {
		s, err := openFrom(phone, oldIP, slb, fmt.Sprintf("phone-%d", i))
		if err != nil {
			t.Fatalf("key %d: %v", i, err)
		}
		if host, _, _ := net.SplitHostPort(s.reply.Client); host != oldIP {
			t.Fatalf("gateway saw client %s, want %s", s.reply.Client, oldIP)
		}
		first[i] = s
		defer s.c.Close()
	}
	live := proxies // the proxies the test process can still reach
	active := func() (n float64) {
		for _, p := range live {
			n += metrics(t, p)["tether_connections_active"]
		}
		return n
	}
	waitFor(t, 5*time.Second, "20 sessions on the proxies", func() bool { return active() == keys })

	// (1) The phone's network changes: old address gone, new one added.
	// Nothing tells the old connections.
	lab.run("-n", phone, "addr", "del", oldIP+"/24", "dev", "eth0")
	lab.run("-n", phone, "addr", "add", newIP+"/24", "dev", "eth0")
	changed := time.Now()
	second := make([]*phoneSession, keys)
	for i := range second {
		s, err := openFrom(phone, newIP, slb, first[i].key)
		if err != nil {
			t.Fatalf("reconnect of %s from %s: %v", first[i].key, newIP, err)
		}
		defer s.c.Close()
		second[i] = s
		if s.reply.Gateway != first[i].reply.Gateway {
			t.Errorf("%s: was on %s, came back to %s", s.key, first[i].reply.Gateway, s.reply.Gateway)
		}
		if host, _, _ := net.SplitHostPort(s.reply.Client); host != newIP {
			t.Errorf("%s: gateway saw %s, want the new address %s", s.key, s.reply.Client, newIP)
		}
	}
	// The gateways reset the stale sessions (newest wins) and the proxies
	// let them go: 20 sessions again, all from the new address.
	waitFor(t, 10*time.Second, "the stale sessions gone from the proxies", func() bool { return active() == keys })
	t.Logf("address change: %d keys back on their gateways from %s; stale sessions gone after %v", keys, newIP, time.Since(changed).Round(10*time.Millisecond))
	replaced := 0
	for _, g := range gws {
		for _, line := range g.allLines() {
			if strings.Contains(line, "newest session wins") && strings.Contains(line, `"older_client":"`+oldIP+":") {
				replaced++
			}
		}
	}
	if replaced != keys {
		t.Errorf("gateways logged %d stale sessions of %s replaced, want %d", replaced, oldIP, keys)
	}
	// No RST reached the phone's old sockets: they just hear nothing.
	for _, s := range first[:3] {
		_ = s.c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
		_, err := s.c.Read(make([]byte, 1))
		if ne, ok := err.(net.Error); !ok || !ne.Timeout() {
			t.Errorf("old connection of %s: %v, want silence (no RST without an address)", s.key, err)
		}
	}
	for _, s := range second {
		if err := s.echo(2 * time.Second); err != nil {
			t.Fatalf("%s after the address change: %v", s.key, err)
		}
	}

	// (2) proxy1's host loses its link.
	via1 := metrics(t, proxies[0])["tether_connections_active"]
	if via1 == 0 {
		t.Fatal("HAProxy sent none of the 20 sessions to proxy1")
	}
	lab.run("-n", pxNS[0], "link", "set", "eth0", "down")
	live = proxies[1:]
	lb.WaitServers(t, "DOWN", "proxy1")
	var moved, kept atomic.Int64
	parallel(len(second), len(second), func(i int) {
		s := second[i]
		// An app heartbeat notices the dead path; the client
		// reconnects through the SLB.
		if err := s.echo(time.Second); err == nil {
			kept.Add(1)
			return
		}
		s.c.Close()
		var again *phoneSession
		var err error
		for try := 0; try < 5; try++ {
			if again, err = openFrom(phone, newIP, slb, s.key); err == nil {
				break
			}
		}
		if err != nil {
			t.Errorf("%s: no way back after proxy1 lost its link: %v", s.key, err)
			return
		}
		defer again.c.Close()
		if again.reply.Gateway != first[i].reply.Gateway {
			t.Errorf("%s: was on %s, came back through proxy2 to %s", s.key, first[i].reply.Gateway, again.reply.Gateway)
		}
		if err := again.echo(2 * time.Second); err != nil {
			t.Errorf("%s through proxy2: %v", s.key, err)
		}
		moved.Add(1)
	})
	if float64(moved.Load()) != via1 || kept.Load()+moved.Load() != keys {
		t.Errorf("after proxy1 lost its link: %d reconnected, %d kept; proxy1 had %v", moved.Load(), kept.Load(), via1)
	}
	t.Logf("proxy1 link down: its %d clients reconnected through proxy2 to their gateways; %d sessions on proxy2 untouched", moved.Load(), kept.Load())
}
