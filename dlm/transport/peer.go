package transport

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// peer is the state kept for one other node. It outlives connections: the
// outgoing stream (sequence numbers and unacknowledged frames) and the
// incoming stream position survive reconnects and are reset only when the
// peer turns out to be a new incarnation.
//
// Lock order: recvMu before mu.
type peer struct {
	t   *Transport
	id  NodeID
	log *slog.Logger
	// key rate-limits this peer's connection events in the log (event).
	key  string
	stop chan struct{} // closed when the peer is removed
	down chan struct{} // signalled (cap 1) when the connection is lost

	// recvMu serialises the processing of received frames, and with it
	// handler calls, across old and new connections.
	recvMu sync.Mutex
	// recvSeq is the highest sequence number received in order. Written
	// under recvMu (and mu when reset), read atomically by writers that
	// piggyback it as the ack.
	recvSeq atomic.Uint64
	// staleDrops counts stale-generation drops from this peer, to rate-
	// limit their log lines. Under recvMu.
	staleDrops uint64
	// The generation table last consulted, and the lockspace looked up in
	// it with its generation: consecutive frames for one lockspace skip
	// the lookup while the table is unchanged. Under recvMu.
	genTable *map[LockspaceID]uint64
	genLS    LockspaceID
	genCur   uint64
	// more is set by the reader while the handler runs for a frame that
	// further whole frames follow in its buffer (Transport.MoreFrames).
	more atomic.Bool

	mu      sync.Mutex
	addr    string // "" while the address is unknown: never dialled, queue bounded
	removed bool
	cur     *conn  // authenticated connection, nil while disconnected
	peerInc uint64 // peer incarnation our streams are bound to; 0 = unbound

	// addrGen counts address changes; the dialer compares it with the
	// value it last dialled to restart its back-off for a new address.
	addrGen uint64
	// moved (cap 1) wakes the dialer when the address changed.
	moved chan struct{}
	// dialCancel abandons the dial (or handshake) in progress, if any,
	// when the address changes or the peer is removed.
	dialCancel context.CancelCauseFunc
	// inBackoff and inNotBefore pace a lower-ID peer's inbound connections
	// the way the dialer paces its own: after a connection that died
	// younger than ReconnectMax, the next one is refused until inNotBefore,
	// and the window doubles (from ReconnectMin/4 to ReconnectMax/4) while
	// connections keep dying young. A quarter of the dialer's back-off, so
	// that a correct dialer's jittered wait (at least half its back-off)
	// always ends after the window.
	inBackoff   time.Duration
	inNotBefore time.Time
	// fullDrops counts frames refused because the queue of a peer without
	// an address was full, to rate-limit their log lines.
	fullDrops uint64

	// Outgoing stream. sendBuf holds the encoded frames from the oldest
	// unacknowledged one to the newest queued one, back to back. Positions
	// are absolute byte offsets in the stream (bufBase is the offset of
	// sendBuf[0]) so they stay valid when the buffer is compacted.
	nextSeq  uint64
	sendBuf  []byte
	bufBase  int64
	headAbs  int64 // offset of the oldest unacknowledged frame
	highAbs  int64 // end of the furthest byte ever written (resend accounting)
	unacked  int   // frames in sendBuf from headAbs on
	ackedIn  uint64
	ackedInA atomic.Uint64 // ackedIn, for receivers to skip taking mu when an ack changes nothing
	ackDue   bool          // a standalone ack should go out with the next write
	ackedOut atomic.Uint64 // ack value last written on cur
	// ackTimer sends a standalone ack AckDelay after frames arrived if no
	// data frame carried it meanwhile. It is armed only when not armed and
	// never stopped early: arming a timer that becomes the earliest one
	// wakes an idle thread, so arming it per frame would cost a wake-up
	// per round trip.
	ackTimer *time.Timer
	ackArmed atomic.Bool
}

