package nbd

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

const (
	readBufSize  = 128 << 10
	writeBufSize = 64 << 10
)

// conn is one client connection: negotiation, then transmission.
//
// One goroutine (serve) reads the socket: options, then request headers and
// write data. Each request that reaches the backend runs on a worker
// goroutine of its own (kept for later requests once done) and queues its
// reply when done, so replies go out in completion
// order; whichever completion finds no writer at work writes the queue out
// with one writev per batch (see reply), so completions never wait for
// each other's socket writes.
type conn struct {
	s      *Server
	nc     net.Conn
	br     *bufio.Reader
	remote string

	// dlMu orders deadline changes against beginShutdown, so a deadline
	// set by the reader cannot overwrite the one that wakes it.
	dlMu    sync.Mutex
	closing bool
	forced  bool

	closingFlag atomic.Bool // closing, readable without dlMu

	// Transmission state.
	exp     *export
	budget  *budget
	running sync.WaitGroup // requests in flight
	dirty   atomic.Bool    // a write-type request succeeded on this connection
	rdl     time.Time      // read deadline in force (reader only)
	lastReq time.Time      // when the last request began (reader only)

	// Replies (see reply): wmu guards the queue, the writing flag and
	// werr; the goroutine that set writing owns the rest.
	wmu     sync.Mutex
	queue   []pendingReply // replies waiting for the writer
	spare   []pendingReply // the other queue, reused
	writing bool           // a goroutine is writing the queue out
	werr    error          // first reply write error; later replies are dropped
	wdl     time.Time      // write deadline in force
	hdrs    []byte         // a batch's reply headers
	iov     net.Buffers    // a batch's writev

	bw *bufio.Writer // negotiation replies

	// Workers (see spawn): goroutines that ran a request and wait for the
	// next one, so that a request does not start on a fresh goroutine
	// whose stack must grow to the backend's depth every time.
	wkMu     sync.Mutex
	idle     []chan job
	wkClosed bool
}

func newConn(s *Server, nc net.Conn) *conn {
	if n := s.cfg.SocketBuffer; n > 0 {
		// Larger kernel buffers mean fewer wake-ups per megabyte on both
		// sides (the kernel caps them at net.core.[rw]mem_max).
		if b, ok := nc.(interface {
			SetReadBuffer(int) error
			SetWriteBuffer(int) error
		}); ok {
			_ = b.SetReadBuffer(n)
			_ = b.SetWriteBuffer(n)
		}
	}
	return &conn{
		s:      s,
		nc:     nc,
		br:     bufio.NewReaderSize(nc, readBufSize),
		bw:     bufio.NewWriterSize(nc, writeBufSize),
		remote: remoteName(nc),
	}
}

// Errors that end a connection without anything having gone wrong.
var (
	errAborted      = errors.New("client aborted negotiation")
	errDisconnected = errors.New("client disconnected")
	errShutdown     = errors.New("server shutting down")
)

// serve runs the connection to its end and unregisters it. With x nil it
// negotiates first; otherwise it starts in transmission for x.
func (c *conn) serve(x *export) error {
	defer c.s.forget(c)
	defer c.nc.Close()
	if x == nil {
		var err error
		if x, err = c.negotiate(); err != nil || x == nil {
			return c.ended("negotiation", err)
		}
	}
	return c.ended("transmission", c.transmit(x))
}

// ended classifies how a connection ended, for the caller of ServeConn.
func (c *conn) ended(phase string, err error) error {
	switch {
	case err == nil, errors.Is(err, errAborted), errors.Is(err, errDisconnected):
		c.s.log.Debug("nbd: connection ended", "remote", c.remote, "phase", phase)
		return nil
	case errors.Is(err, errShutdown):
		return ErrServerClosed
	}
	return fmt.Errorf("nbd: connection from %s, %s: %w", c.remote, phase, err)
}

