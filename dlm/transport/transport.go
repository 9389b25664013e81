package transport

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// Errors returned by Send. They mean the call itself was wrong or came too
// late; network trouble is never reported by Send, it is handled by
// reconnecting and resending.
var (
	// ErrClosed: the transport was closed.
	ErrClosed = errors.New("transport closed")
	// ErrUnknownPeer: the destination is not in the peer set.
	ErrUnknownPeer = errors.New("unknown peer")
	// ErrTooLarge: the payload is over Config.MaxFrameSize.
	ErrTooLarge = errors.New("payload too large")
	// ErrQueueFull: the destination's address is not known yet and
	// Config.MaxUnaddressedQueue bytes already wait for it; the frame was
	// not queued.
	ErrQueueFull = errors.New("queue full")
)

// Transport carries DLM messages between this node and its peers: one TCP
// connection per pair of nodes (the node with the lower ID dials), mutually
// authenticated with the cluster key, with per-peer sequence numbers,
// acknowledgements and resend after reconnect, so each message is delivered
// exactly once and in order as long as neither node restarts. Frames older
// than a lockspace's current generation are dropped on receipt.
//
// All methods are safe for concurrent use.
type Transport struct {
	cfg Config
	id  NodeID
	inc uint64
	log *slog.Logger
	ln  net.Listener

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	closed atomic.Bool

	// mu serialises peer-set changes, Close, and the set of connections
	// still in their handshake.
	mu          sync.Mutex
	handshaking map[net.Conn]struct{}
	pendingIn   int                              // inbound connections in handshaking
	peers       atomic.Pointer[map[NodeID]*peer] // copy on write under mu

	genMu sync.Mutex
	gens  atomic.Pointer[map[LockspaceID]uint64] // copy on write under genMu

	stats counters
	lim   logLimiter
}

// New starts a transport: it listens, and dials every peer with a higher ID.
// It returns once the listener is up; connections come up in the background
// and messages sent before then are queued.
func New(cfg Config) (*Transport, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	t := &Transport{
		cfg:         cfg,
		id:          cfg.NodeID,
		inc:         cfg.Incarnation,
		log:         cfg.Logger.With("node", uint32(cfg.NodeID)),
		handshaking: make(map[net.Conn]struct{}),
	}
	for t.inc == 0 {
		var b [8]byte
		if _, err := rand.Read(b[:]); err != nil {
			return nil, fmt.Errorf("transport: random incarnation: %w", err)
		}
		t.inc = binary.BigEndian.Uint64(b[:])
	}
	t.lim = logLimiter{log: t.log, interval: cfg.LogInterval}
	t.ln = cfg.Listener
	if t.ln == nil {
		lc := net.ListenConfig{KeepAlive: -1}
		t.ln, err = lc.Listen(context.Background(), "tcp", cfg.ListenAddr)
		if err != nil {
			return nil, fmt.Errorf("transport: listen on %s: %w", cfg.ListenAddr, err)
		}
	}
	t.ctx, t.cancel = context.WithCancel(context.Background())
	empty := map[NodeID]*peer{}
	t.peers.Store(&empty)
	noGens := map[LockspaceID]uint64{}
	t.gens.Store(&noGens)
	t.wg.Add(1)
	go t.acceptLoop()
	t.SetPeers(cfg.Peers)
	t.log.Info("transport started", "addr", t.ln.Addr().String(), "incarnation", t.inc)
	return t, nil
}

// Addr returns the address the transport listens on (useful with port 0).
func (t *Transport) Addr() net.Addr { return t.ln.Addr() }

// NodeID returns this node's ID.
func (t *Transport) NodeID() NodeID { return t.id }

// Incarnation returns this run's incarnation number, as sent to peers.
func (t *Transport) Incarnation() uint64 { return t.inc }

// Stats returns a snapshot of the counters.
func (t *Transport) Stats() Stats { return t.stats.snapshot() }

// Send queues payload for node to, tagged with lockspace ls and the sender's
// generation gen for it, and returns without waiting for the network: the
// connection's writer goroutine writes it, coalesced with whatever else is
// queued. The payload is copied, so
// the caller may reuse it at once. Errors only report invalid arguments or a
// closed transport; frames to a disconnected peer wait for the connection.
func (t *Transport) Send(to NodeID, ls LockspaceID, gen uint64, payload []byte) error {
	if t.closed.Load() {
		return ErrClosed
	}
	if len(payload) > t.cfg.MaxFrameSize {
		return fmt.Errorf("transport: send to node %d: %w: %d bytes, max %d", to, ErrTooLarge, len(payload), t.cfg.MaxFrameSize)
	}
	p := (*t.peers.Load())[to]
	if p == nil {
		return fmt.Errorf("transport: send to node %d: %w", to, ErrUnknownPeer)
	}
	return p.send(ls, gen, payload)
}

