package store

import (
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"testing"
)

func pending(t *testing.T, s Store, j Journal) []Entry {
	t.Helper()
	var es []Entry
	if err := s.View(func(tx Txn) (err error) { es, err = j.Pending(tx); return err }); err != nil {
		t.Fatal(err)
	}
	return es
}

func seqs(es []Entry) []uint64 {
	var out []uint64
	for _, e := range es {
		out = append(out, e.Seq)
	}
	return out
}

func appendEntry(t *testing.T, s Store, j Journal, data string) uint64 {
	t.Helper()
	var seq uint64
	mustUpdate(t, s, func(tx Txn) (err error) { seq, err = j.Append(tx, []byte(data)); return err })
	return seq
}

func TestJournalOrderAndDone(t *testing.T) {
	forEach(t, func(t *testing.T, im impl) {
		s := im.open(t)
		j := MustJournal(NSJournal)
		if es := pending(t, s, j); len(es) != 0 {
			t.Fatalf("fresh journal: %+v", es)
		}
		// Past 255 and 256: the order must be numeric, not by the low byte.
		const n = 300
		for i := 1; i <= n; i++ {
			if seq := appendEntry(t, s, j, fmt.Sprint("change ", i)); seq != uint64(i) {
				t.Fatalf("append %d got sequence %d", i, seq)
			}
		}
		es := pending(t, s, j)
		if len(es) != n || !slices.IsSorted(seqs(es)) || string(es[299].Data) != "change 300" {
			t.Fatalf("pending: %d entries, sorted %v", len(es), slices.IsSorted(seqs(es)))
		}
		// Finish some, in any order.
		mustUpdate(t, s, func(tx Txn) error {
			for _, seq := range []uint64{256, 1, 300, 255} {
				if err := j.Done(tx, seq); err != nil {
					return err
				}
			}
			return nil
		})
		es = pending(t, s, j)
		if len(es) != n-4 || es[0].Seq != 2 || es[len(es)-1].Seq != 299 || slices.Contains(seqs(es), 256) {
			t.Fatalf("after done: %v", seqs(es))
		}
		err := s.Update(func(tx Txn) error { return j.Done(tx, 256) })
		if !errors.Is(err, ErrNotFound) {
			t.Fatalf("done twice: %v", err)
		}
		if err := s.View(func(tx Txn) error {
			d, ok, err := j.Get(tx, 2)
			if err != nil || !ok || string(d) != "change 2" {
				return fmt.Errorf("get 2: %q %v %v", d, ok, err)
			}
			if _, ok, err := j.Get(tx, 1); ok || err != nil {
				return fmt.Errorf("get of a done entry: %v %v", ok, err)
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
	})
}

// Sequence numbers are never reused: not after every entry is done, not
// after a restart; a failed Update does not use one up.
func TestJournalSequenceMonotonic(t *testing.T) {
	forEach(t, func(t *testing.T, im impl) {
		s := im.open(t)
		j := MustJournal(NSJournal)
		a, b := appendEntry(t, s, j, "a"), appendEntry(t, s, j, "b")
		mustUpdate(t, s, func(tx Txn) error { return errors.Join(j.Done(tx, a), j.Done(tx, b)) })
		s = im.reopen(t, s)
		boom := errors.New("broadcast refused")
		if err := s.Update(func(tx Txn) error {
			if _, err := j.Append(tx, []byte("rolled back")); err != nil {
				return err
			}
			return boom
		}); err != boom {
			t.Fatal(err)
		}
		if c := appendEntry(t, s, j, "c"); c != b+1 {
			t.Fatalf("after two done entries, a restart and a failed append: sequence %d, want %d", c, b+1)
		}
		// Two appends in one Update get consecutive numbers.
		var d, e uint64
		mustUpdate(t, s, func(tx Txn) (err error) {
			if d, err = j.Append(tx, []byte("d")); err != nil {
				return err
			}
			e, err = j.Append(tx, []byte("e"))
			return err
		})
		if e != d+1 || d != b+2 {
			t.Fatalf("appends in one update: %d, %d", d, e)
		}
	})
}

// A journal entry is atomic with the other keys of its Update, and
// journals in different namespaces are independent.
func TestJournalAtomicWithOtherKeys(t *testing.T) {
	forEach(t, func(t *testing.T, im impl) {
		s := im.open(t)
		j := MustJournal(NSJournal)
		other := MustJournal("journal-md1")
		seq := appendEntry(t, s, j, "grow md0")
		if seq2 := appendEntry(t, s, other, "x"); seq2 != 1 {
			t.Fatalf("a second journal starts at %d", seq2)
		}
		boom := errors.New("write failed")
		err := s.Update(func(tx Txn) error {
			if err := tx.Set(NSArrays, []byte("md0"), []byte("grown")); err != nil {
				return err
			}
			if err := j.Done(tx, seq); err != nil {
				return err
			}
			return boom
		})
		if err != boom {
			t.Fatal(err)
		}
		if es := pending(t, s, j); len(es) != 1 {
			t.Fatalf("the entry was done without its configuration: %v", seqs(es))
		}
		mustUpdate(t, s, func(tx Txn) error {
			return errors.Join(tx.Set(NSArrays, []byte("md0"), []byte("grown")), j.Done(tx, seq))
		})
		if es := pending(t, s, j); len(es) != 0 {
			t.Fatalf("pending after done: %v", seqs(es))
		}
		if es := pending(t, s, other); len(es) != 1 {
			t.Fatalf("the other journal lost its entry: %v", seqs(es))
		}
	})
}

// Damaged journal records are a clear error and an Append over them writes
// nothing.
func TestJournalCorrupt(t *testing.T) {
	cases := []struct {
		name  string
		key   []byte
		value []byte
	}{
		{"short counter", journalNext, []byte{1}},
		{"zero counter", journalNext, make([]byte, 8)},
		{"short entry key", []byte("e\x00\x01"), []byte("x")},
		{"entry zero", entryKey(0), []byte("x")},
		{"entry past the counter", entryKey(7), []byte("x")},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			forEach(t, func(t *testing.T, im impl) {
				s := im.open(t)
				j := MustJournal(NSJournal)
				appendEntry(t, s, j, "first")
				mustUpdate(t, s, func(tx Txn) error { return tx.Set(NSJournal, c.key, c.value) })
				before := dump(t, s, NSJournal)
				err := s.Update(func(tx Txn) error { _, err := j.Append(tx, []byte("more")); return err })
				if !errors.Is(err, ErrCorrupt) {
					t.Fatalf("append over a damaged journal: %v", err)
				}
				if got := dump(t, s, NSJournal); !slices.Equal(got, before) {
					t.Fatalf("a failed append changed the journal: %q, was %q", got, before)
				}
			})
		})
	}
	if _, err := NewJournal("Bad Name"); !errors.Is(err, ErrInvalid) {
		t.Fatalf("journal with a bad namespace: %v", err)
	}
	if got := binary.BigEndian.Uint64(entryKey(258)[1:]); got != 258 {
		t.Fatalf("entry key layout: %d", got)
	}
}
