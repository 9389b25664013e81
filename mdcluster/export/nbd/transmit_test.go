package nbd

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"runtime"
	"sync"
	"syscall"
	"testing"
	"time"
)

func TestEveryCommand(t *testing.T) {
	rec := &flagRecorder{Backend: NewMemBackend(1 << 20)}
	h := &hookBackend{Backend: rec}
	s, sock := startServer(t, Config{Exports: []Export{{Name: "m", Backend: h}}})
	c := dialGo(t, sock, "m")
	data := pattern(64<<10, 1)

	if errno := c.writeAt(data, 4096, 0); errno != 0 {
		t.Fatalf("write: %d", errno)
	}
	if rec.last() != 0 {
		t.Fatalf("plain write reached the backend with flags %b", rec.last())
	}
	if got, errno := c.read(4096, uint32(len(data))); errno != 0 || !bytes.Equal(got, data) {
		t.Fatalf("read back: errno %d, equal %v", errno, bytes.Equal(got, data))
	}
	if errno := c.writeAt(data[:512], 0, cmdFlagFUA); errno != 0 || rec.last() != FUA {
		t.Fatalf("FUA write: errno %d, backend flags %b", errno, rec.last())
	}
	if r := c.do(cmdFlush, 0, 0, 0, nil); r.errno != 0 || h.flushes.Load() != 1 {
		t.Fatalf("flush: errno %d, backend flushes %d", r.errno, h.flushes.Load())
	}
	// FUA is accepted on any command (clients are known to set it on reads).
	if r := c.do(cmdRead, cmdFlagFUA, 0, 1, nil); r.errno != 0 {
		t.Fatalf("read with FUA: %d", r.errno)
	}
	if r := c.do(cmdTrim, cmdFlagFUA, 4096, 4096, nil); r.errno != 0 || rec.last() != FUA {
		t.Fatalf("trim: errno %d flags %b", r.errno, rec.last())
	}
	if got, _ := c.read(4096, 4096); !bytes.Equal(got, make([]byte, 4096)) {
		t.Fatalf("memory trim did not zero")
	}
	if r := c.do(cmdWriteZeroes, cmdFlagNoHole|cmdFlagFastZero, 8192, 8192, nil); r.errno != 0 || rec.last() != NoHole|FastZero {
		t.Fatalf("write zeroes: errno %d flags %b", r.errno, rec.last())
	}
	got, _ := c.read(4096, uint32(len(data)))
	want := append(make([]byte, 12288), data[12288:]...)
	if !bytes.Equal(got, want) {
		t.Fatalf("after trim and zeroes the data is wrong")
	}
	// Zero-length requests are no-ops, even at the very end.
	if r := c.do(cmdRead, 0, 1<<20, 0, nil); r.errno != 0 {
		t.Fatalf("zero-length read: %d", r.errno)
	}
	if r := c.do(cmdWrite, 0, 1<<20, 0, nil); r.errno != 0 {
		t.Fatalf("zero-length write: %d", r.errno)
	}
	c.disc()
	c.waitClosed()
	waitFor(t, "connection gone", func() bool { return s.Stats().ConnectionsActive == 0 })
	st := s.Stats()
	if st.Reads != 5 || st.Writes != 3 || st.Flushes != 1 || st.Trims != 1 || st.WriteZeroes != 1 || st.Disconnects != 1 {
		t.Fatalf("command counts %+v", st)
	}
	if st.BytesWritten != uint64(len(data)+512) || st.ErrorReplies != 0 {
		t.Fatalf("bytes written %d errors %d", st.BytesWritten, st.ErrorReplies)
	}
	// It wrote, so the server flushed when the client left.
	if h.flushes.Load() != 2 {
		t.Fatalf("backend flushed %d times, want 2 (FLUSH, then at disconnect)", h.flushes.Load())
	}
}

