package cluster

import (
	"bytes"
	"sync/atomic"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// zapWriter receives memberlist's standard-library log lines ("[DEBUG]
// memberlist: ...") and re-emits them through zap at the matching level.
type zapWriter struct {
	log     *zap.Logger
	closing *atomic.Bool // set once the node leaves: its sockets closing under a send is expected
}

func (w *zapWriter) Write(p []byte) (int, error) {
	line := bytes.TrimSpace(p)
	lvl := zap.InfoLevel
	for _, l := range []struct {
		tag string
		lvl zapcore.Level
	}{{"[DEBUG]", zap.DebugLevel}, {"[INFO]", zap.InfoLevel}, {"[WARN]", zap.WarnLevel}, {"[ERR]", zap.ErrorLevel}, {"[ERROR]", zap.ErrorLevel}} {
		if bytes.HasPrefix(line, []byte(l.tag)) {
			lvl = l.lvl
			line = bytes.TrimSpace(line[len(l.tag):])
			break
		}
	}
	line = bytes.TrimPrefix(line, []byte("memberlist: "))
	if lvl > zap.DebugLevel && w.closing != nil && w.closing.Load() && bytes.Contains(line, []byte("use of closed network connection")) {
		lvl = zap.DebugLevel // a gossip send racing this node's own shutdown
	}
	if ce := w.log.Check(lvl, string(line)); ce != nil {
		ce.Write()
	}
	return len(p), nil
}
