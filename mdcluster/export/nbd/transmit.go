package nbd

import (
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"
)

// transmit serves requests for x until the client disconnects, the
// connection fails or the server shuts down; then it waits for the
// requests in flight, flushes the backend if this connection wrote to it,
// and returns.
func (c *conn) transmit(x *export) error {
	c.wmu.Lock()
	c.exp = x
	c.budget = newBudget(c.s.cfg.MaxInFlight, c.s.cfg.MaxInFlightBytes, &c.s.stats.inFlightWaits)
	c.wmu.Unlock()
	c.nc.SetWriteDeadline(time.Time{})
	c.rdl = time.Time{}
	c.lastReq = time.Now()

	err := c.readRequests()
	c.running.Wait()
	c.stopWorkers()
	c.dlMu.Lock()
	forced := c.forced
	c.dlMu.Unlock()
	if c.dirty.Load() && x.caps.Flush && !forced {
		// Data the client wrote should not depend on it having flushed
		// before it left (or before we closed it).
		if ferr := x.Backend.Flush(); ferr != nil {
			c.s.stats.backendErrors.Add(1)
			c.s.plog.warn("nbd: flush at disconnect failed", "remote", c.remote, "export", x.Name, "err", ferr)
		}
	}
	return err
}

// readRequests is the connection's reading loop.
func (c *conn) readRequests() error {
	var hdr [requestHdrLen]byte
	cfg := &c.s.cfg
	for {
		c.armRead(time.Now())
		if cfg.IdleTimeout > 0 {
			if idle := c.lastReq.Add(cfg.IdleTimeout); idle.Before(c.rdl) {
				c.rdl = idle
				c.setReadDeadline(idle)
			}
		}
		if _, err := c.br.Peek(1); err != nil {
			switch {
			case c.closingFlag.Load():
				return errShutdown
			case c.writeErr() != nil:
				return c.writeErr()
			case errors.Is(err, io.EOF):
				// A hard disconnect between requests: allowed, if rude.
				return errDisconnected
			case isTimeout(err):
				// Nothing of a new request has arrived: only the idle
				// limit matters here.
				if cfg.IdleTimeout > 0 && time.Since(c.lastReq) >= cfg.IdleTimeout {
					busy, drained := c.budget.idleSince()
					switch {
					case busy:
						// Waiting for our own replies is not idling.
						c.lastReq = time.Now()
					case time.Since(drained) < cfg.IdleTimeout:
						// Idle only since the last reply went out: the
						// client has the whole IdleTimeout from then.
						c.lastReq = drained
					default:
						c.s.stats.timeouts.Add(1)
						return fmt.Errorf("no request for %v (IdleTimeout)", cfg.IdleTimeout)
					}
				}
				continue
			}
			return fmt.Errorf("reading request: %w", err)
		}
		// A request has begun. The deadline in force may be close (set
		// long ago while waiting, or the idle deadline): renew it so the
		// request has at least three quarters of RequestTimeout.
		now := time.Now()
		if cfg.IdleTimeout > 0 {
			c.lastReq = now
			c.rdl = now.Add(cfg.RequestTimeout)
			c.setReadDeadline(c.rdl)
		} else {
			c.armRead(now)
		}
		if _, err := io.ReadFull(c.br, hdr[:]); err != nil {
			return c.readErr("request header", err)
		}
		req, err := decodeRequest(hdr[:])
		if err != nil {
			c.s.stats.protocolErrors.Add(1)
			c.s.plog.warn("nbd: closing connection: stream out of step", "remote", c.remote, "err", err)
			return err
		}
		if err := c.request(req); err != nil {
			return err
		}
	}
}

// armRead keeps the read deadline between three quarters of
// RequestTimeout and RequestTimeout ahead of now. Called when a request's
// first byte has arrived, it gives the request (header and data) at least
// three quarters of RequestTimeout and at most all of it, at the cost of a
// deadline update every quarter of RequestTimeout rather than per request.
func (c *conn) armRead(now time.Time) {
	t := c.s.cfg.RequestTimeout
	if c.rdl.Sub(now) < t*3/4 {
		c.rdl = now.Add(t)
		c.setReadDeadline(c.rdl)
	}
}