// TestInvalidRequestsChangeNothing sends requests the server must refuse
// and checks each gets its error, the device is unchanged, and the
// connection stays usable.
func TestInvalidRequestsChangeNothing(t *testing.T) {
	const size = 1 << 20
	s, sock, m := memServer(t, size, func(c *Config) { c.MaxPayload = 256 << 10 })
	copy(m.Bytes(), pattern(size, 9))
	before := bytes.Clone(m.Bytes())
	c := dialGo(t, sock, "mem")
	page := make([]byte, 4096)
	cases := []struct {
		name        string
		typ, flags  uint16
		off         uint64
		length      uint32
		data        []byte
		want        uint32
		countsTowar string
	}{
		{"read past end", cmdRead, 0, size - 10, 20, nil, errnoInval, ""},
		{"read at end", cmdRead, 0, size, 1, nil, errnoInval, ""},
		{"read offset overflow", cmdRead, 0, 1<<64 - 1, 2, nil, errnoInval, ""},
		{"write past end", cmdWrite, 0, size - 100, 4096, page, errnoNoSpc, ""},
		{"write far past end", cmdWrite, 0, 1 << 62, 4096, page, errnoNoSpc, ""},
		{"trim past end", cmdTrim, 0, size, 4096, nil, errnoInval, ""},
		{"zeroes past end", cmdWriteZeroes, 0, size - 1, 2, nil, errnoNoSpc, ""},
		{"oversized read", cmdRead, 0, 0, 512 << 10, nil, errnoInval, ""},
		{"oversized write", cmdWrite, 0, 0, 512 << 10, make([]byte, 512<<10), errnoInval, ""},
		{"unknown command", 99, 0, 0, 4096, nil, errnoInval, ""},
		{"cache not advertised", cmdCache, 0, 0, 4096, nil, errnoInval, ""},
		{"block status not negotiated", cmdBlockStatus, 0, 0, 4096, nil, errnoInval, ""},
		{"unknown flag", cmdWrite, 1 << 9, 0, 4096, page, errnoInval, ""},
		{"no-hole on a write", cmdWrite, cmdFlagNoHole, 0, 4096, page, errnoInval, ""},
		{"fast-zero on a trim", cmdTrim, cmdFlagFastZero, 0, 4096, nil, errnoInval, ""},
		{"DF without structured replies", cmdRead, cmdFlagDF, 0, 4096, nil, errnoInval, ""},
		{"flush with a range", cmdFlush, 0, 4096, 4096, nil, errnoInval, ""},
	}
	for _, tc := range cases {
		r := c.do(tc.typ, tc.flags, tc.off, tc.length, tc.data)
		if r.errno != tc.want {
			t.Errorf("%s: errno %d, want %d", tc.name, r.errno, tc.want)
		}
		if r.data != nil {
			t.Errorf("%s: error reply carried data", tc.name)
		}
		if !bytes.Equal(m.Bytes(), before) {
			t.Fatalf("%s changed the device", tc.name)
		}
		// Still in step: a valid read returns the right bytes.
		if got, errno := c.read(4096, 64); errno != 0 || !bytes.Equal(got, before[4096:4096+64]) {
			t.Fatalf("after %s: read errno %d data ok %v", tc.name, errno, bytes.Equal(got, before[4096:4096+64]))
		}
	}
	st := s.Stats()
	if st.ErrorReplies != uint64(len(cases)) || st.OversizedRequests != 2 || st.OtherRequests != 3 {
		t.Fatalf("stats: errors %d oversized %d other %d", st.ErrorReplies, st.OversizedRequests, st.OtherRequests)
	}
	if st.BackendErrors != 0 || st.ProtocolErrors != 0 {
		t.Fatalf("stats: %+v", st)
	}
}

func TestReadOnlyExport(t *testing.T) {
	m := NewMemBackend(1 << 16)
	copy(m.Bytes(), "keep")
	_, sock := startServer(t, Config{Exports: []Export{{Name: "ro", Backend: m, ReadOnly: true}}})
	c := dialGo(t, sock, "ro")
	if c.flags&tflagReadOnly == 0 || c.flags&(tflagSendTrim|tflagSendZeroes) != 0 {
		t.Fatalf("read-only export advertises 0x%x", c.flags)
	}
	for _, r := range []result{
		c.do(cmdWrite, 0, 0, 4, []byte("gone")),
		c.do(cmdWrite, 0, 1<<20, 4, []byte("gone")), // EPERM before ENOSPC
		c.do(cmdTrim, 0, 0, 4096, nil),
		c.do(cmdWriteZeroes, 0, 0, 4096, nil),
	} {
		if r.errno != errnoPerm {
			t.Fatalf("write-type request on read-only export: errno %d, want EPERM", r.errno)
		}
	}
	if got, _ := c.read(0, 4); string(got) != "keep" {
		t.Fatalf("device changed: %q", got)
	}
}

func TestUnadvertisedCommands(t *testing.T) {
	h := &hookBackend{Backend: NewMemBackend(1 << 16), caps: &Capabilities{}}
	_, sock := startServer(t, Config{Exports: []Export{{Name: "plain", Backend: h}}})
	c := dialGo(t, sock, "plain")
	if c.flags != tflagHasFlags {
		t.Fatalf("flags 0x%x for a backend with no capabilities", c.flags)
	}
	for _, typ := range []uint16{cmdFlush, cmdTrim, cmdWriteZeroes} {
		if r := c.do(typ, 0, 0, 0, nil); r.errno != errnoInval {
			t.Fatalf("%s not advertised: errno %d", cmdName(typ), r.errno)
		}
	}
	if h.calls.Load() != 0 {
		t.Fatalf("backend called %d times", h.calls.Load())
	}
	// FAST_ZERO without SEND_FAST_ZERO is an unknown flag.
	caps := Capabilities{WriteZeroes: true}
	h2 := &hookBackend{Backend: NewMemBackend(1 << 16), caps: &caps}
	_, sock2 := startServer(t, Config{Exports: []Export{{Name: "z", Backend: h2}}})
	c2 := dialGo(t, sock2, "z")
	if r := c2.do(cmdWriteZeroes, cmdFlagFastZero, 0, 512, nil); r.errno != errnoInval {
		t.Fatalf("FAST_ZERO not advertised: errno %d", r.errno)
	}
	if r := c2.do(cmdWriteZeroes, cmdFlagNoHole, 0, 512, nil); r.errno != 0 {
		t.Fatalf("NO_HOLE: errno %d", r.errno)
	}
}