// SetGeneration records gen as lockspace ls's current generation. From then
// on, data frames for ls carrying an older generation are dropped on receipt
// (acknowledged, counted in Stats.Dropped.StaleGeneration, never delivered).
// Generations only move forward: a value lower than the current one is
// ignored, so a late call from a stale view cannot re-admit old frames.
// Lockspaces never set have generation 0, which drops nothing.
func (t *Transport) SetGeneration(ls LockspaceID, gen uint64) {
	t.genMu.Lock()
	defer t.genMu.Unlock()
	old := *t.gens.Load()
	if cur, ok := old[ls]; ok && cur >= gen {
		return
	}
	m := maps.Clone(old)
	m[ls] = gen
	t.gens.Store(&m)
}

// Generation returns lockspace ls's current generation (0 if never set).
func (t *Transport) Generation(ls LockspaceID) uint64 {
	return (*t.gens.Load())[ls]
}

// SetPeers replaces the peer set. New peers get connected (dialled when
// their ID is higher than ours, awaited otherwise); removed peers are
// disconnected and their queued frames dropped; a changed address is used
// at once (see SetPeer). Inbound connections from node IDs not in the set
// are refused. Entries with an invalid ID or address are skipped with a
// warning.
func (t *Transport) SetPeers(peers map[NodeID]string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed.Load() {
		return
	}
	old := *t.peers.Load()
	next := make(map[NodeID]*peer, len(peers))
	for id, addr := range peers {
		if err := t.checkPeer(id, addr); err != nil {
			t.log.Warn("ignoring a peer", "peer", uint32(id), "err", err.Error())
			continue
		}
		if p := old[id]; p != nil {
			p.setAddr(addr)
			next[id] = p
			continue
		}
		next[id] = t.newPeerLocked(id, addr)
	}
	t.peers.Store(&next)
	for id, p := range old {
		if next[id] == nil {
			p.remove("peer removed")
			t.log.Info("peer removed", "peer", uint32(id))
		}
	}
}

// SetPeer adds node id to the peer set, or changes its address, leaving the
// other peers alone: this is how peers learned at runtime (from gossip) are
// added. addr is "host:port", or "" when the peer must be known (its
// inbound connections accepted, frames for it queued) before its address
// is: frames then wait, up to Config.MaxUnaddressedQueue bytes, and a peer
// with a higher ID is dialled as soon as SetPeer gives it an address. A
// changed address of a peer we dial is tried at once: a dial to the old one
// is abandoned and a connection to it dropped (the peer moved, so that
// connection may be dead without our knowing yet); the streams continue,
// unacknowledged frames are resent on the new connection. An invalid ID or
// address is refused and changes nothing.
func (t *Transport) SetPeer(id NodeID, addr string) error {
	if err := t.checkPeer(id, addr); err != nil {
		return fmt.Errorf("transport: set peer %d: %w", id, err)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed.Load() {
		return fmt.Errorf("transport: set peer %d: %w", id, ErrClosed)
	}
	old := *t.peers.Load()
	if p := old[id]; p != nil {
		p.setAddr(addr)
		return nil
	}
	next := maps.Clone(old)
	next[id] = t.newPeerLocked(id, addr)
	t.peers.Store(&next)
	return nil
}

// RemovePeer removes node id from the peer set: its connection is closed,
// frames queued for it are dropped (Stats.Dropped.PeerRemoved) and its
// inbound connections are refused from then on. It reports whether id was
// a peer.
func (t *Transport) RemovePeer(id NodeID) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	old := *t.peers.Load()
	p := old[id]
	if p == nil || t.closed.Load() {
		return false
	}
	next := maps.Clone(old)
	delete(next, id)
	t.peers.Store(&next)
	p.remove("peer removed")
	t.log.Info("peer removed", "peer", uint32(id))
	return true
}

