//go:build linux

package upgrade

import (
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/tether-proxy/tether/pkg/proxy"
)

// Parent is the old process as the new one sees it.
type Parent struct {
	c       *conn
	started time.Time
	snap    Snapshot
	lns     map[string]inherited
}

type inherited struct {
	flag string
	file *os.File
}

// Inherit returns the old process's side of an upgrade when this process
// was started by one (EnvFD is set), after reading what the old one sent:
// its listeners, its membership and when it began. It returns nil, nil for
// a process started normally. EnvFD is removed from the environment.
func Inherit(timeout time.Duration) (*Parent, error) {
	v, ok := os.LookupEnv(EnvFD)
	if !ok {
		return nil, nil
	}
	os.Unsetenv(EnvFD)
	fd, err := strconv.Atoi(v)
	if err != nil || fd < 3 {
		return nil, fmt.Errorf("upgrade: %s=%q is not a descriptor", EnvFD, v)
	}
	c, err := fileConn(os.NewFile(uintptr(fd), "upgrade"))
	if err != nil {
		return nil, err
	}
	m, fds, err := c.recv(timeout)
	if err != nil {
		c.close()
		return nil, fmt.Errorf("upgrade: reading the old process's state: %w", err)
	}
	p := &Parent{c: c, started: m.Started, lns: map[string]inherited{}}
	if m.Snapshot != nil {
		p.snap = *m.Snapshot
	}
	for i, fd := range fds {
		if i >= len(m.Listeners) {
			closeAll(fds[i:])
			break
		}
		name, flag, _ := strings.Cut(m.Listeners[i], "=")
		p.lns[name] = inherited{flag: flag, file: os.NewFile(uintptr(fd), "listener-"+name)}
	}
	if m.Type != typeState || m.Version != Version {
		p.Refuse(fmt.Errorf("this version speaks upgrade version %d, the old process sent %q version %d", Version, m.Type, m.Version))
		return nil, fmt.Errorf("upgrade: old process speaks version %d (%s), this one %d", m.Version, m.Type, Version)
	}
	return p, nil
}

// Started is when the old process began the upgrade.
func (p *Parent) Started() time.Time { return p.started }

// Snapshot is the old process's membership.
func (p *Parent) Snapshot() Snapshot { return p.snap }

// Listener returns the listening socket the old process passed under
// name, or nil if it passed none. flag is this process's value for it: a
// configuration that moved the socket is an error (restart instead).
func (p *Parent) Listener(name, flag string) (net.Listener, error) {
	in, ok := p.lns[name]
	if !ok {
		return nil, nil
	}
	delete(p.lns, name)
	defer in.file.Close()
	if in.flag != flag {
		return nil, fmt.Errorf("the new configuration moves the %s socket from %q to %q; restart instead of upgrading", name, in.flag, flag)
	}
	ln, err := net.FileListener(in.file)
	if err != nil {
		return nil, fmt.Errorf("upgrade: %s listener: %w", name, err)
	}
	return ln, nil
}

// Unclaimed names the listening sockets the old process passed that this
// process has not taken (a configuration that dropped --admin).
func (p *Parent) Unclaimed() []string {
	var out []string
	for name, in := range p.lns {
		out = append(out, name+" ("+in.flag+")")
	}
	return out
}

// Ready tells the old process that this one is built and can serve; the
// old one then stops accepting and Take begins.
func (p *Parent) Ready() error {
	for name, in := range p.lns {
		in.file.Close() // passed but not wanted by this configuration
		delete(p.lns, name)
	}
	return p.c.send(message{Type: typeReady, PID: os.Getpid()}, nil, 5*time.Second)
}

// Refuse tells the old process that this one cannot take over, and why;
// the old one keeps serving. The socket is closed.
func (p *Parent) Refuse(why error) {
	_ = p.c.send(message{Type: typeRefuse, Reason: why.Error()}, nil, 5*time.Second)
	for _, in := range p.lns {
		in.file.Close()
	}
	p.c.close()
}

// Take runs the rest of the upgrade once Ready was sent: it waits for the
// old process to stop accepting, starts this one's (Serve), then adopts
// every batch of sessions and follows membership changes until the old
// process releases gossip or closes the socket. ErrAbandoned means the old
// one gave up before Serve: exit.
func (p *Parent) Take(n New) (Taken, error) {
	defer p.c.close()
	var t Taken
	serving := false
	for {
		m, fds, err := p.c.recv(0)
		if err != nil {
			closeAll(fds)
			t.Took = time.Since(p.started)
			if !serving {
				return t, fmt.Errorf("%w: %v", ErrAbandoned, err)
			}
			return t, nil // the old process ended; all it held is here or gone
		}
		switch m.Type {
		case typeGo:
			serving = true
			n.Serve(m.LastConn)
			if err := p.c.send(message{Type: typeServing}, nil, 5*time.Second); err != nil {
				return t, err
			}
		case typeMembers:
			if m.Snapshot != nil {
				n.SetMembers(*m.Snapshot)
			}
		case typeSessions:
			ok, failed := adoptBatch(n, m, fds)
			t.Sessions += ok
			t.Failed += failed
			if err := p.c.send(message{Type: typeAck, N: ok + failed}, nil, 5*time.Second); err != nil {
				return t, err
			}
		case typeReleased:
			t.Released = true
			t.Took = time.Since(p.started)
			return t, nil
		default:
			closeAll(fds)
		}
	}
}

// adoptBatch adopts the sessions of one message, each with its share of
// the descriptors.
func adoptBatch(n New, m message, fds []int) (ok, failed int) {
	if len(m.FDCounts) != len(m.Sessions) {
		closeAll(fds)
		return 0, len(m.Sessions)
	}
	next := 0
	for i, st := range m.Sessions {
		k := m.FDCounts[i]
		if next+k > len(fds) {
			failed += len(m.Sessions) - i
			break
		}
		if err := n.Adopt(proxy.HandedSession{State: st, FDs: fds[next : next+k]}); err != nil {
			failed++
		} else {
			ok++
		}
		next += k
	}
	if next < len(fds) {
		closeAll(fds[next:])
	}
	return ok, failed
}
