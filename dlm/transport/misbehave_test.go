package transport

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// The tests here hold the transport to its bounds against one misbehaving
// peer: at most ReconnectMin-paced reconnects (≤ 10 per second with the
// defaults) and at most one log line per LogInterval (1 s by default) at
// Info level or above, whatever the peer does; and a peer that never
// acknowledges makes Send refuse, never lose frames silently.

// readRecord reads one sealed record from nc and opens it with d.
func readRecord(nc net.Conn, d *aeadDir) ([]byte, error) {
	var rh [recHdrLen]byte
	if _, err := io.ReadFull(nc, rh[:]); err != nil {
		return nil, err
	}
	body := make([]byte, binary.BigEndian.Uint32(rh[:]))
	if _, err := io.ReadFull(nc, body); err != nil {
		return nil, err
	}
	return d.open(rh[:], body)
}

// fakeAccept plays node me accepting a connection from node dialer with
// key, as a real acceptor would, with incarnation inc. With the wrong key
// the dialer refuses its proof and the returned error says why the
// handshake ended.
func fakeAccept(nc net.Conn, me, dialer NodeID, key []byte, inc uint64) (*fakeConn, error) {
	hb := make([]byte, HeaderSize+helloBodyLen)
	if _, err := io.ReadFull(nc, hb); err != nil {
		return nil, fmt.Errorf("reading hello: %w", err)
	}
	hi, err := parseHello(hb[HeaderSize:])
	if err != nil {
		return nil, err
	}
	nonce := [nonceLen]byte{9, 9, 9}
	ch := helloFrame(FrameChallenge, &hello{From: me, To: dialer, Nonce: nonce})
	if _, err := nc.Write(ch); err != nil {
		return nil, err
	}
	if _, err := io.ReadFull(nc, make([]byte, HeaderSize+authBodyLen)); err != nil {
		return nil, fmt.Errorf("reading auth: %w", err)
	}
	d2a, a2d, err := sessionKeys(key, dialer, me, hi.Nonce[:], nonce[:])
	if err != nil {
		return nil, err
	}
	fc := &fakeConn{nc: nc}
	if fc.send, err = newAEADDir(a2d); err != nil {
		return nil, err
	}
	if fc.recv, err = newAEADDir(d2a); err != nil {
		return nil, err
	}
	proof := macFrame(FrameProof, transcriptMAC(key, labelAcceptor, hb[HeaderSize:], ch[HeaderSize:]))
	pt, err := readRecord(nc, fc.recv)
	if err != nil {
		// The wrong key: the dialer's session does not open. Answer with
		// a proof anyway (a peer that keeps failing the handshake).
		nc.Write(proof)
		return nil, fmt.Errorf("dialer's session: %w", err)
	}
	f, _, err := DecodeFrame(pt, sessionBodyLen)
	if err != nil {
		return nil, err
	}
	ds, err := parseSession(f)
	if err != nil {
		return nil, err
	}
	msg := proof
	// Bound to the dialer's incarnation, so its stream continues across
	// our reconnects (what it queued is never dropped as for a restart).
	msg = fc.send.seal(msg, sessionFrame(session{Incarnation: inc, StreamFor: ds.Incarnation}))
	if _, err := nc.Write(msg); err != nil {
		return nil, err
	}
	if _, err := readRecord(nc, fc.recv); err != nil {
		return nil, fmt.Errorf("dialer's final session: %w", err)
	}
	return fc, nil
}

// fakePeer listens as node 2 and runs behave on every connection node 1
// makes to it, counting the connections.
type fakePeer struct {
	ln    net.Listener
	conns atomic.Int64
	mu    sync.Mutex
	open  []net.Conn
}

