package nbd

import (
	"bytes"
	"slices"
	"sync"
	"syscall"
	"testing"
)

// pieceBackend records every WriteAt (offset, length, flags), can fail
// the write at one offset, and can hold reads until released.
type pieceBackend struct {
	*MemBackend

	mu        sync.Mutex
	failAt    int64         // WriteAt at this offset fails with EIO (-1: none)
	holdReads chan struct{} // if set, reads wait until it is closed
	writes    []pieceCall
}

func (b *pieceBackend) set(failAt int64, holdReads chan struct{}) {
	b.mu.Lock()
	b.failAt, b.holdReads = failAt, holdReads
	b.mu.Unlock()
}

type pieceCall struct {
	off, n int64
	flags  IOFlags
}

func (b *pieceBackend) WriteAt(p []byte, off int64, f IOFlags) error {
	b.mu.Lock()
	b.writes = append(b.writes, pieceCall{off, int64(len(p)), f})
	fail := off == b.failAt
	b.mu.Unlock()
	if fail {
		return syscall.EIO
	}
	return b.MemBackend.WriteAt(p, off, f)
}

func (b *pieceBackend) ReadAt(p []byte, off int64) (int, error) {
	b.mu.Lock()
	hold := b.holdReads
	b.mu.Unlock()
	if hold != nil {
		<-hold
	}
	return b.MemBackend.ReadAt(p, off)
}

// calls returns the writes so far, sorted by offset, and forgets them.
func (b *pieceBackend) calls() []pieceCall {
	b.mu.Lock()
	defer b.mu.Unlock()
	w := b.writes
	b.writes = nil
	slices.SortFunc(w, func(x, y pieceCall) int { return int(x.off - y.off) })
	return w
}