// setReadDeadline sets the read deadline unless shutdown has begun, in
// which case reads must keep failing at once.
func (c *conn) setReadDeadline(t time.Time) {
	c.dlMu.Lock()
	if !c.closing {
		c.nc.SetReadDeadline(t)
	}
	c.dlMu.Unlock()
}

// beginShutdown makes the reader stop: reads of data not yet buffered fail
// at once. Requests already buffered are still parsed and answered
// ESHUTDOWN; requests in flight finish normally.
func (c *conn) beginShutdown() {
	c.dlMu.Lock()
	c.closing = true
	c.closingFlag.Store(true)
	c.nc.SetReadDeadline(time.Unix(1, 0))
	c.dlMu.Unlock()
}

// forceClose ends the connection without waiting for anything: a reader
// waiting for an in-flight slot gives up, and socket I/O fails.
func (c *conn) forceClose() {
	c.dlMu.Lock()
	c.forced = true
	c.dlMu.Unlock()
	if b := c.loadBudget(); b != nil {
		b.close()
	}
	c.nc.Close()
}

func (c *conn) loadBudget() *budget {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return c.budget
}

// isTimeout reports whether err is a deadline expiry (as opposed to the
// shutdown's deliberate past deadline, which callers check first).
func isTimeout(err error) bool {
	return errors.Is(err, os.ErrDeadlineExceeded)
}

// --- negotiation ---

// negotiate runs the fixed-newstyle handshake. It returns the export chosen
// with NBD_OPT_GO or NBD_OPT_EXPORT_NAME, or nil and errAborted after
// NBD_OPT_ABORT, or an error that ends the connection.
func (c *conn) negotiate() (*export, error) {
	st := &c.s.stats
	deadline := time.Now().Add(c.s.cfg.HandshakeTimeout)
	c.setReadDeadline(deadline)
	c.nc.SetWriteDeadline(deadline)
	x, err := c.haggle()
	if err != nil {
		switch {
		case errors.Is(err, errAborted):
		case errors.Is(err, io.EOF) && !c.closingFlag.Load():
			// The client hung up between options: its choice.
			err = errAborted
		case c.closingFlag.Load() && (isTimeout(err) || errors.Is(err, io.EOF)):
			err = errShutdown
		default:
			st.handshakeFailures.Add(1)
			if isTimeout(err) {
				st.timeouts.Add(1)
				err = fmt.Errorf("handshake not finished within %v: %w", c.s.cfg.HandshakeTimeout, err)
			}
			c.s.plog.warn("nbd: negotiation failed", "remote", c.remote, "err", err)
		}
		return nil, err
	}
	st.handshakes.Add(1)
	c.s.log.Debug("nbd: client negotiated", "remote", c.remote, "export", x.Name)
	return x, nil
}