func TestBackendErrorMapping(t *testing.T) {
	cases := []struct {
		err  error
		want uint32
	}{
		{errors.New("disk on fire"), errnoIO},
		{fmt.Errorf("wrapped: %w", syscall.EIO), errnoIO},
		{&net.OpError{Err: syscall.ENOSPC}, errnoNoSpc},
		{syscall.EDQUOT, errnoNoSpc},
		{syscall.EFBIG, errnoNoSpc},
		{syscall.EROFS, errnoPerm},
		{fmt.Errorf("x: %w", ErrReadOnly), errnoPerm},
		{fmt.Errorf("array stopping: %w", ErrShutdown), errnoShutdown},
		{ErrNotFast, errnoNotSup},
		{syscall.ENOMEM, errnoNoMem},
		{syscall.EINVAL, errnoInval},
	}
	for _, tc := range cases {
		if got := errnoOf(tc.err); got != tc.want {
			t.Errorf("errnoOf(%v) = %d, want %d", tc.err, got, tc.want)
		}
	}
	h := &hookBackend{Backend: NewMemBackend(1 << 16)}
	h.setFail(fmt.Errorf("member failed: %w", syscall.EIO))
	s, sock := startServer(t, Config{Exports: []Export{{Name: "bad", Backend: h}}})
	c := dialGo(t, sock, "bad")
	r := c.do(cmdRead, 0, 0, 4096, nil)
	if r.errno != errnoIO || r.data != nil {
		t.Fatalf("failed read: errno %d, %d bytes of data", r.errno, len(r.data))
	}
	if r := c.do(cmdWrite, 0, 0, 3, []byte("abc")); r.errno != errnoIO {
		t.Fatalf("failed write: %d", r.errno)
	}
	h.setFail(ErrNotFast)
	if r := c.do(cmdWriteZeroes, cmdFlagFastZero, 0, 4096, nil); r.errno != errnoNotSup {
		t.Fatalf("fast zero refused: %d", r.errno)
	}
	if st := s.Stats(); st.BackendErrors != 2 || st.ErrorReplies != 3 {
		t.Fatalf("backend errors %d (ErrNotFast is not one), error replies %d", st.BackendErrors, st.ErrorReplies)
	}
}

func TestShortBackendReadIsEIO(t *testing.T) {
	_, sock := startServer(t, Config{Exports: []Export{{Name: "s", Backend: shortReader{NewMemBackend(8192)}}}})
	c := dialGo(t, sock, "s")
	if _, errno := c.read(0, 4096); errno != errnoIO {
		t.Fatalf("short read: errno %d", errno)
	}
}

// shortReader returns half of every read, without an error.
type shortReader struct{ *MemBackend }

func (s shortReader) ReadAt(p []byte, off int64) (int, error) {
	return s.MemBackend.ReadAt(p[:len(p)/2], off)
}

func TestOversizedWrites(t *testing.T) {
	s, sock, m := memServer(t, 1<<20, func(c *Config) { c.MaxPayload = 64 << 10 })
	c := dialGo(t, sock, "mem")
	// Over the limit but within what the protocol says to tolerate: the
	// data is read and dropped, EINVAL, and the connection goes on.
	if r := c.do(cmdWrite, 0, 0, 128<<10, pattern(128<<10, 3)); r.errno != errnoInval {
		t.Fatalf("128 KiB write over a 64 KiB limit: %d", r.errno)
	}
	if !bytes.Equal(m.Bytes(), make([]byte, 1<<20)) {
		t.Fatalf("oversized write changed the device")
	}
	if errno := c.writeAt([]byte("ok"), 0, 0); errno != 0 {
		t.Fatalf("write after: %d", errno)
	}
	// Over 32 MiB: the server hangs up instead of reading it.
	_, ch := c.send(cmdWrite, 0, 0, 33<<20, nil, 0)
	if r := c.wait(ch); r.err == nil {
		t.Fatalf("33 MiB write answered with errno %d; want the connection closed", r.errno)
	}
	waitFor(t, "protocol error counted", func() bool { return s.Stats().ProtocolErrors == 1 })
	if st := s.Stats(); st.OversizedRequests != 2 {
		t.Fatalf("oversized %d", st.OversizedRequests)
	}
}

