package transport

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
)

var testKey = []byte("test cluster key, 32 bytes long!")

// waitTimeout only guards against hangs; nothing asserts on timing.
const waitTimeout = 60 * time.Second

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// logBuf collects a node's log lines so tests can check what was logged.
type logBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuf) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func (l *logBuf) contains(s string) bool { return strings.Contains(l.String(), s) }

// inbox records what one node receives and checks per-sender order: each
// payload starts with an 8-byte index that must be exactly the next one.
type inbox struct {
	mu     sync.Mutex
	next   map[NodeID]uint64
	byGen  map[uint64]int
	total  int
	errors []string
}

func newInbox() *inbox { return &inbox{next: map[NodeID]uint64{}, byGen: map[uint64]int{}} }

func (in *inbox) handle(from NodeID, ls LockspaceID, gen uint64, payload []byte) {
	in.mu.Lock()
	defer in.mu.Unlock()
	in.total++
	in.byGen[gen]++
	if len(payload) < 8 {
		in.errors = append(in.errors, fmt.Sprintf("short payload from %d: %d bytes", from, len(payload)))
		return
	}
	idx := binary.BigEndian.Uint64(payload)
	if want := in.next[from]; idx != want {
		in.errors = append(in.errors, fmt.Sprintf("from %d: got message %d, want %d", from, idx, want))
	}
	in.next[from] = idx + 1
	for i, c := range payload[8:] {
		if c != byte(idx+uint64(i)) {
			in.errors = append(in.errors, fmt.Sprintf("from %d: message %d corrupt at byte %d", from, idx, i+8))
			break
		}
	}
}

func (in *inbox) count(from NodeID) uint64 {
	in.mu.Lock()
	defer in.mu.Unlock()
	return in.next[from]
}

func (in *inbox) reset(from NodeID) {
	in.mu.Lock()
	defer in.mu.Unlock()
	delete(in.next, from)
}

func (in *inbox) check(t *testing.T) {
	t.Helper()
	in.mu.Lock()
	defer in.mu.Unlock()
	for i, e := range in.errors {
		if i == 10 {
			t.Errorf("... and %d more", len(in.errors)-10)
			break
		}
		t.Error(e)
	}
}

func message(idx uint64, size int) []byte {
	b := make([]byte, max(size, 8))
	binary.BigEndian.PutUint64(b, idx)
	for i := range b[8:] {
		b[8+i] = byte(idx + uint64(i))
	}
	return b
}

type node struct {
	*Transport
	in   *inbox
	logs *logBuf
}

