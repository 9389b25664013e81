package transport

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// idlePoller is a private epoll instance holding one connection's socket,
// armed (EPOLLIN, one-shot) only while no goroutine reads the connection,
// plus an eventfd to wake the watcher. The epoll descriptor is itself
// registered with the Go runtime's poller (an epoll instance is readable
// while it has events), so the watcher parks like any goroutine waiting
// for I/O, holding no thread; since the socket is reported to the private
// instance only while armed, data that a caller reads never wakes it.
type idlePoller struct {
	ep, ev int
	file   *os.File        // ep, registered with the runtime's poller
	rc     syscall.RawConn // file's, to wait on it
	waitFn func(fd uintptr) bool
	ready  bool  // set by waitFn: the socket was reported
	werr   error // set by waitFn
	// The descriptor is used only inside RawConn.Control, which keeps it
	// from being closed meanwhile; ctlFn is built once so arming does not
	// allocate. ctlEv and ctlErr are guarded by the read side's mutex.
	ctlFn  func(fd uintptr)
	ctlOp  int
	ctlEv  unix.EpollEvent
	ctlErr error
	events [4]unix.EpollEvent // wait's buffer (watcher only)
}

const (
	armedEvents    = unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLONESHOT
	disarmedEvents = unix.EPOLLONESHOT
)

func newIdlePoller(c *conn) (*idlePoller, error) {
	if c.raw == nil {
		return nil, errors.New("connection has no file descriptor")
	}
	ep, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("epoll_create1: %w", err)
	}
	ev, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		unix.Close(ep)
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	ip := &idlePoller{ep: ep, ev: ev}
	if err := unix.EpollCtl(ep, unix.EPOLL_CTL_ADD, ev, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(ev)}); err != nil {
		ip.close()
		return nil, fmt.Errorf("epoll_ctl eventfd: %w", err)
	}
	// Non-blocking, so os.NewFile registers it with the runtime's poller.
	if err := unix.SetNonblock(ep, true); err != nil {
		ip.close()
		return nil, fmt.Errorf("epoll fd non-blocking: %w", err)
	}
	ip.file = os.NewFile(uintptr(ep), "idle-epoll")
	rc, err := ip.file.SyscallConn()
	if err != nil {
		ip.close()
		return nil, fmt.Errorf("epoll fd: %w", err)
	}
	ip.rc = rc
	ip.waitFn = ip.poll
	ip.ctlFn = func(fd uintptr) {
		ip.ctlEv.Fd = int32(fd)
		// A raw system call: epoll_ctl never blocks, so the scheduler
		// need not hear of it (the runtime's own poller does the same).
		_, _, e := unix.RawSyscall6(unix.SYS_EPOLL_CTL, uintptr(ip.ep), uintptr(ip.ctlOp), fd,
			uintptr(unsafe.Pointer(&ip.ctlEv)), 0, 0)
		if e != 0 {
			ip.ctlErr = e
		}
	}
	if err := ip.ctl(c, unix.EPOLL_CTL_ADD, disarmedEvents); err != nil {
		ip.close()
		return nil, err
	}
	return ip, nil
}

func (ip *idlePoller) ctl(c *conn, op int, events uint32) error {
	ip.ctlOp, ip.ctlEv.Events, ip.ctlErr = op, events, nil
	if err := c.raw.Control(ip.ctlFn); err != nil {
		return fmt.Errorf("epoll_ctl: %w", err)
	}
	if ip.ctlErr != nil {
		return fmt.Errorf("epoll_ctl: %w", ip.ctlErr)
	}
	return nil
}

// arm makes the poller report the socket's next readability (at once if
// data is already waiting).
func (ip *idlePoller) arm(c *conn) error { return ip.ctl(c, unix.EPOLL_CTL_MOD, armedEvents) }

// disarm stops it reporting.
func (ip *idlePoller) disarm(c *conn) error { return ip.ctl(c, unix.EPOLL_CTL_MOD, disarmedEvents) }

// wait parks until the socket is reported or wake is called; readable
// says which.
func (ip *idlePoller) wait() (readable bool, err error) {
	ip.ready, ip.werr = false, nil
	if err := ip.rc.Read(ip.waitFn); err != nil {
		return false, fmt.Errorf("wait for idle epoll: %w", err)
	}
	return ip.ready, ip.werr
}

// poll collects ready events without blocking; false asks the runtime to
// wait until the epoll instance is readable and call it again.
func (ip *idlePoller) poll(uintptr) bool {
	for {
		n, err := unix.EpollWait(ip.ep, ip.events[:], 0)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			ip.werr = fmt.Errorf("epoll_wait: %w", err)
			return true
		}
		if n == 0 {
			return false
		}
		woken := false
		for _, e := range ip.events[:n] {
			if int(e.Fd) == ip.ev {
				var b [8]byte
				unix.Read(ip.ev, b[:]) // drain; the cause is in the read side's state
				woken = true
			} else {
				ip.ready = true
			}
		}
		return ip.ready || woken
	}
}

// wake interrupts wait.
func (ip *idlePoller) wake() {
	var b [8]byte
	binary.NativeEndian.PutUint64(b[:], 1)
	unix.Write(ip.ev, b[:])
}

func (ip *idlePoller) close() {
	if ip.file != nil {
		ip.file.Close() // closes ep
	} else {
		unix.Close(ip.ep)
	}
	unix.Close(ip.ev)
}