// checkPeer validates a peer entry.
func (t *Transport) checkPeer(id NodeID, addr string) error {
	if id == 0 || id == t.id {
		return fmt.Errorf("invalid peer ID %d (this node is %d)", id, t.id)
	}
	return CheckAddr(addr)
}

// newPeerLocked creates peer id and, if this node dials it, its dialer.
// Called with mu held; the caller publishes it in the peer set.
func (t *Transport) newPeerLocked(id NodeID, addr string) *peer {
	p := newPeer(t, id, addr)
	if t.id < id {
		t.wg.Add(1)
		go p.dialLoop()
	}
	if addr == "" {
		t.log.Info("peer added; its address is not known yet", "peer", uint32(id))
	} else {
		t.log.Info("peer added", "peer", uint32(id), "addr", addr)
	}
	return p
}

// PeerStatus describes the state of one peer, for tests and diagnostics.
type PeerStatus struct {
	// Addr is the peer's configured address ("" while unknown).
	Addr string
	// Connected reports an authenticated connection.
	Connected bool
	// Incarnation is the peer incarnation our streams are bound to (0
	// before the first connection).
	Incarnation uint64
	// Unacked is the number of outgoing frames not yet acknowledged
	// (including those not yet written).
	Unacked int
	// NextSeq is the sequence number the next frame sent will carry.
	NextSeq uint64
	// Received is the highest sequence number received in order.
	Received uint64
}