// haggle is negotiate's protocol loop.
func (c *conn) haggle() (*export, error) {
	var greet [18]byte
	binary.BigEndian.PutUint64(greet[0:], magicInit)
	binary.BigEndian.PutUint64(greet[8:], magicOpt)
	binary.BigEndian.PutUint16(greet[16:], flagFixedNewstyle|flagNoZeroes)
	if _, err := c.bw.Write(greet[:]); err != nil {
		return nil, err
	}
	if err := c.bw.Flush(); err != nil {
		return nil, fmt.Errorf("sending greeting: %w", err)
	}
	var b [optRequestHeaderLen]byte
	if _, err := io.ReadFull(c.br, b[:4]); err != nil {
		return nil, fmt.Errorf("reading client flags: %w", err)
	}
	cflags := binary.BigEndian.Uint32(b[:4])
	if cflags&^(flagCFixedNewstyle|flagCNoZeroes) != 0 {
		return nil, fmt.Errorf("client flags 0x%x have unknown bits", cflags)
	}
	if cflags&flagCFixedNewstyle == 0 {
		return nil, fmt.Errorf("client does not speak fixed newstyle negotiation (client flags 0x%x); old and plain newstyle are not served", cflags)
	}
	noZeroes := cflags&flagCNoZeroes != 0

	for n := 0; ; n++ {
		if n >= c.s.cfg.MaxOptions {
			return nil, fmt.Errorf("client sent %d options without choosing an export (MaxOptions)", n)
		}
		if _, err := io.ReadFull(c.br, b[:]); err != nil {
			return nil, fmt.Errorf("reading option header: %w", err)
		}
		if m := binary.BigEndian.Uint64(b[:]); m != magicOpt {
			return nil, fmt.Errorf("bad option magic 0x%016x", m)
		}
		opt := binary.BigEndian.Uint32(b[8:])
		size := binary.BigEndian.Uint32(b[12:])
		if uint64(size) > uint64(c.s.cfg.MaxOptionLength) {
			if opt == optExportName {
				// No error reply exists for EXPORT_NAME, and no valid name
				// is this long: hang up without reading it.
				return nil, fmt.Errorf("NBD_OPT_EXPORT_NAME with a %d-byte name", size)
			}
			if _, err := io.CopyN(io.Discard, c.br, int64(size)); err != nil {
				return nil, fmt.Errorf("skipping %d bytes of option %d data: %w", size, opt, err)
			}
			if err := c.optError(opt, repErrTooBig, fmt.Sprintf("option data of %d bytes is over the server's limit of %d", size, c.s.cfg.MaxOptionLength)); err != nil {
				return nil, err
			}
			continue
		}
		data := make([]byte, size)
		if _, err := io.ReadFull(c.br, data); err != nil {
			return nil, fmt.Errorf("reading %d bytes of option %d data: %w", size, opt, err)
		}
		x, err := c.option(opt, data, noZeroes)
		if err != nil || x != nil {
			return x, err
		}
	}
}

// option answers one option. It returns the export when the option ends
// negotiation successfully.
func (c *conn) option(opt uint32, data []byte, noZeroes bool) (*export, error) {
	if c.closingFlag.Load() && opt != optAbort {
		if opt == optExportName {
			return nil, errShutdown // it has no error reply: hang up
		}
		return nil, c.optError(opt, repErrShutdown, "server is shutting down")
	}
	switch opt {
	case optExportName:
		x := c.s.lookup(string(data))
		if x == nil {
			// NBD_OPT_EXPORT_NAME has no error reply: closing is the answer.
			return nil, fmt.Errorf("NBD_OPT_EXPORT_NAME for unknown export %.64q", data)
		}
		var b [10 + 124]byte
		binary.BigEndian.PutUint64(b[0:], uint64(x.size))
		binary.BigEndian.PutUint16(b[8:], x.tflags)
		end := len(b)
		if noZeroes {
			end = 10
		}
		if _, err := c.bw.Write(b[:end]); err != nil {
			return nil, err
		}
		return x, c.bw.Flush()

	case optAbort:
		// The client closes after the ACK; the error is only its choice.
		_ = c.optReply(opt, repAck, nil)
		c.bw.Flush()
		return nil, errAborted

	case optList:
		if len(data) != 0 {
			return nil, c.optError(opt, repErrInvalid, "NBD_OPT_LIST takes no data")
		}
		for _, name := range c.s.names {
			p := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
			p = append(p, name...)
			if d := c.s.exports[name].Description; d != "" {
				p = append(p, d...)
			}
			if err := c.optReply(opt, repServer, p); err != nil {
				return nil, err
			}
		}
		return nil, c.optFinal(opt, repAck, nil)

	case optInfo, optGo:
		return c.infoOrGo(opt, data)

	case optStartTLS:
		return nil, c.optError(opt, repErrUnsup, "TLS is not supported; use a unix socket or loopback")
	case optStructuredReply:
		return nil, c.optError(opt, repErrUnsup, "structured replies are not supported; simple replies only")
	case optListMetaContext, optSetMetaContext:
		return nil, c.optError(opt, repErrUnsup, "metadata contexts (block status) are not supported")
	}
	return nil, c.optError(opt, repErrUnsup, fmt.Sprintf("option %d is not supported", opt))
}