func TestBadRequestMagicCloses(t *testing.T) {
	s, sock, _ := memServer(t, 1<<16, nil)
	c := dialGo(t, sock, "mem")
	hdr := encodeRequest(nil, request{typ: cmdRead, cookie: 1, length: 512})
	hdr[0] ^= 0x80
	c.wmu.Lock()
	c.bw.Write(hdr)
	c.bw.Flush()
	c.wmu.Unlock()
	c.waitClosed()
	waitFor(t, "protocol error counted", func() bool { return s.Stats().ProtocolErrors == 1 })
}

func TestRequestAfterDiscIsIgnored(t *testing.T) {
	s, sock, m := memServer(t, 1<<16, nil)
	c := dialGo(t, sock, "mem")
	// DISC and a write in one segment: the write must not be executed.
	b := encodeRequest(nil, request{typ: cmdDisc})
	b = encodeRequest(b, request{typ: cmdWrite, cookie: 7, length: 4})
	b = append(b, "late"...)
	c.wmu.Lock()
	c.bw.Write(b)
	c.bw.Flush()
	c.wmu.Unlock()
	c.waitClosed()
	if got := c.replyOrder(); len(got) != 0 {
		t.Fatalf("replies after DISC: %v", got)
	}
	if string(m.Bytes()[:4]) == "late" {
		t.Fatalf("write after DISC was executed")
	}
	if st := s.Stats(); st.Writes != 0 || st.Disconnects != 1 {
		t.Fatalf("stats %+v", st)
	}
}

func TestDiscWaitsForRequestsInFlight(t *testing.T) {
	h := &hookBackend{Backend: NewMemBackend(1 << 16), gate: make(chan struct{}), entered: make(chan string, 1)}
	_, sock := startServer(t, Config{Exports: []Export{{Name: "g", Backend: h}}})
	c := dialGo(t, sock, "g")
	_, ch := c.send(cmdWrite, 0, 0, 4, []byte("data"), 0)
	<-h.entered
	c.disc()
	time.Sleep(20 * time.Millisecond)
	close(h.gate)
	if r := c.wait(ch); r.err != nil || r.errno != 0 {
		t.Fatalf("write in flight at DISC: %+v", r)
	}
	c.waitClosed()
}

// TestOutOfOrderCompletion holds the first request in the backend while a
// later one completes: the later reply must not wait behind it.
func TestOutOfOrderCompletion(t *testing.T) {
	slow := &slowFirst{MemBackend: NewMemBackend(1 << 16), release: make(chan struct{}), started: make(chan struct{})}
	_, sock := startServer(t, Config{Exports: []Export{{Name: "o", Backend: slow}}})
	c := dialGo(t, sock, "o")
	first, ch1 := c.send(cmdRead, 0, 0, 512, nil, 512)
	<-slow.started
	second, ch2 := c.send(cmdRead, 0, 4096, 512, nil, 512)
	if r := c.wait(ch2); r.err != nil || r.errno != 0 {
		t.Fatalf("second read: %+v", r)
	}
	close(slow.release)
	if r := c.wait(ch1); r.err != nil || r.errno != 0 {
		t.Fatalf("first read: %+v", r)
	}
	if got := c.replyOrder(); len(got) != 2 || got[0] != second || got[1] != first {
		t.Fatalf("reply order %v, want [%d %d]", got, second, first)
	}
}

// slowFirst blocks reads at offset 0 until released.
type slowFirst struct {
	*MemBackend
	release, started chan struct{}
}

func (s *slowFirst) ReadAt(p []byte, off int64) (int, error) {
	if off == 0 {
		close(s.started)
		<-s.release
	}
	return s.MemBackend.ReadAt(p, off)
}

func TestInFlightBound(t *testing.T) {
	for _, tc := range []struct {
		name      string
		maxN      int
		maxBytes  int
		reqSize   int
		wantAbove int
	}{
		{"requests", 4, 64 << 20, 4096, 4},
		{"bytes", 128, 256 << 10, 64 << 10, 4},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := &hookBackend{Backend: NewMemBackend(1 << 20), gate: make(chan struct{}), entered: make(chan string, 100)}
			s, sock := startServer(t, Config{MaxInFlight: tc.maxN, MaxInFlightBytes: tc.maxBytes, MaxPayload: 64 << 10,
				Exports: []Export{{Name: "g", Backend: h}}})
			released := false
			t.Cleanup(func() {
				if !released {
					close(h.gate)
				}
			})
			c := dialGo(t, sock, "g")
			// Sending may block once the server stops reading: send from
			// a goroutine.
			chans := make([]<-chan result, 10)
			sent := make(chan struct{})
			go func() {
				defer close(sent)
				for i := range chans {
					_, chans[i] = c.send(cmdWrite, 0, uint64(i*tc.reqSize), uint32(tc.reqSize), pattern(tc.reqSize, byte(i)), 0)
				}
			}()
			for i := 0; i < tc.wantAbove; i++ {
				<-h.entered
			}
			waitFor(t, "reader blocked", func() bool { return s.Stats().InFlightWaits > 0 })
			time.Sleep(50 * time.Millisecond)
			st := s.Stats()
			if st.InFlight != int64(tc.wantAbove) || h.calls.Load() != int32(tc.wantAbove) {
				t.Fatalf("in flight %d, backend calls %d; want %d", st.InFlight, h.calls.Load(), tc.wantAbove)
			}
			if st.InFlightBytes != int64(tc.wantAbove*tc.reqSize) {
				t.Fatalf("in-flight bytes %d", st.InFlightBytes)
			}
			close(h.gate)
			released = true
			<-sent
			for _, ch := range chans {
				if r := c.wait(ch); r.err != nil || r.errno != 0 {
					t.Fatalf("write: %+v", r)
				}
			}
			if h.peak() != tc.wantAbove {
				t.Fatalf("peak concurrency %d, want %d", h.peak(), tc.wantAbove)
			}
			waitFor(t, "gauges back to zero", func() bool { st := s.Stats(); return st.InFlight == 0 && st.InFlightBytes == 0 })
		})
	}
}

