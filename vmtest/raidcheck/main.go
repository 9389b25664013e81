// Command raidcheck is the guest side of vmtest's RAID engine check. It
// runs inside the test VM on the member devices of an array that real
// mdadm created and the kernel's md driver wrote, with the array stopped:
//
//	raidcheck read EXPECTED DEV...
//
// reads the members' md superblocks, builds mdcluster's geometry from
// them, and requires the array the engine reads to equal EXPECTED (what
// the kernel returned from /dev/mdX) byte for byte, and every copy of
// every block, read straight from the members where our geometry says md
// put it, to equal it too.
//
//	raidcheck write SEED OUT DEV...
//
// writes a pseudo-random pattern over the whole array through the engine
// and saves it to OUT, so the test can have the kernel assemble the array
// and read it back (and run md's own "check" over every copy).
//
//	raidcheck ours SEED OUT LEVEL[:LAYOUT:CHUNK_KIB] DEV...
//
// creates an array of our own on the devices, as mdadm-go --create
// does (the array package's Create), with a clustered bitmap (4 slots),
// writes a pseudo-random pattern over it through the engine with the
// write-intent bitmap in slot 0 (the bits it sets stay set, as after a
// node that stopped without clearing them), switches the bitmap to
// internal with the rewrite mdadm-go --grow --bitmap=internal uses
// (array.ConvertBitmap), and saves the pattern to OUT, for the kernel to
// assemble the array and read back.
//
// Members may be given in any order; their roles come from the
// superblocks. It prints what it did and exits 1 on any mismatch.
package main

import (
	"bytes"
	"crypto/md5"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/mdcluster/mdcluster/bitmap"
	"github.com/mdcluster/mdcluster/bitmap/intent"
	"github.com/mdcluster/mdcluster/mdcluster/array"
	"github.com/mdcluster/mdcluster/mdcluster/raid"
	"github.com/mdcluster/mdcluster/mdcluster/superblock"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "raidcheck:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	switch {
	case len(args) >= 3 && args[0] == "read":
		return check(args[1], args[2:])
	case len(args) >= 5 && args[0] == "ours":
		seed, err := strconv.ParseUint(args[1], 10, 64)
		if err != nil {
			return fmt.Errorf("seed: %w", err)
		}
		return ours(seed, args[2], args[3], args[4:])
	case len(args) >= 4 && args[0] == "write":
		seed, err := strconv.ParseUint(args[1], 10, 64)
		if err != nil {
			return fmt.Errorf("seed: %w", err)
		}
		return write(seed, args[2], args[3:])
	}
	return errors.New("usage: raidcheck read EXPECTED DEV... | raidcheck write SEED OUT DEV... | raidcheck ours SEED OUT LEVEL[:LAYOUT:CHUNK_KIB] DEV...")
}

// array opens the members and builds an engine over them.
type engArray struct {
	e    *raid.Engine
	devs []*raid.DirectFile // by role
	offs []int64            // data offsets by role
}

func open(paths []string) (*engArray, error) {
	var a engArray
	var g raid.Geometry
	for _, p := range paths {
		d, err := raid.OpenDirect(p)
		if err != nil {
			return nil, err
		}
		sb, err := superblock.Probe(d, uint64(d.Size()/512))
		if err != nil {
			return nil, fmt.Errorf("%s: %w", p, err)
		}
		if g.Disks() == 0 {
			if g, err = raid.FromSuperblock(sb); err != nil {
				return nil, fmt.Errorf("%s: %w", p, err)
			}
			a.devs = make([]*raid.DirectFile, g.Disks())
			a.offs = make([]int64, g.Disks())
			fmt.Printf("geometry %v (level %d, layout %#x, chunk %d sectors, %d raid disks, size %d sectors per device)\n",
				g, sb.Level, sb.Layout, sb.ChunkSize, sb.RaidDisks, sb.Size)
		}
		role := int(sb.Role())
		if role >= g.Disks() {
			return nil, fmt.Errorf("%s: role %#x is not an active slot", p, role)
		}
		a.devs[role] = d
		a.offs[role] = int64(sb.DataOffset) * 512
		fmt.Printf("%s: role %d, data offset %d sectors\n", p, role, sb.DataOffset)
	}
	members := make([]raid.Member, g.Disks())
	for i, d := range a.devs {
		if d == nil {
			return nil, fmt.Errorf("no device for role %d", i)
		}
		members[i] = raid.Member{Device: d, DataOffset: a.offs[i]}
	}
	e, err := raid.New(raid.Config{Geometry: g, Members: members})
	if err != nil {
		return nil, err
	}
	a.e = e
	return &a, nil
}

