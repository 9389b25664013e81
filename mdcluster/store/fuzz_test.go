package store

import (
	"bytes"
	"encoding/binary"
	"errors"
	"slices"
	"testing"
)

// FuzzDecodeKey: decoding any stored key never panics; what decodes
// re-encodes to the same bytes and carries a valid namespace and key.
func FuzzDecodeKey(f *testing.F) {
	f.Add([]byte("\x04nodeid"))
	f.Add([]byte("\x0amembershiphardstate"))
	f.Add([]byte("\x00format"))
	f.Add([]byte("node/id"))
	f.Add([]byte{})
	f.Add([]byte{32})
	f.Add(append([]byte{1, 'a'}, bytes.Repeat([]byte{0xff}, MaxKeyLen+1)...))
	f.Fuzz(func(t *testing.T, b []byte) {
		ns, key, err := decodeKey(b)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("decode error %v does not wrap ErrCorrupt", err)
			}
			return
		}
		if ns.Validate() != nil || len(key) > MaxKeyLen {
			t.Fatalf("decoded an invalid namespace %q or key of %d bytes", ns, len(key))
		}
		if !bytes.Equal(encodeKey(ns, key), b) {
			t.Fatalf("%x decodes to %q/%x, which encodes to %x", b, ns, key, encodeKey(ns, key))
		}
	})
}

// FuzzNamespaceKeys: for any two (namespace, key) pairs, encoding round
// trips, distinct pairs never share a stored key, and one namespace's
// prefix never covers another namespace's key.
func FuzzNamespaceKeys(f *testing.F) {
	f.Add("a", []byte("bc"), "ab", []byte("c"))
	f.Add("x", []byte("\x01yk"), "y", []byte("k"))
	f.Add("arrays", []byte("\x07journal1"), "journal", []byte("1"))
	f.Add("a", []byte(""), "a", []byte("\x00"))
	f.Fuzz(func(t *testing.T, ns1 string, k1 []byte, ns2 string, k2 []byte) {
		a, b := Namespace(ns1), Namespace(ns2)
		if checkKey("fuzz", a, k1) != nil || checkKey("fuzz", b, k2) != nil {
			return
		}
		e1, e2 := encodeKey(a, k1), encodeKey(b, k2)
		for _, c := range []struct {
			ns  Namespace
			key []byte
			enc []byte
		}{{a, k1, e1}, {b, k2, e2}} {
			ns, key, err := decodeKey(c.enc)
			if err != nil || ns != c.ns || !bytes.Equal(key, c.key) {
				t.Fatalf("%q/%x encodes to %x, which decodes to %q/%x (%v)", c.ns, c.key, c.enc, ns, key, err)
			}
		}
		same := a == b && bytes.Equal(k1, k2)
		if bytes.Equal(e1, e2) != same {
			t.Fatalf("%q/%x and %q/%x: stored keys equal %v", a, k1, b, k2, !same)
		}
		if a != b && (bytes.HasPrefix(e2, nsPrefix(a)) || bytes.HasPrefix(e1, nsPrefix(b))) {
			t.Fatalf("namespace %q's prefix covers %q/%x or the other way round", a, b, k2)
		}
		// Order within a namespace is the keys' bytewise order.
		if a == b && bytes.Compare(e1, e2) != bytes.Compare(k1, k2) {
			t.Fatalf("order of %x and %x not kept in namespace %q", k1, k2, a)
		}
	})
}

// FuzzHardState: whatever bytes the membership record holds, loading never
// panics, a failure wraps ErrCorrupt and changes nothing, and what loads
// saves and loads back to the same state.
func FuzzHardState(f *testing.F) {
	f.Add(hsFixture().Marshal())
	f.Add([]byte{})
	f.Add([]byte{1})
	f.Add(append(hsFixture().Marshal(), 0))
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) > MaxValueLen {
			return
		}
		m := NewMem()
		mustUpdate(t, m, func(tx Txn) error { return tx.Set(NSMembership, []byte(keyHardState), b) })
		hs, ok, err := LoadHardState(m)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) || ok {
				t.Fatalf("load failed with %v (ok %v), want ErrCorrupt", err, ok)
			}
			if v, _ := get(t, m, NSMembership, keyHardState); v != string(b) {
				t.Fatal("a failed load changed the record")
			}
			return
		}
		if !ok {
			t.Fatal("a stored record loads as absent")
		}
		if err := SaveHardState(m, hs); err != nil {
			t.Fatal(err)
		}
		again, ok, err := LoadHardState(m)
		if err != nil || !ok || !bytes.Equal(again.Marshal(), hs.Marshal()) {
			t.Fatalf("saved %+v, loaded %+v (%v, %v)", hs, again, ok, err)
		}
	})
}

// FuzzJournal: whatever the journal's namespace holds, Pending and Append
// never panic; a failure wraps ErrCorrupt and an Append that fails writes
// nothing; a successful Append's entry is the newest pending one.
func FuzzJournal(f *testing.F) {
	f.Add([]byte("n"), binary.BigEndian.AppendUint64(nil, 3), []byte("e\x00\x00\x00\x00\x00\x00\x00\x02"), []byte("x"))
	f.Add([]byte("n"), []byte{1}, []byte("e"), []byte{})
	f.Add([]byte("e\x00\x00\x00\x00\x00\x00\x00\x00"), []byte("x"), []byte("q"), []byte("x"))
	f.Fuzz(func(t *testing.T, k1, v1, k2, v2 []byte) {
		if checkKey("fuzz", NSJournal, k1) != nil || checkKey("fuzz", NSJournal, k2) != nil ||
			len(v1) > MaxValueLen || len(v2) > MaxValueLen {
			return
		}
		m := NewMem()
		j := MustJournal(NSJournal)
		mustUpdate(t, m, func(tx Txn) error { return errors.Join(tx.Set(NSJournal, k1, v1), tx.Set(NSJournal, k2, v2)) })
		before := dump(t, m, NSJournal)
		var es []Entry
		if err := m.View(func(tx Txn) (err error) { es, err = j.Pending(tx); return err }); err != nil && !errors.Is(err, ErrCorrupt) {
			t.Fatalf("pending: %v", err)
		}
		var seq uint64
		err := m.Update(func(tx Txn) (err error) { seq, err = j.Append(tx, []byte("new")); return err })
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("append: %v", err)
			}
			if got := dump(t, m, NSJournal); !slices.Equal(got, before) {
				t.Fatal("a failed append changed the journal")
			}
			return
		}
		after := pending(t, m, j)
		if len(after) == 0 || after[len(after)-1].Seq != seq || string(after[len(after)-1].Data) != "new" {
			t.Fatalf("appended %d, pending %v", seq, seqs(after))
		}
		if len(es) > 0 && seq <= es[len(es)-1].Seq {
			t.Fatalf("appended %d after pending %v", seq, seqs(es))
		}
	})
}
