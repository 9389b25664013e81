package transport

import (
	"bytes"
	"errors"
	"io"
	"net"
	"runtime"
	"sync"
	"testing"
	"time"
)

// proxy forwards TCP between its listener and target; tamper, if set, may
// change each chunk going from the dialer to the acceptor (the slice it
// returns is forwarded), and record collects those bytes.
type proxy struct {
	ln     net.Listener
	target string
	mu     sync.Mutex
	tamper func([]byte) []byte
	record bytes.Buffer
	conns  []net.Conn
}

func newProxy(t *testing.T, target string) *proxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &proxy{ln: ln, target: target}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			p.mu.Lock()
			p.conns = append(p.conns, c, s)
			p.mu.Unlock()
			go func() { io.Copy(c, s); c.Close() }()
			go func() {
				buf := make([]byte, 64<<10)
				for {
					n, err := c.Read(buf)
					if n > 0 {
						b := append([]byte(nil), buf[:n]...)
						p.mu.Lock()
						p.record.Write(b)
						if p.tamper != nil {
							b = p.tamper(b)
						}
						p.mu.Unlock()
						if _, werr := s.Write(b); werr != nil {
							return
						}
					}
					if err != nil {
						s.Close()
						return
					}
				}
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		p.mu.Lock()
		for _, c := range p.conns {
			c.Close()
		}
		p.mu.Unlock()
	})
	return p
}

func (p *proxy) setTamper(f func([]byte) []byte) {
	p.mu.Lock()
	p.tamper = f
	p.mu.Unlock()
}

// TestOnPathTampering sends a numbered stream from node 1 to node 2 through
// a proxy that flips a bit in one record, then injects a copy of an earlier
// chunk: each time the acceptor rejects the record and resets the
// connection, nothing forged is delivered, both ends reconnect, and every
// message arrives exactly once and in order.
func TestOnPathTampering(t *testing.T) {
	b := newNode(t, 2, testKey, nil)
	pr := newProxy(t, b.Addr().String())
	a := newNode(t, 1, testKey, func(c *Config) { c.ReconnectMin = 5 * time.Millisecond })
	a.SetPeers(map[NodeID]string{2: pr.ln.Addr().String()})
	b.SetPeers(map[NodeID]string{1: a.Addr().String()})
	var i uint64
	send := func(n int) {
		for range n {
			if err := a.Send(2, 1, 1, message(i, 40)); err != nil {
				t.Fatal(err)
			}
			i++
		}
	}
	send(10)
	waitFor(t, "first messages", func() bool { return b.in.count(1) == 10 })
	var saved []byte
	for k, tamper := range []func([]byte) []byte{
		func(c []byte) []byte { c[len(c)-1] ^= 1; return c },                         // modify
		func(c []byte) []byte { return append(append([]byte(nil), saved...), c...) }, // inject an old record first
	} {
		pr.mu.Lock()
		saved = append([]byte(nil), pr.record.Bytes()[pr.record.Len()-100:]...) // the last record sent: 4+40+40+16 bytes
		pr.mu.Unlock()
		once := sync.Once{}
		pr.setTamper(func(c []byte) []byte {
			once.Do(func() { c = tamper(c) })
			return c
		})
		before := b.Stats().RecordsRejected
		send(1)
		waitFor(t, "the record rejected", func() bool { return b.Stats().RecordsRejected == before+1 })
		pr.setTamper(nil)
		send(10)
		want := uint64(21 + 11*k)
		waitFor(t, "every message after the reconnect", func() bool { return b.in.count(1) == want })
	}
	b.in.check(t) // exactly once, in order
	if st := b.Stats(); st.FramesDelivered != i || st.RecordsRejected != 2 {
		t.Fatalf("delivered %d of %d, %d records rejected", st.FramesDelivered, i, st.RecordsRejected)
	}
}

