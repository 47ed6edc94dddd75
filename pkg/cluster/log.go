package cluster

import (
	"bytes"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// zapWriter receives memberlist's standard-library log lines ("[DEBUG]
// memberlist: ...") and re-emits them through zap at the matching level.
type zapWriter struct {
	log *zap.Logger
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
	if ce := w.log.Check(lvl, string(line)); ce != nil {
		ce.Write()
	}
	return len(p), nil
}
