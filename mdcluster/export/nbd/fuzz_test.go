package nbd

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"syscall"
	"testing"
	"time"
)

// Fuzz limits: small, so inputs of a few hundred bytes reach them.
const (
	fuzzMaxPayload = 16 << 10
	fuzzDevice     = 64 << 10
)

// guardBackend panics if the server calls it with a range it should have
// refused: the fuzz targets then fail on any hole in the request checks.
type guardBackend struct{ *MemBackend }

func (g guardBackend) check(op string, off, n int64, payload bool) {
	if off < 0 || n < 0 || off+n > g.Size() || (payload && n > fuzzMaxPayload) {
		panic(fmt.Sprintf("server let through %s of %d bytes at %d", op, n, off))
	}
}

func (g guardBackend) ReadAt(p []byte, off int64) (int, error) {
	g.check("read", off, int64(len(p)), true)
	return g.MemBackend.ReadAt(p, off)
}

func (g guardBackend) WriteAt(p []byte, off int64, f IOFlags) error {
	g.check("write", off, int64(len(p)), true)
	return g.MemBackend.WriteAt(p, off, f)
}

func (g guardBackend) Trim(off, n int64, f IOFlags) error {
	g.check("trim", off, n, false)
	return g.MemBackend.Trim(off, n, f)
}

func (g guardBackend) WriteZeroes(off, n int64, f IOFlags) error {
	g.check("write zeroes", off, n, false)
	return g.MemBackend.WriteZeroes(off, n, f)
}

