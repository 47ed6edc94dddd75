//go:build !linux

package main

import (
	"os"

	"go.uber.org/zap"
)

const envSupervised = "TETHER_SUPERVISED"

// supervise needs Linux (a child subreaper).
func supervise(_ []string, _ string, _ <-chan os.Signal, log *zap.Logger) int {
	log.Error("--supervise needs Linux")
	return 2
}
