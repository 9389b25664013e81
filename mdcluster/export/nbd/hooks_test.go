package nbd

import (
	"sync"
	"sync/atomic"
	"testing"

	"github.com/mdcluster/mdcluster/internal/fuzzcap"
)

// TestMain bounds fuzz minimisation (see package fuzzcap): the fuzz inputs
// here are byte streams of a few hundred bytes.
func TestMain(m *testing.M) { fuzzcap.Main(m) }

// hookBackend wraps a Backend for tests: it can replace the capabilities,
// fail every call, hold calls at a gate, and it records how many calls run
// at once.
type hookBackend struct {
	Backend
	caps *Capabilities

	// gate, if set, holds each call until a value arrives or it is closed.
	gate chan struct{}
	// entered, if set, receives the operation name as each call starts.
	entered chan string
	// fail, if set (setFail), is returned by every call instead of
	// running it.
	failMu sync.Mutex
	fail   error

	mu        sync.Mutex
	active    int
	maxActive int
	flushes   atomic.Int32
	calls     atomic.Int32
}

func (h *hookBackend) enter(op string) func() {
	h.calls.Add(1)
	h.mu.Lock()
	h.active++
	h.maxActive = max(h.maxActive, h.active)
	h.mu.Unlock()
	if h.entered != nil {
		h.entered <- op
	}
	if h.gate != nil {
		<-h.gate
	}
	return func() {
		h.mu.Lock()
		h.active--
		h.mu.Unlock()
	}
}

func (h *hookBackend) setFail(err error) {
	h.failMu.Lock()
	h.fail = err
	h.failMu.Unlock()
}

func (h *hookBackend) failing() error {
	h.failMu.Lock()
	defer h.failMu.Unlock()
	return h.fail
}

func (h *hookBackend) peak() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.maxActive
}

func (h *hookBackend) ReadAt(p []byte, off int64) (int, error) {
	defer h.enter("read")()
	if err := h.failing(); err != nil {
		return 0, err
	}
	return h.Backend.ReadAt(p, off)
}

func (h *hookBackend) WriteAt(p []byte, off int64, f IOFlags) error {
	defer h.enter("write")()
	if err := h.failing(); err != nil {
		return err
	}
	return h.Backend.WriteAt(p, off, f)
}

func (h *hookBackend) Flush() error {
	defer h.enter("flush")()
	h.flushes.Add(1)
	if err := h.failing(); err != nil {
		return err
	}
	return h.Backend.Flush()
}

func (h *hookBackend) Trim(off, n int64, f IOFlags) error {
	defer h.enter("trim")()
	if err := h.failing(); err != nil {
		return err
	}
	return h.Backend.Trim(off, n, f)
}

func (h *hookBackend) WriteZeroes(off, n int64, f IOFlags) error {
	defer h.enter("zero")()
	if err := h.failing(); err != nil {
		return err
	}
	return h.Backend.WriteZeroes(off, n, f)
}

func (h *hookBackend) Capabilities() Capabilities {
	if h.caps != nil {
		return *h.caps
	}
	return h.Backend.Capabilities()
}

// flagRecorder records the flags each write-type call received.
type flagRecorder struct {
	Backend
	mu    sync.Mutex
	flags []IOFlags
}

func (r *flagRecorder) rec(f IOFlags) {
	r.mu.Lock()
	r.flags = append(r.flags, f)
	r.mu.Unlock()
}

func (r *flagRecorder) last() IOFlags {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.flags) == 0 {
		return 0xff
	}
	return r.flags[len(r.flags)-1]
}

func (r *flagRecorder) WriteAt(p []byte, off int64, f IOFlags) error {
	r.rec(f)
	return r.Backend.WriteAt(p, off, f)
}

func (r *flagRecorder) Trim(off, n int64, f IOFlags) error {
	r.rec(f)
	return r.Backend.Trim(off, n, f)
}

func (r *flagRecorder) WriteZeroes(off, n int64, f IOFlags) error {
	r.rec(f)
	return r.Backend.WriteZeroes(off, n, f)
}