// readErr describes a failure to read the rest of a request.
func (c *conn) readErr(what string, err error) error {
	switch {
	case c.closingFlag.Load():
		return errShutdown
	case c.writeErr() != nil:
		return c.writeErr()
	case isTimeout(err):
		c.s.stats.timeouts.Add(1)
		return fmt.Errorf("%s not received within RequestTimeout (%v): %w", what, c.s.cfg.RequestTimeout, err)
	}
	c.s.stats.protocolErrors.Add(1)
	return fmt.Errorf("reading %s: %w", what, err)
}

// request handles one request header: answers it at once if it is invalid,
// else reads its data and starts it.
func (c *conn) request(r request) error {
	st := &c.s.stats
	x := c.exp
	switch r.typ {
	case cmdRead:
		st.reads.Add(1)
	case cmdWrite:
		st.writes.Add(1)
	case cmdFlush:
		st.flushes.Add(1)
	case cmdTrim:
		st.trims.Add(1)
	case cmdWriteZeroes:
		st.zeroes.Add(1)
	case cmdDisc:
		// No reply; the client sends nothing after it. What is in flight
		// finishes and the connection closes.
		st.discs.Add(1)
		return errDisconnected
	default:
		st.other.Add(1)
	}
	errno := c.check(r)
	if errno == errnoOK && c.closingFlag.Load() {
		errno = errnoShutdown
	}
	if r.typ == cmdWrite {
		n := int64(r.length)
		if n > int64(x.maxPayload) {
			st.oversized.Add(1)
			if n > defaultMaxBody {
				// Reading that much just to drop it is what a server may
				// call abuse: the protocol lets it hang up instead.
				st.protocolErrors.Add(1)
				c.s.plog.warn("nbd: closing connection: write too large", "remote", c.remote,
					"length", n, "max_payload", x.maxPayload)
				return fmt.Errorf("write of %d bytes is over the maximum payload of %d", n, x.maxPayload)
			}
			errno = errnoInval
		}
		if errno != errnoOK {
			// The data follows the header whatever the answer: read past it.
			if _, err := io.CopyN(io.Discard, c.br, n); err != nil {
				return c.readErr("write data", err)
			}
			c.reply(r.cookie, errno, nil, nil, false)
			return nil
		}
	}
	if errno != errnoOK {
		c.reply(r.cookie, errno, nil, nil, false)
		return nil
	}
	size := 0
	if r.typ == cmdRead || r.typ == cmdWrite {
		size = int(r.length)
	}
	waited, ok := c.budget.acquire(size)
	if !ok {
		return errShutdown
	}
	if waited && c.closingFlag.Load() {
		// Close began while this request waited for a slot: it has not
		// started, so it is refused like one received after Close.
		c.budget.release(size)
		if r.typ == cmdWrite {
			if _, err := io.CopyN(io.Discard, c.br, int64(size)); err != nil {
				return c.readErr("write data", err)
			}
		}
		c.reply(r.cookie, errnoShutdown, nil, nil, false)
		return nil
	}
	st.inFlight.Add(1)
	st.inFlightBytes.Add(int64(size))
	buf := getBuf(size)
	if r.typ == cmdWrite && size >= 2*streamPiece && c.budget.count() == 1 {
		return c.streamWrite(r, buf)
	}
	if r.typ == cmdWrite && size > 0 {
		if _, err := io.ReadFull(c.br, buf); err != nil {
			c.finish(size, buf)
			return c.readErr("write data", err)
		}
	}
	c.running.Add(1)
	c.spawn(job{r: r, buf: buf})
	return nil
}

// job is what a worker runs: a request, or one piece of a streamed write.
type job struct {
	r      request
	buf    []byte
	sj     *streamJob // a piece of this streamed write: buf[lo:hi]
	lo, hi int
}

// spawn runs j on an idle worker, or on a new one when none is idle.
// Requests in flight are bounded by the budget, so workers are too: at
// most MaxInFlight requests (each streamed write's pieces counted) run at
// once, and no more workers than that stay idle.
func (c *conn) spawn(j job) {
	c.wkMu.Lock()
	if n := len(c.idle); n > 0 {
		ch := c.idle[n-1]
		c.idle = c.idle[:n-1]
		c.wkMu.Unlock()
		ch <- j // buffered: never blocks
		return
	}
	c.wkMu.Unlock()
	go c.worker(j)
}