func newFakePeer(t *testing.T, behave func(nc net.Conn)) *fakePeer {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	fp := &fakePeer{ln: ln}
	go func() {
		for {
			nc, err := ln.Accept()
			if err != nil {
				return
			}
			fp.conns.Add(1)
			fp.mu.Lock()
			fp.open = append(fp.open, nc)
			fp.mu.Unlock()
			go func() {
				defer nc.Close()
				behave(nc)
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		fp.mu.Lock()
		for _, nc := range fp.open {
			nc.Close()
		}
		fp.mu.Unlock()
	})
	return fp
}

// logLines counts the lines at Info level or above in a text log.
func logLines(s string) int {
	n := 0
	for _, l := range strings.Split(s, "\n") {
		if l != "" && !strings.Contains(l, "level=DEBUG") {
			n++
		}
	}
	return n
}

// TestMisbehavingPeerBounded: node 1 dials a peer that completes the
// handshake and then acknowledges a frame never sent, or sends garbage, or
// that keeps failing the handshake (it cannot prove the key). With the
// default back-off and LogInterval, over a few seconds node 1 reconnects at
// most 10 times a second and logs at most one line a second; nothing
// unsent counts as acknowledged and every failure is counted.
func TestMisbehavingPeerBounded(t *testing.T) {
	const window = 3 * time.Second
	wrongKey := []byte("the attacker's key, 32 bytes....")
	for _, tc := range []struct {
		name   string
		behave func(nc net.Conn)
		stat   func(Stats) uint64
	}{
		{"ack never sent", func(nc net.Conn) {
			fc, err := fakeAccept(nc, 2, 1, testKey, 4242)
			if err != nil {
				return
			}
			var h [HeaderSize]byte
			putHeader(h[:], FrameAck, 0, 0, 0, 0, 1000)
			fc.write(h[:])
			io.Copy(io.Discard, nc)
		}, func(s Stats) uint64 { return s.ProtocolErrors }},
		{"garbage after the handshake", func(nc net.Conn) {
			if _, err := fakeAccept(nc, 2, 1, testKey, 4242); err != nil {
				return
			}
			nc.Write(bytes.Repeat([]byte{0, 0, 0, 80, 0xa5}, 40))
			io.Copy(io.Discard, nc)
		}, func(s Stats) uint64 { return s.RecordsRejected }},
		{"failing handshake", func(nc net.Conn) {
			fakeAccept(nc, 2, 1, wrongKey, 4242)
			io.Copy(io.Discard, nc)
		}, func(s Stats) uint64 { return s.AuthFailures }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			fp := newFakePeer(t, tc.behave)
			a := newNode(t, 1, testKey, func(c *Config) {
				def := DefaultConfig()
				c.ReconnectMin, c.ReconnectMax, c.LogInterval = def.ReconnectMin, def.ReconnectMax, def.LogInterval
			})
			a.SetPeers(map[NodeID]string{2: fp.ln.Addr().String()})
			for i := range uint64(3) {
				if err := a.Send(2, 1, 1, message(i, 40)); err != nil {
					t.Fatal(err)
				}
			}
			waitFor(t, "the first misbehaviour", func() bool { return tc.stat(a.Stats()) >= 1 })
			logs0, conns0, st0 := a.logs.String(), fp.conns.Load(), a.Stats()
			start := time.Now()
			time.Sleep(window)
			logs1, conns1, st1 := a.logs.String(), fp.conns.Load(), a.Stats()
			secs := time.Since(start).Seconds()
			lines := logLines(logs1[len(logs0):])
			reconnects := conns1 - conns0
			t.Logf("over %.2f s: %d reconnects, %d log lines (Info and above); failures counted %d",
				secs, reconnects, lines, tc.stat(st1)-tc.stat(st0))
			if float64(reconnects) > 10*secs {
				t.Errorf("%d reconnects in %.2f s: more than 10 a second", reconnects, secs)
			}
			if reconnects < 2 {
				t.Errorf("%d reconnects in %.2f s: node 1 gave up on the peer", reconnects, secs)
			}
			if float64(lines) > secs+1 { // one per LogInterval, plus one straddling the window
				t.Errorf("%d log lines in %.2f s:\n%s", lines, secs, logs1[len(logs0):])
			}
			if got := tc.stat(st1) - tc.stat(st0); got+1 < uint64(reconnects) {
				t.Errorf("%d failures counted for %d connections", got, reconnects)
			}
			if ps, _ := a.PeerStatus(2); ps.Unacked != 3 {
				t.Errorf("%d frames unacknowledged, want the 3 sent: a forged ack trimmed the stream", ps.Unacked)
			}
			if st1.ConnectionsEstablished > 0 && tc.name == "failing handshake" {
				t.Errorf("a connection without the key was established")
			}
		})
	}
}

