package sim

import (
	"context"
	"fmt"
)

// The simulated array under bitmap ownership: the shared member devices and
// the array's resync.

// simArray is one incarnation's view of the array: Resync copies the chunks
// from the first mirror to the second, one per tick (so a crash can strike
// in the middle), and pays the debts of the slots its node holds.
type simArray struct{ on *ownNode }

// Resync implements ownership.Array.
func (a *simArray) Resync(_ context.Context, chunks []uint64) error {
	on, o := a.on, a.on.o
	for _, c := range chunks {
		if on.dead {
			return errGone
		}
		o.resyncChunk(on, c)
		t := o.s.now
		if !on.park(func() bool { return o.s.now > t }) {
			return errGone
		}
	}
	return nil
}

// simDisk is one shared member device: the bitmap area only (the data is
// abstract). Writes are durable at once: the simulation never crashes a
// node in the middle of a step, so a bitmap flush is all or nothing here
// (bitmap/ownership's crash tests cover torn flushes).
type simDisk struct{ b []byte }

// ReadAt reads from the device (io.ReaderAt).
func (d *simDisk) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 || off+int64(len(p)) > int64(len(d.b)) {
		return 0, fmt.Errorf("simdisk: read %d+%d beyond %d", off, len(p), len(d.b))
	}
	return copy(p, d.b[off:]), nil
}

// WriteAt writes to the device, durably (io.WriterAt).
func (d *simDisk) WriteAt(p []byte, off int64) (int, error) {
	if off < 0 || off+int64(len(p)) > int64(len(d.b)) {
		return 0, fmt.Errorf("simdisk: write %d+%d beyond %d", off, len(p), len(d.b))
	}
	return copy(d.b[off:], p), nil
}

// simDev is one incarnation's handle to a shared member device. Once the
// incarnation is gone (crash, fence) it refuses all I/O, as a fenced node's
// storage does. Every write is checked against invariant (b).
type simDev struct {
	on     *ownNode
	d      *simDisk
	mirror int
}

// ReadAt implements intent.Device.
func (v *simDev) ReadAt(p []byte, off int64) (int, error) {
	if v.on.dead {
		return 0, errGone
	}
	return v.d.ReadAt(p, off)
}

// WriteAt implements intent.Device, checking invariants (b) and (c).
func (v *simDev) WriteAt(p []byte, off int64) (int, error) {
	on, o := v.on, v.on.o
	if on.dead {
		return 0, errGone
	}
	l := o.layout
	bits := false
	for s := 0; s < l.Slots; s++ {
		lo, hi := l.SlotOffset(s), l.SlotOffset(s)+l.SlotSize
		if off < hi && off+int64(len(p)) > lo {
			bits = true
			if !on.holdsPW(s) {
				o.fail("(b): node %s wrote bitmap slot %d (mirror %d, byte %d) without holding %s in PW",
					on.n.ID, s, v.mirror, off, o.names[s])
			}
		}
	}
	k, err := v.d.WriteAt(p, off)
	if bits {
		// A bit may be cleared only where another slot keeps the chunk
		// marked: (c) holds at every write, not only between steps.
		o.checkCoverage(fmt.Sprintf("after node %s's bitmap write to mirror %d", on.n.ID, v.mirror))
	}
	return k, err
}

// Sync implements intent.Device: writes are durable at once.
func (v *simDev) Sync() error {
	if v.on.dead {
		return errGone
	}
	return nil
}
