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
// Members may be given in any order; their roles come from the
// superblocks. It prints what it did and exits 1 on any mismatch.
package main

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"

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
	case len(args) >= 4 && args[0] == "write":
		seed, err := strconv.ParseUint(args[1], 10, 64)
		if err != nil {
			return fmt.Errorf("seed: %w", err)
		}
		return write(seed, args[2], args[3:])
	}
	return errors.New("usage: raidcheck read EXPECTED DEV... | raidcheck write SEED OUT DEV...")
}

// array opens the members and builds an engine over them.
type array struct {
	e    *raid.Engine
	devs []*raid.DirectFile // by role
	offs []int64            // data offsets by role
}

func open(paths []string) (*array, error) {
	var a array
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
	data := make([]byte, g.Size())
	rng := rand.New(rand.NewPCG(seed, seed))
	for i := 0; i+8 <= len(data); i += 8 {
		binary.LittleEndian.PutUint64(data[i:], rng.Uint64())
	}
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