func newPeer(t *Transport, id NodeID, addr string) *peer {
	p := &peer{
		t:       t,
		id:      id,
		log:     t.log.With("peer", uint32(id)),
		key:     fmt.Sprintf("peer %d", id),
		stop:    make(chan struct{}),
		down:    make(chan struct{}, 1),
		moved:   make(chan struct{}, 1),
		addr:    addr,
		nextSeq: 1,
	}
	p.ackTimer = time.AfterFunc(time.Hour, p.ackTimerFired)
	p.ackTimer.Stop()
	return p
}

// event logs one of the peer's connection events (connected, lost, dial
// or handshake failure, backlog refusal). They share one rate-limit key per
// peer: a peer that misbehaves in a loop costs at most one line per
// LogInterval, and the latest event still shows at the end of each
// interval (logLimiter).
func (p *peer) event(level slog.Level, msg string, args ...any) {
	p.t.lim.logf(p.key, level, msg, append([]any{"peer", uint32(p.id)}, args...)...)
}

// errAddrChanged abandons a dial to an address that is no longer the
// peer's.
var errAddrChanged = errors.New("the peer's address changed")

// setAddr changes the peer's address; "" means unknown. When this node is
// the dialer, a change abandons a dial in progress, drops the current
// connection if the new address is known (the peer moved: a connection to
// its old address may be dead without our knowing it yet, and the new one
// is tried at once) and wakes the dialer. A lower-ID peer's address is
// never used (it dials us), so for it a change is only recorded.
func (p *peer) setAddr(addr string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.removed || addr == p.addr {
		return
	}
	old := p.addr
	p.addr = addr
	p.addrGen++
	if p.t.id < p.id {
		if p.dialCancel != nil {
			p.dialCancel(errAddrChanged)
		}
		if c := p.cur; c != nil && addr != "" {
			p.connLostLocked(c, slog.LevelInfo, "the peer's address changed", nil)
		}
		select {
		case p.moved <- struct{}{}:
		default:
		}
	}
	p.log.Info("peer address changed", "old_addr", old, "addr", addr)
}

// remove disconnects the peer for good and drops what was queued for it.
func (p *peer) remove(reason string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.removed {
		return
	}
	p.removed = true
	close(p.stop)
	if p.dialCancel != nil {
		p.dialCancel(ErrUnknownPeer)
	}
	p.ackTimer.Stop()
	if c := p.cur; c != nil {
		p.cur = nil
		c.retired.Store(true)
		c.close()
		p.log.Debug("connection closed", "reason", reason)
	}
	p.t.stats.dropRemove.Add(uint64(p.unacked))
	p.discardSendLocked()
}

// send appends one data frame to the outgoing stream and, when the
// connection is idle, writes it at once.
func (p *peer) send(ls LockspaceID, gen uint64, payload []byte) error {
	p.mu.Lock()
	if p.removed {
		p.mu.Unlock()
		if p.t.closed.Load() {
			return ErrClosed
		}
		return fmt.Errorf("transport: send to node %d: %w", p.id, ErrUnknownPeer)
	}
	extra := HeaderSize + len(payload)
	if p.addr == "" {
		if queued := int(p.tailAbsLocked() - p.headAbs); queued+extra > p.t.cfg.MaxUnaddressedQueue {
			p.fullDrops++
			p.t.stats.dropQueueFull.Add(1)
			n := p.fullDrops
			p.mu.Unlock()
			if n&(n-1) == 0 { // 1, 2, 4, 8...: log without flooding
				p.log.Warn("frame refused: the peer's address is unknown and its queue is full",
					"queued_bytes", queued, "limit", p.t.cfg.MaxUnaddressedQueue, "refused_for_peer", n)
			}
			return fmt.Errorf("transport: send to node %d: %w: its address is unknown and %d bytes wait for it (limit %d)",
				p.id, ErrQueueFull, queued, p.t.cfg.MaxUnaddressedQueue)
		}
	}
	if queued := int(p.tailAbsLocked() - p.headAbs); p.addr != "" && queued+extra > p.t.cfg.MaxUnackedBytes {
		p.t.stats.dropBacklog.Add(1)
		p.mu.Unlock()
		p.event(slog.LevelWarn, "frame refused: too many bytes unacknowledged by the peer (not reading, or unreachable)",
			"unacked_bytes", queued, "limit", p.t.cfg.MaxUnackedBytes)
		return fmt.Errorf("transport: send to node %d: %w: %d bytes unacknowledged (limit %d)",
			p.id, ErrQueueFull, queued, p.t.cfg.MaxUnackedBytes)
	}
	seq := p.nextSeq
	p.nextSeq++
	if len(p.sendBuf)+extra > cap(p.sendBuf) {
		p.growSendLocked(extra)
	}
	n := len(p.sendBuf)
	p.sendBuf = p.sendBuf[:n+extra]
	putHeader(p.sendBuf[n:], FrameData, ls, uint32(len(payload)), gen, seq, 0)
	copy(p.sendBuf[n+HeaderSize:], payload)
	p.unacked++
	p.flushLocked()
	p.mu.Unlock()
	return nil
}

