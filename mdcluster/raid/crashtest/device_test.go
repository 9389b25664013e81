package crashtest

import (
	"fmt"
	"math/rand/v2"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"unsafe"

	"github.com/mdcluster/mdcluster/mdcluster/raid"
)

// pageSize is the unit of the write-back cache and of the writers' blocks.
const pageSize = 4096

// alignedBuf returns n zero bytes aligned for O_DIRECT.
func alignedBuf(n int) []byte {
	b := make([]byte, n+raid.Alignment)
	skip := 0
	if r := int(uintptr(unsafe.Pointer(&b[0])) & (raid.Alignment - 1)); r != 0 {
		skip = raid.Alignment - r
	}
	return b[skip : skip+n : skip+n]
}

// cacheDev is a member as one node process reaches it: the shared file
// (opened with O_DIRECT, the medium every node sees) behind a volatile
// write-back cache that lives in the process and dies with it, as a disk's
// cache dies with its power. A plain write lands either in the cache or,
// on a seeded coin flip, on the medium at once (a cache may write back
// whenever it likes); Sync writes the cache back and fdatasyncs; a FUA
// write goes to the medium (RWF_DSYNC) at once. So after a SIGKILL exactly
// what was FUA-written or synced is sure to be on the file, and anything
// else may or may not be: what the engine's durability rules must cope
// with. Reads see the cache over the medium.
type cacheDev struct {
	f      *raid.DirectFile
	member int
	probe  *probe

	mu    sync.Mutex
	pages map[int64][]byte // cached whole pages by offset
	rng   *rand.Rand
}

func (d *cacheDev) Size() int64    { return d.f.Size() }
func (d *cacheDev) BlockSize() int { return d.f.BlockSize() }
func (d *cacheDev) Close() error   { return d.f.Close() }

func (d *cacheDev) ReadAt(p []byte, off int64) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	n, err := d.f.ReadAt(p, off)
	if err != nil {
		return n, err
	}
	for po, pg := range d.pages {
		lo, hi := max(po, off), min(po+pageSize, off+int64(len(p)))
		if lo < hi {
			copy(p[lo-off:hi-off], pg[lo-po:hi-po])
		}
	}
	return len(p), nil
}

// wholePages reports whether [off, off+n) is made of whole cache pages.
func wholePages(off int64, n int) bool { return off%pageSize == 0 && n%pageSize == 0 && n > 0 }

// dropCached forgets cached pages the range covers and writes back any it
// covers only partly (mu held), so the medium is current under the range.
func (d *cacheDev) dropCached(off int64, n int) error {
	for po, pg := range d.pages {
		if po >= off+int64(n) || po+pageSize <= off {
			continue
		}
		if po < off || po+pageSize > off+int64(n) {
			if _, err := d.f.WriteAt(pg, po); err != nil {
				return err
			}
		}
		delete(d.pages, po)
	}
	return nil
}

func (d *cacheDev) WriteAt(p []byte, off int64) (int, error) {
	through := d.probe.before(opWrite, d.member, off, len(p))
	d.mu.Lock()
	defer d.mu.Unlock()
	if !wholePages(off, len(p)) || through || d.rng.IntN(2) == 0 {
		if err := d.dropCached(off, len(p)); err != nil {
			return 0, err
		}
		return d.f.WriteAt(p, off)
	}
	for i := 0; i < len(p); i += pageSize {
		pg := d.pages[off+int64(i)]
		if pg == nil {
			pg = alignedBuf(pageSize)
			d.pages[off+int64(i)] = pg
		}
		copy(pg, p[i:i+pageSize])
	}
	return len(p), nil
}

func (d *cacheDev) WriteAtFUA(p []byte, off int64) (int, error) {
	d.probe.before(opFUA, d.member, off, len(p))
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.dropCached(off, len(p)); err != nil {
		return 0, err
	}
	return d.f.WriteAtFUA(p, off)
}

func (d *cacheDev) Sync() error {
	d.probe.before(opSync, d.member, 0, 0)
	d.mu.Lock()
	defer d.mu.Unlock()
	offs := make([]int64, 0, len(d.pages))
	for po := range d.pages {
		offs = append(offs, po)
	}
	slices.Sort(offs)
	for i := 0; i < len(offs); {
		j := i + 1
		for j < len(offs) && offs[j] == offs[j-1]+pageSize {
			j++
		}
		run := alignedBuf((j - i) * pageSize)
		for k := i; k < j; k++ {
			copy(run[(k-i)*pageSize:], d.pages[offs[k]])
		}
		if _, err := d.f.WriteAt(run, offs[i]); err != nil {
			return err
		}
		i = j
	}
	clear(d.pages)
	return d.f.Sync()
}

