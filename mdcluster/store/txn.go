package store

import (
	"fmt"
	"sync"
)

// rawTxn is what an implementation provides underneath txn: operations on
// stored (encoded) keys. txn does the validation, copying, limits and
// lifetime checks, so every implementation behaves the same.
type rawTxn interface {
	// get returns a copy of the value stored under k.
	get(k []byte) ([]byte, bool, error)
	// set stores v under k; v is the store's own copy.
	set(k, v []byte) error
	del(k []byte) error
	// scan calls fn in key order for the stored keys starting with prefix,
	// as of the call, with slices fn may keep.
	scan(prefix []byte, fn func(k, v []byte) error) error
}

// txn implements Txn over a rawTxn.
type txn struct {
	raw    rawTxn
	update bool
	done   bool
	writes int
	bytes  int
}

func (t *txn) usable(op string, ns Namespace, key []byte) error {
	if t.done {
		return fmt.Errorf("%s %s: %w", op, ns, ErrTxnDone)
	}
	return checkKey(op, ns, key)
}

func (t *txn) Get(ns Namespace, key []byte) ([]byte, bool, error) {
	if err := t.usable("get", ns, key); err != nil {
		return nil, false, err
	}
	v, ok, err := t.raw.get(encodeKey(ns, key))
	if err != nil {
		return nil, false, fmt.Errorf("get %s %q: %w", ns, key, err)
	}
	if ok && v == nil {
		v = []byte{}
	}
	return v, ok, nil
}

// count charges one write of n bytes against the Update's limits.
func (t *txn) count(op string, ns Namespace, n int) error {
	if !t.update {
		return fmt.Errorf("%s %s: %w", op, ns, ErrReadOnly)
	}
	if t.writes+1 > MaxTxnWrites {
		return fmt.Errorf("%s %s: %w: more than %d writes", op, ns, ErrTxnTooBig, MaxTxnWrites)
	}
	if t.bytes+n > MaxTxnBytes {
		return fmt.Errorf("%s %s: %w: more than %d bytes of keys and values", op, ns, ErrTxnTooBig, MaxTxnBytes)
	}
	t.writes++
	t.bytes += n
	return nil
}

func (t *txn) Set(ns Namespace, key, value []byte) error {
	if err := t.usable("set", ns, key); err != nil {
		return err
	}
	if len(value) > MaxValueLen {
		return fmt.Errorf("set %s %q: %w: value of %d bytes, max %d", ns, key, ErrInvalid, len(value), MaxValueLen)
	}
	if err := t.count("set", ns, len(key)+len(value)); err != nil {
		return err
	}
	if err := t.raw.set(encodeKey(ns, key), append([]byte{}, value...)); err != nil {
		return fmt.Errorf("set %s %q: %w", ns, key, err)
	}
	return nil
}

func (t *txn) Delete(ns Namespace, key []byte) error {
	if err := t.usable("delete", ns, key); err != nil {
		return err
	}
	if err := t.count("delete", ns, len(key)); err != nil {
		return err
	}
	if err := t.raw.del(encodeKey(ns, key)); err != nil {
		return fmt.Errorf("delete %s %q: %w", ns, key, err)
	}
	return nil
}

func (t *txn) Scan(ns Namespace, prefix []byte, fn func(key, value []byte) error) error {
	if err := t.usable("scan", ns, prefix); err != nil {
		return err
	}
	var fnErr error
	err := t.raw.scan(encodeKey(ns, prefix), func(k, v []byte) error {
		gotNS, key, err := decodeKey(k)
		if err != nil {
			return err
		}
		if gotNS != ns {
			return fmt.Errorf("%w: stored key %q found scanning namespace %q", ErrCorrupt, k, ns)
		}
		if v == nil {
			v = []byte{}
		}
		if fnErr = fn(key, v); fnErr != nil {
			return fnErr
		}
		return nil
	})
	if fnErr != nil {
		return fnErr
	}
	if err != nil {
		return fmt.Errorf("scan %s %q: %w", ns, prefix, err)
	}
	return nil
}

// gate tracks a store's running transactions so Close can wait for them,
// and refuses new ones once the store is closed.
type gate struct {
	mu     sync.Mutex
	idle   sync.Cond
	active int
	closed bool
}

// enter admits one transaction, or fails once the store is closed.
func (g *gate) enter() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return ErrClosed
	}
	g.active++
	return nil
}

func (g *gate) leave() {
	g.mu.Lock()
	g.active--
	if g.active == 0 && g.idle.L != nil {
		g.idle.Broadcast()
	}
	g.mu.Unlock()
}

// close refuses new transactions and, if wait, waits for running ones. It
// reports whether this call closed the gate (false if already closed).
func (g *gate) close(wait bool) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return false
	}
	g.closed = true
	if g.idle.L == nil {
		g.idle.L = &g.mu
	}
	for wait && g.active > 0 {
		g.idle.Wait()
	}
	return true
}

// isClosed reports whether close was called.
func (g *gate) isClosed() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.closed
}