// worker runs j, then waits for further jobs until the connection stops
// its workers.
func (c *conn) worker(j job) {
	ch := make(chan job, 1)
	for {
		if j.sj != nil {
			j.sj.write(j.lo, j.hi)
		} else {
			c.run(j.r, j.buf)
		}
		j = job{} // keep no buffer alive while idle
		c.wkMu.Lock()
		if c.wkClosed || len(c.idle) >= c.s.cfg.MaxInFlight {
			c.wkMu.Unlock()
			return
		}
		c.idle = append(c.idle, ch)
		c.wkMu.Unlock()
		var ok bool
		if j, ok = <-ch; !ok {
			return
		}
	}
}

// stopWorkers ends the idle workers once no request is in flight; a worker
// still finishing its last job ends instead of going idle.
func (c *conn) stopWorkers() {
	c.wkMu.Lock()
	c.wkClosed = true
	idle := c.idle
	c.idle = nil
	c.wkMu.Unlock()
	for _, ch := range idle {
		close(ch)
	}
}

// streamPiece is the unit in which a large write's data is handed to the
// backend while the rest of it is still arriving. A power of two of at
// least 64 KiB, so pieces keep any block size constraint a backend may
// have. Writes of less than two pieces are read whole first.
const streamPiece = 256 << 10

// streamWrite reads a large write's data piece by piece and starts each
// piece on the backend as soon as it has arrived, so receiving the data
// and writing it overlap even with one request in flight (a client at
// queue depth 1 otherwise waits for the transfer and the device one after
// the other). It is used only for a write that is alone in flight on its
// connection: with more, transfers already overlap other requests' device
// time, and whole writes cost the backend fewer, larger operations. The
// reply goes out when every piece is done, with the first error if any
// piece failed. NBD makes no promise about what a write that was not
// acknowledged left behind, so a connection that fails half-way through
// the data may leave the pieces already written; such a request gets no
// reply (the stream is out of step and the connection closes).
func (c *conn) streamWrite(r request, buf []byte) error {
	c.s.stats.streamed.Add(1)
	j := &streamJob{c: c, r: r, buf: buf}
	j.left.Store(1) // the reader's own reference, dropped when all is read
	c.running.Add(1)
	for lo := 0; lo < len(buf); lo += streamPiece {
		hi := min(lo+streamPiece, len(buf))
		if _, err := io.ReadFull(c.br, buf[lo:hi]); err != nil {
			j.aborted.Store(true)
			j.done()
			return c.readErr("write data", err)
		}
		j.left.Add(1)
		c.spawn(job{sj: j, lo: lo, hi: hi})
	}
	j.done()
	return nil
}

// streamJob is one write being streamed to the backend in pieces.
type streamJob struct {
	c       *conn
	r       request
	buf     []byte
	left    atomic.Int32 // pieces running, plus one while the reader reads
	aborted atomic.Bool  // the data did not all arrive: no reply
	errMu   sync.Mutex
	err     error // the first piece's error
}

// write writes buf[lo:hi] and drops its reference.
func (j *streamJob) write(lo, hi int) {
	c := j.c
	if err := c.exp.Backend.WriteAt(j.buf[lo:hi], int64(j.r.offset)+int64(lo), c.ioFlags(j.r)); err != nil {
		j.errMu.Lock()
		if j.err == nil {
			j.err = err
		}
		j.errMu.Unlock()
	}
	j.done()
}

// done drops one reference; the last one completes the request.
func (j *streamJob) done() {
	if j.left.Add(-1) != 0 {
		return
	}
	defer j.c.running.Done()
	if j.aborted.Load() {
		j.c.finish(len(j.buf), j.buf)
		return
	}
	j.c.complete(j.r, j.err, j.buf)
}

