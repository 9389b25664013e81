package raid

import (
	"fmt"
	"io"
	"sync"

	"github.com/mdcluster/mdcluster/bitmap/intent"
	"github.com/mdcluster/mdcluster/bitmap/ownership"
	"github.com/mdcluster/mdcluster/mdcluster/export/nbd"
)

// The engine is what the daemon exports over NBD.
var _ nbd.Backend = (*Engine)(nil)

// The engine is the array that bitmap/ownership resyncs.
var _ ownership.Array = (*Engine)(nil)

// WriteAt writes p at off (nbd.Backend). With nbd.FUA the data is durable
// on every copy before it returns: each copy is written with FUA (RWF_DSYNC
// on DirectFile). The write-intent bit is durable before any data is
// written in either case.
func (e *Engine) WriteAt(p []byte, off int64, flags nbd.IOFlags) error {
	if err := e.checkRange("write", off, int64(len(p))); err != nil {
		return err
	}
	return e.write(p, off, flags&nbd.FUA != 0)
}

// Trim accepts a discard and does nothing (nbd.Backend). md raid1 passes
// discards down to the members, but what a discarded range then reads
// back as is up to each device, so the mirrors could differ and a later
// check or resync would find (or copy) garbage. Doing nothing keeps every
// copy identical, which NBD allows: a trim is a hint. Advertising it still
// lets file systems issue it (mkfs, fstrim) without an error.
func (e *Engine) Trim(off, n int64, flags nbd.IOFlags) error {
	if err := e.checkRange("trim", off, n); err != nil {
		return err
	}
	e.st.trims.Add(1)
	return nil
}

var (
	zeroOnce sync.Once
	zeroBuf  []byte
)

// WriteZeroes writes zeroes to [off, off+n) through the normal write path
// (bitmap, every copy), in MaxIOSize pieces (nbd.Backend). The engine
// cannot zero faster than that, so with nbd.FastZero it changes nothing
// and returns nbd.ErrNotFast; NoHole is always honoured (nothing is
// deallocated).
func (e *Engine) WriteZeroes(off, n int64, flags nbd.IOFlags) error {
	if err := e.checkRange("write zeroes", off, n); err != nil {
		return err
	}
	if flags&nbd.FastZero != 0 {
		return nbd.ErrNotFast
	}
	zeroOnce.Do(func() { zeroBuf = alignedBuf(DefaultMaxIOSize) })
	piece := int64(min(e.cfg.MaxIOSize, len(zeroBuf)))
	for pos := off; pos < off+n; {
		l := min(piece-pos%piece, off+n-pos)
		if err := e.write(zeroBuf[:l], pos, flags&nbd.FUA != 0); err != nil {
			return fmt.Errorf("raid: write zeroes at %d: %w", pos, err)
		}
		pos += l
	}
	e.st.zeroes.Add(1)
	return nil
}

// Capabilities advertises flush and FUA (members have volatile caches),
// trim (accepted, see Trim), zeroing with the fast-zero refusal, and
// multi-connection safety (the engine has no per-connection state: a
// flush covers writes from every connection). Requests must be aligned to
// the array's logical block size.
func (e *Engine) Capabilities() nbd.Capabilities {
	return nbd.Capabilities{
		Flush: true, Trim: true, WriteZeroes: true, FastZero: true, MultiConn: true,
		MinBlockSize: uint32(e.bs), PreferredBlockSize: uint32(max(e.bs, Alignment)),
	}
}

// WriterAt returns the engine as an io.WriterAt (nbd.Backend's WriteAt
// takes flags, so the engine itself cannot be one). fua makes every write
// durable on return.
func (e *Engine) WriterAt(fua bool) io.WriterAt {
	rw := nbd.NewReadWriterAt(e)
	if fua {
		rw.Flags = nbd.FUA
	}
	return rw
}

// BitmapMirrors returns, for bitmap/intent and bitmap/ownership, the
// members as the bitmap sees them: the bitmap is written to every member
// that is in sync or recovering, and skipped on failed or missing ones
// (md writes its bitmap to every working member). A member whose bitmap
// write or flush fails is failed like on a data error; the bitmap write
// fails only when that leaves no member to hold it, so one bad member
// does not stop every write to the array. Reads of a failed or missing
// member's bitmap fail (ownership then reads the other members).
func (e *Engine) BitmapMirrors() []intent.Device {
	out := make([]intent.Device, len(e.members))
	for i := range e.members {
		out[i] = bitmapMirror{e: e, m: i}
	}
	return out
}

type bitmapMirror struct {
	e *Engine
	m int
}

func (b bitmapMirror) ref() *devRef {
	m := b.e.members[b.m]
	if !m.writable() {
		return nil
	}
	return m.dev.Load()
}

// ReadAt reads the member's bitmap area; it fails for a member not in use.
func (b bitmapMirror) ReadAt(p []byte, off int64) (int, error) {
	r := b.ref()
	if r == nil {
		return 0, fmt.Errorf("bitmap on member %d: member is %s", b.m, b.e.members[b.m].st())
	}
	return r.dev.ReadAt(p, off)
}

// WriteAt writes a bitmap page to the member, skipping members not in use
// and failing the member on an error (see BitmapMirrors).
func (b bitmapMirror) WriteAt(p []byte, off int64) (int, error) {
	r := b.ref()
	if r == nil {
		return len(p), nil
	}
	if err := b.e.gateCheck(); err != nil {
		return 0, fmt.Errorf("bitmap on member %d: %w", b.m, err)
	}
	if _, err := r.dev.WriteAt(p, off); err != nil {
		return 0, b.failed(fmt.Errorf("bitmap write at %d: %w", off, err))
	}
	return len(p), nil
}

// Sync flushes the member, with WriteAt's treatment of errors.
func (b bitmapMirror) Sync() error {
	r := b.ref()
	if r == nil {
		return nil
	}
	if err := b.e.gateCheck(); err != nil {
		return fmt.Errorf("bitmap on member %d: %w", b.m, err)
	}
	if err := r.dev.Sync(); err != nil {
		return b.failed(fmt.Errorf("bitmap flush: %w", err))
	}
	return nil
}

// failed fails the member after a bitmap I/O error and says whether the
// bitmap can do without it.
func (b bitmapMirror) failed(err error) error {
	b.e.members[b.m].errors.Add(1)
	if ch := b.e.failMember(b.m, err); ch != nil {
		<-ch
		for _, m := range b.e.members {
			if m.writable() {
				return nil
			}
		}
	}
	return fmt.Errorf("member %d: %w", b.m, err)
}