// PeerStatus returns the status of peer id, and false if id is not a peer.
func (t *Transport) PeerStatus(id NodeID) (PeerStatus, bool) {
	p := (*t.peers.Load())[id]
	if p == nil {
		return PeerStatus{}, false
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return PeerStatus{
		Addr:        p.addr,
		Connected:   p.cur != nil,
		Incarnation: p.peerInc,
		Unacked:     p.unacked,
		NextSeq:     p.nextSeq,
		Received:    p.recvSeq.Load(),
	}, true
}

// Close stops the transport: it closes the listener and every connection,
// drops queued frames and waits for all its goroutines to finish (including
// handler calls in progress, so it must not be called from a handler).
// Later Sends return ErrClosed. Close is idempotent.
func (t *Transport) Close() error {
	t.mu.Lock()
	if t.closed.Swap(true) {
		t.mu.Unlock()
		t.wg.Wait()
		return nil
	}
	t.cancel()
	err := t.ln.Close()
	for nc := range t.handshaking {
		nc.Close()
	}
	for _, p := range *t.peers.Load() {
		p.remove("transport closed")
	}
	t.mu.Unlock()
	t.wg.Wait()
	t.lim.close()
	t.log.Info("transport closed")
	if err != nil && !errors.Is(err, net.ErrClosed) {
		return fmt.Errorf("transport: close listener: %w", err)
	}
	return nil
}

// trackHandshake registers a connection in its handshake so Close can
// interrupt it; it reports false (and closes nc) if the transport is
// closed, or if MaxHandshakes connections are already in their handshake
// (counted in HandshakesRefused).
func (t *Transport) trackHandshake(nc net.Conn, inbound bool) bool {
	t.mu.Lock()
	if t.closed.Load() {
		t.mu.Unlock()
		nc.Close()
		return false
	}
	if inbound && t.pendingIn >= t.cfg.MaxHandshakes {
		t.mu.Unlock()
		nc.Close()
		t.stats.hsRefused.Add(1)
		t.lim.logf("handshake limit", slog.LevelWarn, "connection refused: too many connections in their handshake",
			"limit", t.cfg.MaxHandshakes, "refused_total", t.stats.hsRefused.Load())
		return false
	}
	t.handshaking[nc] = struct{}{}
	if inbound {
		t.pendingIn++
	}
	t.mu.Unlock()
	return true
}

func (t *Transport) untrackHandshake(nc net.Conn, inbound bool) {
	t.mu.Lock()
	delete(t.handshaking, nc)
	if inbound {
		t.pendingIn--
	}
	t.mu.Unlock()
}

// acceptLoop accepts connections from peers with lower IDs.
func (t *Transport) acceptLoop() {
	defer t.wg.Done()
	var delay time.Duration
	for {
		nc, err := t.ln.Accept()
		if err != nil {
			if t.closed.Load() {
				return
			}
			// Typically out of file descriptors: back off instead of
			// spinning.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			t.log.Warn("accept failed", "err", err, "retry_in", delay)
			select {
			case <-time.After(delay):
			case <-t.ctx.Done():
				return
			}
			continue
		}
		delay = 0
		if !t.trackHandshake(nc, true) {
			if t.closed.Load() {
				return
			}
			continue // over MaxHandshakes: closed, counted, logged (rate-limited)
		}
		t.wg.Add(1)
		go t.serveInbound(nc)
	}
}

// handshakeError is a handshake failure with the counter it bumps.
type handshakeError struct {
	counter *atomic.Uint64 // extra counter besides HandshakeFailures, or nil
	key     string         // rate-limit key for its log line, if not the side's
	err     error
}

func (e *handshakeError) Error() string { return e.err.Error() }
func (e *handshakeError) Unwrap() error { return e.err }

// refuse builds a handshake error counted in counter.
func refuse(counter *atomic.Uint64, format string, args ...any) error {
	return &handshakeError{counter: counter, err: fmt.Errorf(format, args...)}
}

// handshakeFailed logs and counts a failed handshake and closes nc. key
// rate-limits the log line: the peer's for a dial (we know whom we
// dialled), one shared key for inbound handshakes (the sender is not
// authenticated, so nothing it claims may pick a key).
func (t *Transport) handshakeFailed(nc net.Conn, side, key string, err error) {
	nc.Close()
	if t.closed.Load() {
		return
	}
	t.stats.handshakeFail.Add(1)
	var he *handshakeError
	if errors.As(err, &he) && he.counter != nil {
		he.counter.Add(1)
	}
	if errors.Is(err, ErrMalformed) {
		t.stats.malformed.Add(1)
	}
	kind := "other"
	switch {
	case he != nil && he.counter == &t.stats.authFail:
		kind = "auth"
	case he != nil && he.counter == &t.stats.unknownNode:
		kind = "unknown node"
	case he != nil && he.counter == &t.stats.paced:
		kind = "reconnecting too fast"
	case errors.Is(err, ErrMalformed):
		kind = "malformed"
	}
	if he != nil && he.key != "" {
		key = he.key
	}
	t.lim.logf(key, slog.LevelWarn, "connection refused: handshake failed", "side", side, "kind", kind,
		"remote", nc.RemoteAddr().String(), "reason", err.Error())
}

// serveInbound authenticates an accepted connection and hands it to its peer.
func (t *Transport) serveInbound(nc net.Conn) {
	defer t.wg.Done()
	defer t.untrackHandshake(nc, true)
	t.tuneConn(nc)
	c := newConn(nc)
	nc.SetDeadline(time.Now().Add(t.cfg.HandshakeTimeout))
	p, hs, err := t.acceptHandshake(c)
	if err != nil {
		t.handshakeFailed(nc, "accept", "handshake failed: accept", err)
		return
	}
	nc.SetDeadline(time.Time{})
	p.install(c, hs) // an error is logged and counted; the dialer retries
}

// handshakeResult is what a completed handshake tells about the peer.
type handshakeResult struct {
	peerInc       uint64 // the peer's incarnation
	peerStreamFor uint64 // our incarnation as the peer's outgoing stream knows it
	peerAck       uint64 // highest of our sequence numbers the peer has
	ourAck        uint64 // the ack we sent in the handshake
}

// streamAck is the acknowledgement to report in a handshake with a peer of
// incarnation peerInc whose outgoing stream is bound to our incarnation
// peerStreamFor: our receive position if the streams continue, 0 if they
// start afresh.
func (p *peer) streamAck(peerInc, peerStreamFor uint64) uint64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.freshLocked(peerInc, peerStreamFor) {
		return 0
	}
	return p.recvSeq.Load()
}

// readHandshake reads one handshake frame of type want from c.
func (t *Transport) readHandshake(c *conn, want FrameType) ([]byte, error) {
	var hb [HeaderSize]byte
	if _, err := io.ReadFull(c.nc, hb[:]); err != nil {
		return nil, fmt.Errorf("reading %v: %w", want, err)
	}
	h, err := DecodeHeader(hb[:], handshakeMaxBody)
	if err != nil {
		return nil, fmt.Errorf("reading %v: %w", want, err)
	}
	if h.Type != want {
		return nil, fmt.Errorf("%w: got %v frame, want %v", ErrMalformed, h.Type, want)
	}
	body := make([]byte, h.Length)
	if _, err := io.ReadFull(c.nc, body); err != nil {
		return nil, fmt.Errorf("reading %v body: %w", want, err)
	}
	return body, nil
}

