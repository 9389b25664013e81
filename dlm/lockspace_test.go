package dlm_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/dlm"
)

// guard bounds waits that should end promptly, so a broken implementation
// fails instead of hanging; it is never a timing assertion.
const guard = 10 * time.Second

func newNode(t *testing.T) *dlm.Node {
	t.Helper()
	n, err := dlm.NewNode(dlm.Config{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	closeOnCleanup(t, n)
	return n
}

func open(t *testing.T, n *dlm.Node, lvb int) *dlm.Lockspace {
	t.Helper()
	ls, err := n.Open("test", dlm.OpenOptions{LVBLen: lvb})
	if err != nil {
		t.Fatal(err)
	}
	return ls
}

func bg() context.Context { return context.Background() }

func TestLockUnlock(t *testing.T) {
	ls := open(t, newNode(t), 0)
	lk, err := ls.Lock(bg(), "res", dlm.EX, 0)
	if err != nil {
		t.Fatal(err)
	}
	if lk.Mode() != dlm.EX || lk.Resource() != "res" {
		t.Fatalf("mode %v resource %q", lk.Mode(), lk.Resource())
	}
	if _, err := ls.Lock(bg(), "res", dlm.PR, dlm.NoQueue); !errors.Is(err, dlm.ErrAgain) {
		t.Fatalf("NOQUEUE against EX: %v", err)
	}
	if err := lk.Convert(bg(), dlm.PR, 0); err != nil {
		t.Fatal(err)
	}
	if lk.Mode() != dlm.PR {
		t.Fatalf("after convert: %v", lk.Mode())
	}
	if err := lk.Unlock(bg(), 0); err != nil {
		t.Fatal(err)
	}
	if lk.Mode() != dlm.ModeIV {
		t.Fatalf("after unlock: %v", lk.Mode())
	}
	if err := lk.Unlock(bg(), 0); !errors.Is(err, dlm.ErrNotFound) {
		t.Fatalf("second unlock: %v", err)
	}
	if err := lk.Convert(bg(), dlm.EX, 0); !errors.Is(err, dlm.ErrNotFound) {
		t.Fatalf("convert after unlock: %v", err)
	}
}

func TestBlockingCallbackHandOff(t *testing.T) {
	ls := open(t, newNode(t), 0)
	blocked := make(chan dlm.Mode, 4)
	holder, err := ls.Acquire(bg(), dlm.LockRequest{Resource: "r", Mode: dlm.PW,
		OnBlock: func(l *dlm.Lock, m dlm.Mode) {
			blocked <- m
			// Handlers may make locking calls: give way.
			if err := l.Convert(context.Background(), dlm.CR, 0); err != nil {
				t.Errorf("down-convert in handler: %v", err)
			}
		}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(bg(), guard)
	defer cancel()
	waiter, err := ls.Lock(ctx, "r", dlm.PR, 0)
	if err != nil {
		t.Fatalf("waiter: %v", err)
	}
	if m := <-blocked; m != dlm.PR {
		t.Fatalf("blocking callback for %v, want PR", m)
	}
	if holder.Mode() != dlm.CR || waiter.Mode() != dlm.PR {
		t.Fatalf("holder %v waiter %v", holder.Mode(), waiter.Mode())
	}
}

func TestAsyncCompletionOnceAndInOrder(t *testing.T) {
	ls := open(t, newNode(t), 0)
	var mu sync.Mutex
	var log []string
	rec := func(s string) { mu.Lock(); log = append(log, s); mu.Unlock() }
	done := make(chan struct{}, 8)
	a, err := ls.LockAsync(bg(), dlm.LockRequest{Resource: "r", Mode: dlm.EX,
		OnBlock: func(_ *dlm.Lock, m dlm.Mode) { rec("a bast " + m.String()) }},
		func(l *dlm.Lock, err error) { rec(fmt.Sprintf("a done %v", err)); done <- struct{}{} })
	if err != nil {
		t.Fatal(err)
	}
	b, err := ls.LockAsync(bg(), dlm.LockRequest{Resource: "r", Mode: dlm.EX},
		func(l *dlm.Lock, err error) { rec(fmt.Sprintf("b done %v", err)); done <- struct{}{} })
	if err != nil {
		t.Fatal(err)
	}
	<-done
	if err := a.UnlockAsync(bg(), 0, func(_ *dlm.Lock, err error) { rec(fmt.Sprintf("a unlocked %v", err)); done <- struct{}{} }); err != nil {
		t.Fatal(err)
	}
	<-done
	<-done
	mu.Lock()
	got := strings.Join(log, "; ")
	mu.Unlock()
	want := "a done <nil>; a bast EX; a unlocked <nil>; b done <nil>"
	if got != want {
		t.Fatalf("callbacks:\n got %s\nwant %s", got, want)
	}
	if b.Mode() != dlm.EX {
		t.Fatalf("b mode %v", b.Mode())
	}
	select {
	case <-done:
		t.Fatal("a completion was delivered twice")
	case <-time.After(20 * time.Millisecond):
	}
}

func TestDeadlineCancelsWaitingRequest(t *testing.T) {
	ls := open(t, newNode(t), 0)
	if _, err := ls.Lock(bg(), "r", dlm.EX, 0); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(bg(), 5*time.Millisecond)
	defer cancel()
	if _, err := ls.Lock(ctx, "r", dlm.EX, 0); !errors.Is(err, dlm.ErrTimeout) {
		t.Fatalf("deadline: %v, want ErrTimeout", err)
	}
	// The request is gone from the queue.
	d := ls.Dump()
	if len(d) != 1 || len(d[0].Waiting) != 0 {
		t.Fatalf("queue after timeout: %+v", d)
	}
	// Cancelling the context reports ErrCancel; async requests honour it too.
	ctx2, cancel2 := context.WithCancel(bg())
	errc := make(chan error, 1)
	if _, err := ls.LockAsync(ctx2, dlm.LockRequest{Resource: "r", Mode: dlm.PR}, func(_ *dlm.Lock, err error) { errc <- err }); err != nil {
		t.Fatal(err)
	}
	cancel2()
	select {
	case err := <-errc:
		if !errors.Is(err, dlm.ErrCancel) {
			t.Fatalf("async cancel: %v", err)
		}
	case <-time.After(guard):
		t.Fatal("async request not cancelled")
	}
	// A deadline on a conversion leaves the lock in its mode.
	lk, err := ls.Lock(bg(), "q", dlm.PR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ls.Lock(bg(), "q", dlm.PR, 0); err != nil {
		t.Fatal(err)
	}
	ctx3, cancel3 := context.WithTimeout(bg(), 5*time.Millisecond)
	defer cancel3()
	if err := lk.Convert(ctx3, dlm.EX, 0); !errors.Is(err, dlm.ErrTimeout) {
		t.Fatalf("convert deadline: %v", err)
	}
	if lk.Mode() != dlm.PR {
		t.Fatalf("mode after timed-out conversion: %v", lk.Mode())
	}
}

func TestCancelAndForceUnlockEndWaiter(t *testing.T) {
	ls := open(t, newNode(t), 0)
	if _, err := ls.Lock(bg(), "r", dlm.EX, 0); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		do   func(*dlm.Lock) error
		want error
	}{
		{"cancel", (*dlm.Lock).Cancel, dlm.ErrCancel},
		{"force", func(l *dlm.Lock) error { return l.Unlock(bg(), dlm.ForceUnlock) }, dlm.ErrUnlocked},
	} {
		errc := make(chan error, 1)
		w, err := ls.LockAsync(bg(), dlm.LockRequest{Resource: "r", Mode: dlm.EX}, func(_ *dlm.Lock, err error) { errc <- err })
		if err != nil {
			t.Fatal(err)
		}
		if err := w.Unlock(bg(), 0); !errors.Is(err, dlm.ErrBusy) {
			t.Fatalf("%s: plain unlock of a waiting lock: %v", tc.name, err)
		}
		if err := w.Convert(bg(), dlm.NL, 0); !errors.Is(err, dlm.ErrBusy) {
			t.Fatalf("%s: convert of a waiting lock: %v", tc.name, err)
		}
		if err := tc.do(w); err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if err := <-errc; !errors.Is(err, tc.want) {
			t.Fatalf("%s: waiter got %v, want %v", tc.name, err, tc.want)
		}
	}
}

func TestLVBThroughAPI(t *testing.T) {
	ls := open(t, newNode(t), 32)
	w, err := ls.Lock(bg(), "r", dlm.EX, dlm.ValBlk)
	if err != nil {
		t.Fatal(err)
	}
	val := bytes.Repeat([]byte{7}, 32)
	if err := w.SetLVB(val[:31]); !errors.Is(err, dlm.ErrInvalid) {
		t.Fatalf("short LVB: %v", err)
	}
	if err := w.SetLVB(val); err != nil {
		t.Fatal(err)
	}
	if err := w.Convert(bg(), dlm.NL, dlm.ValBlk); err != nil {
		t.Fatal(err)
	}
	r, err := ls.Lock(bg(), "r", dlm.PR, dlm.ValBlk)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(r.LVB(), val) || r.LVBSeq() != 1 || r.StatusFlags() != 0 {
		t.Fatalf("reader: %v seq %d flags %v", r.LVB(), r.LVBSeq(), r.StatusFlags())
	}
	if err := r.Unlock(bg(), 0); err != nil {
		t.Fatal(err)
	}
	if err := w.Convert(bg(), dlm.EX, 0); err != nil {
		t.Fatal(err)
	}
	if err := w.Unlock(bg(), dlm.IVValBlk); err != nil {
		t.Fatal(err)
	}
	r2, err := ls.Lock(bg(), "r", dlm.PW, dlm.ValBlk)
	if err != nil {
		t.Fatal(err)
	}
	if r2.StatusFlags()&dlm.ValNotValid == 0 {
		t.Fatalf("invalidated LVB not reported: %v", r2.StatusFlags())
	}
}

func TestOrphanAdoptionAcrossHandles(t *testing.T) {
	n := newNode(t)
	ls1 := open(t, n, 16)
	lk, err := ls1.Lock(bg(), "bitmap0001", dlm.PW, dlm.Persistent|dlm.ValBlk)
	if err != nil {
		t.Fatal(err)
	}
	if err := lk.SetLVB([]byte("0123456789abcdef")); err != nil {
		t.Fatal(err)
	}
	if err := lk.Convert(bg(), dlm.PW, dlm.Persistent|dlm.ValBlk); err != nil {
		t.Fatal(err)
	}
	if _, err := ls1.Lock(bg(), "other", dlm.EX, 0); err != nil {
		t.Fatal(err)
	}
	if err := ls1.Release(); err != nil {
		t.Fatal(err)
	}
	if err := ls1.Release(); !errors.Is(err, dlm.ErrReleased) {
		t.Fatalf("second release: %v", err)
	}
	ls2 := open(t, n, 16)
	// The non-persistent lock went with its handle.
	if _, err := ls2.Lock(bg(), "other", dlm.EX, dlm.NoQueue); err != nil {
		t.Fatalf("non-persistent lock survived release: %v", err)
	}
	// The persistent one is an orphan that still holds PW.
	if _, err := ls2.Lock(bg(), "bitmap0001", dlm.PW, dlm.NoQueue); !errors.Is(err, dlm.ErrAgain) {
		t.Fatalf("orphan does not hold its mode: %v", err)
	}
	if _, err := ls2.Lock(bg(), "bitmap0001", dlm.EX, dlm.Orphan); !errors.Is(err, dlm.ErrAgain) {
		t.Fatalf("adopt in the wrong mode: %v", err)
	}
	ad, err := ls2.Lock(bg(), "bitmap0001", dlm.PW, dlm.Orphan|dlm.ValBlk)
	if err != nil {
		t.Fatal(err)
	}
	if ad.Mode() != dlm.PW || string(ad.LVB()) != "0123456789abcdef" {
		t.Fatalf("adopted %v %q", ad.Mode(), ad.LVB())
	}
}

func TestReleasedLockspaceRefusesEverything(t *testing.T) {
	n := newNode(t)
	ls := open(t, n, 0)
	lk, err := ls.Lock(bg(), "r", dlm.EX, 0)
	if err != nil {
		t.Fatal(err)
	}
	other := open(t, n, 0)
	ctx, cancel := context.WithTimeout(bg(), guard)
	defer cancel()
	errc := make(chan error, 1)
	go func() {
		_, err := ls.Lock(ctx, "r", dlm.EX, 0) // waits behind lk
		errc <- err
	}()
	for len(other.Dump()) == 0 || len(other.Dump()[0].Waiting) == 0 {
		time.Sleep(time.Millisecond)
	}
	if err := ls.Release(); err != nil {
		t.Fatal(err)
	}
	if err := <-errc; !errors.Is(err, dlm.ErrReleased) {
		t.Fatalf("pending request at release: %v", err)
	}
	if _, err := ls.Lock(bg(), "r", dlm.EX, 0); !errors.Is(err, dlm.ErrReleased) {
		t.Fatalf("lock on released lockspace: %v", err)
	}
	if err := lk.Unlock(bg(), 0); !errors.Is(err, dlm.ErrReleased) {
		t.Fatalf("unlock on released lockspace: %v", err)
	}
	if err := lk.Convert(bg(), dlm.NL, 0); !errors.Is(err, dlm.ErrReleased) {
		t.Fatalf("convert on released lockspace: %v", err)
	}
	// The released handle's lock is gone: another handle gets it.
	if _, err := other.Lock(bg(), "r", dlm.EX, dlm.NoQueue); err != nil {
		t.Fatalf("lock of released handle still held: %v", err)
	}
}

func TestBadInputChangesNothing(t *testing.T) {
	n := newNode(t)
	ls := open(t, n, 0)
	held, err := ls.Lock(bg(), "r", dlm.PR, 0)
	if err != nil {
		t.Fatal(err)
	}
	before := ls.Dump()
	for _, tc := range []struct {
		name string
		want error
		do   func() error
	}{
		{"unknown mode", dlm.ErrInvalid, func() error { _, err := ls.Lock(bg(), "r", dlm.Mode(6), 0); return err }},
		{"long name", dlm.ErrInvalid, func() error { _, err := ls.Lock(bg(), strings.Repeat("n", 65), dlm.PR, 0); return err }},
		{"bad flags", dlm.ErrInvalid, func() error { _, err := ls.Lock(bg(), "r", dlm.PR, dlm.Cancel); return err }},
		{"bad convert mode", dlm.ErrInvalid, func() error { return held.Convert(bg(), dlm.Mode(-3), 0) }},
		{"lvb size", dlm.ErrInvalid, func() error { return held.SetLVB(make([]byte, 8)) }},
		{"nil async callback", dlm.ErrInvalid, func() error {
			_, err := ls.LockAsync(bg(), dlm.LockRequest{Resource: "r", Mode: dlm.PR}, nil)
			return err
		}},
		{"cancelled context", dlm.ErrCancel, func() error {
			ctx, cancel := context.WithCancel(bg())
			cancel()
			_, err := ls.Lock(ctx, "r", dlm.PR, 0)
			return err
		}},
	} {
		if err := tc.do(); !errors.Is(err, tc.want) {
			t.Errorf("%s: %v, want %v", tc.name, err, tc.want)
		}
		if after := ls.Dump(); !reflect.DeepEqual(before, after) {
			t.Errorf("%s changed the lockspace:\n%+v\n%+v", tc.name, before, after)
		}
	}
	if _, err := n.Open("test", dlm.OpenOptions{LVBLen: 32}); !errors.Is(err, dlm.ErrInvalid) {
		t.Errorf("open with another LVB length: %v", err)
	}
	if _, err := n.Open(strings.Repeat("l", 65), dlm.OpenOptions{}); !errors.Is(err, dlm.ErrInvalid) {
		t.Errorf("open with a long name: %v", err)
	}
	if _, err := n.Open("odd", dlm.OpenOptions{LVBLen: 12}); !errors.Is(err, dlm.ErrInvalid) {
		t.Errorf("open with LVB length 12: %v", err)
	}
}

// TestMutualExclusionUnderContention hammers a few resources from many
// goroutines: no two EX holders may ever overlap, and every request ends.
func TestMutualExclusionUnderContention(t *testing.T) {
	ls := open(t, newNode(t), 0)
	const workers, rounds, resources = 8, 300, 3
	var inside [resources]atomic.Int32
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range rounds {
				r := (w + i) % resources
				mode := dlm.EX
				if i%3 == 0 {
					mode = dlm.PR
				}
				ctx, cancel := context.WithTimeout(bg(), guard)
				lk, err := ls.Lock(ctx, fmt.Sprintf("r%d", r), mode, 0)
				cancel()
				if err != nil {
					t.Errorf("lock: %v", err)
					return
				}
				if mode == dlm.EX {
					if inside[r].Add(1) != 1 {
						t.Errorf("two holders inside r%d", r)
					}
					inside[r].Add(-1)
				}
				if err := lk.Unlock(bg(), 0); err != nil {
					t.Errorf("unlock: %v", err)
					return
				}
			}
		}()
	}
	wg.Wait()
	for _, r := range ls.Dump() {
		if !r.Idle || len(r.Granted)+len(r.Converting)+len(r.Waiting) != 0 {
			t.Fatalf("locks left: %+v", r)
		}
	}
}

// closeOnCleanup closes n when the test ends, failing it if Close fails.
func closeOnCleanup(tb testing.TB, n *dlm.Node) {
	tb.Cleanup(func() {
		if err := n.Close(); err != nil {
			tb.Error(err)
		}
	})
}