// growSendLocked makes room for extra more bytes, by compacting
// acknowledged bytes away when that frees enough, else by reallocating.
func (p *peer) growSendLocked(extra int) {
	dead := int(p.headAbs - p.bufBase)
	live := len(p.sendBuf) - dead
	if dead > 0 && live+extra <= cap(p.sendBuf) && dead >= cap(p.sendBuf)/4 {
		copy(p.sendBuf, p.sendBuf[dead:])
		p.sendBuf = p.sendBuf[:live]
		p.bufBase = p.headAbs
		return
	}
	nb := make([]byte, live, max(2*(live+extra), 4096))
	copy(nb, p.sendBuf[dead:])
	p.sendBuf = nb
	p.bufBase = p.headAbs
}

// tailAbsLocked is the offset just past the newest queued frame.
func (p *peer) tailAbsLocked() int64 { return p.bufBase + int64(len(p.sendBuf)) }

// discardSendLocked empties the outgoing stream without renumbering it.
func (p *peer) discardSendLocked() {
	tail := p.tailAbsLocked()
	if cap(p.sendBuf) > 1<<20 {
		p.sendBuf = nil
	} else {
		p.sendBuf = p.sendBuf[:0]
	}
	p.bufBase, p.headAbs = tail, tail
	p.unacked = 0
}

// restartStreamLocked starts a new outgoing stream for a peer that came
// back as a new incarnation, returning how many unacknowledged frames it
// kept. Without Config.KeepCurrentGeneration every queued frame is dropped:
// it was addressed to a process that no longer exists. With it, frames
// whose generation is at least their lockspace's current one were made for
// the current view, which is addressed to the node whichever process
// joined it (the view that readmits a restarted node is agreed with its
// new incarnation), so they are kept, in order, and renumbered from 1;
// frames of older generations are dropped (the new incarnation would drop
// them as stale anyway).
func (p *peer) restartStreamLocked() int {
	var keep []byte
	kept := 0
	if p.t.cfg.KeepCurrentGeneration && p.unacked > 0 {
		gens := *p.t.gens.Load()
		live := p.sendBuf[p.headAbs-p.bufBase:]
		for off := 0; off < len(live); {
			f := live[off:]
			n := HeaderSize + int(binary.BigEndian.Uint32(f[offLen:]))
			ls := LockspaceID(binary.BigEndian.Uint32(f[offLS:]))
			if cur := gens[ls]; cur != 0 && binary.BigEndian.Uint64(f[offGen:]) >= cur {
				kept++
				start := len(keep)
				keep = append(keep, f[:n]...)
				binary.BigEndian.PutUint64(keep[start+offSeq:], uint64(kept))
				binary.BigEndian.PutUint64(keep[start+offAck:], 0)
			}
			off += n
		}
	}
	p.discardSendLocked()
	p.nextSeq = uint64(kept) + 1
	if kept > 0 {
		// The kept frames go out on the new stream as if just queued;
		// highAbs marks them as already written once (resent).
		p.sendBuf = append(p.sendBuf, keep...)
		p.unacked = kept
		p.highAbs = p.tailAbsLocked()
	}
	return kept
}

