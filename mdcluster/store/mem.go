package store

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"sort"
	"strings"
	"sync"
)

// Mem is an in-memory Store for the simulator and tests. It behaves like
// Badger (same namespaces, limits, ordering, snapshots, errors) and adds
// what a test needs to check crash safety: Crash stops the handle the way a
// process death stops a real node, keeping exactly what finished Updates
// committed, and Reopen gives the restarted node a new handle on that data.
//
// The data (the "disk") is shared by every handle Reopen derives from one
// NewMem; at most one handle is open at a time, as badger allows one
// process per directory.
type Mem struct {
	disk *memDisk
	g    gate
	upd  sync.Mutex // serialises Updates

	mu       sync.Mutex
	crashed  bool
	failWith error // SetCommitError
}

// memDisk is the committed state, surviving handles.
type memDisk struct {
	mu   sync.Mutex
	snap *memSnap
	open *Mem // the handle that may commit; nil when none is open
}

// memSnap is one committed state. It is never modified after it becomes
// current: a commit builds a new one, so a View keeps reading its own.
type memSnap struct {
	m    map[string][]byte
	keys []string // the keys of m, sorted
}

// NewMem returns an empty, open in-memory store.
func NewMem() *Mem {
	d := &memDisk{snap: &memSnap{m: map[string][]byte{}}}
	m := &Mem{disk: d}
	d.open = m
	return m
}

// Crash simulates the death of the process using the store: from now on
// this handle's View and Update fail with ErrClosed, and an Update still
// running (in another goroutine, or the caller's own if Crash is called
// from inside its function) commits nothing. Everything committed by an
// Update that returned nil stays, as it would on disk; Reopen returns the
// restarted process's handle. Crash does not wait for running transactions;
// calling it twice, or after Close, does nothing more.
func (m *Mem) Crash() {
	m.mu.Lock()
	m.crashed = true
	m.mu.Unlock()
	m.g.close(false)
	m.disk.mu.Lock()
	if m.disk.open == m {
		m.disk.open = nil
	}
	m.disk.mu.Unlock()
}

// Reopen returns a new handle on the data of m, as a restarted node opens
// its data directory again. It fails while m (or another handle on the same
// data) is still open: Close or Crash it first.
func (m *Mem) Reopen() (*Mem, error) {
	m.disk.mu.Lock()
	defer m.disk.mu.Unlock()
	if m.disk.open != nil {
		return nil, errors.New("store: in-memory store is still open by another handle (close or crash it first)")
	}
	n := &Mem{disk: m.disk}
	m.disk.open = n
	return n, nil
}

// SetCommitError makes every later commit of an Update that wrote
// something fail with err (wrapped), changing nothing, as a failing disk
// would; nil makes commits succeed again. For tests of what a caller does when durable
// state cannot be written.
func (m *Mem) SetCommitError(err error) {
	m.mu.Lock()
	m.failWith = err
	m.mu.Unlock()
}

func (m *Mem) closedErr() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.crashed {
		return fmt.Errorf("%w (the in-memory store crashed)", ErrClosed)
	}
	return ErrClosed
}

func (m *Mem) current() *memSnap {
	m.disk.mu.Lock()
	defer m.disk.mu.Unlock()
	return m.disk.snap
}

// View implements Store.
func (m *Mem) View(fn func(Txn) error) error {
	if m.g.enter() != nil {
		return fmt.Errorf("store view: %w", m.closedErr())
	}
	defer m.g.leave()
	t := &txn{raw: &memTxn{base: m.current()}}
	defer func() { t.done = true }()
	return fn(t)
}

// Update implements Store.
func (m *Mem) Update(fn func(Txn) error) error {
	if m.g.enter() != nil {
		return fmt.Errorf("store update: %w", m.closedErr())
	}
	defer m.g.leave()
	m.upd.Lock()
	defer m.upd.Unlock()
	mt := &memTxn{base: m.current(), pending: map[string]memWrite{}}
	t := &txn{raw: mt, update: true}
	err := func() error {
		defer func() { t.done = true }()
		return fn(t)
	}()
	if err != nil {
		return err
	}
	if err := m.commit(mt); err != nil {
		return fmt.Errorf("store update: commit: %w", err)
	}
	return nil
}

// commit makes mt's writes the current state, atomically, unless the handle
// crashed (or closed) meanwhile or a commit error is set.
func (m *Mem) commit(mt *memTxn) error {
	m.mu.Lock()
	failWith := m.failWith
	m.mu.Unlock()
	d := m.disk
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.open != m {
		return m.closedErr()
	}
	if len(mt.pending) == 0 {
		return nil // nothing to write, so nothing for a failing disk to refuse
	}
	if failWith != nil {
		return failWith
	}
	next := &memSnap{m: maps.Clone(d.snap.m)}
	for k, w := range mt.pending {
		if w.del {
			delete(next.m, k)
		} else {
			next.m[k] = w.v
		}
	}
	next.keys = slices.Sorted(maps.Keys(next.m))
	d.snap = next
	return nil
}

// Close implements Store: it waits for running transactions, then releases
// the data for Reopen.
func (m *Mem) Close() error {
	if !m.g.close(true) {
		return nil
	}
	m.disk.mu.Lock()
	if m.disk.open == m {
		m.disk.open = nil
	}
	m.disk.mu.Unlock()
	return nil
}

// memWrite is one pending write of an Update.
type memWrite struct {
	v   []byte
	del bool
}

// memTxn is a transaction over a committed snapshot plus, in an Update, its
// pending writes.
type memTxn struct {
	base    *memSnap
	pending map[string]memWrite // nil in a View
}

func (t *memTxn) get(k []byte) ([]byte, bool, error) {
	if w, ok := t.pending[string(k)]; ok {
		if w.del {
			return nil, false, nil
		}
		return append([]byte{}, w.v...), true, nil
	}
	v, ok := t.base.m[string(k)]
	if !ok {
		return nil, false, nil
	}
	return append([]byte{}, v...), true, nil
}

func (t *memTxn) set(k, v []byte) error {
	t.pending[string(k)] = memWrite{v: v}
	return nil
}

func (t *memTxn) del(k []byte) error {
	t.pending[string(k)] = memWrite{del: true}
	return nil
}

func (t *memTxn) scan(prefix []byte, fn func(k, v []byte) error) error {
	p := string(prefix)
	// The keys as of now: the snapshot's, with the pending writes applied.
	// Later writes by fn change t.pending, not this list.
	type kv struct {
		k string
		v []byte
	}
	var list []kv
	keys := t.base.keys
	for i := sort.SearchStrings(keys, p); i < len(keys) && strings.HasPrefix(keys[i], p); i++ {
		if _, ok := t.pending[keys[i]]; !ok {
			list = append(list, kv{keys[i], t.base.m[keys[i]]})
		}
	}
	for k, w := range t.pending {
		if !w.del && strings.HasPrefix(k, p) {
			list = append(list, kv{k, w.v})
		}
	}
	slices.SortFunc(list, func(a, b kv) int { return strings.Compare(a.k, b.k) })
	for _, e := range list {
		if err := fn([]byte(e.k), append([]byte{}, e.v...)); err != nil {
			return err
		}
	}
	return nil
}