// fuzzServe feeds stream to a fresh server over one end of a unix socket
// pair, reading and dropping everything the server sends, and checks that
// the server ends the connection promptly, releases everything it held,
// and allocates a bounded amount however large the lengths in the stream
// claim to be.
//
// A socket pair rather than net.Pipe: the client half-closes after the
// stream (the server sees EOF only once it has consumed every byte) while
// still reading replies. net.Pipe has no half-close, so the only way to
// end the stream would cut the server off before it had answered what it
// read.
func fuzzServe(t *testing.T, stream []byte) Stats {
	s, err := NewServer(Config{
		Logger:           quietLogger(),
		MaxPayload:       fuzzMaxPayload,
		MaxInFlight:      8,
		MaxInFlightBytes: 2 * fuzzMaxPayload,
		MaxOptions:       16,
		MaxOptionLength:  1024,
		HandshakeTimeout: 5 * time.Second,
		RequestTimeout:   5 * time.Second,
		WriteTimeout:     5 * time.Second,
		Exports: []Export{
			{Name: "a", Description: "fuzz", Backend: guardBackend{NewMemBackend(fuzzDevice)}},
			{Name: "ro", Backend: guardBackend{NewMemBackend(4096)}, ReadOnly: true},
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	srv, cli := socketPair(t)
	defer cli.Close()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	done := make(chan error, 1)
	go func() { done <- s.ServeConn(srv) }()
	drained := make(chan struct{})
	go func() { io.Copy(io.Discard, cli); close(drained) }()
	go func() {
		cli.Write(stream) // fails early if the server hangs up first
		cli.CloseWrite()
	}()
	timeout := time.After(10 * time.Second)
	select {
	case err := <-done:
		if testing.Verbose() && err != nil {
			t.Logf("connection ended: %v", err)
		}
	case <-timeout:
		t.Fatalf("server still serving 10s after the stream ended")
	}
	select {
	case <-drained:
	case <-timeout:
		t.Fatalf("server connection not closed")
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	runtime.ReadMemStats(&after)
	st := s.Stats()
	if st.InFlight != 0 || st.InFlightBytes != 0 || st.ConnectionsActive != 0 {
		t.Fatalf("left behind: %+v", st)
	}
	// Buffers (128+64 KiB), in-flight payloads (32 KiB), options (16 ×
	// 1 KiB) and the server itself: far below this, unless a length from
	// the stream was trusted.
	if got := after.TotalAlloc - before.TotalAlloc; got > 4<<20+2*uint64(len(stream)) {
		t.Fatalf("serving a %d-byte stream allocated %d bytes", len(stream), got)
	}
	return st
}

// TestFuzzHarnessReachesTransmission checks the fuzz harness is not
// vacuous: the first transmission seed negotiates and runs every request.
func TestFuzzHarnessReachesTransmission(t *testing.T) {
	st := fuzzServe(t, append(transmissionPrefix(), transmissionSeeds()[0]...))
	if st.Handshakes != 1 || st.Writes != 1 || st.Reads != 1 || st.Flushes != 1 || st.Disconnects != 1 || st.ErrorReplies != 0 {
		t.Fatalf("seed did not run as meant: %+v", st)
	}
	st = fuzzServe(t, append(transmissionPrefix(), transmissionSeeds()[4]...))
	if st.ProtocolErrors != 1 || st.OversizedRequests != 1 {
		t.Fatalf("4 GiB write not refused by hanging up: %+v", st)
	}
}

// socketPair returns the two ends of a connected unix stream socket pair.
func socketPair(t *testing.T) (*net.UnixConn, *net.UnixConn) {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	var ends [2]*net.UnixConn
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "socketpair")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		ends[i] = c.(*net.UnixConn)
	}
	return ends[0], ends[1]
}

// negotiationSeeds are client streams for the option phase.
func negotiationSeeds() [][]byte {
	flags := binary.BigEndian.AppendUint32(nil, flagCFixedNewstyle|flagCNoZeroes)
	cat := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	goReq := func(name string, infos ...uint16) []byte {
		return appendInfoRequest(nil, infoRequest{name: name, infos: infos})
	}
	return [][]byte{
		cat(flags, optBytes(optGo, goReq("a", infoName, infoDescription, infoBlockSize))),
		cat(flags, optBytes(optInfo, goReq("")), optBytes(optGo, goReq("ro"))),
		cat(flags, optBytes(optList, nil), optBytes(optAbort, nil)),
		cat(binary.BigEndian.AppendUint32(nil, flagCFixedNewstyle), optBytes(optExportName, []byte("a"))),
		cat(flags, optBytes(optStructuredReply, nil), optBytes(optSetMetaContext, []byte("base:allocation")), optBytes(99, []byte{1, 2, 3})),
		cat(flags, optBytes(optGo, []byte{0xff, 0xff, 0xff, 0xff, 0, 0})),
		cat(flags, optBytes(optGo, goReq("missing"))),
		cat(flags, optBytes(optInfo, make([]byte, 2000))),
		cat(flags, optBytes(optExportName, []byte("nope"))),
		cat(flags, []byte("IHAVEOPT\x00\x00\x00\x07\xff\xff\xff\xff")),
		cat(flags, []byte("IHAVEOPX")),
		{0, 0, 0, 0},
		{},
	}
}

// transmissionPrefix negotiates export "a" with GO; FuzzTransmission
// mutates what follows.
func transmissionPrefix() []byte {
	b := binary.BigEndian.AppendUint32(nil, flagCFixedNewstyle|flagCNoZeroes)
	return append(b, optBytes(optGo, appendInfoRequest(nil, infoRequest{name: "a", infos: []uint16{infoBlockSize}}))...)
}

func transmissionSeeds() [][]byte {
	req := func(typ, flags uint16, off uint64, n uint32, data ...byte) []byte {
		return append(encodeRequest(nil, request{typ: typ, flags: flags, cookie: uint64(typ)<<8 | 1, offset: off, length: n}), data...)
	}
	return [][]byte{
		bytes.Join([][]byte{req(cmdWrite, cmdFlagFUA, 512, 4, 'd', 'a', 't', 'a'), req(cmdRead, 0, 0, 4096), req(cmdFlush, 0, 0, 0), req(cmdDisc, 0, 0, 0)}, nil),
		bytes.Join([][]byte{req(cmdTrim, 0, 0, 8192), req(cmdWriteZeroes, cmdFlagNoHole|cmdFlagFastZero, 4096, 4096), req(cmdCache, 0, 0, 1)}, nil),
		req(cmdRead, 0, fuzzDevice-1, 2),
		req(cmdWrite, 0, 0, fuzzMaxPayload+1),
		req(cmdWrite, 0, 0, 0xffffffff),
		req(cmdRead, 0, 1<<63, 0xffffffff),
		req(99, 0xffff, 0, 0),
		append(req(cmdDisc, 0, 0, 0), req(cmdWrite, 0, 0, 1, 'x')...),
		bytes.Repeat(req(cmdRead, 0, 0, fuzzMaxPayload), 20),
		[]byte("\x25\x60\x95\x14garbage"),
		{},
	}
}

// FuzzNegotiation feeds arbitrary client streams to a server from its first
// byte: the option phase's parsing, then whatever follows.
func FuzzNegotiation(f *testing.F) {
	for _, s := range negotiationSeeds() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, stream []byte) {
		// The GO/INFO payload parser on its own: anything it accepts
		// re-encodes to the same bytes.
		if r, err := parseInfoRequest(stream); err == nil {
			if re := appendInfoRequest(nil, r); !bytes.Equal(re, stream) {
				t.Fatalf("info request %x re-encodes as %x", stream, re)
			}
		}
		fuzzServe(t, stream)
	})
}

// FuzzTransmission negotiates an export and then feeds arbitrary bytes as
// transmission-phase requests.
func FuzzTransmission(f *testing.F) {
	for _, s := range transmissionSeeds() {
		f.Add(s)
	}
	prefix := transmissionPrefix()
	f.Fuzz(func(t *testing.T, stream []byte) {
		if r, err := decodeRequest(stream); err == nil {
			if re := encodeRequest(nil, r); !bytes.Equal(re, stream[:requestHdrLen]) {
				t.Fatalf("request header %x re-encodes as %x", stream[:requestHdrLen], re)
			}
		}
		fuzzServe(t, append(append([]byte(nil), prefix...), stream...))
	})
}
