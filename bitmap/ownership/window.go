package ownership

import (
	"encoding/binary"
	"fmt"
)

// LVBSize is the lock value block length of the array's lockspace, md-cluster's
// LVB_SIZE.
const LVBSize = 64

// Window is a node's current resync window in sectors, [Lo, Hi): md-cluster's
// struct resync_info {__le64 lo; __le64 hi;} at the start of the slot lock's
// value block. Hi == 0 means no resync is running. Writers on other nodes
// keep out of an announced window, which is what lets a resync copy a chunk
// without racing a write to it.
type Window struct {
	Lo, Hi uint64
}

// Active reports whether the window announces a resync.
func (w Window) Active() bool { return w.Hi != 0 }

// MarshalLVB encodes w into a value block of LVBSize bytes (the rest zero).
func (w Window) MarshalLVB() []byte {
	b := make([]byte, LVBSize)
	binary.LittleEndian.PutUint64(b[0:], w.Lo)
	binary.LittleEndian.PutUint64(b[8:], w.Hi)
	return b
}

// UnmarshalLVB decodes a window from a value block.
func UnmarshalLVB(b []byte) (Window, error) {
	if len(b) < 16 {
		return Window{}, fmt.Errorf("resync window: value block of %d bytes, need 16", len(b))
	}
	w := Window{Lo: binary.LittleEndian.Uint64(b[0:]), Hi: binary.LittleEndian.Uint64(b[8:])}
	if w.Hi != 0 && w.Hi < w.Lo {
		return Window{}, fmt.Errorf("resync window: hi %d below lo %d", w.Hi, w.Lo)
	}
	return w, nil
}

// LockName returns the DLM resource name of slot s, md-cluster's "bitmap%04d"
// (the 0-based bitmap slot).
func LockName(s int) string { return fmt.Sprintf("bitmap%04d", s) }