// trimLocked forgets frames acknowledged by ack. It fails if ack names a
// frame never queued, which only a broken or confused peer does.
func (p *peer) trimLocked(ack uint64) error {
	if ack <= p.ackedIn {
		return nil
	}
	if ack >= p.nextSeq {
		return fmt.Errorf("peer acknowledged sequence %d, but the last sent is %d", ack, p.nextSeq-1)
	}
	p.ackedIn = ack
	p.ackedInA.Store(ack)
	off := int(p.headAbs - p.bufBase)
	for off < len(p.sendBuf) {
		if binary.BigEndian.Uint64(p.sendBuf[off+offSeq:]) > ack {
			break
		}
		off += HeaderSize + int(binary.BigEndian.Uint32(p.sendBuf[off+offLen:]))
		p.unacked--
	}
	p.headAbs = p.bufBase + int64(off)
	if off == len(p.sendBuf) {
		p.discardSendLocked()
	}
	if c := p.cur; c != nil && c.sentAbs < p.headAbs {
		c.sentAbs = p.headAbs
	}
	return nil
}

// hasWorkLocked reports whether c has frames or an ack to write.
func (p *peer) hasWorkLocked(c *conn) bool {
	return c.sentAbs < p.tailAbsLocked() || (p.ackDue && p.recvSeq.Load() > p.ackedOut.Load())
}

// fillLocked copies the next batch of unwritten frames into c's write
// buffer, stamping each with the current cumulative ack, or a standalone
// ack frame if there are no frames but an ack is due.
func (p *peer) fillLocked(c *conn) []byte {
	st := &p.t.stats
	ack := p.recvSeq.Load()
	buf := c.wbuf[:0]
	start := max(c.sentAbs, p.headAbs)
	off := int(start - p.bufBase)
	end := off
	limit := p.t.cfg.MaxWriteBatch
	var sent, resent uint64
	for end < len(p.sendBuf) {
		n := HeaderSize + int(binary.BigEndian.Uint32(p.sendBuf[end+offLen:]))
		if end > off && end-off+n > limit {
			break
		}
		if p.bufBase+int64(end) < p.highAbs {
			resent++
		} else {
			sent++
		}
		end += n
	}
	if end > off {
		for o := off; o < end; {
			n := HeaderSize + int(binary.BigEndian.Uint32(p.sendBuf[o+offLen:]))
			start := len(buf)
			buf = append(buf, 0, 0, 0, 0)
			buf = append(buf, p.sendBuf[o:o+n]...)
			binary.BigEndian.PutUint64(buf[start+recHdrLen+offAck:], ack)
			buf = c.send.finish(buf, start)
			o += n
		}
		c.sentAbs = p.bufBase + int64(end)
		p.highAbs = max(p.highAbs, c.sentAbs)
		st.framesSent.Add(sent)
		if resent > 0 {
			st.framesResent.Add(resent)
		}
		p.ackedOut.Store(ack)
		p.ackDue = false

	} else if p.ackDue && ack > p.ackedOut.Load() {
		var h [HeaderSize]byte
		putHeader(h[:], FrameAck, 0, 0, 0, 0, ack)
		buf = c.send.seal(buf, h[:])
		p.ackedOut.Store(ack)
		p.ackDue = false
		st.acksSent.Add(1)
	}
	c.wbuf = buf
	return buf
}

// flushLocked writes pending frames from the calling goroutine when the
// writer goroutine is idle: the common, idle case costs no goroutine
// switch. The write is non-blocking (directwrite_unix.go), because Send
// must never block: the lock manager sends with its lockspace lock held.
// Whatever the socket does not take at once, and whatever other goroutines
// queue meanwhile, is handed to the writer goroutine. p.mu is released
// during the write.
func (p *peer) flushLocked() {
	c := p.cur
	if c == nil || c.writing || !p.hasWorkLocked(c) {
		return
	}
	c.writing = true
	buf := p.fillLocked(c)
	p.mu.Unlock()
	n, err := c.tryWrite(buf)
	p.mu.Lock()
	if n > 0 || err != nil {
		p.t.stats.writes.Add(1)
	}
	if p.cur != c {
		return // replaced or lost while we wrote; the new one resends
	}
	if err != nil {
		p.connLostLocked(c, slog.LevelInfo, "write failed", err)
		return
	}
	if n < len(buf) {
		c.leftover = buf[n:]
		c.wakeFlusher()
		return
	}
	if p.hasWorkLocked(c) {
		c.wakeFlusher() // ownership passes to the writer, writing stays true
		return
	}
	c.writing = false
}