func check(expected string, paths []string) error {
	want, err := os.ReadFile(expected)
	if err != nil {
		return err
	}
	a, err := open(paths)
	if err != nil {
		return err
	}
	g := a.e.Geometry()
	if g.Size() != int64(len(want)) {
		return fmt.Errorf("our geometry says the array has %d bytes, md's device has %d", g.Size(), len(want))
	}
	got := make([]byte, g.Size())
	if _, err := a.e.ReadAt(got, 0); err != nil {
		return fmt.Errorf("reading through the engine: %w", err)
	}
	if !bytes.Equal(got, want) {
		i := 0
		for got[i] == want[i] {
			i++
		}
		return fmt.Errorf("the engine reads the array differently from md, first at byte %d", i)
	}
	// Every copy, straight from the members.
	copies, bad := 0, 0
	var ferr error
	g.Extents(0, g.Size(), func(x raid.Extent) bool {
		for _, l := range x.Copies {
			b := make([]byte, x.Len)
			if _, err := a.devs[l.Member].ReadAt(b, a.offs[l.Member]+l.Off); err != nil {
				ferr = err
				return false
			}
			copies++
			if !bytes.Equal(b, want[x.Off:x.Off+x.Len]) {
				if bad < 5 {
					fmt.Printf("MISMATCH array bytes %d+%d: role %d at data offset %d\n", x.Off, x.Len, l.Member, l.Off)
				}
				bad++
			}
		}
		return true
	})
	if ferr != nil {
		return ferr
	}
	if bad > 0 {
		return fmt.Errorf("%d of %d copies are not where our geometry puts them", bad, copies)
	}
	fmt.Printf("OK: %d bytes read as md reads them; all %d copies (%d per block) where our geometry puts them\n", len(want), copies, g.Copies())
	return nil
}

func write(seed uint64, out string, paths []string) error {
	a, err := open(paths)
	if err != nil {
		return err
	}
	g := a.e.Geometry()
	data := pattern(seed, g.Size())
	w := a.e.WriterAt(false)
	for off := int64(0); off < g.Size(); off += 1 << 20 {
		if _, err := w.WriteAt(data[off:min(off+1<<20, g.Size())], off); err != nil {
			return fmt.Errorf("writing through the engine: %w", err)
		}
	}
	if err := a.e.Flush(); err != nil {
		return err
	}
	if err := os.WriteFile(out, data, 0o644); err != nil {
		return err
	}
	fmt.Printf("OK: wrote %d bytes through the engine\n", len(data))
	return nil
}

// pattern returns n pseudo-random bytes from seed.
func pattern(seed uint64, n int64) []byte {
	data := make([]byte, n)
	rng := rand.New(rand.NewPCG(seed, seed))
	for i := 0; i+8 <= len(data); i += 8 {
		binary.LittleEndian.PutUint64(data[i:], rng.Uint64())
	}
	return data
}

