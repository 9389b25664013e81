//go:build unix

package transport

import (
	"errors"
	"syscall"
)

// Send writes a frame itself when the connection's writer is idle, so a
// request costs no goroutine switch before it reaches the socket; but Send
// must never block (the lock manager calls it with its lockspace lock held),
// so that write is non-blocking: syscall.RawConn.Write with a function that
// never asks the runtime to wait. Whatever the socket does not take at once
// is left to the writer goroutine.

// initDirect prepares direct writes when the connection exposes its
// descriptor (TCP does).
func (c *conn) initDirect() {
	sc, ok := c.nc.(syscall.Conn)
	if !ok {
		return
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return
	}
	c.raw = rc
	c.rawFn = c.directWrite // built once: a write does not allocate
}

// directWrite writes c.dwBuf from c.dwN on until done or EAGAIN.
func (c *conn) directWrite(fd uintptr) bool {
	for c.dwN < len(c.dwBuf) {
		n, err := syscall.Write(int(fd), c.dwBuf[c.dwN:])
		if err != nil {
			if errors.Is(err, syscall.EINTR) {
				continue
			}
			if !errors.Is(err, syscall.EAGAIN) {
				c.dwErr = err
			}
			return true
		}
		if n <= 0 {
			return true
		}
		c.dwN += n
	}
	return true
}

// tryWrite writes as much of b as the socket takes without blocking and
// returns how much that was.
func (c *conn) tryWrite(b []byte) (int, error) {
	if c.raw == nil {
		return 0, nil
	}
	c.dwBuf, c.dwN, c.dwErr = b, 0, nil
	err := c.raw.Write(c.rawFn)
	n, werr := c.dwN, c.dwErr
	c.dwBuf, c.dwErr = nil, nil
	if err != nil {
		return n, err
	}
	return n, werr
}
