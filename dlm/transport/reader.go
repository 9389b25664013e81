package transport

import (
	"fmt"
	"io"
)

// The read side: every authenticated connection has one reader goroutine
// (readLoop) that reads frames and hands them to receive, which calls the
// handler. A caller waiting for a reply waits on its own channel, woken by
// the handler; nothing else reads the connection.

// readLoop reads c until it fails or is closed. It calls Config.BatchDone
// when the frames a read brought in whole have been handled, before any
// read that could wait for the network (see wholeRecordBuffered).
func (p *peer) readLoop(c *conn) {
	defer p.t.wg.Done()
	done := p.t.cfg.BatchDone
	n := 0
	for {
		if err := p.readFrame(c); err != nil {
			if n > 0 && done != nil {
				done(p.id)
			}
			p.readFailed(c, err)
			return
		}
		n++
		if done != nil && (n >= p.t.cfg.AckEvery || !p.wholeRecordBuffered(c)) {
			done(p.id)
			n = 0
		}
		p.afterFrame(c)
	}
}

// wholeRecordBuffered reports whether c's read buffer holds a complete
// record, which readFrame handles without reading from the socket.
func (p *peer) wholeRecordBuffered(c *conn) bool { return p.wholeRecordAt(c, 0) }

// wholeRecordAt reports whether a complete record starts at byte skip of
// c's read buffer (the bytes before it are buffered already). It never
// reads from the socket.
func (p *peer) wholeRecordAt(c *conn, skip int) bool {
	b := c.br.Buffered()
	if b < skip+recHdrLen {
		return false
	}
	hb, err := c.br.Peek(skip + recHdrLen)
	if err != nil {
		return false
	}
	n, err := recordLen(hb[skip:], p.t.cfg.MaxFrameSize)
	if err != nil {
		return true // readFrame fails on it without reading
	}
	return skip+recHdrLen+n <= b
}

// MoreFrames reports, while the handler runs for a frame from node from,
// whether that peer's reader holds further whole frames it will hand
// over before it waits for the network (and before Config.BatchDone). A
// handler that holds its replies back until BatchDone can send at once
// when this is false: the frame is the last of its batch, and waiting
// would only delay the reply. Only meaningful on the reader's goroutine,
// that is inside the handler.
func (t *Transport) MoreFrames(from NodeID) bool {
	p := (*t.peers.Load())[from]
	return p != nil && p.more.Load()
}

// afterFrame keeps acknowledgements flowing after a handled frame: at a
// pause (nothing buffered) by the ack timer, and every AckEvery frames in a
// long stream that never pauses.
func (p *peer) afterFrame(c *conn) {
	if c.br.Buffered() == 0 {
		p.afterBatch()
	} else if p.recvSeq.Load()-p.ackedOut.Load() >= uint64(p.t.cfg.AckEvery) {
		p.ackNow()
	}
}

// readFrame reads c's next record, opens it and hands the frame inside to
// receive. Records that fit the read buffer are opened in place and their
// payload passed without copying; larger ones are read into c.big. A record
// that does not open ends the connection before anything in it is used.
func (p *peer) readFrame(c *conn) error {
	hb, err := c.br.Peek(recHdrLen)
	if err != nil {
		return err
	}
	n, err := recordLen(hb, p.t.cfg.MaxFrameSize)
	if err != nil {
		return err
	}
	total := recHdrLen + n
	if total <= c.br.Size() {
		b, err := c.br.Peek(total)
		if err != nil {
			return err
		}
		p.more.Store(p.wholeRecordAt(c, total))
		err = p.openAndReceive(c, b[:recHdrLen], b[recHdrLen:])
		p.more.Store(false)
		c.br.Discard(total)
		return err
	}
	var hdr [recHdrLen]byte
	copy(hdr[:], hb)
	c.br.Discard(recHdrLen)
	if cap(c.big) < n {
		c.big = make([]byte, n)
	}
	body := c.big[:n]
	if _, err := io.ReadFull(c.br, body); err != nil {
		return err
	}
	return p.openAndReceive(c, hdr[:], body)
}

// openAndReceive opens one record and processes the frame inside.
func (p *peer) openAndReceive(c *conn, hdr, body []byte) error {
	pt, err := c.recv.open(hdr, body)
	if err != nil {
		return err
	}
	f, used, err := DecodeFrame(pt, p.t.cfg.MaxFrameSize)
	if err != nil {
		return err
	}
	if used != len(pt) {
		return fmt.Errorf("%w: %d bytes after the frame in its record", ErrMalformed, len(pt)-used)
	}
	return p.receive(c, &f.Header, f.Payload)
}