// readSession reads and opens the sealed Session record that ends each
// side's part of the handshake.
func (t *Transport) readSession(c *conn) (session, error) {
	var hdr [recHdrLen]byte
	if _, err := io.ReadFull(c.nc, hdr[:]); err != nil {
		return session{}, fmt.Errorf("reading session: %w", err)
	}
	n, err := recordLen(hdr[:], sessionBodyLen)
	if err != nil {
		return session{}, err
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(c.nc, body); err != nil {
		return session{}, fmt.Errorf("reading session: %w", err)
	}
	pt, err := c.recv.open(hdr[:], body)
	if err != nil {
		return session{}, refuse(&t.stats.authFail, "session record did not open: %w", err)
	}
	f, used, err := DecodeFrame(pt, sessionBodyLen)
	if err != nil {
		return session{}, err
	}
	if used != len(pt) {
		return session{}, fmt.Errorf("%w: %d bytes after the session frame", ErrMalformed, len(pt)-used)
	}
	return parseSession(f)
}

// setKeys installs the connection's two ciphers.
func (c *conn) setKeys(sendKey, recvKey []byte) error {
	s, err := newAEADDir(sendKey)
	if err != nil {
		return err
	}
	r, err := newAEADDir(recvKey)
	if err != nil {
		return err
	}
	c.send, c.recv = s, r
	return nil
}

// acceptHandshake runs the acceptor's side of the handshake.
func (t *Transport) acceptHandshake(c *conn) (*peer, handshakeResult, error) {
	var res handshakeResult
	helloBody, err := t.readHandshake(c, FrameHello)
	if err != nil {
		return nil, res, err
	}
	hi, err := parseHello(helloBody)
	if err != nil {
		return nil, res, err
	}
	if hi.To != t.id {
		return nil, res, refuse(&t.stats.unknownNode, "node %d dialled node %d, but this is node %d", hi.From, hi.To, t.id)
	}
	p := (*t.peers.Load())[hi.From]
	if p == nil {
		return nil, res, refuse(&t.stats.unknownNode, "unknown node %d", hi.From)
	}
	if hi.From > t.id {
		return nil, res, refuse(&t.stats.unknownNode, "node %d dialled a lower node ID; the lower ID dials", hi.From)
	}
	// Refused before any cryptography: the window only ever opens after
	// an authenticated connection of that peer died young, so a stranger
	// claiming its ID cannot open or extend it.
	if wait := p.inboundWait(); wait > 0 {
		err := refuse(&t.stats.paced, "node %d reconnected %v too early after a connection that died young", hi.From, wait.Round(time.Millisecond))
		err.(*handshakeError).key = p.key // logged with the peer's other events
		return nil, res, err
	}
	nonce, err := newNonce()
	if err != nil {
		return nil, res, err
	}
	ch := helloFrame(FrameChallenge, &hello{From: t.id, To: hi.From, Nonce: nonce})
	if _, err := c.nc.Write(ch); err != nil {
		return nil, res, fmt.Errorf("writing challenge to node %d: %w", hi.From, err)
	}
	authBody, err := t.readHandshake(c, FrameAuth)
	if err != nil {
		return nil, res, fmt.Errorf("node %d: %w", hi.From, err)
	}
	chBody := ch[HeaderSize:]
	if !hmac.Equal(authBody, transcriptMAC(t.cfg.ClusterKey, labelDialer, helloBody, chBody)) {
		return nil, res, refuse(&t.stats.authFail, "node %d failed authentication (wrong cluster key?)", hi.From)
	}
	d2a, a2d, err := sessionKeys(t.cfg.ClusterKey, hi.From, t.id, hi.Nonce[:], nonce[:])
	if err != nil {
		return nil, res, err
	}
	if err := c.setKeys(a2d, d2a); err != nil {
		return nil, res, err
	}
	// The dialer proved the key: now we prove it, and read its session.
	if _, err := c.nc.Write(macFrame(FrameProof, transcriptMAC(t.cfg.ClusterKey, labelAcceptor, helloBody, chBody))); err != nil {
		return nil, res, fmt.Errorf("writing proof to node %d: %w", hi.From, err)
	}
	ds, err := t.readSession(c)
	if err != nil {
		return nil, res, fmt.Errorf("node %d: %w", hi.From, err)
	}
	res.ourAck = p.streamAck(ds.Incarnation, ds.StreamFor)
	p.mu.Lock()
	streamFor := p.peerInc
	p.mu.Unlock()
	if _, err := c.nc.Write(c.send.seal(nil, sessionFrame(session{Incarnation: t.inc, StreamFor: streamFor, Ack: res.ourAck}))); err != nil {
		return nil, res, fmt.Errorf("writing session to node %d: %w", hi.From, err)
	}
	fin, err := t.readSession(c)
	if err != nil {
		return nil, res, fmt.Errorf("node %d: %w", hi.From, err)
	}
	if fin.Incarnation != ds.Incarnation || fin.StreamFor != ds.StreamFor {
		return nil, res, fmt.Errorf("%w: node %d changed its session during the handshake", ErrMalformed, hi.From)
	}
	res.peerInc, res.peerStreamFor, res.peerAck = ds.Incarnation, ds.StreamFor, fin.Ack
	return p, res, nil
}

// dialHandshake runs the dialer's side of the handshake with peer p.
func (t *Transport) dialHandshake(c *conn, p *peer) (handshakeResult, error) {
	var res handshakeResult
	nonce, err := newNonce()
	if err != nil {
		return res, err
	}
	hf := helloFrame(FrameHello, &hello{From: t.id, To: p.id, Nonce: nonce})
	if _, err := c.nc.Write(hf); err != nil {
		return res, fmt.Errorf("writing hello: %w", err)
	}
	chBody, err := t.readHandshake(c, FrameChallenge)
	if err != nil {
		return res, err
	}
	hi, err := parseHello(chBody)
	if err != nil {
		return res, err
	}
	if hi.From != p.id || hi.To != t.id {
		return res, refuse(&t.stats.unknownNode, "expected node %d, found node %d (which wants node %d)", p.id, hi.From, hi.To)
	}
	helloBody := hf[HeaderSize:]
	d2a, a2d, err := sessionKeys(t.cfg.ClusterKey, t.id, p.id, nonce[:], hi.Nonce[:])
	if err != nil {
		return res, err
	}
	if err := c.setKeys(d2a, a2d); err != nil {
		return res, err
	}
	p.mu.Lock()
	streamFor := p.peerInc
	p.mu.Unlock()
	me := session{Incarnation: t.inc, StreamFor: streamFor}
	msg := macFrame(FrameAuth, transcriptMAC(t.cfg.ClusterKey, labelDialer, helloBody, chBody))
	msg = c.send.seal(msg, sessionFrame(me)) // sealed: only a key holder can read it
	if _, err := c.nc.Write(msg); err != nil {
		return res, fmt.Errorf("writing auth: %w", err)
	}
	proof, err := t.readHandshake(c, FrameProof)
	if err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, ErrMalformed) {
			return res, fmt.Errorf("node %d did not prove the key: %w", p.id, err)
		}
		// It closed the connection after our proof: it refused it.
		return res, refuse(&t.stats.authFail, "node %d refused our proof of the key (wrong cluster key?): %w", p.id, err)
	}
	if !hmac.Equal(proof, transcriptMAC(t.cfg.ClusterKey, labelAcceptor, helloBody, chBody)) {
		return res, refuse(&t.stats.authFail, "node %d failed authentication (wrong cluster key?)", hi.From)
	}
	as, err := t.readSession(c)
	if err != nil {
		return res, err
	}
	res.peerInc, res.peerStreamFor, res.peerAck = as.Incarnation, as.StreamFor, as.Ack
	res.ourAck = p.streamAck(as.Incarnation, as.StreamFor)
	me.Ack = res.ourAck
	if _, err := c.nc.Write(c.send.seal(nil, sessionFrame(me))); err != nil {
		return res, fmt.Errorf("writing session: %w", err)
	}
	return res, nil
}

// tuneConn sets the socket options every connection gets: no Nagle delay
// (latency is the point) and dead-peer detection bounded by PeerTimeout.
func (t *Transport) tuneConn(nc net.Conn) {
	tc, ok := nc.(*net.TCPConn)
	if !ok {
		return
	}
	tc.SetNoDelay(true)
	pt := t.cfg.PeerTimeout
	tc.SetKeepAliveConfig(net.KeepAliveConfig{Enable: true, Idle: pt / 2, Interval: pt / 6, Count: 3})
	if err := setUserTimeout(tc, pt); err != nil {
		t.log.Debug("cannot set TCP user timeout", "err", err)
	}
}
