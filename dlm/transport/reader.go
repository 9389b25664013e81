package transport

import "io"

// The read side: every authenticated connection has one reader goroutine
// (readLoop) that reads frames and hands them to receive, which calls the
// handler. A caller waiting for a reply waits on its own channel, woken by
// the handler; nothing else reads the connection.

// readLoop reads c until it fails or is closed.
func (p *peer) readLoop(c *conn) {
	defer p.t.wg.Done()
	for {
		if err := p.readFrame(c); err != nil {
			p.readFailed(c, err)
			return
		}
		p.afterFrame(c)
	}
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

// readFrame reads c's next frame and hands it to receive. Payloads that fit
// the read buffer are passed without copying; larger ones are read into
// c.big.
func (p *peer) readFrame(c *conn) error {
	hb, err := c.br.Peek(HeaderSize)
	if err != nil {
		return err
	}
	h, err := DecodeHeader(hb, p.t.cfg.MaxFrameSize)
	if err != nil {
		return err
	}
	total := HeaderSize + int(h.Length)
	if total <= c.br.Size() {
		b, err := c.br.Peek(total)
		if err != nil {
			return err
		}
		err = p.receive(c, &h, b[HeaderSize:])
		c.br.Discard(total)
		return err
	}
	c.br.Discard(HeaderSize)
	if cap(c.big) < int(h.Length) {
		c.big = make([]byte, h.Length)
	}
	payload := c.big[:h.Length]
	if _, err := io.ReadFull(c.br, payload); err != nil {
		return err
	}
	return p.receive(c, &h, payload)
}
