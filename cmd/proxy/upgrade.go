package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/tether-proxy/tether/internal/upgrade"
	"github.com/tether-proxy/tether/internal/version"
	"github.com/tether-proxy/tether/pkg/cluster"
	"github.com/tether-proxy/tether/pkg/proxy"
)

// The SIGUSR2 upgrade, wired: internal/upgrade runs the conversation, this
// file gives it the process (as the old side, oldProcess, and as the new
// side, newProcess).

// exePath is the path this process was started as, made absolute at
// start: an upgrade starts whatever file is at that path then, so a binary
// renamed over it, or a symlink switched to another release, is the new
// version. Without a usable argv[0], the resolved executable.
var exePath, exeErr = startPath()

func startPath() (string, error) {
	arg0 := os.Args[0]
	if strings.Contains(arg0, "/") {
		return filepath.Abs(arg0)
	}
	if p, err := exec.LookPath(arg0); err == nil {
		return filepath.Abs(p)
	}
	return os.Executable()
}

// upgradeResult is how an upgrade this process ran ended.
type upgradeResult struct {
	res upgrade.Result
	err error
}

// upgrade starts a SIGUSR2 upgrade unless one is under way (busy, or this
// process is still taking over from its own predecessor) or it cannot
// work here; it returns the channel its result arrives on.
func (p *process) upgrade(busy bool) (chan upgradeResult, context.CancelFunc) {
	refuse := func(msg string, fields ...zap.Field) (chan upgradeResult, context.CancelFunc) {
		p.upm.Failures.WithLabelValues("unsupported").Inc()
		p.log.Error(msg, fields...)
		return nil, nil
	}
	switch {
	case busy || p.taken != nil:
		p.log.Warn("SIGUSR2 ignored: an upgrade is already under way")
		return nil, nil
	case !p.srv.CanHandOff():
		return refuse("SIGUSR2 refused: with --no-park sessions live in goroutines and Go's splice pipes, which cannot move to another process; restart instead, or run without --no-park")
	case os.Getpid() == 1:
		return refuse("SIGUSR2 refused: this proxy is PID 1 (a container's main process), which cannot hand over and exit without stopping the container; run it under --supervise, or upgrade containers with a rolling update (docs/operating.md)")
	case exeErr != nil:
		return refuse("SIGUSR2 refused: cannot tell which executable to start", zap.Error(exeErr))
	}
	ctx, cancel := context.WithCancel(context.Background())
	ch := make(chan upgradeResult, 1)
	p.log.Info("SIGUSR2: upgrading in place", zap.String("exe", exePath), zap.Int("connections", p.srv.Active()),
		zap.Duration("upgrade_timeout", p.o.upgradeTimeout))
	go func() {
		res, err := upgrade.Run(ctx, oldProcess{p}, upgrade.Config{
			Exe: exePath, Args: p.args, Env: os.Environ(), Stdout: os.Stdout, Stderr: os.Stderr,
			Timeout: p.o.upgradeTimeout, Logger: p.log.Named("upgrade"), Metrics: p.upm,
		})
		ch <- upgradeResult{res, err}
	}()
	return ch, cancel
}

// oldProcess is this process as the old side of an upgrade.
type oldProcess struct{ *process }

var _ upgrade.Old = oldProcess{}

func (o oldProcess) Listeners() ([]upgrade.Listener, error) {
	f, err := tcpListener(o.tcpLn).File()
	if err != nil {
		return nil, fmt.Errorf("client listener: %w", err)
	}
	lns := []upgrade.Listener{{Name: "client", Flag: o.o.listen, File: f}}
	if o.adminLn != nil {
		af, err := tcpListener(o.adminLn).File()
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("admin listener: %w", err)
		}
		lns = append(lns, upgrade.Listener{Name: "admin", Flag: o.o.admin, File: af})
	}
	return lns, nil
}

func (o oldProcess) Snapshot() upgrade.Snapshot {
	var s upgrade.Snapshot
	if node := o.node.Load(); node != nil {
		s.Gateways, s.Peers = node.Gateways(), node.Peers()
	} else if o.relay != nil {
		s.Gateways = o.relay.Gateways()
	}
	s.Drained = o.syncer.DrainedIDs()
	return s
}

func (o oldProcess) StopAccepting() {
	o.srv.StopAccepting()
	<-o.servingDone()
	if a := o.admin.Load(); a != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = a.Shutdown(ctx) // closes this process's descriptor of the socket; the new one serves it
	}
}

func (o oldProcess) ResumeAccepting(lns []upgrade.Listener) error {
	var errs []error
	for _, l := range lns {
		ln, err := net.FileListener(l.File)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", l.Name, err))
			continue
		}
		switch l.Name {
		case "client":
			tln := keepAliveListener{ln.(*net.TCPListener), o.keepAlive()}
			wrapped, err := o.wrap(tln)
			if err != nil {
				ln.Close()
				errs = append(errs, err)
				continue
			}
			o.tcpLn, o.ln = tln, wrapped
			o.startServing(wrapped)
		case "admin":
			o.adminLn = ln
			o.serveAdmin(ln)
		}
	}
	o.writePidFile() // the failed new process had rewritten it
	o.log.Info("upgrade: accepting again", zap.Int("pid", os.Getpid()))
	return errors.Join(errs...)
}

func (o oldProcess) Server() *proxy.Server    { return o.srv }
func (o oldProcess) Changes() <-chan struct{} { return o.changed }
func (o oldProcess) ReleaseGossip()           { o.leaveGossip() }

