package dlm_test

import (
	"bytes"
	"errors"
	"testing"

	"github.com/mdcluster/mdcluster/dlm"
)

// TestLockerOverLockspace runs the Locker contract over two real nodes: a
// lock taken with an initial value block and no VALBLK publishes that value
// when it is released from EX with VALBLK; a VALBLK reader on the other
// node reads it; a refused NOQUEUE request returns ErrAgain and a nil
// handle (not a typed nil); a blocking callback reaches the holder; a value
// block of the wrong length is refused.
func TestLockerOverLockspace(t *testing.T) {
	c := startCluster(t, 2, nil)
	ls := c.open(t, "locker", 16)
	ctx := withGuard(t)
	var a, b dlm.Locker = ls[0], ls[1]

	val := bytes.Repeat([]byte{0x5a}, 16)
	w, err := a.Request(ctx, dlm.LockSpec{Resource: "message", Mode: dlm.EX, LVB: val})
	if err != nil {
		t.Fatal(err)
	}
	if w.Mode() != dlm.EX || w.Resource() != "message" || !bytes.Equal(w.LVB(), val) {
		t.Fatalf("writer: mode %v resource %q LVB % x", w.Mode(), w.Resource(), w.LVB())
	}
	h, err := b.Request(ctx, dlm.LockSpec{Resource: "message", Mode: dlm.CR, Flags: dlm.NoQueue})
	if !errors.Is(err, dlm.ErrAgain) || h != nil {
		t.Fatalf("NOQUEUE CR against EX: handle %v, %v", h, err)
	}
	if err := w.Unlock(ctx, dlm.ValBlk); err != nil {
		t.Fatal(err)
	}
	if w.Mode() != dlm.ModeIV {
		t.Fatalf("after unlock: %v", w.Mode())
	}
	r, err := b.Request(ctx, dlm.LockSpec{Resource: "message", Mode: dlm.PR, Flags: dlm.ValBlk, LVB: make([]byte, 16)})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(r.LVB(), val) || r.StatusFlags()&dlm.ValNotValid != 0 {
		t.Fatalf("reader: LVB % x flags %v, want % x valid", r.LVB(), r.StatusFlags(), val)
	}

	// A blocking callback, then a conversion down so the waiter gets in.
	blocked := make(chan dlm.Mode, 1)
	if err := r.Unlock(ctx, 0); err != nil {
		t.Fatal(err)
	}
	hold, err := b.Request(ctx, dlm.LockSpec{Resource: "ack", Mode: dlm.CR, OnBlock: func(m dlm.Mode) { blocked <- m }})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		x, err := a.Request(ctx, dlm.LockSpec{Resource: "ack", Mode: dlm.EX})
		if err == nil {
			err = x.Unlock(ctx, 0)
		}
		done <- err
	}()
	select {
	case m := <-blocked:
		if m != dlm.EX {
			t.Fatalf("blocking callback for %v, want EX", m)
		}
	case <-ctx.Done():
		t.Fatal("no blocking callback")
	}
	if err := hold.Convert(ctx, dlm.NL, 0); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}

	if _, err := a.Request(ctx, dlm.LockSpec{Resource: "x", Mode: dlm.EX, LVB: make([]byte, 8)}); !errors.Is(err, dlm.ErrInvalid) {
		t.Fatalf("short LVB: %v", err)
	}
	if a.LVBLen() != 16 {
		t.Fatalf("LVBLen %d", a.LVBLen())
	}
}