// ours creates a clustered array of our own, writes it through the engine
// with the clustered bitmap in use, and switches the bitmap to internal.
func ours(seed uint64, out, shape string, paths []string) error {
	spec := array.CreateSpec{RaidDevices: len(paths), Bitmap: array.BitmapClustered, BitmapChunk: 64 << 10,
		Nodes: 4, ClusterName: "vmtest", Name: "ours", AssumeClean: true}
	f := strings.Split(shape, ":")
	switch {
	case len(f) == 1 && f[0] == "1":
		spec.Level = 1
	case len(f) == 3 && f[0] == "10":
		kib, err := strconv.ParseInt(f[2], 10, 64)
		if err != nil {
			return fmt.Errorf("chunk: %w", err)
		}
		spec.Level, spec.Layout, spec.ChunkSize = 10, f[1], kib<<10
	default:
		return fmt.Errorf("shape %q: want 1 or 10:LAYOUT:CHUNK_KIB", shape)
	}
	members := func() ([]array.Member, func(), error) {
		var ms []array.Member
		closeAll := func() {
			for _, m := range ms {
				m.(*array.FileMember).Close()
			}
		}
		for _, p := range paths {
			m, err := array.OpenFile(p, true)
			if err != nil {
				closeAll()
				return nil, nil, err
			}
			ms = append(ms, m)
		}
		return ms, closeAll, nil
	}
	ms, closeAll, err := members()
	if err != nil {
		return err
	}
	c, err := array.Create(spec, ms)
	closeAll()
	if err != nil {
		return fmt.Errorf("create: %w", err)
	}
	fmt.Printf("created %s: level %d, layout %#x, %d sectors, clustered bitmap of %d slots, %d-byte chunks\n",
		c.Info.Name, c.Info.Level, c.Info.Layout, c.Info.ArraySectors, c.Info.Nodes, c.Info.BitmapChunk)

	// Write it through the engine, bitmap in slot 0 as node 1 would.
	a, err := open(paths)
	if err != nil {
		return err
	}
	g := a.e.Geometry()
	a.e.Close()
	members2 := make([]raid.Member, len(a.devs))
	for i, d := range a.devs {
		members2[i] = raid.Member{Device: d, DataOffset: a.offs[i]}
	}
	e, err := raid.New(raid.Config{Geometry: g, Members: members2, BitmapChunkSize: int64(c.Info.BitmapChunk), RequireIntent: true})
	if err != nil {
		return err
	}
	slot, err := bitmap.ReadSlot(a.devs[0], c.BitmapLayout, 0)
	if err != nil {
		return err
	}
	for _, ch := range slot.DirtyChunks() { // Create leaves every bit set
		slot.Clear(ch)
	}
	in, err := intent.New(intent.Config{Layout: c.BitmapLayout, Slot: slot, Mirrors: e.BitmapMirrors(), Owner: intent.Static(0)})
	if err != nil {
		return err
	}
	e.SetIntent(in)
	data := pattern(seed, g.Size())
	w := e.WriterAt(false)
	for off := int64(0); off < g.Size(); off += 1 << 20 {
		if _, err := w.WriteAt(data[off:min(off+1<<20, g.Size())], off); err != nil {
			return fmt.Errorf("writing through the engine: %w", err)
		}
	}
	if err := e.Flush(); err != nil {
		return err
	}
	st := in.Stats()
	e.Close()
	for _, d := range a.devs {
		d.Close()
	}
	if st.BitsSet == 0 {
		return errors.New("the engine's writes set no bit in the clustered bitmap")
	}
	fmt.Printf("wrote %d bytes through the engine; %d bits set in slot 0 of the clustered bitmap\n", len(data), st.BitsSet)

	// Switch to internal, as mdadm-go --grow --bitmap=internal does.
	ms, closeAll, err = members()
	if err != nil {
		return err
	}
	err = array.ConvertBitmap(ms, array.BitmapSpec{Mode: array.BitmapInternal}, time.Now(), nil)
	closeAll()
	if err != nil {
		return err
	}
	if err := os.WriteFile(out, data, 0o644); err != nil {
		return err
	}
	fmt.Printf("OK: bitmap switched to internal; md5 %x\n", md5.Sum(data))
	return nil
}
