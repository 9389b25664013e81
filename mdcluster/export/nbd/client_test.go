package nbd

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// This file is a small NBD client for the tests and benchmarks: raw
// negotiation helpers, and a transmission-phase client that pipelines
// requests and matches replies by cookie, so tests can drive the server
// with many requests in flight and see replies in the order they come.

// optReplyMsg is one option reply as received.
type optReplyMsg struct {
	opt, typ uint32
	data     []byte
}

// rawClient speaks the negotiation byte by byte, for tests of the handshake.
type rawClient struct {
	t  testing.TB
	nc net.Conn
	br *bufio.Reader
}

func newRaw(t testing.TB, nc net.Conn) *rawClient {
	t.Helper()
	nc.SetDeadline(time.Now().Add(20 * time.Second))
	return &rawClient{t: t, nc: nc, br: bufio.NewReader(nc)}
}

// greeting reads the server's 18-byte greeting and returns its flags.
func (r *rawClient) greeting() (uint16, error) {
	var b [18]byte
	if _, err := io.ReadFull(r.br, b[:]); err != nil {
		return 0, fmt.Errorf("reading greeting: %w", err)
	}
	if binary.BigEndian.Uint64(b[0:]) != magicInit || binary.BigEndian.Uint64(b[8:]) != magicOpt {
		return 0, fmt.Errorf("bad greeting % x", b)
	}
	return binary.BigEndian.Uint16(b[16:]), nil
}

func (r *rawClient) write(b []byte) {
	r.t.Helper()
	if _, err := r.nc.Write(b); err != nil {
		r.t.Fatalf("client write: %v", err)
	}
}

func (r *rawClient) clientFlags(f uint32) { r.write(binary.BigEndian.AppendUint32(nil, f)) }

// start reads the greeting and answers with fixed newstyle (+no zeroes).
func (r *rawClient) start(noZeroes bool) {
	r.t.Helper()
	hf, err := r.greeting()
	if err != nil {
		r.t.Fatal(err)
	}
	if hf != flagFixedNewstyle|flagNoZeroes {
		r.t.Fatalf("handshake flags 0x%x, want fixed newstyle + no zeroes", hf)
	}
	f := uint32(flagCFixedNewstyle)
	if noZeroes {
		f |= flagCNoZeroes
	}
	r.clientFlags(f)
}

func optBytes(opt uint32, data []byte) []byte {
	b := binary.BigEndian.AppendUint64(nil, magicOpt)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

func (r *rawClient) sendOpt(opt uint32, data []byte) { r.write(optBytes(opt, data)) }

func (r *rawClient) readOptReply() (optReplyMsg, error) {
	var h [optReplyHeaderLen]byte
	if _, err := io.ReadFull(r.br, h[:]); err != nil {
		return optReplyMsg{}, fmt.Errorf("reading option reply: %w", err)
	}
	if m := binary.BigEndian.Uint64(h[:]); m != magicOptReply {
		return optReplyMsg{}, fmt.Errorf("option reply magic 0x%x", m)
	}
	m := optReplyMsg{opt: binary.BigEndian.Uint32(h[8:]), typ: binary.BigEndian.Uint32(h[12:])}
	n := binary.BigEndian.Uint32(h[16:])
	if n > 1<<20 {
		return m, fmt.Errorf("option reply of %d bytes", n)
	}
	m.data = make([]byte, n)
	if _, err := io.ReadFull(r.br, m.data); err != nil {
		return m, fmt.Errorf("reading option reply data: %w", err)
	}
	return m, nil
}

// replies reads option replies up to and including the final one (ACK or
// an error).
func (r *rawClient) replies() []optReplyMsg {
	r.t.Helper()
	var out []optReplyMsg
	for {
		m, err := r.readOptReply()
		if err != nil {
			r.t.Fatal(err)
		}
		out = append(out, m)
		if m.typ == repAck || m.typ&(1<<31) != 0 {
			return out
		}
	}
}

// expectFinal sends an option and checks its final reply type.
func (r *rawClient) expectFinal(opt uint32, data []byte, want uint32) []optReplyMsg {
	r.t.Helper()
	r.sendOpt(opt, data)
	rs := r.replies()
	if got := rs[len(rs)-1]; got.typ != want || got.opt != opt {
		r.t.Fatalf("option %d: final reply type 0x%x for option %d (%q), want 0x%x", opt, got.typ, got.opt, got.data, want)
	}
	return rs
}

// expectClosed checks that the server closes the connection without
// sending anything more.
func (r *rawClient) expectClosed() {
	r.t.Helper()
	r.nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	b, err := r.br.ReadByte()
	if err == nil {
		r.t.Fatalf("server sent 0x%02x, want the connection closed", b)
	}
	if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) && !isReset(err) {
		r.t.Fatalf("want EOF, got %v", err)
	}
}

