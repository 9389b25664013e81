package transport

import (
	"io"
	"os"
	"syscall"
	"unsafe"
)

// On Linux the connection's reads and its direct writes use raw system
// calls. The socket is non-blocking, so read(2) and write(2) return at once
// (EAGAIN when they would block, and the runtime's poller is then asked to
// wait), and the scheduler need not be told of each call: on a round trip of
// a few microseconds its bookkeeping around every system call is measurable.

func sysWrite(fd uintptr, b []byte) (int, syscall.Errno) {
	n, _, e := syscall.RawSyscall(syscall.SYS_WRITE, fd, uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)))
	return int(n), e
}

// rawReader reads the connection with raw read(2) calls; bufio sits on it.
type rawReader struct {
	c   *conn
	fn  func(fd uintptr) bool
	buf []byte
	n   int
	err error
}

func newRawReader(c *conn) io.Reader {
	if c.raw == nil {
		return c.nc
	}
	r := &rawReader{c: c}
	r.fn = r.read // built once: Read does not allocate
	return r
}

func (r *rawReader) read(fd uintptr) bool {
	for {
		n, _, e := syscall.RawSyscall(syscall.SYS_READ, fd, uintptr(unsafe.Pointer(&r.buf[0])), uintptr(len(r.buf)))
		switch e {
		case 0:
			r.n = int(n)
			return true
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			return false // the runtime's poller waits for data, then calls us again
		default:
			r.err = os.NewSyscallError("read", e)
			return true
		}
	}
}

// Read reads like net.Conn.Read: read deadlines interrupt it with an error
// matching os.ErrDeadlineExceeded, and a closed stream reports io.EOF.
func (r *rawReader) Read(b []byte) (int, error) {
	if len(b) == 0 {
		return 0, nil
	}
	r.buf, r.n, r.err = b, 0, nil
	err := r.c.raw.Read(r.fn)
	n, rerr := r.n, r.err
	r.buf, r.err = nil, nil
	switch {
	case err != nil:
		return 0, err
	case rerr != nil:
		return 0, rerr
	case n == 0:
		return 0, io.EOF
	}
	return n, nil
}