// flushLoop is the connection's flusher: it takes over writing whenever a
// direct write could not finish or found more work queued behind it, and
// keeps writing (blocking) until nothing is left, coalescing everything
// queued meanwhile into each write.
func (p *peer) flushLoop(c *conn) {
	defer p.t.wg.Done()
	for {
		select {
		case <-c.wake:
		case <-c.done:
			return
		}
		p.mu.Lock()
		for p.cur == c {
			buf := c.leftover
			c.leftover = nil
			if len(buf) == 0 {
				if !p.hasWorkLocked(c) {
					c.writing = false
					break
				}
				buf = p.fillLocked(c)
			}
			p.mu.Unlock()
			_, err := c.nc.Write(buf)
			p.mu.Lock()
			p.t.stats.writes.Add(1)
			if err != nil {
				if p.cur == c {
					p.connLostLocked(c, slog.LevelInfo, "write failed", err)
				}
				break
			}
		}
		p.mu.Unlock()
	}
}

// ackTimerFired sends a standalone ack if no data frame carried one since
// frames were received.
func (p *peer) ackTimerFired() {
	p.mu.Lock()
	p.ackArmed.Store(false)
	if p.cur != nil && p.recvSeq.Load() > p.ackedOut.Load() {
		p.ackDue = true
		p.flushLocked()
	}
	p.mu.Unlock()
}

// afterBatch runs when the reader has consumed everything buffered: it
// makes sure what was received gets acknowledged, at once if many frames
// are waiting for it, otherwise after AckDelay unless a data frame carries
// the ack first.
func (p *peer) afterBatch() {
	r := p.recvSeq.Load()
	a := p.ackedOut.Load()
	if r <= a {
		return
	}
	if r-a >= uint64(p.t.cfg.AckEvery) {
		p.ackNow()
		return
	}
	if !p.ackArmed.Swap(true) {
		p.ackTimer.Reset(p.t.cfg.AckDelay)
	}
}

// ackNow writes an acknowledgement as soon as the connection allows.
func (p *peer) ackNow() {
	p.mu.Lock()
	p.ackDue = true
	p.flushLocked()
	p.mu.Unlock()
}

// freshLocked reports whether a connection to a peer of incarnation peerInc,
// whose outgoing stream is bound to our incarnation peerStreamFor, starts
// new streams in both directions instead of continuing the current ones.
// Both sides evaluate the same condition from the handshake, so they agree.
func (p *peer) freshLocked(peerInc, peerStreamFor uint64) bool {
	return peerInc != p.peerInc || peerStreamFor != p.t.inc
}