// TestConcurrentClients runs several connections, each with many requests
// in flight, writing disjoint regions and reading them back.
func TestConcurrentClients(t *testing.T) {
	const (
		conns     = 4
		perConn   = 8 // goroutines per connection
		region    = 256 << 10
		blockSize = 4096
		rounds    = 40
	)
	s, sock, m := memServer(t, conns*perConn*region, nil)
	var wg sync.WaitGroup
	errs := make(chan error, conns*perConn)
	for ci := 0; ci < conns; ci++ {
		c := dialGo(t, sock, "mem")
		for g := 0; g < perConn; g++ {
			wg.Add(1)
			go func(base uint64, seed uint64) {
				defer wg.Done()
				rng := rand.New(rand.NewPCG(seed, 1))
				shadow := make([]byte, region)
				for i := 0; i < rounds; i++ {
					off := uint64(rng.IntN(region/blockSize)) * blockSize
					n := blockSize * (1 + rng.IntN(4))
					if off+uint64(n) > region {
						n = int(region - off)
					}
					p := make([]byte, n)
					for j := range p {
						p[j] = byte(rng.Uint32())
					}
					_, ch := c.send(cmdWrite, 0, base+off, uint32(n), p, 0)
					if r := <-ch; r.err != nil || r.errno != 0 {
						errs <- fmt.Errorf("write: %+v", r)
						return
					}
					copy(shadow[off:], p)
					_, ch = c.send(cmdRead, 0, base+off, uint32(n), nil, n)
					if r := <-ch; r.err != nil || r.errno != 0 || !bytes.Equal(r.data, shadow[off:off+uint64(n)]) {
						errs <- fmt.Errorf("read back at %d: errno %d err %v", base+off, r.errno, r.err)
						return
					}
				}
			}(uint64((ci*perConn+g)*region), uint64(ci*100+g))
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if st := s.Stats(); st.ConnectionsActive != conns || st.Writes != conns*perConn*rounds {
		t.Fatalf("stats %+v", st)
	}
	_ = m
}

func TestCloseIsGraceful(t *testing.T) {
	h := &hookBackend{Backend: NewMemBackend(1 << 16), gate: make(chan struct{}), entered: make(chan string, 4)}
	s, err := NewServer(Config{MaxInFlight: 1, Logger: quietLogger(), Exports: []Export{{Name: "g", Backend: h}}})
	if err != nil {
		t.Fatal(err)
	}
	l, err := ListenUnix(t.TempDir() + "/s")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- s.Serve(l) }()
	c := dialGo(t, l.Addr().String(), "g")
	// One write in the backend; a read queued behind it (MaxInFlight 1).
	_, w := c.send(cmdWrite, 0, 0, 4, []byte("data"), 0)
	<-h.entered
	_, rd := c.send(cmdRead, 0, 0, 4, nil, 4)
	waitFor(t, "read waiting for a slot", func() bool { return s.Stats().InFlightWaits == 1 })
	closed := make(chan error, 1)
	go func() { closed <- s.Close() }()
	waitFor(t, "close started", s.isClosing)
	time.Sleep(20 * time.Millisecond)
	h.gate <- struct{}{} // the write finishes
	if r := c.wait(w); r.err != nil || r.errno != 0 {
		t.Fatalf("write in flight at Close: %+v", r)
	}
	if r := c.wait(rd); r.err != nil || r.errno != errnoShutdown {
		t.Fatalf("read queued at Close: %+v, want ESHUTDOWN", r)
	}
	close(h.gate) // the flush at disconnect
	c.waitClosed()
	if err := <-closed; err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := <-served; !errors.Is(err, ErrServerClosed) {
		t.Fatalf("Serve: %v", err)
	}
	if h.flushes.Load() != 1 {
		t.Fatalf("backend flushed %d times at shutdown, want 1", h.flushes.Load())
	}
	if _, err := net.Dial("unix", l.Addr().String()); err == nil {
		t.Fatalf("still accepting after Close")
	}
	if err := s.Serve(l); !errors.Is(err, ErrServerClosed) {
		t.Fatalf("Serve after Close: %v", err)
	}
}

func TestCloseDuringNegotiation(t *testing.T) {
	s, err := NewServer(Config{Logger: quietLogger(), Exports: []Export{{Name: "m", Backend: NewMemBackend(512)}}})
	if err != nil {
		t.Fatal(err)
	}
	a, b := net.Pipe()
	done := make(chan error, 1)
	go func() { done <- s.ServeConn(a) }()
	r := newRaw(t, b)
	r.start(true)
	r.expectFinal(optStructuredReply, nil, repErrUnsup)
	go s.Close()
	// The server stops negotiating; the client sees the connection end.
	r.expectClosed()
	if err := <-done; !errors.Is(err, ErrServerClosed) {
		t.Fatalf("ServeConn: %v", err)
	}
	if s.Stats().HandshakeFailures != 0 {
		t.Fatalf("shutdown counted as a handshake failure")
	}
}

func TestShutdownTimeoutForcesClose(t *testing.T) {
	h := &hookBackend{Backend: NewMemBackend(1 << 16), gate: make(chan struct{}), entered: make(chan string, 1)}
	s, err := NewServer(Config{ShutdownTimeout: 100 * time.Millisecond, Logger: quietLogger(), Exports: []Export{{Name: "g", Backend: h}}})
	if err != nil {
		t.Fatal(err)
	}
	a, b := net.Pipe()
	go s.ServeConn(a)
	c := goClient(t, b, "g")
	_, ch := c.send(cmdRead, 0, 0, 4, nil, 4)
	<-h.entered
	start := time.Now()
	err = s.Close()
	if err == nil || time.Since(start) < 200*time.Millisecond {
		t.Fatalf("Close with a stuck backend call: %v after %v", err, time.Since(start))
	}
	if r := c.wait(ch); r.err == nil {
		t.Fatalf("stuck request answered: %+v", r)
	}
	close(h.gate)
	waitFor(t, "connection gone", func() bool { return s.Stats().ConnectionsActive == 0 })
}

func TestTimeouts(t *testing.T) {
	t.Run("request", func(t *testing.T) {
		s, sock, _ := memServer(t, 1<<16, func(c *Config) { c.RequestTimeout = 200 * time.Millisecond })
		c := dialGo(t, sock, "mem")
		hdr := encodeRequest(nil, request{typ: cmdWrite, cookie: 1, length: 4096})
		c.nc.Write(hdr[:20]) // half a header, then silence
		c.waitClosed()
		if st := s.Stats(); st.Timeouts != 1 {
			t.Fatalf("timeouts %d", st.Timeouts)
		}
	})
	t.Run("request starting near an old deadline", func(t *testing.T) {
		// The deadline armed while waiting must not cut short a request
		// that begins just before it expires.
		s, sock, m := memServer(t, 1<<16, func(c *Config) { c.RequestTimeout = time.Second })
		c := dialGo(t, sock, "mem")
		hdr := encodeRequest(nil, request{typ: cmdWrite, cookie: 1, length: 4})
		_, ch := func() (uint64, <-chan result) {
			c.mu.Lock()
			ch := make(chan result, 1)
			c.pending[1] = &pending{ch: ch}
			c.next = 1
			c.mu.Unlock()
			return 1, ch
		}()
		time.Sleep(800 * time.Millisecond)
		c.nc.Write(hdr[:10])
		time.Sleep(500 * time.Millisecond)
		c.nc.Write(append(hdr[10:], "late"...))
		if r := c.wait(ch); r.err != nil || r.errno != 0 {
			t.Fatalf("slow-starting request: %+v", r)
		}
		if st := s.Stats(); st.Timeouts != 0 || string(m.Bytes()[:4]) != "late" {
			t.Fatalf("timeouts %d, data %q", st.Timeouts, m.Bytes()[:4])
		}
	})
	t.Run("write data", func(t *testing.T) {
		s, sock, m := memServer(t, 1<<16, func(c *Config) { c.RequestTimeout = 200 * time.Millisecond })
		c := dialGo(t, sock, "mem")
		hdr := encodeRequest(nil, request{typ: cmdWrite, cookie: 1, length: 4096})
		c.nc.Write(append(hdr, "part"...))
		c.waitClosed()
		if st := s.Stats(); st.Timeouts != 1 || !bytes.Equal(m.Bytes()[:4], make([]byte, 4)) {
			t.Fatalf("timeouts %d; device start %q", st.Timeouts, m.Bytes()[:4])
		}
	})
	t.Run("idle", func(t *testing.T) {
		s, sock, _ := memServer(t, 1<<16, func(c *Config) { c.IdleTimeout = 200 * time.Millisecond })
		c := dialGo(t, sock, "mem")
		if _, errno := c.read(0, 1); errno != 0 {
			t.Fatal(errno)
		}
		c.waitClosed()
		if st := s.Stats(); st.Timeouts != 1 {
			t.Fatalf("timeouts %d", st.Timeouts)
		}
	})
	t.Run("waiting for replies is not idle", func(t *testing.T) {
		h := &hookBackend{Backend: NewMemBackend(1 << 16), gate: make(chan struct{}), entered: make(chan string, 1)}
		// The request waits 4 idle timeouts in the backend; the follow-up
		// read right after its reply has a whole idle timeout to arrive,
		// ample even on a loaded machine.
		s, sock := startServer(t, Config{IdleTimeout: 250 * time.Millisecond, Exports: []Export{{Name: "g", Backend: h}}})
		c := dialGo(t, sock, "g")
		_, ch := c.send(cmdRead, 0, 0, 1, nil, 1)
		<-h.entered
		time.Sleep(time.Second)
		close(h.gate)
		if r := c.wait(ch); r.err != nil || r.errno != 0 {
			t.Fatalf("slow read: %+v", r)
		}
		if _, errno := c.read(0, 1); errno != 0 {
			t.Fatal(errno)
		}
		if st := s.Stats(); st.Timeouts != 0 {
			t.Fatalf("timeouts %d", st.Timeouts)
		}
	})
	t.Run("idle is not a request timeout", func(t *testing.T) {
		// With no IdleTimeout, a connection may idle past RequestTimeout.
		_, sock, _ := memServer(t, 1<<16, func(c *Config) { c.RequestTimeout = 100 * time.Millisecond })
		c := dialGo(t, sock, "mem")
		time.Sleep(400 * time.Millisecond)
		if _, errno := c.read(0, 1); errno != 0 {
			t.Fatal(errno)
		}
	})
	t.Run("client not reading replies", func(t *testing.T) {
		s, sock, _ := memServer(t, 4<<20, func(c *Config) { c.WriteTimeout = 300 * time.Millisecond })
		nc, err := net.Dial("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		defer nc.Close()
		r := newRaw(t, nc)
		r.start(true)
		if e := r.info(optGo, "mem"); e.finalType != repAck {
			t.Fatal(e.finalMsg)
		}
		// Ask for far more than the socket buffers hold, read nothing.
		var reqs []byte
		for i := 0; i < 64; i++ {
			reqs = encodeRequest(reqs, request{typ: cmdRead, cookie: uint64(i), length: 1 << 20})
		}
		nc.SetDeadline(time.Time{})
		go nc.Write(reqs)
		waitFor(t, "write timeout", func() bool { return s.Stats().Timeouts == 1 })
		waitFor(t, "connection dropped", func() bool { return s.Stats().ConnectionsActive == 0 })
	})
}

func TestMaxConnectionsRefusesAtOnce(t *testing.T) {
	s, sock, _ := memServer(t, 4096, func(c *Config) { c.MaxConnections = 2 })
	c1 := dialGo(t, sock, "mem")
	c2 := dialGo(t, sock, "mem")
	r := dialRaw(t, sock)
	if _, err := r.greeting(); err == nil {
		t.Fatalf("third connection was greeted")
	}
	c1.disc()
	c1.waitClosed()
	waitFor(t, "slot free", func() bool { return s.Stats().ConnectionsActive == 1 })
	c3 := dialGo(t, sock, "mem")
	for _, c := range []*client{c2, c3} {
		if _, errno := c.read(0, 1); errno != 0 {
			t.Fatal(errno)
		}
	}
	if st := s.Stats(); st.ConnectionsRefused != 1 || st.ConnectionsAccepted != 3 {
		t.Fatalf("stats %+v", st)
	}
}

func TestProtocolErrorLogsAreRateLimited(t *testing.T) {
	var mu sync.Mutex
	lines := 0
	log := newCountingLogger(func() { mu.Lock(); lines++; mu.Unlock() })
	s, sock, _ := memServer(t, 4096, func(c *Config) { c.Logger = log; c.LogInterval = time.Hour })
	for i := 0; i < 3*logBurst; i++ {
		r := dialRaw(t, sock)
		r.greeting()
		r.clientFlags(0xff) // bad flags: dropped and logged
		r.expectClosed()
	}
	waitFor(t, "all counted", func() bool { return s.Stats().HandshakeFailures == 3*logBurst })
	mu.Lock()
	defer mu.Unlock()
	if lines != logBurst {
		t.Fatalf("%d warnings logged, want %d", lines, logBurst)
	}
	if got := s.Stats().LogsSuppressed; got != 2*logBurst {
		t.Fatalf("suppressed %d, want %d", got, 2*logBurst)
	}
}

func TestServeTransmissionWithoutHandshake(t *testing.T) {
	m := NewMemBackend(1 << 16)
	s, err := NewServer(Config{Logger: quietLogger(), Exports: []Export{{Name: "k", Backend: m}}})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	size, flags, err := s.ExportInfo("k")
	if err != nil || size != 1<<16 || flags&tflagSendFlush == 0 {
		t.Fatalf("ExportInfo: %d 0x%x %v", size, flags, err)
	}
	if _, _, err := s.ExportInfo("nope"); err == nil {
		t.Fatalf("ExportInfo of an unknown export succeeded")
	}
	a, b := net.Pipe()
	done := make(chan error, 1)
	go func() { done <- s.ServeTransmission(a, "k") }()
	c := startClient(t, b, bufio.NewReader(b), size, flags)
	if errno := c.writeAt([]byte("kernel"), 10, cmdFlagFUA); errno != 0 {
		t.Fatal(errno)
	}
	if string(m.Bytes()[10:16]) != "kernel" {
		t.Fatalf("write not applied")
	}
	c.disc()
	if err := <-done; err != nil {
		t.Fatalf("ServeTransmission: %v", err)
	}
	x, y := net.Pipe()
	defer y.Close()
	if err := s.ServeTransmission(x, "nope"); err == nil {
		t.Fatalf("unknown export served")
	}
}

func TestTCPListener(t *testing.T) {
	s, err := NewServer(Config{Logger: quietLogger(), Exports: []Export{{Name: "t", Backend: NewMemBackend(4096)}}})
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go s.Serve(l)
	defer s.Close()
	nc, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	c := goClient(t, nc, "t")
	if errno := c.writeAt([]byte("tcp"), 0, 0); errno != 0 {
		t.Fatal(errno)
	}
	if got, _ := c.read(0, 3); string(got) != "tcp" {
		t.Fatalf("read %q", got)
	}
}

func TestListenUnix(t *testing.T) {
	path := t.TempDir() + "/nbd.sock"
	l, err := ListenUnix(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Lstat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode %v (%v)", fi.Mode(), err)
	}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	if _, err := ListenUnix(path); err == nil {
		t.Fatalf("took over a live socket")
	}
	// A socket file left behind by a dead server is replaced. (Closing a
	// Go listener removes its file, so make a stale one by hand.)
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	l2, err := ListenUnix(path)
	if err != nil {
		t.Fatalf("stale socket not replaced: %v", err)
	}
	l2.Close()
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := ListenUnix(path); err == nil {
		t.Fatalf("replaced a regular file")
	}
}

var _ = io.EOF

// countingHandler calls count for every record at Warn or above.
type countingHandler struct{ count func() }

func (h countingHandler) Enabled(_ context.Context, l slog.Level) bool { return l >= slog.LevelWarn }
func (h countingHandler) Handle(context.Context, slog.Record) error {
	h.count()
	return nil
}
func (h countingHandler) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h countingHandler) WithGroup(string) slog.Handler      { return h }

func newCountingLogger(count func()) *slog.Logger { return slog.New(countingHandler{count}) }

// TestWorkersReusedAndStopped: requests run on workers that wait for the
// next request instead of ending, so a connection that has sent thousands
// of requests 8 at a time holds about 8 workers (a server that started a
// goroutine per request and kept each afterwards would hold up to
// MaxInFlight idle ones); streamed writes' pieces use the same workers;
// and once the client is gone, no worker is left behind.
func TestWorkersReusedAndStopped(t *testing.T) {
	const depth, rounds = 8, 300
	_, sock, m := memServer(t, 16<<20, nil)
	base := runtime.NumGoroutine()
	c := dialGo(t, sock, "mem")
	data := pattern(4096, 3)
	for r := range rounds {
		var chs []<-chan result
		for i := range depth {
			_, ch := c.send(cmdWrite, 0, uint64((r*depth+i)%4096)*4096, 4096, data, 0)
			chs = append(chs, ch)
		}
		for _, ch := range chs {
			if res := c.wait(ch); res.err != nil || res.errno != 0 {
				t.Fatalf("round %d: write: %v, errno %d", r, res.err, res.errno)
			}
		}
	}
	// A streamed write (alone in flight, several pieces).
	big := pattern(4*streamPiece, 9)
	if errno := c.writeAt(big, 0, 0); errno != 0 {
		t.Fatalf("streamed write: errno %d", errno)
	}
	if got, _ := m.ReadAt(make([]byte, len(big)), 0); got != len(big) {
		t.Fatalf("read back %d bytes", got)
	}
	// The reply goes out before the worker is idle: give it a moment.
	var during int
	for range 100 {
		if during = runtime.NumGoroutine() - base; during <= depth+4 {
			break
		}
		time.Sleep(time.Millisecond)
	}
	// The client's reader, the connection's reader and at most about
	// depth workers (the streamed write's pieces reuse them).
	if during > depth+4 {
		t.Fatalf("%d goroutines more than before the connection after %d requests %d at a time, want at most %d", during, rounds*depth, depth, depth+4)
	}
	c.disc()
	c.waitClosed()
	waitFor(t, "the connection's goroutines to end", func() bool { return runtime.NumGoroutine() <= base })
}