// TestPeerNeverAcks: the peer authenticates and reads everything but never
// acknowledges. The sender keeps every frame it accepted until the bound
// (MaxUnackedBytes), then Send refuses with ErrQueueFull: no frame is lost
// silently, memory stays bounded however long the sender keeps trying, and
// the refusals cost at most a log line per LogInterval.
func TestPeerNeverAcks(t *testing.T) {
	const limit = 1 << 20
	read := atomic.Int64{}
	fp := newFakePeer(t, func(nc net.Conn) {
		fc, err := fakeAccept(nc, 2, 1, testKey, 4242)
		if err != nil {
			return
		}
		for { // reads, checks, never answers
			if _, err := readRecord(nc, fc.recv); err != nil {
				return
			}
			read.Add(1)
		}
	})
	a := newNode(t, 1, testKey, func(c *Config) {
		c.MaxUnackedBytes = limit
		c.LogInterval = time.Second
	})
	a.SetPeers(map[NodeID]string{2: fp.ln.Addr().String()})
	waitFor(t, "connected", func() bool { ps, _ := a.PeerStatus(2); return ps.Connected })
	const size = 4096
	accepted := 0
	var refused error
	for refused == nil {
		if refused = a.Send(2, 1, 1, message(uint64(accepted), size)); refused == nil {
			accepted++
		}
	}
	if !errors.Is(refused, ErrQueueFull) || !strings.Contains(refused.Error(), "unacknowledged") {
		t.Fatalf("send to a peer that never acknowledges: %v", refused)
	}
	if accepted*(HeaderSize+size) > limit || (accepted+1)*(HeaderSize+size) <= limit {
		t.Fatalf("%d frames of %d bytes accepted under a %d-byte bound", accepted, HeaderSize+size, limit)
	}
	// Everything accepted is still held for resending, and it all went out.
	waitFor(t, "every accepted frame read by the peer", func() bool { return read.Load() == int64(accepted) })
	if ps, _ := a.PeerStatus(2); ps.Unacked != accepted || !ps.Connected {
		t.Fatalf("%d of %d accepted frames held (connected %v)", ps.Unacked, accepted, ps.Connected)
	}
	// Keep trying for a while: every attempt is refused, memory and the
	// log stay flat.
	runtime.GC()
	var m0, m1 runtime.MemStats
	runtime.ReadMemStats(&m0)
	logs0 := a.logs.String()
	start := time.Now()
	tries := 0
	for time.Since(start) < 2*time.Second {
		for range 1000 {
			if err := a.Send(2, 1, 1, message(0, size)); !errors.Is(err, ErrQueueFull) {
				t.Fatalf("send %d past the bound: %v", tries, err)
			}
			tries++
		}
	}
	secs := time.Since(start).Seconds()
	runtime.GC()
	runtime.ReadMemStats(&m1)
	logs1 := a.logs.String()[len(logs0):]
	lines := logLines(logs1)
	growth := int64(m1.HeapAlloc) - int64(m0.HeapAlloc)
	st := a.Stats()
	t.Logf("%d frames accepted, then %d refused in %.2f s: heap %+d KiB, %d log lines, Dropped.Backlog %d",
		accepted, tries, secs, growth>>10, lines, st.Dropped.Backlog)
	if st.Dropped.Backlog != uint64(tries+1) {
		t.Errorf("Dropped.Backlog %d, want %d", st.Dropped.Backlog, tries+1)
	}
	if growth > 4<<20 {
		t.Errorf("heap grew %d KiB while every send was refused", growth>>10)
	}
	if float64(lines) > secs+1 {
		t.Errorf("%d log lines in %.2f s:\n%s", lines, secs, logs1)
	}
}

// TestMisbehavingDialerPaced: the misbehaving peer has the lower ID, so it
// dials, and it does so in a tight loop, acknowledging a frame never sent
// on every connection. The acceptor paces it (a connection that died young
// makes the next ones wait, the window doubling like the dialer's
// back-off): over a few seconds at most 10 connections a second are
// established and at most one line a second is logged for it.
func TestMisbehavingDialerPaced(t *testing.T) {
	const window = 3 * time.Second
	b := newNode(t, 2, testKey, func(c *Config) {
		def := DefaultConfig()
		c.ReconnectMin, c.ReconnectMax, c.LogInterval = def.ReconnectMin, def.ReconnectMax, def.LogInterval
	})
	b.SetPeers(map[NodeID]string{1: "127.0.0.1:1"})
	stop := make(chan struct{})
	done := make(chan struct{})
	var attempts atomic.Int64
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			default:
			}
			attempts.Add(1)
			fc, err := fakeDial(b.Addr().String(), 1, 2, testKey)
			if err != nil {
				continue
			}
			var h [HeaderSize]byte
			putHeader(h[:], FrameAck, 0, 0, 0, 0, 1000)
			fc.write(h[:])
			fc.nc.SetReadDeadline(time.Now().Add(time.Second))
			io.Copy(io.Discard, fc.nc)
			fc.Close()
		}
	}()
	defer func() { close(stop); <-done }()
	waitFor(t, "the first protocol error", func() bool { return b.Stats().ProtocolErrors >= 1 })
	logs0, st0, a0 := b.logs.String(), b.Stats(), attempts.Load()
	start := time.Now()
	time.Sleep(window)
	logs1, st1, a1 := b.logs.String(), b.Stats(), attempts.Load()
	secs := time.Since(start).Seconds()
	lines := logLines(logs1[len(logs0):])
	conns := st1.ConnectionsEstablished - st0.ConnectionsEstablished
	t.Logf("over %.2f s: %d attempts, %d connections established, %d paced, %d log lines (Info and above)",
		secs, a1-a0, conns, st1.ReconnectsPaced-st0.ReconnectsPaced, lines)
	if float64(conns) > 10*secs {
		t.Errorf("%d connections in %.2f s: more than 10 a second", conns, secs)
	}
	if conns < 2 {
		t.Errorf("%d connections in %.2f s: the peer was shut out, not paced", conns, secs)
	}
	if st1.ReconnectsPaced == st0.ReconnectsPaced {
		t.Error("no connection was paced")
	}
	if float64(lines) > secs+1 {
		t.Errorf("%d log lines in %.2f s:\n%s", lines, secs, logs1[len(logs0):])
	}
	if got := st1.ProtocolErrors - st0.ProtocolErrors; got+1 < conns {
		t.Errorf("%d protocol errors counted for %d connections", got, conns)
	}
}
