//go:build linux

package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// HandOff passes the established sessions this server holds now to send,
// in batches of at most maxFDs descriptors. Each session is first stopped
// between two moves (a move in progress ends; a destination with no room
// keeps its bytes in the pipe, which goes along). send must transmit the
// batch before it returns (SCM_RIGHTS copies the descriptors). When it
// returns nil the batch's sessions are gone from this server: their
// descriptors here are closed without a shutdown or reset, since the
// sockets live on in the other process. When it fails, the batch resumes
// here unchanged and HandOff returns the error. Sessions still in their
// handshake, and those not spliced by the parker, stay; call HandOff again
// for those that became sessions since. It returns how many were handed.
func (s *Server) HandOff(ctx context.Context, maxFDs int, send func([]HandedSession) error) (int, error) {
	if s.parker == nil {
		return 0, ErrHandoffUnsupported
	}
	if maxFDs < maxSessionFDs {
		return 0, fmt.Errorf("proxy: handoff batches of %d descriptors: want at least %d", maxFDs, maxSessionFDs)
	}
	s.mu.Lock()
	var all []*parkedSession
	for ses := range s.sessions {
		if ps := ses.parked.Load(); ps != nil && !ses.aborted.Load() {
			all = append(all, ps)
		}
	}
	s.mu.Unlock()
	// One batch at a time, each stopped only for its own round trip: a
	// session pauses for one batch, not for the whole handoff. A batch
	// holds as many sessions as fit if every one brought both pipes.
	per := maxFDs / maxSessionFDs
	handed := 0
	for len(all) > 0 {
		n := min(per, len(all))
		k, err := s.handOffBatch(ctx, all[:n], send)
		handed += k
		if err != nil {
			return handed, err
		}
		all = all[n:]
	}
	return handed, nil
}

// maxSessionFDs is the most descriptors one handed session carries: two
// sockets and, when both directions have bytes in flight, two pipes.
const maxSessionFDs = 6

// handOffBatch stops, exports and sends one batch of sessions; on any
// failure they resume here.
func (s *Server) handOffBatch(ctx context.Context, group []*parkedSession, send func([]HandedSession) error) (int, error) {
	quiet := make([]<-chan struct{}, len(group))
	for i, ps := range group {
		quiet[i] = s.parker.stop(ps)
	}
	if err := waitQuiet(ctx, quiet); err != nil {
		for _, ps := range group {
			s.parker.resume(ps)
		}
		return 0, fmt.Errorf("proxy: sessions did not stop for the handoff: %w", err)
	}
	batch := make([]HandedSession, 0, len(group))
	owners := make([]*parkedSession, 0, len(group))
	for i, ps := range group {
		if quiet[i] == nil {
			continue // ended before it was asked to stop
		}
		h, ok, err := s.export(ps)
		switch {
		case err != nil:
			s.parker.resume(ps)
			s.log.Warn("handoff: cannot pass a session on; it stays here", zap.Uint64("conn", ps.ses.id), zap.Error(err))
		case ok:
			batch, owners = append(batch, h), append(owners, ps)
		}
		// !ok: it ended while stopping
	}
	if len(batch) == 0 {
		return 0, nil
	}
	err := send(batch)
	for i, ps := range owners {
		closeFDs(batch[i].FDs[:2]) // our duplicates; the pipes are the session's own
		if err != nil {
			s.parker.resume(ps)
			continue
		}
		s.handedOver(ps)
	}
	if err != nil {
		return 0, err
	}
	return len(batch), nil
}

// export reads a stopped session into a HandedSession, with duplicates of
// its sockets (so a concurrent close here cannot reuse their numbers
// during send) and its pipes' own descriptors.
func (s *Server) export(ps *parkedSession) (HandedSession, bool, error) {
	dirs, pipes, ok := s.parker.handedState(ps)
	if !ok {
		return HandedSession{}, false, nil
	}
	ses := ps.ses
	cfd, err := dupConn(ses.client)
	if err != nil {
		return HandedSession{}, false, fmt.Errorf("client socket: %w", err)
	}
	gfd, err := dupConn(ses.gw)
	if err != nil {
		unix.Close(cfd)
		return HandedSession{}, false, fmt.Errorf("gateway socket: %w", err)
	}
	h := HandedSession{
		State: SessionState{ID: ses.id, Start: ses.start, KeyHash: ses.keyHash, Gateway: ses.gwID,
			Client: ses.peerString(), Hello: ses.hello, Dirs: dirs},
		FDs: []int{cfd, gfd},
	}
	for _, pp := range pipes {
		if pp != nil {
			h.FDs = append(h.FDs, pp.r, pp.w)
		}
	}
	return h, true, nil
}