// check validates a request against the export and returns the error to
// answer it with, or 0. The order follows the protocol's precedence: a
// write to a read-only export is EPERM whatever else is wrong with it.
func (c *conn) check(r request) uint32 {
	x := c.exp
	var allowed uint16 = cmdFlagFUA // valid on every command, ignored where meaningless
	switch r.typ {
	case cmdRead:
	case cmdWrite:
		if x.readOnly {
			return errnoPerm
		}
	case cmdFlush:
		if x.tflags&tflagSendFlush == 0 {
			return errnoInval
		}
	case cmdTrim:
		if x.readOnly {
			return errnoPerm
		}
		if x.tflags&tflagSendTrim == 0 {
			return errnoInval
		}
	case cmdWriteZeroes:
		if x.readOnly {
			return errnoPerm
		}
		if x.tflags&tflagSendZeroes == 0 {
			return errnoInval
		}
		allowed |= cmdFlagNoHole
		if x.tflags&tflagSendFastZero != 0 {
			allowed |= cmdFlagFastZero
		}
	default:
		// CACHE, BLOCK_STATUS (not advertised or negotiated) and unknown
		// commands.
		return errnoInval
	}
	if r.flags&^allowed != 0 {
		return errnoInval
	}
	if r.typ == cmdFlush {
		if r.offset != 0 || r.length != 0 {
			return errnoInval
		}
		return errnoOK
	}
	if r.typ == cmdRead && r.length > x.maxPayload {
		c.s.stats.oversized.Add(1)
		return errnoInval
	}
	if m := uint64(x.minBlock); m > 1 && (r.offset%m != 0 || uint64(r.length)%m != 0) {
		return errnoInval
	}
	if end := r.offset + uint64(r.length); end < r.offset || end > uint64(x.size) {
		if r.typ == cmdWrite || r.typ == cmdWriteZeroes {
			return errnoNoSpc // writing past the end: no space there
		}
		return errnoInval
	}
	return errnoOK
}

// run performs one request on the backend and replies.
func (c *conn) run(r request, buf []byte) {
	defer c.running.Done()
	x := c.exp
	off, n := int64(r.offset), int64(r.length)
	flags := c.ioFlags(r)
	var err error
	switch r.typ {
	case cmdRead:
		if n > 0 {
			var got int
			got, err = x.Backend.ReadAt(buf, off)
			if got == len(buf) {
				err = nil // io.ReaderAt may report EOF with a full read at the end
			} else if err == nil {
				err = fmt.Errorf("short read: %d of %d bytes: %w", got, n, io.ErrUnexpectedEOF)
			}
		}
	case cmdWrite:
		if n > 0 {
			err = x.Backend.WriteAt(buf, off, flags)
		}
	case cmdFlush:
		err = x.Backend.Flush()
	case cmdTrim:
		if n > 0 {
			err = x.Backend.Trim(off, n, flags)
		}
	case cmdWriteZeroes:
		if r.flags&cmdFlagNoHole != 0 {
			flags |= NoHole
		}
		if r.flags&cmdFlagFastZero != 0 {
			flags |= FastZero
		}
		if n > 0 {
			err = x.Backend.WriteZeroes(off, n, flags)
		}
	}
	c.complete(r, err, buf)
}

// ioFlags are the backend flags a request's command flags ask for.
func (c *conn) ioFlags(r request) IOFlags {
	if r.flags&cmdFlagFUA != 0 && c.exp.caps.Flush {
		return FUA
	}
	return 0
}

// complete accounts for a request the backend has finished (err is its
// outcome) and replies; the request's buffer and budget are released
// before the reply, or for a read once its data is sent.
func (c *conn) complete(r request, err error, buf []byte) {
	st := &c.s.stats
	x := c.exp
	n := int64(r.length)
	var data []byte
	switch {
	case err == nil:
		switch r.typ {
		case cmdRead:
			data = buf
			st.bytesRead.Add(uint64(n))
		case cmdWrite:
			st.bytesWritten.Add(uint64(n))
			c.dirty.Store(true)
		case cmdTrim, cmdWriteZeroes:
			c.dirty.Store(true)
		}
	case errors.Is(err, ErrNotFast):
		// An expected answer to FAST_ZERO, not a failure.
	default:
		st.backendErrors.Add(1)
		c.s.plog.warn("nbd: backend error", "export", x.Name, "command", cmdName(r.typ),
			"offset", int64(r.offset), "length", n, "err", err)
	}
	if data == nil {
		// Nothing to send from the buffer: give it and the budget back
		// before replying, so a client that sends its next request as soon
		// as the reply arrives finds this one gone.
		c.finish(len(buf), buf)
		c.reply(r.cookie, errnoOf(err), nil, nil, false)
		return
	}
	c.reply(r.cookie, errnoOf(err), data, buf, true)
}

