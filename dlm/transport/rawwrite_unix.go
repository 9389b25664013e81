//go:build unix

package transport

import (
	"fmt"
	"os"
	"syscall"
)

// initRaw prepares non-blocking direct writes when the connection exposes
// its file descriptor (TCP does).
func (c *conn) initRaw() {
	sc, ok := c.nc.(syscall.Conn)
	if !ok {
		return
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return
	}
	c.raw = rc
	// Built once per connection, not per write. Control only keeps the
	// descriptor from being closed during the call; writers are already
	// serialised by the peer (conn.writing), and the socket is
	// non-blocking, so the poller's write lock and wait are not needed.
	c.rawFn = c.rawWrite
}

// rawWrite writes c.rwBuf with write(2) on the non-blocking socket, stopping
// at EAGAIN instead of waiting; it never asks the runtime to park.
func (c *conn) rawWrite(fd uintptr) {
	for c.rwN < len(c.rwBuf) {
		n, e := sysWrite(fd, c.rwBuf[c.rwN:])
		switch {
		case e == syscall.EINTR:
			continue
		case e == syscall.EAGAIN:
			return
		case e != 0:
			c.rwErr = os.NewSyscallError("write", e)
			return
		case n <= 0:
			return
		}
		c.rwN += n
	}
}

// tryWrite writes as much of b as the socket takes without blocking and
// returns how much that was. Connections without a descriptor write nothing
// here and leave it all to the flusher.
func (c *conn) tryWrite(b []byte) (int, error) {
	if c.raw == nil {
		return 0, nil
	}
	c.rwBuf, c.rwN, c.rwErr = b, 0, nil
	err := c.raw.Control(c.rawFn)
	n, werr := c.rwN, c.rwErr
	c.rwBuf, c.rwErr = nil, nil
	if err != nil {
		return n, fmt.Errorf("direct write: %w", err)
	}
	return n, werr
}