func isReset(err error) bool {
	var oe *net.OpError
	return errors.As(err, &oe) && !oe.Timeout()
}

// exportInfo is what GO or INFO told the client.
type exportInfo struct {
	size                   int64
	flags                  uint16
	name, desc             string
	hasName, hasBlock      bool
	minB, prefB, maxB      uint32
	infoTypes              []uint16
	finalType              uint32
	finalMsg               string
	replies                []optReplyMsg
	exportInfoCount, other int
}

func parseInfoReplies(rs []optReplyMsg) exportInfo {
	var e exportInfo
	e.replies = rs
	for _, m := range rs {
		if m.typ != repInfo {
			continue
		}
		if len(m.data) < 2 {
			e.other++
			continue
		}
		t := binary.BigEndian.Uint16(m.data)
		e.infoTypes = append(e.infoTypes, t)
		p := m.data[2:]
		switch {
		case t == infoExport && len(p) == 10:
			e.size = int64(binary.BigEndian.Uint64(p))
			e.flags = binary.BigEndian.Uint16(p[8:])
			e.exportInfoCount++
		case t == infoName:
			e.name, e.hasName = string(p), true
		case t == infoDescription:
			e.desc = string(p)
		case t == infoBlockSize && len(p) == 12:
			e.hasBlock = true
			e.minB = binary.BigEndian.Uint32(p)
			e.prefB = binary.BigEndian.Uint32(p[4:])
			e.maxB = binary.BigEndian.Uint32(p[8:])
		default:
			e.other++
		}
	}
	last := rs[len(rs)-1]
	e.finalType, e.finalMsg = last.typ, string(last.data)
	return e
}

// info sends NBD_OPT_INFO or NBD_OPT_GO and parses the answer.
func (r *rawClient) info(opt uint32, name string, infos ...uint16) exportInfo {
	r.t.Helper()
	r.sendOpt(opt, appendInfoRequest(nil, infoRequest{name: name, infos: infos}))
	return parseInfoReplies(r.replies())
}

// --- transmission client ---

type result struct {
	errno uint32
	data  []byte
	err   error // connection failure
}

type pending struct {
	readLen int
	ch      chan result
}

// client is a transmission-phase client that pipelines requests.
type client struct {
	t     testing.TB
	nc    net.Conn
	br    *bufio.Reader
	size  int64
	flags uint16

	wmu sync.Mutex
	bw  *bufio.Writer

	mu      sync.Mutex
	pending map[uint64]*pending
	next    uint64
	dead    error
	order   []uint64 // cookies in reply order, for out-of-order tests
	done    chan struct{}
}

// dialGo connects to a unix socket and negotiates name with NBD_OPT_GO.
func dialGo(t testing.TB, sock, name string) *client {
	t.Helper()
	nc, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	return goClient(t, nc, name)
}

// goClient negotiates name on nc with NBD_OPT_GO and starts the reply
// reader.
func goClient(t testing.TB, nc net.Conn, name string) *client {
	t.Helper()
	r := newRaw(t, nc)
	r.start(true)
	e := r.info(optGo, name, infoBlockSize)
	if e.finalType != repAck {
		t.Fatalf("GO %q: reply 0x%x %q", name, e.finalType, e.finalMsg)
	}
	nc.SetDeadline(time.Time{})
	return startClient(t, nc, r.br, e.size, e.flags)
}

func startClient(t testing.TB, nc net.Conn, br *bufio.Reader, size int64, flags uint16) *client {
	c := &client{t: t, nc: nc, br: br, bw: bufio.NewWriterSize(nc, 256<<10), size: size, flags: flags,
		pending: map[uint64]*pending{}, done: make(chan struct{})}
	go c.readLoop()
	t.Cleanup(func() { c.nc.Close(); <-c.done })
	return c
}

func (c *client) readLoop() {
	defer close(c.done)
	var h [replyHdrLen]byte
	fail := func(err error) {
		c.mu.Lock()
		c.dead = err
		for k, p := range c.pending {
			p.ch <- result{err: err}
			delete(c.pending, k)
		}
		c.mu.Unlock()
	}
	for {
		if _, err := io.ReadFull(c.br, h[:]); err != nil {
			fail(err)
			return
		}
		if m := binary.BigEndian.Uint32(h[:]); m != magicReply {
			fail(fmt.Errorf("reply magic 0x%x", m))
			return
		}
		errno := binary.BigEndian.Uint32(h[4:])
		cookie := binary.BigEndian.Uint64(h[8:])
		c.mu.Lock()
		p := c.pending[cookie]
		delete(c.pending, cookie)
		c.order = append(c.order, cookie)
		c.mu.Unlock()
		if p == nil {
			fail(fmt.Errorf("reply for unknown cookie %d", cookie))
			return
		}
		res := result{errno: errno}
		if errno == 0 && p.readLen > 0 {
			res.data = make([]byte, p.readLen)
			if _, err := io.ReadFull(c.br, res.data); err != nil {
				p.ch <- result{err: err}
				fail(err)
				return
			}
		}
		p.ch <- res
	}
}

