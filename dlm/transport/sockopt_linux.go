package transport

import (
	"net"
	"os"
	"syscall"
	"time"
)

// tcpUserTimeout is Linux's TCP_USER_TIMEOUT socket option (not exported by
// package syscall).
const tcpUserTimeout = 0x12

// setUserTimeout bounds how long written data may stay unacknowledged by
// the peer's kernel before the connection is dropped; keepalives only cover
// idle connections, this covers busy ones whose peer died.
func setUserTimeout(tc *net.TCPConn, d time.Duration) error {
	rc, err := tc.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	err = rc.Control(func(fd uintptr) {
		serr = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_TCP, tcpUserTimeout, int(d.Milliseconds()))
	})
	if err != nil {
		return err
	}
	return os.NewSyscallError("setsockopt TCP_USER_TIMEOUT", serr)
}
