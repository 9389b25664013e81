package raid

import (
	"errors"
	"fmt"
	"sync"
)

// ErrInjected is the error a Fault returns when it has no Err of its own.
var ErrInjected = errors.New("injected I/O error")

// Fault is one rule of a FaultDevice: operations of the kinds in Ops that
// touch [Off, Off+Len) fail with Err.
type Fault struct {
	// Ops is the set of operations the rule applies to (OpRead|OpWrite,
	// …). Sync has no range: a rule with OpSync matches every Sync.
	Ops Op
	// Off and Len give the byte range; Len 0 means the whole device.
	Off, Len int64
	// Err is returned (wrapped); nil means ErrInjected.
	Err error
	// Skip lets the first Skip matching operations through.
	Skip int
	// Count is how many times the rule fires before it is spent; 0 means
	// it never is.
	Count int
	// HealOnWrite removes the rule when a write covering its whole range
	// succeeds: a bad sector the disk remaps when it is rewritten, which
	// is what md's read-error repair counts on.
	HealOnWrite bool
}

// FaultDevice wraps a Device and fails chosen operations, for tests of the
// engine's failure handling. It is the same interface, so it wraps
// DirectFile or MemDevice alike.
type FaultDevice struct {
	Device
	mu    sync.Mutex
	rules []*Fault
	fired int
}

// NewFaultDevice wraps d with no faults.
func NewFaultDevice(d Device) *FaultDevice { return &FaultDevice{Device: d} }

// Inject adds a rule.
func (f *FaultDevice) Inject(r Fault) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.rules = append(f.rules, &r)
}

// Clear removes every rule.
func (f *FaultDevice) Clear() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.rules = nil
}

// Fired returns how many operations the rules failed so far.
func (f *FaultDevice) Fired() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.fired
}

// Rules returns how many rules are still in force.
func (f *FaultDevice) Rules() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.rules)
}

// match returns the error for an operation, if a rule fails it.
func (f *FaultDevice) match(op Op, off, n int64) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	for i, r := range f.rules {
		if r.Ops&op == 0 {
			continue
		}
		if op != OpSync && r.Len != 0 && (off+n <= r.Off || off >= r.Off+r.Len) {
			continue
		}
		if r.Skip > 0 {
			r.Skip--
			continue
		}
		f.fired++
		if r.Count > 0 {
			r.Count--
			if r.Count == 0 {
				f.rules = append(f.rules[:i:i], f.rules[i+1:]...)
			}
		}
		err := r.Err
		if err == nil {
			err = ErrInjected
		}
		return fmt.Errorf("%s at %d+%d: %w", op, off, n, err)
	}
	return nil
}

// heal drops HealOnWrite rules whose range [off, off+n) covers.
func (f *FaultDevice) heal(off, n int64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	kept := f.rules[:0]
	for _, r := range f.rules {
		if r.HealOnWrite && r.Len != 0 && off <= r.Off && r.Off+r.Len <= off+n {
			continue
		}
		kept = append(kept, r)
	}
	f.rules = kept
}

// ReadAt fails when a rule says so, else reads from the wrapped device.
func (f *FaultDevice) ReadAt(p []byte, off int64) (int, error) {
	if err := f.match(OpRead, off, int64(len(p))); err != nil {
		return 0, err
	}
	return f.Device.ReadAt(p, off)
}

// WriteAt fails when a rule says so, else writes to the wrapped device.
func (f *FaultDevice) WriteAt(p []byte, off int64) (int, error) {
	if err := f.match(OpWrite, off, int64(len(p))); err != nil {
		return 0, err
	}
	n, err := f.Device.WriteAt(p, off)
	if err == nil {
		f.heal(off, int64(len(p)))
	}
	return n, err
}

// WriteAtFUA fails when a rule says so, else writes durably.
func (f *FaultDevice) WriteAtFUA(p []byte, off int64) (int, error) {
	if err := f.match(OpWrite, off, int64(len(p))); err != nil {
		return 0, err
	}
	n, err := f.Device.WriteAtFUA(p, off)
	if err == nil {
		f.heal(off, int64(len(p)))
	}
	return n, err
}

// Sync fails when a rule says so, else flushes the wrapped device.
func (f *FaultDevice) Sync() error {
	if err := f.match(OpSync, 0, 0); err != nil {
		return err
	}
	return f.Device.Sync()
}