// send queues a request (with write data) and returns the channel its
// result arrives on. readLen is the data length expected in a successful
// reply (reads only).
func (c *client) send(typ, flags uint16, off uint64, length uint32, data []byte, readLen int) (uint64, <-chan result) {
	ch := make(chan result, 1)
	c.mu.Lock()
	if c.dead != nil {
		c.mu.Unlock()
		ch <- result{err: c.dead}
		return 0, ch
	}
	c.next++
	cookie := c.next
	if typ != cmdDisc {
		c.pending[cookie] = &pending{readLen: readLen, ch: ch}
	}
	c.mu.Unlock()
	c.wmu.Lock()
	hdr := encodeRequest(nil, request{flags: flags, typ: typ, cookie: cookie, offset: off, length: length})
	c.bw.Write(hdr)
	c.bw.Write(data)
	err := c.bw.Flush()
	c.wmu.Unlock()
	if err != nil {
		c.mu.Lock()
		if p := c.pending[cookie]; p != nil {
			delete(c.pending, cookie)
			p.ch <- result{err: err}
		}
		c.mu.Unlock()
	}
	return cookie, ch
}

func (c *client) wait(ch <-chan result) result {
	c.t.Helper()
	select {
	case r := <-ch:
		return r
	case <-time.After(20 * time.Second):
		c.t.Fatalf("no reply within 20s")
	}
	return result{}
}

// do sends a request and waits for its reply, failing the test if the
// connection breaks.
func (c *client) do(typ, flags uint16, off uint64, length uint32, data []byte) result {
	c.t.Helper()
	readLen := 0
	if typ == cmdRead {
		readLen = int(length)
	}
	_, ch := c.send(typ, flags, off, length, data, readLen)
	r := c.wait(ch)
	if r.err != nil {
		c.t.Fatalf("%s at %d+%d: connection failed: %v", cmdName(typ), off, length, r.err)
	}
	return r
}

func (c *client) read(off uint64, n uint32) ([]byte, uint32) {
	c.t.Helper()
	r := c.do(cmdRead, 0, off, n, nil)
	return r.data, r.errno
}

func (c *client) writeAt(p []byte, off uint64, flags uint16) uint32 {
	c.t.Helper()
	return c.do(cmdWrite, flags, off, uint32(len(p)), p).errno
}

// disc sends NBD_CMD_DISC.
func (c *client) disc() { c.send(cmdDisc, 0, 0, 0, nil, 0) }

// waitClosed waits for the server to close the connection.
func (c *client) waitClosed() {
	c.t.Helper()
	select {
	case <-c.done:
	case <-time.After(20 * time.Second):
		c.t.Fatalf("server did not close the connection")
	}
}

// replyOrder returns the cookies in the order their replies arrived.
func (c *client) replyOrder() []uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]uint64(nil), c.order...)
}

// --- test servers ---

// quietLogger discards logs; tests that look at logs use countingHandler.
func quietLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// startServer serves cfg on a unix socket in a temporary directory and
// closes the server when the test ends.
func startServer(t testing.TB, cfg Config) (*Server, string) {
	t.Helper()
	if cfg.Logger == nil {
		cfg.Logger = quietLogger()
	}
	s, err := NewServer(cfg)
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	l, err := ListenUnix(sock)
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- s.Serve(l) }()
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		if err := <-served; !errors.Is(err, ErrServerClosed) {
			t.Errorf("Serve returned %v, want ErrServerClosed", err)
		}
	})
	return s, sock
}

// memServer serves one MemBackend of size bytes as export "mem".
func memServer(t testing.TB, size int64, tweak func(*Config)) (*Server, string, *MemBackend) {
	t.Helper()
	m := NewMemBackend(size)
	cfg := Config{Exports: []Export{{Name: "mem", Description: "test memory", Backend: m}}}
	if tweak != nil {
		tweak(&cfg)
	}
	s, sock := startServer(t, cfg)
	return s, sock, m
}

// waitFor polls cond until it holds or 10 s pass.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i*7+i>>8)
	}
	return b
}

var _ = bytes.Equal