// newNode starts a transport on a loopback port with no peers yet.
func newNode(t *testing.T, id NodeID, key []byte, tweak func(*Config)) *node {
	t.Helper()
	n := &node{in: newInbox(), logs: &logBuf{}}
	cfg := DefaultConfig()
	cfg.NodeID = id
	cfg.ListenAddr = "127.0.0.1:0"
	cfg.ClusterKey = key
	cfg.Handler = n.in.handle
	cfg.Logger = slog.New(slog.NewTextHandler(n.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	cfg.ReconnectMin = 2 * time.Millisecond
	cfg.ReconnectMax = 50 * time.Millisecond
	if tweak != nil {
		tweak(&cfg)
	}
	tr, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	n.Transport = tr
	t.Cleanup(func() {
		tr.Close()
		if t.Failed() {
			t.Logf("node %d log:\n%s", id, n.logs.String())
		}
	})
	return n
}

// connect gives every node every other node as a peer.
func connect(nodes ...*node) {
	for _, a := range nodes {
		peers := map[NodeID]string{}
		for _, b := range nodes {
			if a != b {
				peers[b.NodeID()] = b.Addr().String()
			}
		}
		a.SetPeers(peers)
	}
}

// checkNoLeak fails if goroutines started since base are still around.
func checkNoLeak(t *testing.T, base int) {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	for runtime.NumGoroutine() > base {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Fatalf("goroutines leaked: %d > %d\n%s", runtime.NumGoroutine(), base, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func peerOf(n *node, id NodeID) *peer { return (*n.peers.Load())[id] }

// killConn closes the socket of n's current connection to peer id under the
// transport, waiting for there to be one.
func killConn(t *testing.T, n *node, id NodeID) {
	t.Helper()
	p := peerOf(n, id)
	waitFor(t, "a live connection", func() bool {
		p.mu.Lock()
		defer p.mu.Unlock()
		if p.cur == nil {
			return false
		}
		p.cur.nc.Close() // the socket dies under the transport
		return true
	})
}

func TestMeshDeliversInOrder(t *testing.T) {
	base := runtime.NumGoroutine()
	const msgs = 2000
	nodes := []*node{newNode(t, 1, testKey, nil), newNode(t, 2, testKey, nil), newNode(t, 3, testKey, nil)}
	connect(nodes...)
	var wg sync.WaitGroup
	for _, a := range nodes {
		for _, b := range nodes {
			if a == b {
				continue
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := range uint64(msgs) {
					// Sizes from 8 bytes to past the read buffer, so both
					// read paths run.
					size := 8 + int(i%97)
					if i%500 == 499 {
						size = 100 << 10
					}
					if err := a.Send(b.NodeID(), LockspaceID(i%3), 1, message(i, size)); err != nil {
						t.Error(err)
						return
					}
				}
			}()
		}
	}
	wg.Wait()
	for _, b := range nodes {
		for _, a := range nodes {
			if a != b {
				waitFor(t, fmt.Sprintf("%d messages %d->%d", msgs, a.NodeID(), b.NodeID()),
					func() bool { return b.in.count(a.NodeID()) >= msgs })
			}
		}
	}
	for _, n := range nodes {
		n.in.check(t)
		if got := n.in.total; got != 2*msgs {
			t.Errorf("node %d: %d deliveries, want %d", n.NodeID(), got, 2*msgs)
		}
		st := n.Stats()
		if st.FramesDelivered != 2*msgs || st.Dropped.Duplicate != 0 || st.MalformedFrames != 0 {
			t.Errorf("node %d stats: %+v", n.NodeID(), st)
		}
	}
	// Everything gets acknowledged eventually (standalone acks).
	for _, a := range nodes {
		for _, b := range nodes {
			if a != b {
				waitFor(t, "all frames acknowledged", func() bool {
					ps, _ := a.PeerStatus(b.NodeID())
					return ps.Unacked == 0
				})
			}
		}
	}
	for _, n := range nodes {
		n.Close()
	}
	checkNoLeak(t, base)
}

func TestKillConnectionMidStream(t *testing.T) {
	const msgs = 20000
	a := newNode(t, 1, testKey, nil)
	b := newNode(t, 2, testKey, nil)
	connect(a, b)
	var wg sync.WaitGroup
	for _, pair := range [][2]*node{{a, b}, {b, a}} {
		from, to := pair[0], pair[1]
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range uint64(msgs) {
				if err := from.Send(to.NodeID(), 1, 1, message(i, 8+int(i%50))); err != nil {
					t.Error(err)
					return
				}
				// Keep at most a window in flight so the stream is still
				// going when the connections are killed.
				for i >= 500 && to.in.count(from.NodeID()) < i-500 {
					time.Sleep(100 * time.Microsecond)
				}
			}
		}()
	}
	// Kill the connection under both ends, alternately, while traffic flows.
	const kills = 10
	for k := range kills {
		side, other := a, b
		if k%2 == 1 {
			side, other = b, a
		}
		progress := uint64(msgs) * uint64(k+1) / (kills + 2)
		waitFor(t, "progress", func() bool { return other.in.count(side.NodeID()) >= progress })
		waitFor(t, "a new connection", func() bool {
			return a.Stats().ConnectionsEstablished > uint64(k) && b.Stats().ConnectionsEstablished > uint64(k)
		})
		killConn(t, side, other.NodeID())
	}
	wg.Wait()
	waitFor(t, "all messages a->b", func() bool { return b.in.count(1) >= msgs })
	waitFor(t, "all messages b->a", func() bool { return a.in.count(2) >= msgs })
	a.in.check(t)
	b.in.check(t)
	for _, n := range []*node{a, b} {
		st := n.Stats()
		if st.FramesDelivered != msgs {
			t.Errorf("node %d delivered %d, want exactly %d", n.NodeID(), st.FramesDelivered, msgs)
		}
		if st.ConnectionsEstablished < kills+1 {
			t.Errorf("node %d: only %d connections for %d kills", n.NodeID(), st.ConnectionsEstablished, kills)
		}
		t.Logf("node %d: %+v", n.NodeID(), st)
	}
}

func TestPeerRestart(t *testing.T) {
	for _, restart := range []NodeID{2, 1} { // the acceptor, then the dialer
		t.Run(fmt.Sprintf("node%d", restart), func(t *testing.T) {
			nodes := map[NodeID]*node{1: newNode(t, 1, testKey, nil), 2: newNode(t, 2, testKey, nil)}
			connect(nodes[1], nodes[2])
			exchange := func(n uint64) {
				t.Helper()
				for i := range n {
					nodes[1].Send(2, 1, 1, message(i, 16))
					nodes[2].Send(1, 1, 1, message(i, 16))
				}
				waitFor(t, "exchange", func() bool { return nodes[1].in.count(2) == n && nodes[2].in.count(1) == n })
			}
			exchange(100)
			oldInc := nodes[restart].Incarnation()
			survivor := nodes[3-restart]
			waitFor(t, "acks", func() bool { ps, _ := survivor.PeerStatus(restart); return ps.Unacked == 0 })

			nodes[restart].Close()
			// Queued for the dead incarnation: must not reach the new one.
			const orphans = 7
			for i := range uint64(orphans) {
				survivor.Send(restart, 1, 1, message(1000+i, 16))
			}
			nodes[restart] = newNode(t, restart, testKey, nil)
			if nodes[restart].Incarnation() == oldInc {
				t.Fatal("restart reused the incarnation")
			}
			connect(nodes[1], nodes[2]) // the restarted node has a new port
			survivor.in.reset(restart)  // its stream starts again at message 0
			waitFor(t, "reconnect", func() bool {
				ps, _ := survivor.PeerStatus(restart)
				return ps.Connected && ps.Incarnation == nodes[restart].Incarnation()
			})
			exchange(50)
			nodes[1].in.check(t)
			nodes[2].in.check(t)
			if got := survivor.Stats().Dropped.PeerRestarted; got != orphans {
				t.Errorf("survivor dropped %d frames for the old incarnation, want %d", got, orphans)
			}
			// The connected line says so (rate-limited with the lost
			// connection's line, so it may come at the end of the interval).
			waitFor(t, "the restart logged", func() bool { return survivor.logs.contains("peer_restarted") })
		})
	}
}

func TestWrongKeyRefused(t *testing.T) {
	a := newNode(t, 1, testKey, nil)
	b := newNode(t, 2, []byte("a different key, also 32 bytes.."), nil)
	connect(a, b)
	for i := range uint64(10) {
		a.Send(2, 1, 1, message(i, 8))
		b.Send(1, 1, 1, message(i, 8))
	}
	waitFor(t, "dialer's handshakes fail", func() bool { return a.Stats().HandshakeFailures >= 2 })
	waitFor(t, "acceptor sees failed handshakes", func() bool { return b.Stats().HandshakeFailures >= 2 })
	// An attacker that skips checking the acceptor and sends its own proof
	// (made with the wrong key) followed by data.
	nc, err := fakeDial(b.Addr().String(), 1, 2, []byte("the attacker's key, 32 bytes...."))
	if err != nil {
		t.Fatal(err)
	}
	nc.write(dataFrame(1, message(0, 8)))
	waitFor(t, "acceptor refuses the attacker", func() bool { return b.Stats().AuthFailures >= 1 })
	expectClosed(t, nc.nc)
	if a.Stats().FramesDelivered != 0 || b.Stats().FramesDelivered != 0 {
		t.Fatalf("frames delivered despite the wrong key: %d, %d", a.Stats().FramesDelivered, b.Stats().FramesDelivered)
	}
	if ps, _ := a.PeerStatus(2); ps.Connected {
		t.Fatal("connected with the wrong key")
	}
	if !a.logs.contains("wrong cluster key") || !b.logs.contains("failed authentication") {
		t.Fatal("authentication failures not logged")
	}
}

func TestUnknownNodeRefused(t *testing.T) {
	a := newNode(t, 1, testKey, nil)
	b := newNode(t, 2, testKey, nil)
	// b does not know node 1 yet; 1 dials b and is refused.
	a.SetPeers(map[NodeID]string{2: b.Addr().String()})
	b.SetPeers(map[NodeID]string{5: "127.0.0.1:1"})
	for i := range uint64(10) {
		if err := a.Send(2, 1, 1, message(i, 8)); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "refusals", func() bool { return b.Stats().UnknownNodes >= 2 })
	if b.Stats().FramesDelivered != 0 {
		t.Fatal("delivered from an unknown node")
	}
	if !b.logs.contains("unknown node 1") {
		t.Fatal("refusal not logged")
	}
	if err := b.Send(1, 1, 1, nil); !errors.Is(err, ErrUnknownPeer) {
		t.Fatalf("send to unknown node: %v", err)
	}
	// Once the membership adds it, the queued messages go through.
	b.SetPeers(map[NodeID]string{1: a.Addr().String()})
	waitFor(t, "queued messages", func() bool { return b.in.count(1) == 10 })
	b.in.check(t)
}

func TestStaleGenerationDropped(t *testing.T) {
	a := newNode(t, 1, testKey, nil)
	b := newNode(t, 2, testKey, nil)
	connect(a, b)
	b.SetGeneration(7, 5)
	b.SetGeneration(7, 3) // never goes back
	if g := b.Generation(7); g != 5 {
		t.Fatalf("generation %d, want 5", g)
	}
	sends := []struct {
		ls  LockspaceID
		gen uint64
	}{{7, 4}, {7, 1}, {7, 5}, {7, 4}, {7, 6}, {8, 0}}
	for i, s := range sends {
		a.Send(2, s.ls, s.gen, message(uint64(i), 8))
	}
	waitFor(t, "all frames processed", func() bool { return b.Stats().FramesReceived == uint64(len(sends)) })
	st := b.Stats()
	if st.Dropped.StaleGeneration != 3 || st.FramesDelivered != 3 {
		t.Fatalf("stale dropped %d, delivered %d; want 3 and 3", st.Dropped.StaleGeneration, st.FramesDelivered)
	}
	b.in.mu.Lock()
	defer b.in.mu.Unlock()
	if b.in.byGen[4] != 0 || b.in.byGen[1] != 0 || b.in.byGen[5] != 1 || b.in.byGen[6] != 1 || b.in.byGen[0] != 1 {
		t.Fatalf("delivered generations %v", b.in.byGen)
	}
	if !b.logs.contains("dropped frame from an old generation") {
		t.Fatal("stale drop not logged")
	}
}

func TestMalformedFrameClosesConnection(t *testing.T) {
	cases := []struct {
		name string
		mod  func(b []byte)
		want string
	}{
		{"bad magic", func(b []byte) { b[0] = 'X' }, "bad magic"},
		{"bad version", func(b []byte) { b[offVersion] = 9 }, "unsupported version"},
		{"too long", func(b []byte) { binary.BigEndian.PutUint32(b[offLen:], 1<<30) }, "over maximum"},
		{"unknown type", func(b []byte) { b[offType] = 77 }, "unknown frame type"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			b := newNode(t, 2, testKey, nil)
			b.SetPeers(map[NodeID]string{1: "127.0.0.1:1"})
			nc, err := fakeDial(b.Addr().String(), 1, 2, testKey)
			if err != nil {
				t.Fatal(err)
			}
			defer nc.Close()
			nc.write(dataFrame(1, message(0, 8)))
			waitFor(t, "first frame", func() bool { return b.in.count(1) == 1 })
			bad := dataFrame(2, message(1, 8))
			tc.mod(bad)
			nc.write(bad)
			expectClosed(t, nc.nc)
			waitFor(t, "log line", func() bool { return b.logs.contains("malformed frame") })
			if !b.logs.contains(tc.want) {
				t.Fatalf("log does not give the reason %q:\n%s", tc.want, b.logs.String())
			}
			if st := b.Stats(); st.MalformedFrames != 1 || st.FramesDelivered != 1 {
				t.Fatalf("stats %+v", st)
			}
		})
	}
	t.Run("garbage instead of hello", func(t *testing.T) {
		b := newNode(t, 2, testKey, nil)
		nc, err := net.Dial("tcp", b.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer nc.Close()
		nc.Write(bytes.Repeat([]byte("GET / HTTP/1.1\r\n"), 4))
		expectClosed(t, nc)
		waitFor(t, "log line", func() bool { return b.logs.contains("bad magic") })
		if b.Stats().MalformedFrames != 1 {
			t.Fatalf("stats %+v", b.Stats())
		}
	})
}

func TestCoalescing(t *testing.T) {
	a := newNode(t, 1, testKey, nil)
	b := newNode(t, 2, testKey, nil)
	connect(a, b)
	a.Send(2, 1, 1, message(0, 8))
	waitFor(t, "connection", func() bool { return b.in.count(1) == 1 })
	p := peerOf(a, 2)
	// Pretend a write is in progress: Sends must queue behind it. A real
	// write (an acknowledgement, say) may be under way: wait for it to end
	// (never t.Fatal with p.mu held: the cleanup's Close would hang on it).
	var c *conn
	waitFor(t, "the connection's writer idle", func() bool {
		p.mu.Lock()
		defer p.mu.Unlock()
		if p.cur == nil || p.cur.writing {
			return false
		}
		c = p.cur
		c.writing = true
		return true
	})
	before := a.Stats()
	const n = 500
	for i := range uint64(n) {
		a.Send(2, 1, 1, message(1+i, 64))
	}
	if w := a.Stats().Writes; w != before.Writes {
		t.Fatalf("%d writes while another write was in progress", w-before.Writes)
	}
	// The write in progress finishes and finds the queue.
	p.mu.Lock()
	c.writing = false
	p.flushLocked()
	p.mu.Unlock()
	waitFor(t, "delivery", func() bool { return b.in.count(1) == n+1 })
	b.in.check(t)
	after := a.Stats()
	writes, frames := after.Writes-before.Writes, after.FramesSent-before.FramesSent
	t.Logf("%d frames in %d writes", frames, writes)
	if frames != n || writes > 3 {
		t.Fatalf("%d frames in %d writes: not coalesced", frames, writes)
	}
}

func TestSendErrors(t *testing.T) {
	a := newNode(t, 1, testKey, func(c *Config) { c.MaxFrameSize = 100 })
	a.SetPeers(map[NodeID]string{2: "127.0.0.1:1"})
	if err := a.Send(3, 1, 1, nil); !errors.Is(err, ErrUnknownPeer) {
		t.Fatalf("unknown peer: %v", err)
	}
	if err := a.Send(2, 1, 1, make([]byte, 101)); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("too large: %v", err)
	}
	if err := a.Send(2, 1, 1, make([]byte, 100)); err != nil {
		t.Fatalf("queued send to unreachable peer: %v", err)
	}
	a.Close()
	if err := a.Send(2, 1, 1, nil); !errors.Is(err, ErrClosed) {
		t.Fatalf("after close: %v", err)
	}
	if _, err := New(Config{NodeID: 1, ListenAddr: "127.0.0.1:0", ClusterKey: []byte("short"), Handler: func(NodeID, LockspaceID, uint64, []byte) {}}); err == nil {
		t.Fatal("short key accepted")
	}
}

// fakeConn is a hand-driven dialer's end of a connection: it seals what
// it writes with the keys its handshake derived.
type fakeConn struct {
	nc         net.Conn
	send, recv *aeadDir
}

// write seals frame and writes it.
func (f *fakeConn) write(frame []byte) error {
	_, err := f.nc.Write(f.send.seal(nil, frame))
	return err
}

func (f *fakeConn) Close() error { return f.nc.Close() }

// fakeDial plays node from dialling node to with key: it proves the key,
// sends its session, and, if the acceptor proves the key too, completes
// the handshake; the connection is then ready for sealed data frames. With
// the wrong key it returns after sending its proof and session.
func fakeDial(addr string, from, to NodeID, key []byte) (*fakeConn, error) {
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		return nil, err
	}
	nc.SetDeadline(time.Now().Add(waitTimeout))
	defer nc.SetDeadline(time.Time{})
	nonce := [nonceLen]byte{7, 7, 7}
	hf := helloFrame(FrameHello, &hello{From: from, To: to, Nonce: nonce})
	if _, err := nc.Write(hf); err != nil {
		return nil, err
	}
	hb := make([]byte, HeaderSize+helloBodyLen)
	if _, err := io.ReadFull(nc, hb); err != nil {
		return nil, fmt.Errorf("reading challenge: %w", err)
	}
	ch, _, err := DecodeFrame(hb, handshakeMaxBody)
	if err != nil {
		return nil, err
	}
	d2a, a2d, err := sessionKeys(key, from, to, nonce[:], ch.Payload[8:8+nonceLen])
	if err != nil {
		return nil, err
	}
	fc := &fakeConn{nc: nc}
	if fc.send, err = newAEADDir(d2a); err != nil {
		return nil, err
	}
	if fc.recv, err = newAEADDir(a2d); err != nil {
		return nil, err
	}
	me := session{Incarnation: 12345}
	msg := macFrame(FrameAuth, transcriptMAC(key, labelDialer, hf[HeaderSize:], ch.Payload))
	msg = fc.send.seal(msg, sessionFrame(me))
	if _, err := nc.Write(msg); err != nil {
		return nil, err
	}
	pb := make([]byte, HeaderSize+authBodyLen)
	if _, err := io.ReadFull(nc, pb); err != nil {
		return fc, nil // refused: the caller checks that
	}
	var rh [recHdrLen]byte
	if _, err := io.ReadFull(nc, rh[:]); err != nil {
		return nil, err
	}
	body := make([]byte, binary.BigEndian.Uint32(rh[:]))
	if _, err := io.ReadFull(nc, body); err != nil {
		return nil, err
	}
	if _, err := fc.recv.open(rh[:], body); err != nil {
		return nil, err
	}
	if err := fc.write(sessionFrame(me)); err != nil {
		return nil, err
	}
	return fc, nil
}

func dataFrame(seq uint64, payload []byte) []byte {
	return EncodeFrame(nil, &Frame{Header: Header{Type: FrameData, Lockspace: 1, Generation: 1, Seq: seq}, Payload: payload})
}

// expectClosed waits until the other end closes nc (acks may arrive first).
func expectClosed(t *testing.T, nc net.Conn) {
	t.Helper()
	nc.SetReadDeadline(time.Now().Add(waitTimeout))
	buf := make([]byte, 4096)
	for {
		_, err := nc.Read(buf)
		if err == nil {
			continue
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatal("connection not closed")
		}
		return
	}
}

// TestPeerRestartKeepsCurrentGeneration: with KeepCurrentGeneration, the
// frames a survivor queued for a peer that restarted are dropped if they
// belong to an older generation (the old incarnation's view) and delivered
// to the new incarnation, in order and once, if they belong to the
// lockspace's current generation (the view that readmits it). Without the
// option those frames were dropped too, and a recovery that had queued its
// messages before the new incarnation connected waited for them forever.
func TestPeerRestartKeepsCurrentGeneration(t *testing.T) {
	for _, restart := range []NodeID{2, 1} { // the acceptor, then the dialer
		t.Run(fmt.Sprintf("node%d", restart), func(t *testing.T) {
			keep := func(c *Config) { c.KeepCurrentGeneration = true }
			nodes := map[NodeID]*node{1: newNode(t, 1, testKey, keep), 2: newNode(t, 2, testKey, keep)}
			connect(nodes[1], nodes[2])
			survivor := nodes[3-restart]
			const ls, other = LockspaceID(7), LockspaceID(8)
			survivor.SetGeneration(ls, 5)
			survivor.SetGeneration(other, 9)
			for i := range uint64(20) {
				survivor.Send(restart, ls, 5, message(i, 16))
			}
			waitFor(t, "first messages", func() bool { return nodes[restart].in.count(3-restart) == 20 })
			waitFor(t, "acks", func() bool { ps, _ := survivor.PeerStatus(restart); return ps.Unacked == 0 })

			nodes[restart].Close()
			// The old view's messages, queued for the dead incarnation.
			const stale = 7
			for i := range uint64(stale) {
				survivor.Send(restart, ls, 5, message(1000+i, 16))
				survivor.Send(restart, other, 8, message(2000+i, 16))
			}
			// The view that readmits the restarted node: its messages are
			// queued before the new incarnation connects.
			survivor.SetGeneration(ls, 6)
			const fresh = 5
			for i := range uint64(fresh) {
				survivor.Send(restart, ls, 6, message(i, 16))
				if i == 2 {
					survivor.Send(restart, ls, 5, message(3000, 16)) // late, old view: dropped
				}
			}
			nodes[restart] = newNode(t, restart, testKey, keep)
			connect(nodes[1], nodes[2]) // the restarted node has a new port
			waitFor(t, "the readmitting view's messages", func() bool { return nodes[restart].in.count(3-restart) == fresh })
			for i := range uint64(fresh) {
				survivor.Send(restart, ls, 6, message(fresh+i, 16))
			}
			waitFor(t, "later messages", func() bool { return nodes[restart].in.count(3-restart) == 2*fresh })
			nodes[restart].in.check(t)
			st := survivor.Stats()
			if st.Dropped.PeerRestarted != 2*stale+1 || st.KeptOnRestart != fresh {
				t.Errorf("survivor dropped %d and kept %d frames for the new incarnation, want %d and %d",
					st.Dropped.PeerRestarted, st.KeptOnRestart, 2*stale+1, fresh)
			}
			if got := nodes[restart].in.byGen[6]; got != 2*fresh || len(nodes[restart].in.byGen) != 1 {
				t.Errorf("the new incarnation received %v frames by generation, want only %d of generation 6", nodes[restart].in.byGen, 2*fresh)
			}
		})
	}
}

// TestBatchDone checks when the reader reports the end of a batch: once
// for a burst that arrived together (not once per frame), never with a
// whole frame still buffered, at least every AckEvery frames, and before
// any read that waits for the network.
func TestBatchDone(t *testing.T) {
	const ackEvery = 8
	release := make(chan struct{})
	var mu sync.Mutex
	var handled, sinceDone int
	var batches []int // frames handled between two BatchDone calls
	b := newNode(t, 2, testKey, func(c *Config) {
		c.AckEvery = ackEvery
		inner := c.Handler
		c.Handler = func(from NodeID, ls LockspaceID, gen uint64, payload []byte) {
			inner(from, ls, gen, payload)
			mu.Lock()
			handled++
			sinceDone++
			first := handled == 1
			mu.Unlock()
			if first {
				<-release // hold the reader so the burst piles up in the socket
			}
		}
		c.BatchDone = func(from NodeID) {
			if from != 1 {
				t.Errorf("BatchDone for node %d, want 1", from)
			}
			mu.Lock()
			batches = append(batches, sinceDone)
			sinceDone = 0
			mu.Unlock()
		}
	})
	a := newNode(t, 1, testKey, nil)
	connect(a, b)
	a.Send(2, 1, 1, message(0, 8))
	waitFor(t, "the first frame in the handler", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return handled == 1
	})
	const burst = 5 // fewer than ackEvery: one batch
	for i := range uint64(burst) {
		a.Send(2, 1, 1, message(1+i, 64))
	}
	// The burst is written in one go (the sender coalesces) and sits in
	// the receiver's socket until the handler lets the reader go on.
	waitFor(t, "the burst written", func() bool { return a.Stats().FramesSent >= 1+burst })
	time.Sleep(50 * time.Millisecond)
	close(release)
	waitFor(t, "the burst handled", func() bool { return b.in.count(1) == 1+burst })
	waitFor(t, "its batch reported", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return sinceDone == 0
	})
	mu.Lock()
	got := append([]int(nil), batches...)
	mu.Unlock()
	t.Logf("frames per batch: %v", got)
	if len(got) > 3 || got[len(got)-1] < 2 {
		t.Fatalf("frames per batch %v: the burst was not reported as one batch", got)
	}

	// A long stream is cut every AckEvery frames at the latest.
	mu.Lock()
	batches = nil
	mu.Unlock()
	const long = 200
	for i := range uint64(long) {
		a.Send(2, 1, 1, message(1+burst+i, 64))
	}
	waitFor(t, "the stream handled", func() bool { return b.in.count(1) == 1+burst+long })
	waitFor(t, "its batches reported", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return sinceDone == 0
	})
	mu.Lock()
	defer mu.Unlock()
	sum := 0
	for _, n := range batches {
		if n > ackEvery {
			t.Errorf("a batch of %d frames, more than AckEvery (%d)", n, ackEvery)
		}
		sum += n
	}
	if sum != long {
		t.Errorf("batches cover %d frames, want %d", sum, long)
	}
	b.in.check(t)
}