// finish returns what request took from the budget.
func (c *conn) finish(size int, buf []byte) {
	putBuf(buf)
	c.s.stats.inFlight.Add(-1)
	c.s.stats.inFlightBytes.Add(-int64(size))
	c.budget.release(size)
}

// reply queues a simple reply, with data for a successful read, and
// writes it unless another goroutine is writing replies already, in which
// case that one sends it with the rest of its batch. So a completion never
// waits for the socket behind another: the lock is held only to queue, and
// a burst of replies leaves in one writev (headers and read data, no
// copying). With release set, the request's buffer and budget (buf, the
// request's whole buffer) are given back once the reply is written or
// dropped. After a write error every later reply is dropped: the
// connection is being torn down.
func (c *conn) reply(cookie uint64, errno uint32, data, buf []byte, release bool) {
	if errno != errnoOK {
		c.s.stats.errorReplies.Add(1)
	}
	p := pendingReply{data: data, buf: buf, release: release}
	appendReply(p.hdr[:0], errno, cookie)
	c.wmu.Lock()
	if c.werr != nil {
		c.wmu.Unlock()
		c.released(p)
		return
	}
	c.queue = append(c.queue, p)
	if c.writing {
		c.wmu.Unlock()
		return
	}
	c.writing = true
	for {
		batch := c.queue
		c.queue = c.spare[:0]
		c.wmu.Unlock()
		err := c.writeReplies(batch)
		for i := range batch {
			c.released(batch[i])
			batch[i] = pendingReply{}
		}
		c.wmu.Lock()
		c.spare = batch[:0]
		if err != nil {
			c.werr = fmt.Errorf("sending reply: %w", err)
			if isTimeout(err) {
				c.s.stats.timeouts.Add(1)
				c.werr = fmt.Errorf("client did not read its replies within WriteTimeout (%v): %w", c.s.cfg.WriteTimeout, err)
			}
			if !c.closingFlag.Load() {
				c.s.plog.warn("nbd: closing connection: cannot send replies", "remote", c.remote, "err", c.werr)
			}
			c.nc.Close() // wakes the reader
			rest := c.queue
			c.queue = nil
			c.writing = false
			c.wmu.Unlock()
			for _, p := range rest {
				c.released(p)
			}
			return
		}
		if len(c.queue) == 0 {
			c.writing = false
			c.wmu.Unlock()
			return
		}
	}
}

// pendingReply is a reply queued for the writer.
type pendingReply struct {
	hdr     [replyHdrLen]byte
	data    []byte // read data sent after the header
	buf     []byte // the request's buffer, given back after sending
	release bool   // give back buf and the request's budget
}

// released gives back what a reply's request held, once the reply is
// written or dropped.
func (c *conn) released(p pendingReply) {
	if p.release {
		c.finish(len(p.buf), p.buf)
	}
}

// writeReplies writes a batch of replies with one writev (Go splits it at
// the system's limit on buffers per call): consecutive headers are
// gathered in one buffer, read data is sent from the request's own buffer.
// Only the goroutine that set c.writing calls it.
func (c *conn) writeReplies(batch []pendingReply) error {
	// Like armRead: a deadline between 3/4 and all of WriteTimeout ahead,
	// renewed every quarter of it rather than per reply.
	now := time.Now()
	if t := c.s.cfg.WriteTimeout; c.wdl.Sub(now) < t*3/4 {
		c.wdl = now.Add(t)
		c.nc.SetWriteDeadline(c.wdl)
	}
	if need := len(batch) * replyHdrLen; cap(c.hdrs) < need {
		c.hdrs = make([]byte, 0, need)
	}
	hdrs := c.hdrs[:0]
	iov := c.iov[:0]
	start := 0
	for i := range batch {
		hdrs = append(hdrs, batch[i].hdr[:]...)
		if len(batch[i].data) > 0 {
			iov = append(iov, hdrs[start:], batch[i].data)
			start = len(hdrs)
		}
	}
	if start < len(hdrs) {
		iov = append(iov, hdrs[start:])
	}
	c.hdrs = hdrs
	bufs := iov
	_, err := bufs.WriteTo(c.nc)
	clear(iov) // no references to request buffers stay behind
	c.iov = iov[:0]
	return err
}

// writeErr returns the reply write error, if any.
func (c *conn) writeErr() error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return c.werr
}
