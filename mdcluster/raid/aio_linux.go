//go:build linux && (amd64 || arm64)

package raid

import (
	"encoding/binary"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Linux native AIO (io_setup, io_submit, io_getevents) for the member
// writes of one request. On files and block devices opened with O_DIRECT
// the kernel queues the writes and returns from io_submit, so every
// mirror's write of a request is issued from the calling thread, back to
// back, and the same thread then sleeps once until all of them are done.
// With one blocking pwrite per member the second mirror's write waited
// for another thread to be woken while the caller sat in the first.
//
// Each request borrows an AIO context of its own from a process-wide pool
// and reaps exactly the events it submitted, so no completion can be seen
// by another request or left behind for the next user of the context.
//
// The wait for the completions does not block a thread in io_getevents.
// Each context has an eventfd that the kernel signals once per completed
// write (IOCB_FLAG_RESFD), registered with the runtime's network poller:
// the request's goroutine parks on it like on a socket, and reaps the
// events with a non-blocking io_getevents once all have been signalled. A
// thread blocked in a system call keeps its processor until the runtime's
// monitor takes it back (after 20 µs or more) and hands it to another
// thread; with a write of every request in flight that way (32 at a time
// under a queue-depth-32 load) those hand-offs and the monitor's fast
// polling were most of the process's context switches. A context whose
// eventfd cannot be polled reaps by blocking, as before.

// The kernel's struct iocb and struct io_event (little-endian layout:
// aio_key comes before aio_rw_flags, hence the build constraint).
type iocb struct {
	data     uint64
	key      uint32
	rwFlags  int32
	opcode   uint16
	reqprio  int16
	fd       uint32
	buf      uint64
	nbytes   uint64
	offset   int64
	reserved uint64
	flags    uint32
	resfd    uint32
}

type ioEvent struct {
	data, obj uint64
	res, res2 int64
}

const iocbCmdPwrite = 1

// iocbFlagResfd asks the kernel to signal the iocb's resfd (an eventfd)
// when the write completes.
const iocbFlagResfd = 1

// aioMaxBatch is the most writes one request submits at once (a raid1 of
// up to aioMaxBatch mirrors, or raid10 pieces); larger batches use the
// blocking path.
const aioMaxBatch = 16

// aioMaxContexts bounds the contexts the pool creates. Each reserves
// kernel memory and a share of fs.aio-max-nr for the life of the
// process; a request that finds none free uses the blocking path.
const aioMaxContexts = 128

type aioCtx struct {
	id     uintptr
	cbs    [aioMaxBatch]iocb
	ptrs   [aioMaxBatch]*iocb
	events [aioMaxBatch]ioEvent
	done   *completionFD // nil: reap by blocking in io_getevents
}

// completionFD is a context's eventfd, registered with the runtime's
// poller, that counts its completed writes.
type completionFD struct {
	f  *os.File // keeps the descriptor open and registered
	rc syscall.RawConn
	fd int
}

// newCompletionFD returns a pollable eventfd, or nil when there is none
// (the context then reaps by blocking).
func newCompletionFD() *completionFD {
	fd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		return nil
	}
	// A non-blocking descriptor given to os.NewFile is registered with
	// the poller if the poller accepts it; SyscallConn's Read fails on
	// one it did not.
	f := os.NewFile(uintptr(fd), "aio-completions")
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil
	}
	c := &completionFD{f: f, rc: rc, fd: fd}
	// Check that waiting works: the first check signals and finds nothing
	// counted yet, the wait returns on that event, the second check reads
	// the count.
	calls := 0
	var got uint64
	err = rc.Read(func(uintptr) bool {
		calls++
		if calls == 1 {
			var one [8]byte
			binary.NativeEndian.PutUint64(one[:], 1)
			unix.Write(fd, one[:])
			return false
		}
		got += c.take()
		return got > 0
	})
	if err != nil || got != 1 {
		f.Close()
		return nil
	}
	return c
}

// take reads and resets the count of completions signalled since the last
// take (0 when there were none).
func (c *completionFD) take() uint64 {
	var b [8]byte
	for {
		n, err := unix.Read(c.fd, b[:])
		switch {
		case err == unix.EINTR:
			continue
		case err != nil || n != 8:
			return 0 // EAGAIN: nothing yet
		}
		return binary.NativeEndian.Uint64(b[:])
	}
}

// wait parks the calling goroutine in the poller until n completions have
// been signalled.
func (c *completionFD) wait(n int) {
	var got uint64
	err := c.rc.Read(func(uintptr) bool {
		got += c.take()
		return got >= uint64(n)
	})
	if err != nil {
		// The descriptor is never closed while the context lives and was
		// checked pollable.
		panic("raid: waiting for AIO completions: " + err.Error())
	}
}

var aioPool struct {
	mu      sync.Mutex
	free    []*aioCtx
	created int
	// off is set once io_setup said the kernel has no AIO (ENOSYS) or
	// refused it for good; nothing asks again.
	off atomic.Bool
}