// readyForTakeover tells the old process that this one is built, and
// takes over in the background (p.taken reports the end).
func (p *process) readyForTakeover() error {
	if !p.srv.CanHandOff() {
		err := errors.New("this configuration has --no-park, so it cannot adopt sessions; restart instead of upgrading")
		p.parent.Refuse(err)
		return err
	}
	if un := p.parent.Unclaimed(); len(un) > 0 {
		err := fmt.Errorf("this configuration no longer serves %s, which the old process passed; restart instead of upgrading", strings.Join(un, ", "))
		p.parent.Refuse(err)
		return err
	}
	if err := p.parent.Ready(); err != nil {
		return fmt.Errorf("upgrade: %w", err)
	}
	p.taken = make(chan error, 1)
	p.log.Info("upgrade: ready; waiting for the old process to hand over", zap.Time("upgrade_started", p.parent.Started()))
	go func() { p.taken <- p.takeOver() }()
	return nil
}

// takeOver receives everything the old process hands over, then takes
// over its gossip node name.
func (p *process) takeOver() error {
	t, err := p.parent.Take(newProcess{p})
	if errors.Is(err, upgrade.ErrAbandoned) {
		p.log.Error("upgrade: the old process gave up before handing over; exiting (it keeps serving)", zap.Error(err))
		return err
	}
	switch {
	case err != nil:
		p.log.Warn("upgrade: the handoff ended early; serving what arrived", zap.Error(err))
	case !t.Released:
		p.log.Warn("upgrade: the old process closed the upgrade socket before releasing gossip (it gave up, or died); serving what arrived")
	}
	if p.o.gossip.Bind != "" {
		p.takeOverGossip()
	}
	p.upm.Duration.Set(t.Took.Seconds())
	p.log.Info("upgrade complete: this process serves everything", zap.Int("sessions_received", t.Sessions),
		zap.Int("sessions_failed", t.Failed), zap.Bool("gossip_released", t.Released), zap.Duration("took", t.Took))
	return nil
}

// takeOverGossip starts gossip under the old process's node name, joins
// through the members it knew, and then routes with it instead of the
// membership the old process passed.
func (p *process) takeOverGossip() {
	seeds := p.parent.Snapshot().Peers
	var node *cluster.Cluster
	for attempt := 1; ; attempt++ {
		n, err := startGossip(p.o, p.tcpLn.Addr().String(), seeds, p.log)
		if err == nil {
			node = n
			break
		}
		if attempt == 50 {
			p.log.Error("upgrade: cannot take over gossip; routing with the membership the old process passed", zap.Error(err))
			return
		}
		time.Sleep(100 * time.Millisecond) // the old process's sockets are closing
	}
	if !p.setNode(node) {
		return
	}
	select {
	case <-node.Joined():
	case <-time.After(10 * time.Second):
		p.log.Warn("upgrade: gossip not joined yet; routing with the old process's membership until it is")
		<-node.Joined()
	}
	p.relay.Attach(node)
}

// newProcess is this process as the new side of an upgrade.
type newProcess struct{ *process }

var _ upgrade.New = newProcess{}

func (n newProcess) Serve(lastConn uint64) {
	n.srv.SetNextConnID(lastConn)
	n.startServing(n.ln)
	if n.adminLn != nil {
		n.serveAdmin(n.adminLn)
	}
	n.writePidFile()
	n.log.Info("upgrade: serving; the old process hands its sessions over", zap.Uint64("last_conn", lastConn), zap.Int("pid", os.Getpid()))
}

func (n newProcess) Adopt(h proxy.HandedSession) error { return n.srv.Adopt(h) }

func (n newProcess) SetMembers(s upgrade.Snapshot) {
	if n.relay != nil {
		n.relay.Set(s.Gateways)
	}
}

// keepAliveListener sets --client-keepalive on each accepted connection:
// for an inherited socket Go cannot, and turns its own default on instead.
type keepAliveListener struct {
	*net.TCPListener
	ka net.KeepAliveConfig
}

func (l keepAliveListener) Accept() (net.Conn, error) {
	c, err := l.AcceptTCP()
	if err != nil {
		return nil, err
	}
	if l.ka.Enable {
		_ = c.SetKeepAliveConfig(l.ka)
	} else {
		_ = c.SetKeepAlive(false)
	}
	return c, nil
}

// tcpListener finds the *net.TCPListener under ln.
func tcpListener(ln net.Listener) *net.TCPListener {
	if k, ok := ln.(keepAliveListener); ok {
		return k.TCPListener
	}
	return ln.(*net.TCPListener)
}

// mergeSeeds joins two seed lists without repeats, in order.
func mergeSeeds(a, b []string) []string {
	seen := map[string]bool{}
	var out []string
	for _, s := range append(append([]string{}, a...), b...) {
		if !seen[s] {
			seen[s] = true
			out = append(out, s)
		}
	}
	return out
}

// buildInfo registers tether_build_info: the version, source revision and
// Go release of this binary, so a dashboard shows an upgrade took.
func buildInfo(reg prometheus.Registerer) {
	g := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "tether_build_info",
		Help: "Always 1; the labels are this binary's version, source revision and Go release (as --version prints them).",
	}, []string{"version", "revision", "goversion"})
	v := version.Get()
	g.WithLabelValues(v.Version, v.Revision, v.GoVersion).Set(1)
	reg.MustRegister(g)
}