// install makes c the peer's connection after a successful handshake
// (an error if it cannot: the peer acknowledged frames never sent),
// resetting the streams if the peer is a new incarnation, dropping what
// the peer already has, and starting the reader and the flusher; then
// resends whatever is unacknowledged.
func (p *peer) install(c *conn, hs handshakeResult) error {
	t := p.t
	p.recvMu.Lock()
	p.mu.Lock()
	if p.removed || t.closed.Load() {
		p.mu.Unlock()
		p.recvMu.Unlock()
		c.close()
		return ErrClosed
	}
	var restartAttrs []any
	if p.freshLocked(hs.peerInc, hs.peerStreamFor) {
		if p.peerInc != 0 {
			before := p.unacked
			kept := p.restartStreamLocked()
			if dropped := before - kept; dropped > 0 {
				t.stats.dropRestarted.Add(uint64(dropped))
			}
			if kept > 0 {
				t.stats.keptRestarted.Add(uint64(kept))
			}
			restartAttrs = []any{"peer_restarted", "new streams", "old_incarnation", p.peerInc,
				"dropped_unacked", before - kept, "kept_current_generation", kept}
		}
		p.recvSeq.Store(0)
		p.ackedIn = 0
		p.ackedInA.Store(0)
	}
	p.peerInc = hs.peerInc
	if err := p.trimLocked(hs.peerAck); err != nil {
		p.mu.Unlock()
		p.recvMu.Unlock()
		t.stats.protocolErr.Add(1)
		p.event(slog.LevelWarn, "connection refused: protocol error in handshake", "reason", err.Error())
		c.close()
		return fmt.Errorf("%w: %w", errProtocol, err)
	}
	replaced := false
	if old := p.cur; old != nil {
		old.retired.Store(true)
		old.close()
		replaced = true
	}
	p.cur = c
	c.established = time.Now()
	c.startReading(t.cfg.ReadBufferSize)
	c.sentAbs = p.headAbs
	p.ackedOut.Store(hs.ourAck)
	p.ackDue = false
	t.stats.connEstablished.Add(1)
	c.log = p.log
	t.wg.Add(2)
	go p.readLoop(c)
	go p.flushLoop(c)
	p.mu.Unlock()
	p.recvMu.Unlock()
	p.event(slog.LevelInfo, "connected", append([]any{"remote", c.nc.RemoteAddr().String(), "peer_incarnation", hs.peerInc,
		"resending", p.unackedSnapshot(), "replaced_connection", replaced}, restartAttrs...)...)

	p.mu.Lock()
	p.flushLocked()
	p.mu.Unlock()
	return nil
}

// inboundWait is how long an inbound connection from the peer must still
// wait after its previous connection died young (0 or less: accept it).
func (p *peer) inboundWait() time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	return time.Until(p.inNotBefore)
}

func (p *peer) unackedSnapshot() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.unacked
}

