package store

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"testing"
)

// impl is one Store implementation under the conformance suite.
type impl struct {
	name string
	// open returns a new, empty store, closed at the end of the test.
	open func(t *testing.T) Store
	// reopen closes s cleanly and opens its data again.
	reopen func(t *testing.T, s Store) Store
}

func quietLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

var impls = []impl{
	{
		name: "badger",
		open: func(t *testing.T) Store {
			b, err := OpenBadger(t.TempDir(), quietLogger())
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { b.Close() })
			return b
		},
		reopen: func(t *testing.T, s Store) Store {
			dir := s.(*Badger).dir
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			b, err := OpenBadger(dir, quietLogger())
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { b.Close() })
			return b
		},
	},
	{
		name: "mem",
		open: func(t *testing.T) Store {
			m := NewMem()
			t.Cleanup(func() { m.Close() })
			return m
		},
		reopen: func(t *testing.T, s Store) Store {
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			m, err := s.(*Mem).Reopen()
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { m.Close() })
			return m
		},
	},
}

// forEach runs test against every implementation.
func forEach(t *testing.T, test func(t *testing.T, im impl)) {
	for _, im := range impls {
		t.Run(im.name, func(t *testing.T) { test(t, im) })
	}
}

func mustUpdate(t *testing.T, s Store, fn func(Txn) error) {
	t.Helper()
	if err := s.Update(fn); err != nil {
		t.Fatal(err)
	}
}