// aioDev is a member as a node of the AIO variant reaches it: the shared
// file itself (O_DIRECT), with no cache of the process's own. It embeds
// *raid.DirectFile, so the engine sees a device it may submit native AIO
// to and sends its plain data writes straight to the file's descriptor,
// as in production; those bypass WriteAt, and reach the probe through
// raid.AIOObserver instead. Every other operation (intent bits, FUA data
// writes, flushes, the bitmap daemon, resync, and any write AIO refused)
// goes through the probe as with cacheDev, and then to the file.
type aioDev struct {
	*raid.DirectFile
	member int
	probe  *probe
}

func (d *aioDev) WriteAt(p []byte, off int64) (int, error) {
	d.probe.before(opWrite, d.member, off, len(p))
	return d.DirectFile.WriteAt(p, off)
}

func (d *aioDev) WriteAtFUA(p []byte, off int64) (int, error) {
	d.probe.before(opFUA, d.member, off, len(p))
	return d.DirectFile.WriteAtFUA(p, off)
}

func (d *aioDev) Sync() error {
	d.probe.before(opSync, d.member, 0, 0)
	return d.DirectFile.Sync()
}

// AIOSubmit is told of an AIO write before its batch is submitted.
func (d *aioDev) AIOSubmit(p []byte, off int64) { d.probe.aioSubmit(d, p, off) }

// AIOInFlight is told of it once the batch is in the kernel.
func (d *aioDev) AIOInFlight(p []byte, off int64) { d.probe.aioInFlight(d.member, p, off) }

var _ raid.AIOObserver = (*aioDev)(nil)

// Device operation kinds the probe sees.
const (
	opWrite = "write"
	opFUA   = "fua"
	opSync  = "sync"
)

// probe counts a node's device operations that change what a crash leaves
// (writes, FUA writes, syncs), classifies each by who issued it, and can
// stop the process's device I/O at a chosen one so the parent kills the
// node exactly there. A class is "<phase>-<kind>", and for data writes
// "<data|fua>-c<copy>":
//
//	set-write, set-sync       the write-intent bitmap setting bits (StartWrite)
//	data-c0, data-c1          a plain data write of copy 0 or 1 of a block
//	fua-c0, fua-c1            a FUA data write of copy 0 or 1
//	aio-c0, aio-c1            a native AIO data write of copy 0 or 1 (aioDev)
//	flush-sync                the array's Flush
//	clear-sync, clear-write   the bitmap daemon (Tick): preflush, cleared page
//	merge-*, slot-*, resync-* slot recovery on a survivor
type probe struct {
	geo     raid.Geometry
	dataOff int64
	report  func(format string, a ...any)

	ops           atomic.Int64
	resyncWritten atomic.Int64 // bytes written by the engine's resync
	undoPath      string       // where an AIO pause records what its write overwrites

	mu      sync.Mutex
	armed   bool
	pattern string
	after   int64
	paused  bool
	sibLo   int64 // array range of the paused data write: its other copies still go through
	sibHi   int64
	sibFrom int
	// inflight is the AIO write chosen to pause at once its batch is
	// submitted (aioSubmit armed it, aioInFlight stops there).
	inflight *undoRec
}

// undoRec is an AIO write the victim was stopped with in flight, and what
// its member held there before: the parent puts old back on that copy
// after the kill, as if the power had failed before this copy's write
// reached the medium (see TestCrash).
type undoRec struct {
	member int
	off    int64 // member offset
	n      int
	old    []byte
	no     int64 // the probe's operation number
	class  string
}

// caller names the phase that issued the current device operation, from
// the goroutine's stack.
func caller() string {
	pcs := make([]uintptr, 48)
	n := runtime.Callers(3, pcs)
	frames := runtime.CallersFrames(pcs[:n])
	for {
		f, more := frames.Next()
		fn := f.Function
		switch {
		case strings.Contains(fn, "intent.(*Intent).Tick"):
			return "clear"
		case strings.Contains(fn, "intent.(*Intent).Merge"):
			return "merge"
		case strings.Contains(fn, "intent.(*Intent).StartWrite"):
			return "set"
		case strings.Contains(fn, "bitmap/ownership.(*Driver)"):
			return "slot"
		case strings.Contains(fn, "raid.(*Engine).runSync"), strings.Contains(fn, "raid.(*Engine).copyWindow"):
			return "resync"
		case strings.Contains(fn, "raid.(*Engine).Flush"):
			return "flush"
		case strings.Contains(fn, "raid.(*Engine).writeCopies"):
			return "data"
		}
		if !more {
			return "other"
		}
	}
}

