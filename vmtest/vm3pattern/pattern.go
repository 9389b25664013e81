// Package vm3pattern is the verifiable data of the three-VM cluster test
// (docs/vmtest.md): every 4 KiB sector a writer puts on the array names
// itself (writer node, run epoch, byte offset, pass) and is filled from
// those four numbers, so that a reader can tell from the sector alone
// whether it is intact and which write it came from. A torn or misplaced
// sector, a stale copy or a lost acknowledged write is then a fact one
// can check on any copy, by the guests through the cluster and by the
// host straight from the member images.
package vm3pattern

import (
	"bytes"
	"encoding/binary"
	"fmt"
)

// Sector is the unit every header describes.
const Sector = 4096

// magic opens every pattern sector.
var magic = []byte("MDC3PATT")

// Stamp identifies one write of one sector.
type Stamp struct {
	Node   uint32 // the writing node
	Epoch  uint32 // the run (power cut) the write belongs to
	Offset uint64 // byte offset of the sector in the array
	Pass   uint64 // how many times the writer had gone over its region before
}

// Fill writes the sector for s into b (len Sector).
func Fill(b []byte, s Stamp) {
	copy(b, magic)
	binary.LittleEndian.PutUint32(b[8:], s.Node)
	binary.LittleEndian.PutUint32(b[12:], s.Epoch)
	binary.LittleEndian.PutUint64(b[16:], s.Offset)
	binary.LittleEndian.PutUint64(b[24:], s.Pass)
	x := seed(s)
	for i := 32; i < Sector; i += 8 {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		binary.LittleEndian.PutUint64(b[i:], x)
	}
}

func seed(s Stamp) uint64 {
	x := uint64(s.Node)<<32 | uint64(s.Epoch)
	x ^= s.Offset*0x9e3779b97f4a7c15 ^ s.Pass*0xc2b2ae3d27d4eb4f
	if x == 0 {
		x = 1
	}
	return x
}

// Parse reads a sector: zero reports whether it is all zeroes (never
// written), ok whether it is an intact pattern sector (then s is its
// stamp). Anything else is damage.
func Parse(b []byte) (s Stamp, zero, ok bool) {
	if !bytes.HasPrefix(b, magic) {
		for _, c := range b {
			if c != 0 {
				return s, false, false
			}
		}
		return s, true, false
	}
	s = Stamp{
		Node:   binary.LittleEndian.Uint32(b[8:]),
		Epoch:  binary.LittleEndian.Uint32(b[12:]),
		Offset: binary.LittleEndian.Uint64(b[16:]),
		Pass:   binary.LittleEndian.Uint64(b[24:]),
	}
	want := make([]byte, Sector)
	Fill(want, s)
	return s, false, bytes.Equal(b[:Sector], want)
}

// Region is one writer's part of the array: it writes Block bytes at a
// time, in order, from Start to Start+Len, and again, pass after pass.
// Write number k (from 0) is pass k/n at block k%n, n = Len/Block.
type Region struct {
	Node  uint32
	Epoch uint32
	Start uint64
	Len   uint64
	Block uint64
}

// Blocks is how many blocks one pass writes.
func (r Region) Blocks() uint64 { return r.Len / r.Block }

// Check verifies one sector at array offset off read from the region,
// given that writes 0..acked-1 were acknowledged (acked = 0: none). A
// sector whose block an acknowledged write of this epoch covered must
// hold this writer's data of this epoch, of that write's pass or a later
// one (the write after the last acknowledged one may have landed or not);
// any other sector must be zero or an intact sector of this writer and
// offset (an earlier epoch or an unacknowledged write).
func (r Region) Check(b []byte, off uint64, acked uint64) error {
	s, zero, ok := Parse(b)
	blk := (off - r.Start) / r.Block
	n := r.Blocks()
	var minPass uint64
	covered := acked > blk
	if covered {
		minPass = (acked - 1 - blk) / n // the last acknowledged write's pass for this block
	}
	switch {
	case zero && !covered:
		return nil
	case zero:
		return fmt.Errorf("offset %d: zeroes, but write %d (pass %d) of node %d epoch %d was acknowledged", off, minPass*n+blk, minPass, r.Node, r.Epoch)
	case !ok:
		return fmt.Errorf("offset %d: neither zeroes nor an intact pattern sector (torn or foreign data)", off)
	case s.Offset != off || s.Node != r.Node:
		return fmt.Errorf("offset %d: holds node %d's sector for offset %d", off, s.Node, s.Offset)
	case !covered:
		if s.Epoch > r.Epoch {
			return fmt.Errorf("offset %d: epoch %d is newer than the writer's %d", off, s.Epoch, r.Epoch)
		}
		return nil
	case s.Epoch != r.Epoch:
		return fmt.Errorf("offset %d: epoch %d, but write %d of epoch %d was acknowledged", off, s.Epoch, minPass*n+blk, r.Epoch)
	case s.Pass < minPass:
		return fmt.Errorf("offset %d: pass %d, but pass %d was acknowledged (a lost write)", off, s.Pass, minPass)
	case s.Pass > minPass+1:
		return fmt.Errorf("offset %d: pass %d, but only up to pass %d was acknowledged", off, s.Pass, minPass)
	}
	return nil
}
