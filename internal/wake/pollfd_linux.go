package wake

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// pollFD is an eventfd registered with the runtime's network poller.
type pollFD struct {
	f  *os.File // keeps the descriptor open (and registered)
	rc syscall.RawConn
	fd int
}

// one is what signal writes: the eventfd counter's increment, 1.
var one = func() (b [8]byte) {
	binary.NativeEndian.PutUint64(b[:], 1)
	return
}()

func newPollFD() (*pollFD, error) {
	fd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	// A non-blocking descriptor given to os.NewFile is registered with the
	// runtime's poller if the poller accepts it.
	f := os.NewFile(uintptr(fd), "wake")
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	p := &pollFD{f: f, rc: rc, fd: fd}
	// Check that waiting works (the descriptor is in the poller): the first
	// check signals and fails, the wait returns on that event and the
	// second check succeeds; an unpollable file fails the wait instead.
	// (The signal must come from inside: RawConn.Read forgets readiness
	// that arrived before it started.)
	calls := 0
	if err := rc.Read(func(uintptr) bool {
		calls++
		if calls == 1 {
			p.signal()
			return false
		}
		return true
	}); err != nil {
		f.Close()
		return nil, fmt.Errorf("eventfd not pollable: %w", err)
	}
	return p, nil
}

// signal makes the descriptor readable again: a new event for the poller.
func (p *pollFD) signal() {
	for {
		_, err := unix.Write(p.fd, one[:])
		if !errors.Is(err, unix.EINTR) {
			return // EAGAIN only if the counter were about to overflow
		}
	}
}

// wait blocks in the poller until ready reports true; ready is checked
// first and after every event. Readiness from before the call is forgotten
// (RawConn.Read starts by resetting it), so ready must check the condition
// itself, not rely on an earlier event.
func (p *pollFD) wait(ready func(uintptr) bool) {
	if err := p.rc.Read(ready); err != nil {
		panic(fmt.Sprintf("wake: waiting on the eventfd: %v", err)) // never closed, checked pollable
	}
}