// before is called by every mutating device operation before it touches
// the cache or the file. It returns whether a write must go straight to
// the medium (the other copies of a paused data write, so that the kill
// finds one copy written and the other not). Once paused, every other
// operation blocks forever: the parent is about to SIGKILL the process.
func (p *probe) before(kind string, member int, off int64, n int) (through bool) {
	no := p.ops.Add(1)
	phase := caller()
	class := phase + "-" + kind
	var virt int64 = -1
	if phase == "data" && kind != opSync {
		if v, cp, _, ok := p.geo.Virt(member, off-p.dataOff); ok {
			virt = v
			class = "data"
			if kind == opFUA {
				class = "fua"
			}
			class += fmt.Sprintf("-c%d", cp)
		}
	}
	if phase == "resync" && kind != opSync {
		p.resyncWritten.Add(int64(n))
	}
	p.mu.Lock()
	if p.paused {
		if virt >= 0 && virt < p.sibHi && p.sibLo < virt+int64(n) && member != p.sibFrom {
			p.mu.Unlock()
			p.report("sibling %d %s m%d %d+%d", no, class, member, off, n)
			return true
		}
		p.mu.Unlock()
		select {}
	}
	if !p.armed || no < p.after || !matches(p.pattern, class, member) {
		p.mu.Unlock()
		return false
	}
	p.paused, p.armed = true, false
	if virt >= 0 {
		p.sibLo, p.sibHi, p.sibFrom = virt, virt+int64(n), member
	} else {
		p.sibLo, p.sibHi = 0, 0
	}
	p.mu.Unlock()
	p.report("paused %d %s m%d %d+%d", no, class, member, off, n)
	select {}
}

// matches reports whether an operation of class on member matches a kill
// pattern: "any", a class, or "class@mN" for that class on member N only.
func matches(pattern, class string, member int) bool {
	if pattern == "any" || pattern == class {
		return true
	}
	c, m, ok := strings.Cut(pattern, "@m")
	return ok && c == class && m == fmt.Sprint(member)
}

// arm pauses the process at the first operation of class (or any, for
// "any") once at least after operations have been counted.
func (p *probe) arm(class string, after int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.armed, p.pattern, p.after = true, class, p.ops.Load()+after
}

// aioSubmit is called for every native AIO write (aioDev) before its batch
// is submitted. Under a pause of the blocking kinds it blocks like any
// other operation. When it is the armed operation, it records what the
// write overwrites on its member (in undoPath, for the parent) and lets the
// batch go: aioInFlight stops the submitting goroutine once every write
// of the batch is in the kernel. Unlike the other pauses, that one stops
// only this request (holding its range lock, with its intent bits set
// and not acknowledged): the node's other writers go on until the kill,
// so a broken engine that acknowledged, flushed or moved on before this
// write completed has the time to show it.
func (p *probe) aioSubmit(d *aioDev, b []byte, off int64) {
	no := p.ops.Add(1)
	// Only the engine's data writes go by AIO; the class comes from where
	// the write lands, not from the stack (the submitting goroutine is
	// the request's own, but a broken engine might submit elsewhere).
	class := "aio"
	if _, cp, _, ok := p.geo.Virt(d.member, off-p.dataOff); ok {
		class = fmt.Sprintf("aio-c%d", cp)
	}
	p.mu.Lock()
	if p.paused {
		p.mu.Unlock()
		select {}
	}
	if !p.armed || no < p.after || !matches(p.pattern, class, d.member) {
		p.mu.Unlock()
		return
	}
	p.armed = false
	p.mu.Unlock()
	rec := &undoRec{member: d.member, off: off, n: len(b), old: alignedBuf(len(b)), no: no, class: class}
	if _, err := d.DirectFile.ReadAt(rec.old, off); err != nil {
		p.report("error: probe: reading what AIO write m%d %d+%d overwrites: %v", d.member, off, len(b), err)
		select {}
	}
	hdr := fmt.Sprintf("%d %d %d\n", rec.member, rec.off, rec.n)
	if err := os.WriteFile(p.undoPath, append([]byte(hdr), rec.old...), 0o644); err != nil {
		p.report("error: probe: %v", err)
		select {}
	}
	p.mu.Lock()
	p.inflight = rec
	p.mu.Unlock()
}

// aioInFlight is called for every native AIO write once its batch is
// submitted; it stops the armed one's goroutine for good.
func (p *probe) aioInFlight(member int, b []byte, off int64) {
	p.mu.Lock()
	r := p.inflight
	p.mu.Unlock()
	if r == nil || r.member != member || r.off != off || r.n != len(b) {
		return
	}
	p.report("paused %d %s m%d %d+%d in flight", r.no, r.class, member, off, len(b))
	select {}
}

// readUndo reads the record aioSubmit left in path.
func readUndo(path string) (*undoRec, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	hdr, rest, ok := strings.Cut(string(b), "\n")
	r := &undoRec{}
	if !ok {
		return nil, fmt.Errorf("%s: no header", path)
	}
	if _, err := fmt.Sscanf(hdr, "%d %d %d", &r.member, &r.off, &r.n); err != nil {
		return nil, fmt.Errorf("%s: header %q: %w", path, hdr, err)
	}
	if len(rest) != r.n {
		return nil, fmt.Errorf("%s: %d bytes after the header, want %d", path, len(rest), r.n)
	}
	r.old = alignedBuf(r.n)
	copy(r.old, rest)
	return r, nil
}