// handedOver forgets a session the other process took.
func (s *Server) handedOver(ps *parkedSession) {
	s.parker.commit(ps)
	ses := ps.ses
	// Close, not abort: a reset or linger option would reach the socket
	// the other process now serves.
	ses.client.Close()
	ses.gw.Close()
	s.unregister(ses)
	s.m.Handoffs.WithLabelValues("sent").Inc()
	s.active.Add(-1)
	s.m.Active.Dec()
	s.wg.Done()
}

// Adopt takes over a session handed from another process and splices it
// from now on; it owns h.FDs, closing them if it fails.
func (s *Server) Adopt(h HandedSession) error {
	want := 2
	for _, d := range h.State.Dirs {
		if d.Pending > 0 {
			want += 2
		}
	}
	if s.parker == nil || len(h.FDs) != want {
		closeFDs(h.FDs)
		if s.parker == nil {
			return ErrHandoffUnsupported
		}
		return fmt.Errorf("proxy: handed session %d has %d descriptors, want %d", h.State.ID, len(h.FDs), want)
	}
	client, err := fdConn(h.FDs[0], "client")
	if err != nil {
		closeFDs(h.FDs[1:])
		return err
	}
	gw, err := fdConn(h.FDs[1], "gateway")
	if err != nil {
		client.Close()
		closeFDs(h.FDs[2:])
		return err
	}
	var pipes [2]*pipePair
	next := 2
	for i, d := range h.State.Dirs {
		if d.Pending > 0 {
			pipes[i] = &pipePair{r: h.FDs[next], w: h.FDs[next+1]}
			next += 2
		}
	}
	st := h.State
	ses := &session{client: client, gw: gw, gwID: st.Gateway, id: st.ID, start: st.Start, keyHash: st.KeyHash,
		hello: st.Hello, peer: parseAddr(st.Client, client)}
	if !s.register(ses) {
		// Shutting down: end it as an abort would have there.
		for _, pp := range pipes {
			if pp != nil {
				closePipe(pp)
			}
		}
		ses.abort(endShutdown)
		s.unregister(ses)
		return ErrServerClosed
	}
	s.active.Add(1)
	s.m.Active.Inc()
	s.wg.Add(1)
	s.SetNextConnID(st.ID)
	if err := s.parker.adoptHanded(ses, st.Dirs, pipes); err != nil {
		ses.abort(endInternalError)
		s.endSession(ses, st.Dirs[0].Bytes, st.Dirs[1].Bytes)
		s.connDone()
		return err
	}
	s.m.Handoffs.WithLabelValues("received").Inc()
	return nil
}

// dupConn duplicates c's socket descriptor (close-on-exec).
func dupConn(c net.Conn) (int, error) {
	tc := rawTCP(c)
	if tc == nil {
		return -1, errors.New("not TCP")
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return -1, err
	}
	nfd := -1
	var derr error
	if err := rc.Control(func(fd uintptr) { nfd, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		return -1, err
	}
	return nfd, derr
}

// fdConn makes a connection of a received socket descriptor, which it
// closes (net.FileConn works on a duplicate).
func fdConn(fd int, name string) (net.Conn, error) {
	f := os.NewFile(uintptr(fd), name)
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		return nil, fmt.Errorf("proxy: handed %s socket: %w", name, err)
	}
	return c, nil
}

// parseAddr parses a handed client address, falling back to the socket's
// peer (the load balancer, when a PROXY header had named the client).
func parseAddr(s string, c net.Conn) net.Addr {
	if ap, err := netip.ParseAddrPort(s); err == nil {
		return net.TCPAddrFromAddrPort(ap)
	}
	return c.RemoteAddr()
}

func closeFDs(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}
