//go:build linux

package upgrade

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tether-proxy/tether/pkg/proxy"
)

// MaxFDs is the most descriptors one packet carries (the kernel's
// SCM_MAX_FD is 253).
const MaxFDs = 240

// maxPacket bounds one message: a batch of sessions is a few hundred bytes
// each, a membership of thousands of gateways stays well below it.
const maxPacket = 1 << 20

// Message types.
const (
	typeState    = "state"
	typeReady    = "ready"
	typeRefuse   = "refuse"
	typeGo       = "go"
	typeServing  = "serving"
	typeSessions = "sessions"
	typeAck      = "ack"
	typeMembers  = "members"
	typeReleased = "released"
)

// message is one packet of the conversation; fields are used by type.
type message struct {
	Type      string               `json:"type"`
	Version   int                  `json:"version,omitempty"`
	Started   time.Time            `json:"started,omitzero"`
	Listeners []string             `json:"listeners,omitempty"` // names of the attached fds, in order
	Snapshot  *Snapshot            `json:"snapshot,omitempty"`
	PID       int                  `json:"pid,omitempty"`
	Reason    string               `json:"reason,omitempty"`
	LastConn  uint64               `json:"last_conn,omitempty"`
	Sessions  []proxy.SessionState `json:"sessions,omitempty"`
	FDCounts  []int                `json:"fd_counts,omitempty"` // per session, of the attached fds
	N         int                  `json:"n,omitempty"`
}

// conn is one end of the upgrade socket. One goroutine at a time receives
// (the buffers are reused).
type conn struct {
	uc       *net.UnixConn
	buf, oob []byte
}

// socketPair returns the two ends of a new upgrade socket: the old
// process's, and the file for the new one.
func socketPair() (*conn, *os.File, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("upgrade socket: %w", err)
	}
	for _, fd := range fds {
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUF, maxPacket)
	}
	c, err := fileConn(os.NewFile(uintptr(fds[0]), "upgrade"))
	if err != nil {
		unix.Close(fds[1])
		return nil, nil, err
	}
	return c, os.NewFile(uintptr(fds[1]), "upgrade-child"), nil
}

// fileConn makes a conn of a socket file, which it closes.
func fileConn(f *os.File) (*conn, error) {
	nc, err := net.FileConn(f)
	f.Close()
	if err != nil {
		return nil, fmt.Errorf("upgrade socket: %w", err)
	}
	uc, ok := nc.(*net.UnixConn)
	if !ok {
		nc.Close()
		return nil, errors.New("upgrade socket: not a Unix socket")
	}
	return &conn{uc: uc}, nil
}

// send writes one message with fds attached.
func (c *conn) send(m message, fds []int, timeout time.Duration) error {
	b, err := json.Marshal(m)
	if err != nil {
		return err
	}
	if len(b) > maxPacket {
		return fmt.Errorf("upgrade: %s message of %d bytes is too large", m.Type, len(b))
	}
	if len(fds) > MaxFDs {
		return fmt.Errorf("upgrade: %d descriptors in one message (at most %d)", len(fds), MaxFDs)
	}
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	_ = c.uc.SetWriteDeadline(time.Now().Add(timeout))
	if _, _, err := c.uc.WriteMsgUnix(b, oob, nil); err != nil {
		return fmt.Errorf("upgrade: send %s: %w", m.Type, err)
	}
	return nil
}

// recv reads one message and the descriptors attached to it, which become
// the caller's. A zero timeout waits without a bound.
func (c *conn) recv(timeout time.Duration) (message, []int, error) {
	var deadline time.Time
	if timeout > 0 {
		deadline = time.Now().Add(timeout)
	}
	_ = c.uc.SetReadDeadline(deadline)
	if c.buf == nil {
		c.buf, c.oob = make([]byte, maxPacket), make([]byte, unix.CmsgSpace(4*253))
	}
	buf, oob := c.buf, c.oob
	n, oobn, flags, _, err := c.uc.ReadMsgUnix(buf, oob)
	if errors.Is(err, io.EOF) {
		return message{}, nil, errEOF
	}
	if err != nil {
		return message{}, nil, err
	}
	fds, perr := parseRights(oob[:oobn])
	switch {
	case perr != nil:
		closeAll(fds)
		return message{}, nil, perr
	case flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0:
		closeAll(fds)
		return message{}, nil, errors.New("upgrade: message or descriptors truncated")
	case n == 0:
		closeAll(fds)
		return message{}, nil, errEOF // the peer closed its end (SEQPACKET EOF)
	}
	var m message
	if err := json.Unmarshal(buf[:n], &m); err != nil {
		closeAll(fds)
		return message{}, nil, fmt.Errorf("upgrade: bad message: %w", err)
	}
	return m, fds, nil
}

// errEOF is the other process closing its end of the socket.
var errEOF = errors.New("upgrade: the other process closed the upgrade socket")

func parseRights(oob []byte) ([]int, error) {
	if len(oob) == 0 {
		return nil, nil
	}
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, fmt.Errorf("upgrade: control message: %w", err)
	}
	var fds []int
	for _, cm := range msgs {
		got, err := unix.ParseUnixRights(&cm)
		if err != nil {
			closeAll(fds)
			return nil, fmt.Errorf("upgrade: control message: %w", err)
		}
		fds = append(fds, got...)
	}
	for _, fd := range fds {
		unix.CloseOnExec(fd)
	}
	return fds, nil
}

func (c *conn) close() error { return c.uc.Close() }

func closeAll(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}