// connLostLocked closes c, which was the current connection, logging why,
// and wakes the dialer.
func (p *peer) connLostLocked(c *conn, level slog.Level, what string, err error) {
	if p.cur != c {
		c.close()
		return
	}
	p.cur = nil
	c.retired.Store(true)
	c.close()
	if p.t.id > p.id { // it dials us: pace its next connection
		cfg := &p.t.cfg
		if time.Since(c.established) > cfg.ReconnectMax {
			p.inBackoff = 0
		} else {
			p.inBackoff = min(max(2*p.inBackoff, cfg.ReconnectMin), cfg.ReconnectMax)
			p.inNotBefore = time.Now().Add(p.inBackoff / 4)
		}
	}
	if !p.t.closed.Load() && !p.removed {
		p.t.stats.connLost.Add(1)
		p.event(level, "connection closed", "reason", what, "err", errString(err))
	}
	select {
	case p.down <- struct{}{}:
	default:
	}
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

// errProtocol marks a well-formed frame that breaks the protocol.
var errProtocol = errors.New("protocol error")

// errRetired stops the reader of a connection that was replaced.
var errRetired = errors.New("connection replaced")

// receive processes one frame read from c.
func (p *peer) receive(c *conn, h *Header, payload []byte) error {
	t := p.t
	p.recvMu.Lock()
	defer p.recvMu.Unlock()
	if c.retired.Load() {
		return errRetired
	}
	if h.Ack > p.ackedInA.Load() {
		p.mu.Lock()
		err := p.trimLocked(h.Ack)
		p.mu.Unlock()
		if err != nil {
			return fmt.Errorf("%w: %w", errProtocol, err)
		}
	}
	switch h.Type {
	case FrameAck:
		return nil
	case FrameData:
	default:
		return fmt.Errorf("%w: unexpected %v frame after handshake", errProtocol, h.Type)
	}
	r := p.recvSeq.Load()
	if h.Seq <= r {
		t.stats.dropDuplicate.Add(1)
		return nil
	}
	if h.Seq != r+1 {
		return fmt.Errorf("%w: sequence gap: got %d, expected %d", errProtocol, h.Seq, r+1)
	}
	p.recvSeq.Store(h.Seq)
	t.stats.framesReceived.Add(1)
	if tab := t.gens.Load(); tab != p.genTable || h.Lockspace != p.genLS {
		p.genTable, p.genLS, p.genCur = tab, h.Lockspace, (*tab)[h.Lockspace]
	}
	if cur := p.genCur; h.Generation < cur {
		t.stats.dropStale.Add(1)
		p.staleDrops++
		if p.staleDrops&(p.staleDrops-1) == 0 { // 1, 2, 4, 8...: log without flooding
			p.log.Warn("dropped frame from an old generation", "lockspace", uint32(h.Lockspace),
				"frame_generation", h.Generation, "current_generation", cur, "dropped_from_peer", p.staleDrops)
		}
		return nil
	}
	t.cfg.Handler(p.id, h.Lockspace, h.Generation, payload)
	return nil
}

// readFailed ends c after a read or protocol failure, logging the reason.
func (p *peer) readFailed(c *conn, err error) {
	if errors.Is(err, errRetired) {
		return
	}
	level := slog.LevelInfo
	what := "read failed"
	switch {
	case errors.Is(err, ErrMalformed):
		p.t.stats.malformed.Add(1)
		level, what = slog.LevelWarn, "malformed frame"
	case errors.Is(err, errAuth):
		p.t.stats.rejected.Add(1)
		level, what = slog.LevelWarn, "record failed authentication"
	case errors.Is(err, errProtocol):
		p.t.stats.protocolErr.Add(1)
		level, what = slog.LevelWarn, "protocol error"
	case errors.Is(err, io.EOF):
		what = "peer closed the connection"
	}
	p.mu.Lock()
	if p.cur == c {
		p.connLostLocked(c, level, what, err)
	} else {
		c.close()
	}
	p.mu.Unlock()
}

// dialLoop keeps a connection to a peer with a higher ID up: it dials
// whenever there is none and the address is known, backing off
// exponentially (with jitter) after failures. The first attempt after losing
// a connection that lived a while, and the first attempt at a new address,
// are immediate. While the address is unknown it waits for one.
func (p *peer) dialLoop() {
	t := p.t
	defer t.wg.Done()
	var backoff time.Duration
	var established time.Time
	var gen uint64 // the address generation the back-off belongs to
	failures := 0
	for {
		p.mu.Lock()
		removed, connected, addr, ag := p.removed, p.cur != nil, p.addr, p.addrGen
		p.mu.Unlock()
		if removed {
			return
		}
		if ag != gen {
			gen, backoff, failures = ag, 0, 0 // a new address: try it at once
		}
		if connected {
			select {
			case <-p.down:
			case <-p.stop:
				return
			}
			if time.Since(established) > t.cfg.ReconnectMax {
				backoff = 0
			} else {
				// A connection that died young (a peer that authenticates
				// and then breaks the protocol) backs off like a failure.
				backoff = min(max(2*backoff, t.cfg.ReconnectMin), t.cfg.ReconnectMax)
			}
			continue
		}
		if addr == "" {
			select {
			case <-p.moved:
			case <-p.stop:
				return
			}
			continue
		}
		if backoff > 0 {
			d := backoff/2 + rand.N(backoff/2+1)
			select {
			case <-time.After(d):
			case <-p.moved:
				continue
			case <-p.stop:
				return
			}
		}
		ctx, ok := p.startDial(ag)
		if !ok {
			continue // the address changed (or the peer went) meanwhile
		}
		err := p.dialOnce(ctx, addr)
		p.endDial()
		if err == nil {
			established = time.Now()
			failures = 0
			continue
		}
		if errors.Is(context.Cause(ctx), errAddrChanged) {
			continue // not a failure of the new address
		}
		failures++
		backoff = min(max(2*backoff, t.cfg.ReconnectMin), t.cfg.ReconnectMax)
		level := slog.LevelDebug
		if failures == 1 {
			level = slog.LevelWarn
		}
		if !t.closed.Load() && level == slog.LevelWarn {
			p.event(level, "cannot connect to peer", "addr", addr, "err", err.Error(), "attempts", failures)
		} else if !t.closed.Load() {
			p.log.Log(context.Background(), level, "cannot connect to peer", "addr", addr, "err", err.Error(), "attempts", failures)
		}
	}
}

// startDial registers a dial to the address of generation ag, returning the
// context that an address change or the peer's removal cancels; false if
// the address already changed or the peer is gone.
func (p *peer) startDial(ag uint64) (context.Context, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.removed || p.addrGen != ag {
		return nil, false
	}
	ctx, cancel := context.WithCancelCause(p.t.ctx)
	p.dialCancel = cancel
	return ctx, true
}

// endDial unregisters the dial started by startDial.
func (p *peer) endDial() {
	p.mu.Lock()
	cancel := p.dialCancel
	p.dialCancel = nil
	p.mu.Unlock()
	if cancel != nil {
		cancel(nil)
	}
}

// dialOnce connects to addr, authenticates and installs the connection.
// When ctx ends first (the address changed, the peer was removed, the
// transport closed) the attempt is abandoned: the socket is closed, and
// nothing is counted as a handshake failure. A handshake that completed is
// installed even if the address changed just then: it proved that the
// connection leads to the peer.
func (p *peer) dialOnce(ctx context.Context, addr string) error {
	t := p.t
	d := net.Dialer{Timeout: t.cfg.DialTimeout, KeepAlive: -1}
	nc, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return fmt.Errorf("dial %s: %w", addr, err)
	}
	if !t.trackHandshake(nc, false) {
		return ErrClosed
	}
	defer t.untrackHandshake(nc, false)
	stop := context.AfterFunc(ctx, func() { nc.Close() })
	t.tuneConn(nc)
	c := newConn(nc)
	nc.SetDeadline(time.Now().Add(t.cfg.HandshakeTimeout))
	hs, err := t.dialHandshake(c, p)
	if !stop() {
		nc.Close()
		return fmt.Errorf("dial %s: abandoned: %w", addr, context.Cause(ctx))
	}
	if err != nil {
		t.handshakeFailed(nc, "dial", p.key, err)
		return fmt.Errorf("handshake with %s: %w", addr, err)
	}
	nc.SetDeadline(time.Time{})
	if err := p.install(c, hs); err != nil {
		return fmt.Errorf("handshake with %s: %w", addr, err)
	}
	return nil
}