// TestReplayedSession records the bytes a real dialer sent through a proxy
// and replays them to a fresh node with the same identity and key: the
// replay's proof is for another nonce, so nothing is delivered.
func TestReplayedSession(t *testing.T) {
	b := newNode(t, 2, testKey, nil)
	pr := newProxy(t, b.Addr().String())
	a := newNode(t, 1, testKey, nil)
	a.SetPeers(map[NodeID]string{2: pr.ln.Addr().String()})
	b.SetPeers(map[NodeID]string{1: a.Addr().String()})
	for i := range uint64(20) {
		a.Send(2, 1, 1, message(i, 40))
	}
	waitFor(t, "delivery", func() bool { return b.in.count(1) == 20 })
	pr.mu.Lock()
	rec := append([]byte(nil), pr.record.Bytes()...)
	pr.mu.Unlock()

	fresh := newNode(t, 2, testKey, nil)
	fresh.SetPeers(map[NodeID]string{1: "127.0.0.1:1"})
	nc, err := net.Dial("tcp", fresh.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	nc.Write(rec)
	expectClosed(t, nc)
	waitFor(t, "the replay refused", func() bool { return fresh.Stats().AuthFailures == 1 })
	if st := fresh.Stats(); st.FramesDelivered != 0 || st.ConnectionsEstablished != 0 {
		t.Fatalf("replay accepted: %+v", st)
	}
}

// TestGarbageAndWrongKeyLogsBounded: a flood of failing handshakes logs
// at most one line per LogInterval, whatever the kinds of failure.
func TestGarbageAndWrongKeyLogsBounded(t *testing.T) {
	b := newNode(t, 2, testKey, func(c *Config) { c.LogInterval = time.Hour })
	b.SetPeers(map[NodeID]string{1: "127.0.0.1:1"})
	for range 50 {
		nc, err := net.Dial("tcp", b.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		nc.Write(bytes.Repeat([]byte{0xff}, 100))
		expectClosed(t, nc)
		nc.Close()
		fc, err := fakeDial(b.Addr().String(), 1, 2, []byte("the attacker's key, 32 bytes...."))
		if err != nil {
			t.Fatal(err)
		}
		expectClosed(t, fc.nc)
		fc.Close()
	}
	waitFor(t, "failures counted", func() bool { return b.Stats().HandshakeFailures == 100 })
	// Inbound handshake failures share one key whatever their kind (an
	// unauthenticated sender must not be able to pick keys).
	if n := bytes.Count([]byte(b.logs.String()), []byte("handshake failed")); n != 1 {
		t.Fatalf("%d log lines for 100 failed handshakes, want 1:\n%s", n, b.logs.String())
	}
}

// TestPreAuthFlood opens 3,000 connections that never send a byte: at most
// MaxHandshakes are held (the rest closed at once), they cost a goroutine
// and no read buffer each, and all are released at the handshake deadline.
func TestPreAuthFlood(t *testing.T) {
	if testing.Short() {
		t.Skip("3,000 connections")
	}
	b := newNode(t, 2, testKey, func(c *Config) { c.HandshakeTimeout = 2 * time.Second })
	b.SetPeers(map[NodeID]string{1: "127.0.0.1:1"})
	runtime.GC()
	var m0, m1 runtime.MemStats
	runtime.ReadMemStats(&m0)
	g0 := runtime.NumGoroutine()
	const n = 3000
	conns := make([]net.Conn, 0, n)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for range n {
		c, err := net.Dial("tcp", b.Addr().String())
		if err != nil {
			t.Fatalf("after %d connections: %v", len(conns), err)
		}
		conns = append(conns, c)
	}
	waitFor(t, "excess refused", func() bool { return b.Stats().HandshakesRefused >= n-64 })
	runtime.ReadMemStats(&m1)
	g1 := runtime.NumGoroutine()
	growth := int64(m1.HeapAlloc) - int64(m0.HeapAlloc)
	t.Logf("3,000 silent connections: heap +%d KiB, goroutines +%d, refused %d", growth>>10, g1-g0, b.Stats().HandshakesRefused)
	if growth > 32<<20 {
		t.Errorf("heap grew %d MiB", growth>>20)
	}
	if g1-g0 > 64+10 {
		t.Errorf("%d more goroutines", g1-g0)
	}
	waitFor(t, "handshakes timed out", func() bool { return b.Stats().HandshakeFailures >= 64 })
	waitFor(t, "goroutines released", func() bool { return runtime.NumGoroutine() <= g0+2 })
}

// TestPeerNeverReads: a peer that authenticates and then never reads (nor
// acknowledges): the sender queues up to MaxUnackedBytes and then Send
// refuses with ErrQueueFull, counted; memory stays bounded.
func TestPeerNeverReads(t *testing.T) {
	a := newNode(t, 1, testKey, func(c *Config) { c.MaxUnackedBytes = 1 << 20 })
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	// Node 2 is a real transport whose handler blocks forever: it stops
	// reading after the first frame, so nothing more is acknowledged.
	block := make(chan struct{})
	defer close(block)
	b := newNode(t, 2, testKey, func(c *Config) {
		c.Handler = func(NodeID, LockspaceID, uint64, []byte) { <-block }
	})
	connect(a, b)
	payload := make([]byte, 4096)
	var refused error
	for i := 0; i < 10000 && refused == nil; i++ {
		refused = a.Send(2, 1, 1, payload)
	}
	if !errors.Is(refused, ErrQueueFull) {
		t.Fatalf("sends to a peer that never reads: %v", refused)
	}
	ps, _ := a.PeerStatus(2)
	if st := a.Stats(); st.Dropped.Backlog != 1 || ps.Unacked*(HeaderSize+4096) > 1<<20 {
		t.Fatalf("backlog %d refused, %d frames unacknowledged", st.Dropped.Backlog, ps.Unacked)
	}
}
