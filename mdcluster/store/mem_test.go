package store

import (
	"errors"
	"slices"
	"testing"
)

// Crash keeps what finished Updates committed and drops the rest; the
// crashed handle is dead and the data reopens.
func TestMemCrashKeepsOnlyFinishedUpdates(t *testing.T) {
	m := NewMem()
	j := MustJournal(NSJournal)
	// Journalled: the Update returned, so the entry is durable.
	var seq uint64
	mustUpdate(t, m, func(tx Txn) (err error) { seq, err = j.Append(tx, []byte("add disk sdc")); return err })
	// The next Update is under way when the process dies.
	err := m.Update(func(tx Txn) error {
		if err := tx.Set(NSArrays, []byte("md0"), []byte("config with sdc")); err != nil {
			return err
		}
		if err := j.Done(tx, seq); err != nil {
			return err
		}
		m.Crash()
		return nil
	})
	if !errors.Is(err, ErrClosed) {
		t.Fatalf("an Update whose process crashed returned %v, want ErrClosed", err)
	}
	if err := m.View(func(Txn) error { return nil }); !errors.Is(err, ErrClosed) {
		t.Fatalf("View on a crashed handle: %v", err)
	}
	if err := m.Update(func(Txn) error { return nil }); !errors.Is(err, ErrClosed) {
		t.Fatalf("Update on a crashed handle: %v", err)
	}
	m2, err := m.Reopen()
	if err != nil {
		t.Fatal(err)
	}
	defer m2.Close()
	if _, ok := get(t, m2, NSArrays, "md0"); ok {
		t.Fatal("the interrupted Update's write survived the crash")
	}
	var pending []Entry
	_ = m2.View(func(tx Txn) (err error) { pending, err = j.Pending(tx); return err })
	if len(pending) != 1 || pending[0].Seq != seq || string(pending[0].Data) != "add disk sdc" {
		t.Fatalf("after the crash the journal holds %+v, want the entry appended before it", pending)
	}
	// The old handle stays dead after the restart: a zombie cannot write.
	if err := m.Update(func(tx Txn) error { return tx.Set(NSArrays, []byte("zombie"), nil) }); !errors.Is(err, ErrClosed) {
		t.Fatalf("the crashed handle wrote after the restart: %v", err)
	}
	if _, ok := get(t, m2, NSArrays, "zombie"); ok {
		t.Fatal("zombie write visible")
	}
}

// An Update running in another goroutine when the process crashes commits
// nothing, even if it finishes its function afterwards.
func TestMemCrashDuringConcurrentUpdate(t *testing.T) {
	m := NewMem()
	inside, resume := make(chan struct{}), make(chan struct{})
	errc := make(chan error, 1)
	go func() {
		errc <- m.Update(func(tx Txn) error {
			if err := tx.Set(NSArrays, []byte("half"), nil); err != nil {
				return err
			}
			close(inside)
			<-resume
			return tx.Set(NSArrays, []byte("done"), nil)
		})
	}()
	<-inside
	m.Crash() // does not wait for the Update
	m2, err := m.Reopen()
	if err != nil {
		t.Fatal(err)
	}
	defer m2.Close()
	close(resume)
	if err := <-errc; !errors.Is(err, ErrClosed) {
		t.Fatalf("the Update that outlived the crash returned %v", err)
	}
	if got := dump(t, m2, NSArrays); len(got) != 0 {
		t.Fatalf("the interrupted Update committed %q", got)
	}
}

func TestMemReopenWhileOpen(t *testing.T) {
	m := NewMem()
	if _, err := m.Reopen(); err == nil {
		t.Fatal("a second handle opened while the first is open")
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	m2, err := m.Reopen()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m2.Reopen(); err == nil {
		t.Fatal("a third handle opened while the second is open")
	}
	m.Crash() // the closed first handle crashing later changes nothing
	mustUpdate(t, m2, func(tx Txn) error { return tx.Set(NSArrays, []byte("k"), nil) })
}

// SetCommitError makes commits fail like a broken disk, changing nothing.
func TestMemCommitError(t *testing.T) {
	m := NewMem()
	defer m.Close()
	mustUpdate(t, m, func(tx Txn) error { return tx.Set(NSArrays, []byte("a"), []byte("1")) })
	disk := errors.New("I/O error")
	m.SetCommitError(disk)
	err := m.Update(func(tx Txn) error {
		return errors.Join(tx.Set(NSArrays, []byte("a"), []byte("2")), tx.Set(NSArrays, []byte("b"), nil))
	})
	if !errors.Is(err, disk) {
		t.Fatalf("Update with a failing commit: %v", err)
	}
	if got := dump(t, m, NSArrays); !slices.Equal(got, []string{"61=1"}) {
		t.Fatalf("a failed commit changed the store: %q", got)
	}
	if err := SaveHardState(m, hsFixture()); !errors.Is(err, disk) {
		t.Fatalf("SaveHardState over a failing disk: %v", err)
	}
	// An Update that writes nothing has nothing for the disk to refuse.
	mustUpdate(t, m, func(tx Txn) error { _, _, err := tx.Get(NSArrays, []byte("a")); return err })
	m.SetCommitError(nil)
	mustUpdate(t, m, func(tx Txn) error { return tx.Set(NSArrays, []byte("b"), nil) })
}