// conn is one authenticated (or authenticating) TCP connection. Fields
// marked "mu" are guarded by the owning peer's mu.
type conn struct {
	nc  net.Conn
	log *slog.Logger
	// br is the read buffer, allocated once the connection is
	// authenticated (the handshake reads exactly what it needs, so an
	// unauthenticated connection costs no buffer); only the reader uses it.
	br  *bufio.Reader
	big []byte // payloads larger than the read buffer (reader only)
	// The connection's two directions' ciphers (seal.go), set by the
	// handshake: send is used under mu (or by the handshake, before the
	// connection is installed), recv by the reader.
	send, recv *aeadDir
	wake       chan struct{} // hands write work to the writer goroutine
	done       chan struct{} // closed by close
	once       sync.Once
	retired    atomic.Bool // set under the peer's recvMu when replaced or lost

	writing  bool   // mu: a goroutine owns the socket's write side
	leftover []byte // mu: unwritten tail of a partial direct write
	wbuf     []byte // mu/owner: coalescing write buffer
	sentAbs  int64  // mu: stream offset written so far on this connection

	established time.Time // mu: when it was installed

	// Non-blocking direct writes (directwrite_unix.go); owner only.
	raw   syscall.RawConn
	rawFn func(fd uintptr) bool
	dwBuf []byte
	dwN   int
	dwErr error
}

func newConn(nc net.Conn) *conn {
	c := &conn{
		nc:   nc,
		wake: make(chan struct{}, 1),
		done: make(chan struct{}),
		wbuf: make([]byte, 0, 4096),
	}
	c.initDirect()
	return c
}

// startReading allocates the read buffer; called once authenticated.
func (c *conn) startReading(size int) {
	c.br = bufio.NewReaderSize(c.nc, size)
}

func (c *conn) wakeFlusher() {
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

func (c *conn) close() {
	c.once.Do(func() {
		close(c.done)
		c.nc.Close()
	})
}
