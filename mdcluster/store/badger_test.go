package store

import (
	"encoding/binary"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/dgraph-io/badger/v4"
)

// rawBadger writes raw keys into a badger directory, as an older version of
// the node (or a damaged disk) would have left them.
func rawBadger(t *testing.T, dir string, kv map[string][]byte) {
	t.Helper()
	db, err := badger.Open(badger.DefaultOptions(dir).WithLogger(nil))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	err = db.Update(func(bt *badger.Txn) error {
		for k, v := range kv {
			if err := bt.Set([]byte(k), v); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// rawKeys lists every raw key in a badger directory.
func rawKeys(t *testing.T, dir string) map[string]string {
	t.Helper()
	db, err := badger.Open(badger.DefaultOptions(dir).WithLogger(nil))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	out := map[string]string{}
	err = db.View(func(bt *badger.Txn) error {
		it := bt.NewIterator(badger.DefaultIteratorOptions)
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			v, err := it.Item().ValueCopy(nil)
			if err != nil {
				return err
			}
			out[string(it.Item().Key())] = string(v)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// A data directory from before namespaces opens transparently: the node ID
// and the hard state move to their namespaces, once.
func TestBadgerMigratesFormat0(t *testing.T) {
	dir := t.TempDir()
	hs := hsFixture()
	rawBadger(t, dir, map[string][]byte{
		"node/id":              binary.BigEndian.AppendUint32(nil, 2),
		"membership/hardstate": hs.Marshal(),
	})
	for round := range 2 {
		b, err := OpenBadger(dir, quietLogger())
		if err != nil {
			t.Fatal(err)
		}
		if err := ClaimNodeID(b, 3); err == nil || !strings.Contains(err.Error(), "belongs to node 2") {
			t.Fatalf("round %d: the migrated node ID does not hold: %v", round, err)
		}
		if err := ClaimNodeID(b, 2); err != nil {
			t.Fatal(err)
		}
		got, ok, err := LoadHardState(b)
		if err != nil || !ok || string(got.Marshal()) != string(hs.Marshal()) {
			t.Fatalf("round %d: migrated hard state %+v ok %v err %v", round, got, ok, err)
		}
		if err := b.Close(); err != nil {
			t.Fatal(err)
		}
	}
	raw := rawKeys(t, dir)
	for _, old := range []string{"node/id", "membership/hardstate"} {
		if _, ok := raw[old]; ok {
			t.Errorf("the old key %q is still there", old)
		}
	}
	if raw[string(metaKey("format"))] != "\x01" || len(raw) != 3 {
		t.Fatalf("raw keys after migration: %q", raw)
	}
}

// A directory this program cannot read is refused and left as it was.
func TestBadgerRefusesUnknownFormats(t *testing.T) {
	cases := []struct {
		name string
		kv   map[string][]byte
		want string
	}{
		{"newer format", map[string][]byte{string(metaKey("format")): {2}}, "store format 2"},
		{"damaged format record", map[string][]byte{string(metaKey("format")): {1, 0}}, "format version record of 2 bytes"},
		{"old and new key both present", map[string][]byte{
			"node/id": {0, 0, 0, 1}, string(encodeKey(NSNode, []byte(keyNodeID))): {0, 0, 0, 2},
		}, "exists already"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			rawBadger(t, dir, c.kv)
			before := rawKeys(t, dir)
			b, err := OpenBadger(dir, quietLogger())
			if err == nil {
				b.Close()
				t.Fatal("opened")
			}
			if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), dir) {
				t.Fatalf("error %v, want ErrCorrupt naming the directory and %q", err, c.want)
			}
			after := rawKeys(t, dir)
			if len(after) != len(before) {
				t.Fatalf("refusing changed the directory: %q, was %q", after, before)
			}
			for k, v := range before {
				if after[k] != v {
					t.Fatalf("refusing changed key %q: %q, was %q", k, after[k], v)
				}
			}
		})
	}
}

// Commits are synced (the agreement's promise depends on it), and a
// committed Update is in the files without a clean Close: a copy of the
// directory taken while the store is open, as a power cut would leave it,
// opens with the data.
func TestBadgerDurableWithoutClose(t *testing.T) {
	dir := t.TempDir()
	b, err := OpenBadger(dir, quietLogger())
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if !b.db.Opts().SyncWrites {
		t.Fatal("badger is opened without synchronous writes")
	}
	if err := ClaimNodeID(b, 5); err != nil {
		t.Fatal(err)
	}
	if err := SaveHardState(b, hsFixture()); err != nil {
		t.Fatal(err)
	}
	crashed := t.TempDir()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if e.Name() == "LOCK" {
			continue // held by the live process; a dead one's lock is gone
		}
		copyFile(t, filepath.Join(dir, e.Name()), filepath.Join(crashed, e.Name()))
	}
	c, err := OpenBadger(crashed, quietLogger())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := ClaimNodeID(c, 5); err != nil {
		t.Fatal(err)
	}
	got, ok, err := LoadHardState(c)
	if err != nil || !ok || got.Promised != hsFixture().Promised {
		t.Fatalf("after the simulated power cut: %+v ok %v err %v", got, ok, err)
	}
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	in, err := os.Open(from)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.Create(to)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestBadgerOneProcessPerDirectory(t *testing.T) {
	dir := t.TempDir()
	b, err := OpenBadger(dir, quietLogger())
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if c, err := OpenBadger(dir, quietLogger()); err == nil {
		c.Close()
		t.Fatal("a second store opened on a directory in use")
	}
	if _, err := OpenBadger("", nil); err == nil {
		t.Fatal("opened without a directory")
	}
}
