package transport

import (
	"context"
	"encoding/binary"
	"errors"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// Who reads a connection
//
// A reply that a synchronous caller waits for costs one network round trip
// plus whatever it takes to get the reply to that caller. If a dedicated
// reader goroutine reads it, the reader must wake the caller; with idle
// processors the Go runtime then wakes another OS thread as well, and on a
// loopback or LAN round trip of a few microseconds that wake-up costs as
// much again as the network. So a caller waiting for a peer may read that
// peer's connection itself (Transport.Await): it then handles every frame
// that arrives, its own reply included, on its own goroutine, and nothing
// needs waking when its reply comes.
//
// Exactly one goroutine reads a connection at a time: it holds the
// connection's read token. Each connection has a watcher goroutine that
// holds the token whenever no caller does and blocks in the socket read, so
// frames nobody waits for (requests from the peer, blocking callbacks) are
// handled at once. When a caller finds the watcher reading, it waits the
// ordinary way (the watcher wakes it) and marks the token wanted; the
// watcher then steps aside at its next pause: it releases the token and
// parks in a private poller (Linux epoll) that is armed only while the token
// is free, so it wakes only for data that arrives when nobody reads. A caller
// takes a free token (disarming the poller), reads until it is woken, handles
// the complete frames left in the buffer, and releases the token (arming
// the poller, which fires at once if more data is already waiting). Where no
// such poller exists the watcher never steps aside and callers always wait
// the ordinary way.
//
// A caller blocked in the socket read is interrupted by moving the read
// deadline into the past ("kick"): by Waiter.Wake when its wait is ended from
// another goroutine, and by its context. A read that hits the deadline is not
// a failure: what was read stays buffered (a large frame's progress is kept
// in the conn), the deadline is cleared, and whoever reads next resumes.

const (
	ownerWatcher = iota // the watcher goroutine holds the read token
	ownerCaller         // a waiting caller holds it
	ownerFree           // nobody: the idle poller is armed
)

// readSide is a connection's read token and idle poller.
type readSide struct {
	mu     sync.Mutex
	owner  int
	wanted bool // a caller found the watcher reading: it should step aside
	closed bool // the connection is closing: nobody takes the token again
	poll   *idlePoller
}

// startWatch readies the idle poller; called by the watcher as it starts.
// Without a poller the watcher keeps the token for good.
func (rs *readSide) startWatch(c *conn) {
	ip, err := newIdlePoller(c)
	if err != nil {
		return
	}
	rs.mu.Lock()
	defer rs.mu.Unlock()
	if rs.closed {
		ip.close()
		return
	}
	rs.poll = ip
}

// finishWatch is the watcher's last act: no one may take the token or use
// the poller after it.
func (rs *readSide) finishWatch() {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	rs.closed = true
	if rs.poll != nil {
		rs.poll.close()
		rs.poll = nil
	}
}

// shutdown ends the read side when the connection closes: it wakes the
// watcher out of the idle poller.
func (rs *readSide) shutdown() {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	if rs.closed {
		return
	}
	rs.closed = true
	if rs.poll != nil {
		rs.poll.wake()
	}
}

// takeCaller gives the token to a waiting caller if it is free. If the
// watcher holds it, it asks the watcher to step aside for the next caller.
func (rs *readSide) takeCaller(c *conn) bool {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	if rs.closed || rs.poll == nil {
		return false
	}
	switch rs.owner {
	case ownerFree:
		if rs.poll.disarm(c) != nil {
			return false
		}
		rs.owner = ownerCaller
		return true
	case ownerWatcher:
		rs.wanted = true
	}
	return false
}

// releaseCaller frees the token a caller held and arms the idle poller.
func (rs *readSide) releaseCaller(c *conn) {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	rs.owner = ownerFree
	if rs.closed || rs.poll == nil {
		return
	}
	if rs.poll.arm(c) != nil {
		// Without an armed poller nothing would notice the next frame:
		// the watcher goes back to reading.
		rs.owner = ownerWatcher
		rs.poll.wake()
	}
}

// yield is asked by the watcher at a pause (nothing buffered): it releases
// the token, arming the idle poller, if a caller wanted it.
func (rs *readSide) yield(c *conn) bool {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	if !rs.wanted || rs.closed || rs.poll == nil {
		return false
	}
	rs.wanted = false
	if rs.poll.arm(c) != nil {
		return false
	}
	rs.owner = ownerFree
	return true
}

// watchIdle parks the watcher until data arrives while the token is free,
// then takes the token. It returns false when the connection closes.
func (rs *readSide) watchIdle(c *conn) bool {
	for {
		rs.mu.Lock()
		if rs.closed {
			rs.mu.Unlock()
			return false
		}
		if rs.owner == ownerWatcher {
			rs.mu.Unlock() // handed back by a caller that could not arm the poller
			return true
		}
		ip := rs.poll
		rs.mu.Unlock()
		readable, err := ip.wait()
		if err != nil {
			return rs.abandonPoller(c, ip, err)
		}
		if !readable {
			continue // woken: look at closed and owner again
		}
		rs.mu.Lock()
		if rs.owner == ownerFree && !rs.closed {
			rs.owner = ownerWatcher
			rs.wanted = false
			rs.mu.Unlock()
			return true
		}
		rs.mu.Unlock() // a caller took the token first; it re-arms when done
	}
}

// abandonPoller falls back to the watcher reading alone after the idle
// poller failed: callers wait the ordinary way from then on. It waits for a
// caller holding the token to hand it back.
func (rs *readSide) abandonPoller(c *conn, ip *idlePoller, err error) bool {
	c.log.Warn("idle poller failed: only the watcher reads this connection from now on", "err", err.Error())
	rs.mu.Lock()
	rs.poll = nil
	rs.mu.Unlock()
	ip.close()
	for {
		rs.mu.Lock()
		if rs.closed {
			rs.mu.Unlock()
			return false
		}
		if rs.owner != ownerCaller {
			rs.owner = ownerWatcher
			rs.mu.Unlock()
			return true
		}
		rs.mu.Unlock()
		time.Sleep(time.Millisecond)
	}
}

// Waiter is what a caller waits on in Transport.Await: it is woken once per
// wait by whoever completes the caller's operation, possibly the caller
// itself while it handles a frame. Reuse it with Reset after each wait.
type Waiter struct {
	ch      chan struct{}
	woken   atomic.Bool
	blocked atomic.Pointer[conn] // the connection the waiter may be blocked reading
	// A connection claimed for the next Await (owner only).
	claim     *conn
	claimPeer *peer
}

// NewWaiter returns a waiter ready for a wait.
func NewWaiter() *Waiter { return &Waiter{ch: make(chan struct{}, 1)} }

// Wake ends the current wait; one wake-up is delivered per wait, later
// calls before Reset do nothing. If the waiter is blocked reading a
// connection, the read is interrupted.
func (w *Waiter) Wake() {
	if w.woken.Swap(true) {
		return
	}
	w.ch <- struct{}{}
	if c := w.blocked.Load(); c != nil {
		c.kick()
	}
}

// C returns the channel that receives the wake-up, for a caller that waits
// without Await.
func (w *Waiter) C() <-chan struct{} { return w.ch }

// Reset prepares the waiter for the next wait; the wake-up must have been
// received.
func (w *Waiter) Reset() { w.woken.Store(false) }

// Claim reserves the reading of peer's connection for the next Await on
// w, if nobody else is reading it. A caller that will wait for a reply calls
// it before sending the request: then the reply cannot be picked up by the
// connection's watcher goroutine first (which would have to wake the
// caller). Until Await or Unclaim, nobody else reads the connection, so a
// claim must be followed promptly by one of them.
func (t *Transport) Claim(peer NodeID, w *Waiter) {
	if w.claim != nil {
		return
	}
	p := (*t.peers.Load())[peer]
	if p == nil || !t.inline.enter() {
		return
	}
	c := p.curA.Load()
	if c == nil || !c.rs.takeCaller(c) {
		t.inline.leave()
		return
	}
	w.claim, w.claimPeer = c, p
}

// Unclaim gives up w's claim, if any, without waiting.
func (t *Transport) Unclaim(w *Waiter) {
	if c := w.claim; c != nil {
		w.claim, w.claimPeer = nil, nil
		c.rs.releaseCaller(c)
		t.inline.leave()
	}
}

// Await waits until w is woken or ctx ends, and reports whether w was woken
// (its wake-up then received). While it waits, if no other goroutine is
// reading the connection to peer (or w holds a claim on it), the calling
// goroutine reads it and hands what arrives to the handler itself; the
// peer is the node the caller's reply will come from. Like a handler call,
// Await must not be called with locks the handler takes.
func (t *Transport) Await(ctx context.Context, peer NodeID, w *Waiter) bool {
	c, p := w.claim, w.claimPeer
	if c != nil && p.id != peer {
		t.Unclaim(w) // the reply comes from elsewhere now
		c, p = nil, nil
	}
	w.claim, w.claimPeer = nil, nil
	if c == nil && !w.woken.Load() {
		if p = (*t.peers.Load())[peer]; p != nil && t.inline.enter() {
			c = p.curA.Load()
			if c == nil || !c.rs.takeCaller(c) {
				c = nil
				t.inline.leave()
			}
		}
	}
	if c != nil {
		if !w.woken.Load() {
			t.stats.inlineWaits.Add(1)
			p.readAsCaller(ctx, c, w)
		}
		c.rs.releaseCaller(c)
		t.inline.leave()
	}
	select {
	case <-w.ch:
		return true
	case <-ctx.Done():
		return false
	}
}

// readAsCaller reads c on the caller's goroutine until w is woken, ctx ends
// or the connection fails, then handles the complete frames still buffered
// (they would otherwise wait for the next arrival to wake the watcher).
func (p *peer) readAsCaller(ctx context.Context, c *conn, w *Waiter) {
	if ctx.Done() != nil {
		stop := context.AfterFunc(ctx, c.kick)
		defer stop()
	}
	for !w.woken.Load() && ctx.Err() == nil {
		if err := p.readFrame(c, w); err != nil {
			if errors.Is(err, errInterrupted) {
				c.clearDeadline()
				continue
			}
			p.readFailed(c, err)
			return
		}
		p.afterFrame(c)
	}
	for c.frameBuffered(p.t.cfg.MaxFrameSize) {
		if err := p.readFrame(c, nil); err != nil {
			if errors.Is(err, errInterrupted) {
				c.clearDeadline() // a kick left over; the frame is whole in the buffer
				continue
			}
			p.readFailed(c, err)
			return
		}
		p.afterFrame(c)
	}
}

// watch is the connection's watcher goroutine: it reads whenever no caller
// does (see "Who reads a connection" above) until the connection ends.
func (p *peer) watch(c *conn) {
	defer p.t.wg.Done()
	defer c.rs.finishWatch()
	c.rs.startWatch(c)
	for {
		if err := p.readFrame(c, nil); err != nil {
			if errors.Is(err, errInterrupted) {
				c.clearDeadline() // a kick meant for a caller that read before us
				continue
			}
			p.readFailed(c, err)
			return
		}
		p.afterFrame(c)
		if c.br.Buffered() == 0 && c.rs.yield(c) {
			if !c.rs.watchIdle(c) {
				return
			}
			p.t.stats.idleWakes.Add(1)
		}
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

// errInterrupted: a read stopped at the read deadline (a kick). Not a
// connection failure.
var errInterrupted = errors.New("read interrupted")

// readErr classifies a read error.
func readErr(err error) error {
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return errInterrupted
	}
	return err
}

// readFrame reads c's next frame and hands it to receive. Payloads that fit
// the read buffer are passed without copying; larger ones are read into
// c.big, and a read interrupted part-way keeps its progress there. w is the
// caller reading on its own goroutine (nil for the watcher): it is published
// as blocked while the read may block, so Wake can interrupt it.
func (p *peer) readFrame(c *conn, w *Waiter) error {
	if !c.bigPending {
		hb, err := c.fill(HeaderSize, w)
		if err != nil {
			return err
		}
		h, err := DecodeHeader(hb, p.t.cfg.MaxFrameSize)
		if err != nil {
			return err
		}
		total := HeaderSize + int(h.Length)
		if total <= c.br.Size() {
			b, err := c.fill(total, w)
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
		c.bigHdr, c.bigHave, c.bigPending = h, 0, true
	}
	payload := c.big[:c.bigHdr.Length]
	for c.bigHave < len(payload) {
		if c.br.Buffered() == 0 && !c.mayBlock(w) {
			return errInterrupted
		}
		n, err := c.br.Read(payload[c.bigHave:])
		c.doneBlocking(w)
		c.bigHave += n
		if err != nil {
			return readErr(err)
		}
	}
	c.bigPending = false
	return p.receive(c, &c.bigHdr, payload)
}

// fill returns the next n buffered bytes, reading the socket if needed.
func (c *conn) fill(n int, w *Waiter) ([]byte, error) {
	if c.br.Buffered() >= n {
		return c.br.Peek(n)
	}
	if !c.mayBlock(w) {
		return nil, errInterrupted
	}
	b, err := c.br.Peek(n)
	c.doneBlocking(w)
	if err != nil {
		return nil, readErr(err)
	}
	return b, nil
}

// mayBlock publishes that w is about to block reading c and reports whether
// it should: false if w was woken meanwhile. Wake reads the publication
// after setting woken, so either it sees c and kicks, or we see woken.
func (c *conn) mayBlock(w *Waiter) bool {
	if w == nil {
		return true
	}
	w.blocked.Store(c)
	if w.woken.Load() {
		w.blocked.Store(nil)
		return false
	}
	return true
}

func (c *conn) doneBlocking(w *Waiter) {
	if w != nil {
		w.blocked.Store(nil)
	}
}

// frameBuffered reports whether a whole frame (or a malformed header, which
// the next read reports) is buffered, so reading it cannot block.
func (c *conn) frameBuffered(maxPayload int) bool {
	n := c.br.Buffered()
	if c.bigPending {
		return n >= int(c.bigHdr.Length)-c.bigHave
	}
	if n < HeaderSize {
		return false
	}
	hb, _ := c.br.Peek(HeaderSize)
	if _, err := DecodeHeader(hb, maxPayload); err != nil {
		return true
	}
	total := HeaderSize + int(binary.BigEndian.Uint32(hb[offLen:]))
	return total <= c.br.Size() && n >= total
}

// aLongTimeAgo is a read deadline that has passed: setting it interrupts a
// blocked read at once.
var aLongTimeAgo = time.Unix(1, 0)

// kick interrupts a read blocked on c (or the next one).
func (c *conn) kick() {
	c.nc.SetReadDeadline(aLongTimeAgo)
}

// clearDeadline undoes a kick once the interrupted reader has looked at why.
func (c *conn) clearDeadline() { c.nc.SetReadDeadline(time.Time{}) }

// inlineGate counts callers reading connections inline, so Close can wait
// for their handler calls as it waits for its own goroutines'. Entering
// and leaving are one atomic add each: they are on every inline wait.
type inlineGate struct {
	n atomic.Int64 // callers inside, plus gateClosed once closing
}

const gateClosed = 1 << 62

func (g *inlineGate) enter() bool {
	if g.n.Add(1) >= gateClosed {
		g.n.Add(-1)
		return false
	}
	return true
}

func (g *inlineGate) leave() { g.n.Add(-1) }

// closeAndWait refuses new inline readers and waits for those reading;
// their connections are closed by then, so they leave promptly. Called
// once, by Close.
func (g *inlineGate) closeAndWait() {
	g.n.Add(gateClosed)
	for g.n.Load() != gateClosed {
		time.Sleep(100 * time.Microsecond)
	}
}