// infoOrGo answers NBD_OPT_INFO and NBD_OPT_GO.
func (c *conn) infoOrGo(opt uint32, data []byte) (*export, error) {
	req, err := parseInfoRequest(data)
	if err != nil {
		return nil, c.optError(opt, repErrInvalid, err.Error())
	}
	x := c.s.lookup(req.name)
	if x == nil {
		msg := fmt.Sprintf("no export named %.64q", req.name)
		if req.name == "" {
			msg = "no default export; name one (nbdinfo --list shows them)"
		}
		return nil, c.optError(opt, repErrUnknown, msg)
	}
	var wantName, wantDesc, wantBlock bool
	for _, t := range req.infos {
		switch t {
		case infoName:
			wantName = true
		case infoDescription:
			wantDesc = true
		case infoBlockSize:
			wantBlock = true
		}
	}
	p := binary.BigEndian.AppendUint16(nil, infoExport)
	p = binary.BigEndian.AppendUint64(p, uint64(x.size))
	p = binary.BigEndian.AppendUint16(p, x.tflags)
	if err := c.optReply(opt, repInfo, p); err != nil {
		return nil, err
	}
	if wantName {
		p = append(binary.BigEndian.AppendUint16(p[:0], infoName), x.Name...)
		if err := c.optReply(opt, repInfo, p); err != nil {
			return nil, err
		}
	}
	if wantDesc && x.Description != "" {
		p = append(binary.BigEndian.AppendUint16(p[:0], infoDescription), x.Description...)
		if err := c.optReply(opt, repInfo, p); err != nil {
			return nil, err
		}
	}
	// Block sizes are announced whether asked for or not (the protocol
	// allows it), so clients that did not ask still learn the limits.
	p = binary.BigEndian.AppendUint16(p[:0], infoBlockSize)
	p = binary.BigEndian.AppendUint32(p, x.minBlock)
	p = binary.BigEndian.AppendUint32(p, x.prefBlock)
	p = binary.BigEndian.AppendUint32(p, x.maxPayload)
	if err := c.optReply(opt, repInfo, p); err != nil {
		return nil, err
	}
	if opt == optGo && x.minBlock > 1 && !wantBlock {
		// A client that did not ask may not know to align its requests.
		return nil, c.optError(opt, repErrBlockSizeReq, fmt.Sprintf("export needs requests aligned to %d bytes; ask for NBD_INFO_BLOCK_SIZE", x.minBlock))
	}
	if err := c.optFinal(opt, repAck, nil); err != nil {
		return nil, err
	}
	if opt == optGo {
		return x, nil
	}
	return nil, nil
}

// optReply queues one option reply.
func (c *conn) optReply(opt, typ uint32, data []byte) error {
	var h [optReplyHeaderLen]byte
	binary.BigEndian.PutUint64(h[0:], magicOptReply)
	binary.BigEndian.PutUint32(h[8:], opt)
	binary.BigEndian.PutUint32(h[12:], typ)
	binary.BigEndian.PutUint32(h[16:], uint32(len(data)))
	if _, err := c.bw.Write(h[:]); err != nil {
		return fmt.Errorf("sending option reply: %w", err)
	}
	if _, err := c.bw.Write(data); err != nil {
		return fmt.Errorf("sending option reply: %w", err)
	}
	return nil
}

// optFinal sends the final reply to an option and flushes.
func (c *conn) optFinal(opt, typ uint32, data []byte) error {
	if err := c.optReply(opt, typ, data); err != nil {
		return err
	}
	if err := c.bw.Flush(); err != nil {
		return fmt.Errorf("sending option reply: %w", err)
	}
	return nil
}

// optError refuses an option with an error reply carrying a message for
// the user. Only a failure to send it is returned.
func (c *conn) optError(opt, typ uint32, msg string) error {
	c.s.stats.optionsRefused.Add(1)
	c.s.log.Debug("nbd: option refused", "remote", c.remote, "option", opt, "reason", msg)
	return c.optFinal(opt, typ, []byte(msg))
}
