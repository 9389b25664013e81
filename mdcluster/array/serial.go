package array

import (
	"context"
	"sync"

	"github.com/mdcluster/mdcluster/dlm"
)

// serialLocker wraps the lockspace handed to the bitmap ownership driver so
// that each lock's operations are serialised. The driver publishes this
// node's resync window with SetLVB then Convert (PW to PW) on its own slot
// lock, and so does the sync loop here, from another goroutine; a DLM lock
// handle takes one operation at a time, and two SetLVB/Convert pairs must
// not interleave. The wrapper keeps the value SetLVB gives and writes it
// into the lock inside the next Convert or Unlock, under the handle's
// mutex, so every conversion publishes a whole window this node set.
type serialLocker struct{ dlm.Locker }

func (l serialLocker) Request(ctx context.Context, spec dlm.LockSpec) (dlm.LockHandle, error) {
	h, err := l.Locker.Request(ctx, spec)
	if err != nil {
		return nil, err
	}
	return &serialHandle{h: h}, nil
}

type serialHandle struct {
	mu      sync.Mutex
	h       dlm.LockHandle
	pending []byte
}

func (s *serialHandle) Resource() string             { return s.h.Resource() }
func (s *serialHandle) Mode() dlm.Mode               { return s.h.Mode() }
func (s *serialHandle) StatusFlags() dlm.StatusFlags { return s.h.StatusFlags() }

func (s *serialHandle) LVB() []byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.pending != nil {
		return append([]byte(nil), s.pending...)
	}
	return s.h.LVB()
}

func (s *serialHandle) SetLVB(b []byte) error {
	if len(b) == 0 {
		return s.h.SetLVB(b) // let the lock report the bad length
	}
	s.mu.Lock()
	s.pending = append([]byte(nil), b...)
	s.mu.Unlock()
	return nil
}

// flushLocked writes a pending value into the lock.
func (s *serialHandle) flushLocked() error {
	if s.pending == nil {
		return nil
	}
	err := s.h.SetLVB(s.pending)
	s.pending = nil
	return err
}

func (s *serialHandle) Convert(ctx context.Context, mode dlm.Mode, flags dlm.Flags) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.flushLocked(); err != nil {
		return err
	}
	return s.h.Convert(ctx, mode, flags)
}

func (s *serialHandle) Unlock(ctx context.Context, flags dlm.Flags) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.flushLocked(); err != nil {
		return err
	}
	return s.h.Unlock(ctx, flags)
}