// TestStreamedWrite checks the path that hands a large write to the
// backend piece by piece while its data arrives: the data lands whole, in
// streamPiece pieces that cover the request exactly and carry its flags;
// smaller writes and writes that are not alone in flight go whole; a
// failed piece fails the request (and only it); and a client that hangs
// up half-way through the data gets no reply, has none of the missing
// pieces written and leaves nothing in flight.
func TestStreamedWrite(t *testing.T) {
	const size = 8 << 20
	be := &pieceBackend{MemBackend: NewMemBackend(size), failAt: -1}
	s, sock := startServer(t, Config{Exports: []Export{{Name: "p", Backend: be}}})
	c := dialGo(t, sock, "p")

	want := func(what string, got []pieceCall, exp ...pieceCall) {
		t.Helper()
		if !slices.Equal(got, exp) {
			t.Fatalf("%s: backend writes %+v, want %+v", what, got, exp)
		}
	}
	piece := int64(streamPiece)

	// Alone and large: streamed, with FUA on every piece.
	data := pattern(int(4*piece+8192), 3)
	if e := c.writeAt(data, 1<<20, cmdFlagFUA); e != 0 {
		t.Fatalf("streamed write: errno %d", e)
	}
	want("streamed write", be.calls(),
		pieceCall{1 << 20, piece, FUA}, pieceCall{1<<20 + piece, piece, FUA}, pieceCall{1<<20 + 2*piece, piece, FUA},
		pieceCall{1<<20 + 3*piece, piece, FUA}, pieceCall{1<<20 + 4*piece, 8192, FUA})
	if got, e := c.read(1<<20, uint32(len(data))); e != 0 || !bytes.Equal(got, data) {
		t.Fatalf("read back after a streamed write: errno %d, equal %v", e, bytes.Equal(got, data))
	}
	// One after the other, each alone: every one streamed (the previous
	// one's budget is given back before its reply goes out; a read's only
	// once its data is sent, so wait for the read).
	waitFor(t, "the read to be done", func() bool { return s.Stats().InFlight == 0 })
	for i := 0; i < 20; i++ {
		if e := c.writeAt(data, 1<<20, 0); e != 0 {
			t.Fatalf("write %d: errno %d", i, e)
		}
	}
	if n := s.Stats().StreamedWrites; n != 21 {
		t.Fatalf("%d writes streamed, want 21", n)
	}
	be.calls()

	// In one burst behind a streamed write, a small write and a read: the
	// streamed write takes exactly its own data (first what the reader
	// buffered with its header, then straight from the socket), so the
	// requests behind it stay in step and land where they were sent.
	small8 := pattern(8192, 9)
	type burstReq struct {
		typ  uint16
		off  uint64
		n    uint32
		data []byte
	}
	reqs := []burstReq{{cmdWrite, 3 << 20, uint32(len(data)), data}, {cmdWrite, 7 << 20, 8192, small8}, {cmdRead, 1 << 20, 4096, nil}}
	var burst []byte
	chs := make([]chan result, len(reqs))
	c.mu.Lock()
	for i, q := range reqs {
		c.next++
		chs[i] = make(chan result, 1)
		readLen := 0
		if q.typ == cmdRead {
			readLen = int(q.n)
		}
		c.pending[c.next] = &pending{readLen: readLen, ch: chs[i]}
		burst = encodeRequest(burst, request{typ: q.typ, cookie: c.next, offset: q.off, length: q.n})
		burst = append(burst, q.data...)
	}
	c.mu.Unlock()
	streamed := s.Stats().StreamedWrites
	c.wmu.Lock()
	_, err := c.nc.Write(burst)
	c.wmu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	for i := range reqs {
		if r := c.wait(chs[i]); r.err != nil || r.errno != 0 {
			t.Fatalf("request %d of the burst: %+v", i, r)
		} else if reqs[i].typ == cmdRead && !bytes.Equal(r.data, data[:4096]) {
			t.Fatalf("read in the burst: wrong data")
		}
	}
	if n := s.Stats().StreamedWrites - streamed; n != 1 {
		t.Fatalf("burst: %d writes streamed, want 1", n)
	}
	if got, e := c.read(3<<20, uint32(len(data))); e != 0 || !bytes.Equal(got, data) {
		t.Fatalf("read back the burst's streamed write: errno %d, equal %v", e, bytes.Equal(got, data))
	}
	if got, e := c.read(7<<20, 8192); e != 0 || !bytes.Equal(got, small8) {
		t.Fatalf("read back the burst's small write: errno %d, equal %v", e, bytes.Equal(got, small8))
	}
	waitFor(t, "the reads to be done", func() bool { return s.Stats().InFlight == 0 })
	be.calls()

	// Below two pieces: one call.
	small := pattern(int(2*piece-4096), 5)
	if e := c.writeAt(small, 0, 0); e != 0 {
		t.Fatalf("write: errno %d", e)
	}
	want("write below two pieces", be.calls(), pieceCall{0, 2*piece - 4096, 0})

	// Not alone: a read held in the backend is in flight, so the write
	// goes whole.
	hold := make(chan struct{})
	be.set(-1, hold)
	_, readDone := c.send(cmdRead, 0, 0, 4096, nil, 4096)
	waitFor(t, "the read in flight", func() bool { return s.Stats().InFlight == 1 })
	if e := c.writeAt(data, 2<<20, 0); e != 0 {
		t.Fatalf("write beside a read: errno %d", e)
	}
	want("write beside a read", be.calls(), pieceCall{2 << 20, int64(len(data)), 0})
	close(hold)
	if r := c.wait(readDone); r.err != nil || r.errno != 0 {
		t.Fatalf("held read: %+v", r)
	}
	be.set(-1, nil)
	// A read's budget is given back once its data is sent, which may be
	// just after the client has it.
	waitFor(t, "the read to be done", func() bool { return s.Stats().InFlight == 0 })

	// A failing piece fails the request with its error; the connection
	// goes on.
	be.set(4<<20+piece, nil)
	if e := c.writeAt(data, 4<<20, 0); e != errnoIO {
		t.Fatalf("write with a failing piece: errno %d, want EIO", e)
	}
	if n := len(be.calls()); n != 5 {
		t.Fatalf("write with a failing piece: %d backend calls, want all 5 pieces tried", n)
	}
	be.set(-1, nil)
	if got, e := c.read(1<<20, uint32(len(data))); e != 0 || !bytes.Equal(got, data) {
		t.Fatalf("connection after a failed piece: errno %d", e)
	}
	if st := s.Stats(); st.BackendErrors != 1 || st.ErrorReplies != 1 {
		t.Fatalf("after a failed piece: %d backend errors, %d error replies; want 1 and 1", st.BackendErrors, st.ErrorReplies)
	}

	// Hang up after one and a half pieces of data: the first piece may be
	// written (an unacknowledged write may leave anything in its range),
	// nothing else is, no reply comes and nothing stays in flight.
	c2 := dialGo(t, sock, "p")
	hdr := encodeRequest(nil, request{typ: cmdWrite, cookie: 77, offset: 6 << 20, length: uint32(4 * piece)})
	c2.wmu.Lock()
	c2.bw.Write(hdr)
	c2.bw.Write(make([]byte, piece+piece/2))
	err = c2.bw.Flush()
	c2.wmu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the first piece to be written", func() bool {
		be.mu.Lock()
		defer be.mu.Unlock()
		return len(be.writes) == 1
	})
	c2.nc.(interface{ CloseWrite() error }).CloseWrite()
	c2.waitClosed()
	if r := c2.replyOrder(); len(r) != 0 {
		t.Fatalf("replies to a write whose data never all arrived: %v", r)
	}
	waitFor(t, "the cut-off connection to end", func() bool { return s.Stats().ConnectionsActive == 1 })
	want("cut-off write", be.calls(), pieceCall{6 << 20, piece, 0})
	if st := s.Stats(); st.InFlight != 0 || st.InFlightBytes != 0 {
		t.Fatalf("in flight after the cut-off write: %d requests, %d bytes", st.InFlight, st.InFlightBytes)
	}
}
