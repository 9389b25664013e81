package store

import (
	"encoding/binary"
	"fmt"
	"math"
)

// Journal is an ordered, durable log of pending operations in one
// namespace: the array manager's journal of configuration changes. A change
// is appended (and its Update returns, so it is on disk) before it is
// broadcast to the cluster; once applied everywhere, or rolled back, it is
// removed with Done, in the same Update as the configuration it changed. A
// node that crashed in between finds the change among Pending when it
// starts, in the order the changes were made, and completes or rolls back
// each one:
//
//	j := store.MustJournal(store.NSJournal)
//	var seq uint64
//	err := s.Update(func(tx store.Txn) (err error) { seq, err = j.Append(tx, change); return err })
//	// ... broadcast the change; every node applies it ...
//	err = s.Update(func(tx store.Txn) error {
//		// write the new array configuration, then:
//		return j.Done(tx, seq)
//	})
//
// Sequence numbers start at 1 and are never reused, even after every entry
// is done, so an entry's number also orders it against finished ones.
//
// In the namespace, entry seq is stored under "e" + seq as 8 bytes
// big-endian (so a scan returns entries in order) and the next sequence
// number under "n"; nothing else should be written to a journal's
// namespace.
type Journal struct {
	ns Namespace
}

// Entry is one pending journal entry.
type Entry struct {
	Seq  uint64
	Data []byte
}

var (
	journalNext  = []byte("n")
	journalEntry = []byte("e")
)

// NewJournal returns the journal kept in namespace ns.
func NewJournal(ns Namespace) (Journal, error) {
	if err := ns.Validate(); err != nil {
		return Journal{}, fmt.Errorf("journal: %w", err)
	}
	return Journal{ns: ns}, nil
}

// MustJournal is NewJournal for a constant namespace name; it panics if the
// name is invalid (a programming error).
func MustJournal(ns Namespace) Journal {
	j, err := NewJournal(ns)
	if err != nil {
		panic(err)
	}
	return j
}

// Namespace returns the namespace the journal is kept in.
func (j Journal) Namespace() Namespace { return j.ns }

func entryKey(seq uint64) []byte {
	return binary.BigEndian.AppendUint64(append([]byte{}, journalEntry...), seq)
}

// decodeEntryKey returns the sequence number of a stored entry key.
func decodeEntryKey(k []byte) (uint64, error) {
	if len(k) != len(journalEntry)+8 || string(k[:len(journalEntry)]) != string(journalEntry) {
		return 0, fmt.Errorf("%w: journal entry key %q is not %q + 8 bytes", ErrCorrupt, k, journalEntry)
	}
	seq := binary.BigEndian.Uint64(k[len(journalEntry):])
	if seq == 0 {
		return 0, fmt.Errorf("%w: journal entry with sequence number 0", ErrCorrupt)
	}
	return seq, nil
}

// decodeNext decodes the stored next sequence number.
func decodeNext(v []byte) (uint64, error) {
	if len(v) != 8 {
		return 0, fmt.Errorf("%w: journal counter of %d bytes, want 8", ErrCorrupt, len(v))
	}
	n := binary.BigEndian.Uint64(v)
	if n == 0 {
		return 0, fmt.Errorf("%w: journal counter is 0", ErrCorrupt)
	}
	return n, nil
}

// Append adds data as the newest entry and returns its sequence number.
// It is durable when tx's Update returns nil; if the Update fails, the
// number is not used up. data is at most MaxValueLen bytes.
func (j Journal) Append(tx Txn, data []byte) (uint64, error) {
	next := uint64(1)
	v, ok, err := tx.Get(j.ns, journalNext)
	if err != nil {
		return 0, fmt.Errorf("journal %s: append: %w", j.ns, err)
	}
	if ok {
		if next, err = decodeNext(v); err != nil {
			return 0, fmt.Errorf("journal %s: append: %w", j.ns, err)
		}
	}
	// The counter only grows; an entry at or past it means the counter was
	// lost or damaged, and reusing a number would confuse two changes.
	var last uint64
	err = tx.Scan(j.ns, journalEntry, func(k, _ []byte) error {
		seq, err := decodeEntryKey(k)
		last = seq
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("journal %s: append: %w", j.ns, err)
	}
	if last >= next {
		return 0, fmt.Errorf("journal %s: append: %w: entry %d exists but the counter says next is %d", j.ns, ErrCorrupt, last, next)
	}
	if next == math.MaxUint64 {
		return 0, fmt.Errorf("journal %s: append: sequence numbers exhausted", j.ns)
	}
	if err := tx.Set(j.ns, entryKey(next), data); err != nil {
		return 0, fmt.Errorf("journal %s: append: %w", j.ns, err)
	}
	if err := tx.Set(j.ns, journalNext, binary.BigEndian.AppendUint64(nil, next+1)); err != nil {
		return 0, fmt.Errorf("journal %s: append: %w", j.ns, err)
	}
	return next, nil
}

// Pending returns the entries not yet done, oldest first.
func (j Journal) Pending(tx Txn) ([]Entry, error) {
	var out []Entry
	err := tx.Scan(j.ns, journalEntry, func(k, v []byte) error {
		seq, err := decodeEntryKey(k)
		if err != nil {
			return err
		}
		out = append(out, Entry{Seq: seq, Data: v})
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("journal %s: listing pending entries: %w", j.ns, err)
	}
	return out, nil
}

// Get returns entry seq; ok is false when it is not pending (done, or never
// appended).
func (j Journal) Get(tx Txn, seq uint64) (data []byte, ok bool, err error) {
	data, ok, err = tx.Get(j.ns, entryKey(seq))
	if err != nil {
		return nil, false, fmt.Errorf("journal %s: entry %d: %w", j.ns, seq, err)
	}
	return data, ok, nil
}

// Done removes entry seq: the change it recorded was completed or rolled
// back. Removing an entry that is not pending is an error wrapping
// ErrNotFound, since it means two parties finished one change.
func (j Journal) Done(tx Txn, seq uint64) error {
	_, ok, err := tx.Get(j.ns, entryKey(seq))
	if err != nil {
		return fmt.Errorf("journal %s: done %d: %w", j.ns, seq, err)
	}
	if !ok {
		return fmt.Errorf("journal %s: done %d: %w: no such pending entry", j.ns, seq, ErrNotFound)
	}
	if err := tx.Delete(j.ns, entryKey(seq)); err != nil {
		return fmt.Errorf("journal %s: done %d: %w", j.ns, seq, err)
	}
	return nil
}
