//go:build !linux

package transport

import (
	"net"
	"time"
)

// setUserTimeout is Linux-only; elsewhere keepalives alone detect dead peers.
func setUserTimeout(tc *net.TCPConn, d time.Duration) error { return nil }