func get(t *testing.T, s Store, ns Namespace, key string) (string, bool) {
	t.Helper()
	var v []byte
	var ok bool
	err := s.View(func(tx Txn) (err error) {
		v, ok, err = tx.Get(ns, []byte(key))
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return string(v), ok
}

// dump returns every key=value of ns in scan order.
func dump(t *testing.T, s Store, ns Namespace) []string {
	t.Helper()
	var out []string
	err := s.View(func(tx Txn) error {
		return tx.Scan(ns, nil, func(k, v []byte) error {
			out = append(out, fmt.Sprintf("%x=%s", k, v))
			return nil
		})
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func TestConformanceGetSetDelete(t *testing.T) {
	forEach(t, func(t *testing.T, im impl) {
		s := im.open(t)
		if _, ok := get(t, s, NSArrays, "a"); ok {
			t.Fatal("a fresh store has key a")
		}
		mustUpdate(t, s, func(tx Txn) error {
			if err := tx.Set(NSArrays, []byte("a"), []byte("1")); err != nil {
				return err
			}
			if err := tx.Set(NSArrays, []byte("empty"), nil); err != nil {
				return err
			}
			return tx.Set(NSArrays, nil, []byte("empty key")) // the empty key is a key
		})
		if v, ok := get(t, s, NSArrays, "a"); !ok || v != "1" {
			t.Fatalf("a = %q, %v", v, ok)
		}
		if v, ok := get(t, s, NSArrays, "empty"); !ok || v != "" {
			t.Fatalf("an empty value reads as %q, %v; want present and empty", v, ok)
		}
		if v, ok := get(t, s, NSArrays, ""); !ok || v != "empty key" {
			t.Fatalf("the empty key reads as %q, %v", v, ok)
		}
		mustUpdate(t, s, func(tx Txn) error {
			if err := tx.Delete(NSArrays, []byte("a")); err != nil {
				return err
			}
			return tx.Delete(NSArrays, []byte("never-there"))
		})
		if _, ok := get(t, s, NSArrays, "a"); ok {
			t.Fatal("a survives its Delete")
		}
		if got := dump(t, s, NSArrays); !slices.Equal(got, []string{"=empty key", "656d707479="}) {
			t.Fatalf("after delete: %q", got)
		}
	})
}

// An Update whose function fails changes nothing, and its error comes back
// unchanged.
func TestConformanceFailedUpdateChangesNothing(t *testing.T) {
	forEach(t, func(t *testing.T, im impl) {
		s := im.open(t)
		mustUpdate(t, s, func(tx Txn) error {
			return errors.Join(tx.Set(NSArrays, []byte("keep"), []byte("old")), tx.Set(NSArrays, []byte("doomed"), []byte("old")))
		})
		before := dump(t, s, NSArrays)
		boom := errors.New("boom")
		err := s.Update(func(tx Txn) error {
			for i := range 50 {
				if err := tx.Set(NSArrays, fmt.Appendf(nil, "new%02d", i), []byte("x")); err != nil {
					return err
				}
			}
			if err := tx.Set(NSArrays, []byte("keep"), []byte("new")); err != nil {
				return err
			}
			if err := tx.Delete(NSArrays, []byte("doomed")); err != nil {
				return err
			}
			if err := tx.Set(NSJournal, []byte("other"), []byte("x")); err != nil {
				return err
			}
			return boom
		})
		if err != boom {
			t.Fatalf("Update returned %v, want the function's own error", err)
		}
		if got := dump(t, s, NSArrays); !slices.Equal(got, before) {
			t.Fatalf("a failed Update changed the store: %q, was %q", got, before)
		}
		if got := dump(t, s, NSJournal); len(got) != 0 {
			t.Fatalf("a failed Update wrote another namespace: %q", got)
		}
		// Still after a reopen (nothing half-written reached the disk).
		s = im.reopen(t, s)
		if got := dump(t, s, NSArrays); !slices.Equal(got, before) {
			t.Fatalf("after reopen: %q, was %q", got, before)
		}
	})
}

// A panicking Update function leaves nothing behind and the store usable.
func TestConformancePanicInUpdate(t *testing.T) {
	forEach(t, func(t *testing.T, im impl) {
		s := im.open(t)
		func() {
			defer func() {
				if recover() == nil {
					t.Fatal("the panic did not propagate")
				}
			}()
			_ = s.Update(func(tx Txn) error {
				if err := tx.Set(NSArrays, []byte("p"), []byte("1")); err != nil {
					return err
				}
				return tx.Scan(NSArrays, nil, func(k, v []byte) error { panic("in scan") })
			})
		}()
		if _, ok := get(t, s, NSArrays, "p"); ok {
			t.Fatal("a panicking Update committed")
		}
		mustUpdate(t, s, func(tx Txn) error { return tx.Set(NSArrays, []byte("after"), nil) })
	})
}

// Inside an Update, Get and Scan see the Update's own writes; a View run
// meanwhile does not.
func TestConformanceReadYourWrites(t *testing.T) {
	forEach(t, func(t *testing.T, im impl) {
		s := im.open(t)
		mustUpdate(t, s, func(tx Txn) error {
			return errors.Join(tx.Set(NSArrays, []byte("b"), []byte("old")), tx.Set(NSArrays, []byte("c"), []byte("old")))
		})
		mustUpdate(t, s, func(tx Txn) error {
			if err := tx.Set(NSArrays, []byte("a"), []byte("new")); err != nil {
				return err
			}
			if err := tx.Set(NSArrays, []byte("b"), []byte("new")); err != nil {
				return err
			}
			if err := tx.Delete(NSArrays, []byte("c")); err != nil {
				return err
			}
			if v, ok, err := tx.Get(NSArrays, []byte("b")); err != nil || !ok || string(v) != "new" {
				return fmt.Errorf("own write: b = %q %v %v", v, ok, err)
			}
			if _, ok, err := tx.Get(NSArrays, []byte("c")); err != nil || ok {
				return fmt.Errorf("own delete: c present %v %v", ok, err)
			}
			var seen []string
			if err := tx.Scan(NSArrays, nil, func(k, v []byte) error {
				seen = append(seen, string(k)+"="+string(v))
				return nil
			}); err != nil {
				return err
			}
			if !slices.Equal(seen, []string{"a=new", "b=new"}) {
				return fmt.Errorf("scan in the update saw %q", seen)
			}
			// A View meanwhile sees only what is committed.
			return s.View(func(v Txn) error {
				b, _, err := v.Get(NSArrays, []byte("b"))
				if err != nil || string(b) != "old" {
					return fmt.Errorf("a View during the Update read b = %q (%v), want the committed value", b, err)
				}
				if _, ok, _ := v.Get(NSArrays, []byte("a")); ok {
					return errors.New("a View during the Update sees its uncommitted key")
				}
				return nil
			})
		})
	})
}

// A View reads one snapshot: a commit during it does not show.
func TestConformanceViewSnapshot(t *testing.T) {
	forEach(t, func(t *testing.T, im impl) {
		s := im.open(t)
		mustUpdate(t, s, func(tx Txn) error { return tx.Set(NSArrays, []byte("k"), []byte("v1")) })
		started, committed := make(chan struct{}), make(chan struct{})
		errc := make(chan error, 1)
		go func() {
			errc <- s.View(func(tx Txn) error {
				if _, _, err := tx.Get(NSArrays, []byte("k")); err != nil {
					return err
				}
				close(started)
				<-committed
				v, _, err := tx.Get(NSArrays, []byte("k"))
				if err != nil {
					return err
				}
				n := 0
				if err := tx.Scan(NSArrays, nil, func(_, _ []byte) error { n++; return nil }); err != nil {
					return err
				}
				if string(v) != "v1" || n != 1 {
					return fmt.Errorf("the View saw a later commit: k = %q, %d keys", v, n)
				}
				return nil
			})
		}()
		<-started
		mustUpdate(t, s, func(tx Txn) error {
			return errors.Join(tx.Set(NSArrays, []byte("k"), []byte("v2")), tx.Set(NSArrays, []byte("k2"), nil))
		})
		close(committed)
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
		if v, _ := get(t, s, NSArrays, "k"); v != "v2" {
			t.Fatalf("after the commit k = %q", v)
		}
	})
}

// Scan returns keys in bytewise order, filtered by prefix, and a journal
// keyed by big-endian numbers in numeric order.
func TestConformanceScanOrder(t *testing.T) {
	forEach(t, func(t *testing.T, im impl) {
		s := im.open(t)
		r := rand.New(rand.NewPCG(1, 2))
		var keys [][]byte
		for _, k := range []string{"", "\x00", "\x00\x00", "\xff", "\xff\xff", "a", "a\x00", "ab", "b", "B", "arr", "arrays"} {
			keys = append(keys, []byte(k))
		}
		for _, n := range []uint64{0, 1, 2, 255, 256, 257, 65535, 65536, 1 << 32, 1<<64 - 1} {
			keys = append(keys, binary.BigEndian.AppendUint64([]byte("seq"), n))
		}
		for range 40 {
			k := make([]byte, r.IntN(6))
			for i := range k {
				k[i] = byte(r.IntN(256))
			}
			keys = append(keys, k)
		}
		shuffled := slices.Clone(keys)
		r.Shuffle(len(shuffled), func(i, j int) { shuffled[i], shuffled[j] = shuffled[j], shuffled[i] })
		// Half in one Update, half in another, so the order comes from the
		// store, not from one batch.
		for _, part := range [][][]byte{shuffled[:len(shuffled)/2], shuffled[len(shuffled)/2:]} {
			mustUpdate(t, s, func(tx Txn) error {
				for _, k := range part {
					if err := tx.Set(NSJournal, k, k); err != nil {
						return err
					}
				}
				return nil
			})
		}
		want := slices.Clone(keys)
		slices.SortFunc(want, bytes.Compare)
		want = slices.CompactFunc(want, bytes.Equal)
		check := func(s Store, prefix []byte) {
			t.Helper()
			var got [][]byte
			err := s.View(func(tx Txn) error {
				return tx.Scan(NSJournal, prefix, func(k, v []byte) error {
					if !bytes.Equal(k, v) {
						return fmt.Errorf("key %x has value %x", k, v)
					}
					got = append(got, k)
					return nil
				})
			})
			if err != nil {
				t.Fatal(err)
			}
			var exp [][]byte
			for _, k := range want {
				if bytes.HasPrefix(k, prefix) {
					exp = append(exp, k)
				}
			}
			if !slices.EqualFunc(got, exp, bytes.Equal) {
				t.Fatalf("scan %q:\n got %x\nwant %x", prefix, got, exp)
			}
		}
		for _, p := range []string{"", "a", "\x00", "\xff", "seq", "seq\x00\x00\x00\x00\x00\x00\x01", "none"} {
			check(s, []byte(p))
		}
		// Numeric order of the big-endian sequence numbers.
		var seqs []uint64
		_ = s.View(func(tx Txn) error {
			return tx.Scan(NSJournal, []byte("seq"), func(k, _ []byte) error {
				if len(k) == 11 {
					seqs = append(seqs, binary.BigEndian.Uint64(k[3:]))
				}
				return nil
			})
		})
		if !slices.IsSorted(seqs) || len(seqs) != 10 {
			t.Fatalf("sequence numbers out of order: %v", seqs)
		}
		s = im.reopen(t, s)
		check(s, nil)
	})
}

// Writes made during a Scan do not change that scan but do take effect;
// deleting every scanned key as it goes works.
func TestConformanceWritesDuringScan(t *testing.T) {
	forEach(t, func(t *testing.T, im impl) {
		s := im.open(t)
		mustUpdate(t, s, func(tx Txn) error {
			for _, k := range []string{"b", "d", "f"} {
				if err := tx.Set(NSArrays, []byte(k), []byte("1")); err != nil {
					return err
				}
			}
			return nil
		})
		mustUpdate(t, s, func(tx Txn) error {
			if err := tx.Set(NSArrays, []byte("c"), []byte("pending")); err != nil {
				return err
			}
			var seen []string
			err := tx.Scan(NSArrays, nil, func(k, v []byte) error {
				seen = append(seen, string(k)+"="+string(v))
				if err := tx.Delete(NSArrays, k); err != nil {
					return err
				}
				if string(k) == "b" { // a key the scan has not reached yet
					if err := tx.Delete(NSArrays, []byte("d")); err != nil {
						return err
					}
				}
				if err := tx.Set(NSArrays, []byte("e"), []byte("during")); err != nil {
					return err
				}
				return tx.Set(NSArrays, []byte("f"), []byte("changed"))
			})
			if err != nil {
				return err
			}
			if !slices.Equal(seen, []string{"b=1", "c=pending", "d=1", "f=1"}) {
				return fmt.Errorf("the scan saw %q", seen)
			}
			return nil
		})
		// Every scanned key was deleted; in f's own callback the Delete
		// came before the Set, so f ends "changed"; e was added during.
		if got := dump(t, s, NSArrays); !slices.Equal(got, []string{"65=during", "66=changed"}) {
			t.Fatalf("after the update: %q", got)
		}
	})
}

// An error from a Scan callback stops the scan and comes back unchanged.
func TestConformanceScanStops(t *testing.T) {
	forEach(t, func(t *testing.T, im impl) {
		s := im.open(t)
		mustUpdate(t, s, func(tx Txn) error {
			for i := range 10 {
				if err := tx.Set(NSArrays, []byte{byte(i)}, nil); err != nil {
					return err
				}
			}
			return nil
		})
		stop := errors.New("enough")
		calls := 0
		err := s.View(func(tx Txn) error {
			return tx.Scan(NSArrays, nil, func(k, _ []byte) error {
				calls++
				if calls == 3 {
					return stop
				}
				return nil
			})
		})
		if err != stop || calls != 3 {
			t.Fatalf("scan returned %v after %d calls, want the callback's error after 3", err, calls)
		}
	})
}

// Namespaces cannot see or overwrite each other's keys, whatever the keys
// contain.
func TestConformanceNamespaceIsolation(t *testing.T) {
	forEach(t, func(t *testing.T, im impl) {
		s := im.open(t)
		// Pairs a naive "ns + key" or "ns/key" encoding would confuse.
		type rec struct {
			ns  Namespace
			key string
		}
		recs := []rec{
			{"a", "bc"}, {"ab", "c"}, {"abc", ""},
			{"a", "/b"}, {"a.b", ""}, {"a", ".b"},
			{"x", string(nsPrefix("y")) + "k"}, {"y", "k"},
			{"x", "\x01y"}, {"x", ""},
			{"arrays", string(encodeKey("journal", []byte("1")))}, {"journal", "1"},
		}
		mustUpdate(t, s, func(tx Txn) error {
			for i, r := range recs {
				if err := tx.Set(r.ns, []byte(r.key), fmt.Appendf(nil, "%d", i)); err != nil {
					return err
				}
			}
			return nil
		})
		for i, r := range recs {
			if v, ok := get(t, s, r.ns, r.key); !ok || v != fmt.Sprint(i) {
				t.Errorf("%s/%q = %q, %v; want %d (clobbered by another namespace?)", r.ns, r.key, v, ok, i)
			}
		}
		counts := map[Namespace]int{}
		for _, r := range recs {
			counts[r.ns]++
		}
		for ns, n := range counts {
			if got := dump(t, s, ns); len(got) != n {
				t.Errorf("namespace %s scans %d keys %q, holds %d", ns, len(got), got, n)
			}
		}
		// Deleting in one namespace leaves the look-alike in another.
		mustUpdate(t, s, func(tx Txn) error { return tx.Delete("journal", []byte("1")) })
		if v, ok := get(t, s, "arrays", string(encodeKey("journal", []byte("1")))); !ok || v != "10" {
			t.Fatalf("deleting journal/1 touched arrays' look-alike key: %q %v", v, ok)
		}
		if got := dump(t, s, "empty"); len(got) != 0 {
			t.Fatalf("an unused namespace scans %q", got)
		}
	})
}

// Slices returned by a transaction are the caller's; slices passed in are
// copied.
func TestConformanceCopies(t *testing.T) {
	forEach(t, func(t *testing.T, im impl) {
		s := im.open(t)
		val := []byte("original")
		key := []byte("k")
		mustUpdate(t, s, func(tx Txn) error {
			if err := tx.Set(NSArrays, key, val); err != nil {
				return err
			}
			// The caller reuses its buffers before the commit.
			copy(val, "CLOBBER!")
			key[0] = 'z'
			return nil
		})
		if v, ok := get(t, s, NSArrays, "k"); !ok || v != "original" {
			t.Fatalf("k = %q %v after the caller reused its buffers", v, ok)
		}
		if _, ok := get(t, s, NSArrays, "z"); ok {
			t.Fatal("the key was taken by reference")
		}
		var kept, keptK, keptV []byte
		err := s.View(func(tx Txn) error {
			v, _, err := tx.Get(NSArrays, []byte("k"))
			kept = v
			if err != nil {
				return err
			}
			return tx.Scan(NSArrays, nil, func(k, v []byte) error {
				keptK, keptV = k, v
				return nil
			})
		})
		if err != nil {
			t.Fatal(err)
		}
		mustUpdate(t, s, func(tx Txn) error {
			for i := range 200 { // churn the store's buffers
				if err := tx.Set(NSArrays, fmt.Appendf(nil, "k%03d", i), bytes.Repeat([]byte{byte(i)}, 100)); err != nil {
					return err
				}
			}
			return tx.Set(NSArrays, []byte("k"), []byte("replaced"))
		})
		if string(kept) != "original" || string(keptK) != "k" || string(keptV) != "original" {
			t.Fatalf("kept slices changed: get %q, scan %q=%q", kept, keptK, keptV)
		}
		copy(kept, "XXXXXXXX")
		copy(keptV, "YYYYYYYY")
		if v, _ := get(t, s, NSArrays, "k"); v != "replaced" {
			t.Fatalf("writing a returned slice changed the store: %q", v)
		}
	})
}

func TestConformanceClosed(t *testing.T) {
	forEach(t, func(t *testing.T, im impl) {
		s := im.open(t)
		var leaked Txn
		mustUpdate(t, s, func(tx Txn) error { leaked = tx; return tx.Set(NSArrays, []byte("k"), nil) })
		if err := leaked.Set(NSArrays, []byte("late"), nil); !errors.Is(err, ErrTxnDone) {
			t.Fatalf("Set on a finished Update's Txn: %v", err)
		}
		if _, _, err := leaked.Get(NSArrays, []byte("k")); !errors.Is(err, ErrTxnDone) {
			t.Fatalf("Get on a finished Txn: %v", err)
		}
		_ = s.View(func(tx Txn) error { leaked = tx; return nil })
		if err := leaked.Scan(NSArrays, nil, func(_, _ []byte) error { return nil }); !errors.Is(err, ErrTxnDone) {
			t.Fatalf("Scan on a finished View's Txn: %v", err)
		}
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		if err := s.View(func(Txn) error { return nil }); !errors.Is(err, ErrClosed) {
			t.Fatalf("View after Close: %v", err)
		}
		ran := false
		if err := s.Update(func(Txn) error { ran = true; return nil }); !errors.Is(err, ErrClosed) || ran {
			t.Fatalf("Update after Close: %v (ran %v)", err, ran)
		}
		if err := s.Close(); err != nil {
			t.Fatalf("second Close: %v", err)
		}
	})
}

// Close waits for a running transaction instead of pulling the store from
// under it.
func TestConformanceCloseWaits(t *testing.T) {
	forEach(t, func(t *testing.T, im impl) {
		s := im.open(t)
		inside, release := make(chan struct{}), make(chan struct{})
		errc := make(chan error, 1)
		go func() {
			errc <- s.Update(func(tx Txn) error {
				close(inside)
				<-release
				return tx.Set(NSArrays, []byte("k"), []byte("v"))
			})
		}()
		<-inside
		closed := make(chan error, 1)
		go func() { closed <- s.Close() }()
		select {
		case err := <-closed:
			t.Fatalf("Close returned (%v) while an Update ran", err)
		default:
		}
		close(release)
		if err := <-errc; err != nil {
			t.Fatalf("the Update running at Close: %v", err)
		}
		if err := <-closed; err != nil {
			t.Fatal(err)
		}
		s2 := im.reopen(t, s)
		if v, ok := get(t, s2, NSArrays, "k"); !ok || v != "v" {
			t.Fatalf("the Update that finished during Close is lost: %q %v", v, ok)
		}
	})
}

func TestConformanceReadOnlyView(t *testing.T) {
	forEach(t, func(t *testing.T, im impl) {
		s := im.open(t)
		err := s.View(func(tx Txn) error {
			if err := tx.Set(NSArrays, []byte("k"), nil); !errors.Is(err, ErrReadOnly) {
				return fmt.Errorf("Set in a View: %v", err)
			}
			if err := tx.Delete(NSArrays, []byte("k")); !errors.Is(err, ErrReadOnly) {
				return fmt.Errorf("Delete in a View: %v", err)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	})
}

func TestConformanceValidation(t *testing.T) {
	forEach(t, func(t *testing.T, im impl) {
		s := im.open(t)
		long := Namespace(strings.Repeat("n", MaxNamespaceLen))
		mustUpdate(t, s, func(tx Txn) error {
			// The limits themselves are allowed.
			if err := tx.Set(long, bytes.Repeat([]byte{0xff}, MaxKeyLen), make([]byte, MaxValueLen)); err != nil {
				return err
			}
			return tx.Set("a0-_.z", []byte("k"), nil)
		})
		if got := dump(t, s, long); len(got) != 1 {
			t.Fatalf("the longest namespace holds %d keys", len(got))
		}
		bad := []Namespace{"", long + "n", "Arrays", "0arrays", "-x", "a/b", "a b", "a\x00", "ä", "a\n"}
		err := s.Update(func(tx Txn) error {
			for _, ns := range bad {
				if err := tx.Set(ns, []byte("k"), nil); !errors.Is(err, ErrInvalid) {
					return fmt.Errorf("Set in namespace %q: %v", ns, err)
				}
				if _, _, err := tx.Get(ns, []byte("k")); !errors.Is(err, ErrInvalid) {
					return fmt.Errorf("Get in namespace %q: %v", ns, err)
				}
				if err := tx.Scan(ns, nil, func(_, _ []byte) error { return nil }); !errors.Is(err, ErrInvalid) {
					return fmt.Errorf("Scan of namespace %q: %v", ns, err)
				}
			}
			big := make([]byte, MaxKeyLen+1)
			if err := tx.Set(NSArrays, big, nil); !errors.Is(err, ErrInvalid) {
				return fmt.Errorf("Set of a %d-byte key: %v", len(big), err)
			}
			if err := tx.Delete(NSArrays, big); !errors.Is(err, ErrInvalid) {
				return fmt.Errorf("Delete of a %d-byte key: %v", len(big), err)
			}
			if err := tx.Scan(NSArrays, big, func(_, _ []byte) error { return nil }); !errors.Is(err, ErrInvalid) {
				return fmt.Errorf("Scan with a %d-byte prefix: %v", len(big), err)
			}
			if err := tx.Set(NSArrays, []byte("k"), make([]byte, MaxValueLen+1)); !errors.Is(err, ErrInvalid) {
				return fmt.Errorf("Set of a %d-byte value: %v", MaxValueLen+1, err)
			}
			return errors.New("done")
		})
		if err == nil || err.Error() != "done" {
			t.Fatal(err)
		}
		if err := s.Update(func(tx Txn) error { return tx.Set("Bad", nil, nil) }); err == nil ||
			!strings.Contains(err.Error(), `namespace "Bad"`) {
			t.Fatalf("the error does not name the bad namespace: %v", err)
		}
	})
}

// The transaction limits are enforced the same way everywhere, and an
// Update at the limits commits (badger's own batch limits are not reached).
func TestConformanceTxnLimits(t *testing.T) {
	forEach(t, func(t *testing.T, im impl) {
		s := im.open(t)
		long := Namespace(strings.Repeat("n", MaxNamespaceLen))
		// The most writes, each as large as the byte limit allows.
		mustUpdate(t, s, func(tx Txn) error {
			per := MaxTxnBytes / MaxTxnWrites
			for i := range MaxTxnWrites {
				k := fmt.Appendf(nil, "%08d", i)
				if err := tx.Set(long, k, make([]byte, per-len(k))); err != nil {
					return fmt.Errorf("write %d: %w", i, err)
				}
			}
			if err := tx.Delete(long, []byte("x")); !errors.Is(err, ErrTxnTooBig) {
				return fmt.Errorf("write %d: %v, want ErrTxnTooBig", MaxTxnWrites+1, err)
			}
			return nil
		})
		if got := dump(t, s, long); len(got) != MaxTxnWrites {
			t.Fatalf("%d keys committed, want %d", len(got), MaxTxnWrites)
		}
		// The byte limit with the largest values.
		mustUpdate(t, s, func(tx Txn) error {
			total := 0
			for i := 0; ; i++ {
				k := []byte{byte(i)}
				v := make([]byte, min(MaxValueLen, MaxTxnBytes-total-1))
				err := tx.Set(NSArrays, k, v)
				if total+len(k)+len(v) > MaxTxnBytes {
					if !errors.Is(err, ErrTxnTooBig) {
						return fmt.Errorf("over the byte limit: %v", err)
					}
					break
				}
				if err != nil {
					return err
				}
				total += len(k) + len(v)
				if total == MaxTxnBytes {
					if err := tx.Set(NSArrays, []byte("one more"), nil); !errors.Is(err, ErrTxnTooBig) {
						return fmt.Errorf("past the byte limit: %v", err)
					}
					break
				}
			}
			return nil
		})
	})
}

// Updates are serialised: concurrent read-modify-write Updates lose no
// increment and never fail with a conflict.
func TestConformanceConcurrentUpdates(t *testing.T) {
	forEach(t, func(t *testing.T, im impl) {
		s := im.open(t)
		const workers, each = 4, 25
		var wg sync.WaitGroup
		errs := make(chan error, workers)
		for range workers {
			wg.Go(func() {
				for range each {
					err := s.Update(func(tx Txn) error {
						v, _, err := tx.Get(NSArrays, []byte("counter"))
						if err != nil {
							return err
						}
						var n uint64
						if len(v) == 8 {
							n = binary.BigEndian.Uint64(v)
						}
						return tx.Set(NSArrays, []byte("counter"), binary.BigEndian.AppendUint64(nil, n+1))
					})
					if err != nil {
						errs <- err
						return
					}
					if err := s.View(func(tx Txn) error { _, _, err := tx.Get(NSArrays, []byte("counter")); return err }); err != nil {
						errs <- err
						return
					}
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
		v, _ := get(t, s, NSArrays, "counter")
		if n := binary.BigEndian.Uint64([]byte(v)); n != workers*each {
			t.Fatalf("counter %d, want %d", n, workers*each)
		}
	})
}