// getAIOCtx returns a context, or nil when none is free and no more may
// (or can) be created.
func getAIOCtx() *aioCtx {
	if aioPool.off.Load() {
		return nil
	}
	aioPool.mu.Lock()
	if n := len(aioPool.free); n > 0 {
		c := aioPool.free[n-1]
		aioPool.free = aioPool.free[:n-1]
		aioPool.mu.Unlock()
		return c
	}
	if aioPool.created >= aioMaxContexts {
		aioPool.mu.Unlock()
		return nil
	}
	aioPool.created++
	aioPool.mu.Unlock()
	c, e := newAIOCtx(true)
	if e != 0 {
		aioPool.mu.Lock()
		aioPool.created--
		aioPool.mu.Unlock()
		if e == unix.ENOSYS || e == unix.EPERM {
			aioPool.off.Store(true)
		}
		return nil // EAGAIN (fs.aio-max-nr reached): the blocking path
	}
	return c
}

// newAIOCtx sets up a context; with poll, one that waits for its
// completions on an eventfd in the poller where it can (see
// completionFD), else one that reaps by blocking in io_getevents.
func newAIOCtx(poll bool) (*aioCtx, unix.Errno) {
	c := new(aioCtx)
	if _, _, e := unix.Syscall(unix.SYS_IO_SETUP, aioMaxBatch, uintptr(unsafe.Pointer(&c.id)), 0); e != 0 {
		return nil, e
	}
	if poll {
		c.done = newCompletionFD()
	}
	return c, 0
}

func putAIOCtx(c *aioCtx) {
	aioPool.mu.Lock()
	aioPool.free = append(aioPool.free, c)
	aioPool.mu.Unlock()
}

// aioWrite is one write of a batch: p at off on descriptor fd. res is set
// to the bytes written or a negative errno; an errno from submission
// (the write never started) is reported the same way.
type aioWrite struct {
	fd  int
	p   []byte
	off int64
	res int64
}

// aioWriteAll submits every write of ws from this thread and returns when
// all of them have completed, each with its res set. It returns false,
// having started nothing, when AIO is not available (the caller then
// writes the usual way). The buffers must not move or be reused until it
// returns (Go's collector does not move heap objects, and ws keeps them
// alive). hook, when not nil, is called on this thread with false just
// before the batch is submitted (nothing has started yet) and with true
// once every write is submitted, before waiting for them (see
// AIOObserver).
func aioWriteAll(ws []aioWrite, hook func(submitted bool)) bool {
	if len(ws) == 0 || len(ws) > aioMaxBatch {
		return false
	}
	c := getAIOCtx()
	if c == nil {
		return false
	}
	c.writeAll(ws, hook)
	putAIOCtx(c)
	return true
}

// writeAll submits every write of ws (at most aioMaxBatch) on the context
// and returns when all have completed, each with its res set; hook as for
// aioWriteAll.
func (c *aioCtx) writeAll(ws []aioWrite, hook func(submitted bool)) {
	for i := range ws {
		w := &ws[i]
		c.cbs[i] = iocb{
			data: uint64(i), opcode: iocbCmdPwrite, fd: uint32(w.fd),
			buf: uint64(uintptr(unsafe.Pointer(unsafe.SliceData(w.p)))), nbytes: uint64(len(w.p)), offset: w.off,
		}
		if c.done != nil {
			c.cbs[i].flags, c.cbs[i].resfd = iocbFlagResfd, uint32(c.done.fd)
		}
		c.ptrs[i] = &c.cbs[i]
		w.res = 0
	}
	if hook != nil {
		hook(false)
	}
	// Submit; an iocb the kernel refuses outright gets its errno as the
	// result and is skipped (io_submit reports it only when it is the
	// first of the array it was given).
	submitted := 0
	for i := 0; i < len(ws); {
		r, _, e := unix.Syscall(unix.SYS_IO_SUBMIT, c.id, uintptr(len(ws)-i), uintptr(unsafe.Pointer(&c.ptrs[i])))
		switch {
		case e == unix.EINTR:
			continue
		case e != 0:
			ws[i].res = -int64(e)
			i++
		case r == 0: // not expected for a non-empty array; do not spin
			ws[i].res = -int64(unix.EAGAIN)
			i++
		default:
			i += int(r)
			submitted += int(r)
		}
	}
	if hook != nil {
		hook(true)
	}
	// Reap exactly what was submitted: the context goes back to the pool
	// empty. With the eventfd, the events are all in the ring once all
	// are counted (the kernel signals after adding an event), so the
	// io_getevents below returns at once.
	if c.done != nil && submitted > 0 {
		c.done.wait(submitted)
	}
	for got := 0; got < submitted; {
		n, _, e := unix.Syscall6(unix.SYS_IO_GETEVENTS, c.id, uintptr(submitted-got), uintptr(submitted-got),
			uintptr(unsafe.Pointer(&c.events[0])), 0, 0)
		if e == unix.EINTR {
			continue
		}
		if e != 0 {
			// Only a bad context or address gets here: a bug. Writes may
			// still be in flight into buffers the caller would reuse.
			panic("raid: io_getevents: " + e.Error())
		}
		for _, ev := range c.events[:n] {
			ws[ev.data].res = ev.res
		}
		got += int(n)
	}
	runtime.KeepAlive(ws)
}

// aioAvailable reports whether this build can submit native AIO.
const aioAvailable = true
