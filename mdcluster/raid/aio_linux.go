//go:build linux && (amd64 || arm64)

package raid

import (
	"runtime"
	"sync"
	"sync/atomic"
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
	c := new(aioCtx)
	if _, _, e := unix.Syscall(unix.SYS_IO_SETUP, aioMaxBatch, uintptr(unsafe.Pointer(&c.id)), 0); e != 0 {
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
	for i := range ws {
		w := &ws[i]
		c.cbs[i] = iocb{
			data: uint64(i), opcode: iocbCmdPwrite, fd: uint32(w.fd),
			buf: uint64(uintptr(unsafe.Pointer(unsafe.SliceData(w.p)))), nbytes: uint64(len(w.p)), offset: w.off,
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
	// empty.
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
	putAIOCtx(c)
	return true
}

// aioAvailable reports whether this build can submit native AIO.
const aioAvailable = true
