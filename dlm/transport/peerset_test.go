package transport

import (
	"errors"
	"net"
	"strings"
	"testing"
	"time"
)

// sendAll sends messages from..to-1 (the inbox's index) from a to id,
// failing the test on any error.
func sendAll(t *testing.T, a *node, id NodeID, from, to uint64) {
	t.Helper()
	for i := from; i < to; i++ {
		if err := a.Send(id, 1, 1, message(i, 32)); err != nil {
			t.Fatalf("node %d: send %d to node %d: %v", a.NodeID(), i, id, err)
		}
	}
}

// TestSetPeerLater: peers added one at a time, after the transports
// started and after frames were sent. A peer added without an address is
// known (frames for it queue, its connection is accepted) but not dialled;
// once SetPeer gives the address, the dialer connects and everything queued
// is delivered, in order, in both directions.
func TestSetPeerLater(t *testing.T) {
	a := newNode(t, 1, testKey, nil) // dials 2
	b := newNode(t, 2, testKey, nil)
	if err := a.Send(2, 1, 1, message(0, 8)); !errors.Is(err, ErrUnknownPeer) {
		t.Fatalf("send to a peer not added yet: %v, want ErrUnknownPeer", err)
	}
	// Both know each other, neither knows the other's address yet.
	if err := a.SetPeer(2, ""); err != nil {
		t.Fatal(err)
	}
	if err := b.SetPeer(1, ""); err != nil {
		t.Fatal(err)
	}
	sendAll(t, a, 2, 0, 20)
	sendAll(t, b, 1, 0, 20)
	if ps, ok := a.PeerStatus(2); !ok || ps.Connected || ps.Addr != "" || ps.Unacked != 20 {
		t.Fatalf("peer 2 without an address: %+v (known %v), want queued and unconnected", ps, ok)
	}
	// Node 2 never needs node 1's address (the lower ID dials); node 1 needs
	// node 2's.
	if err := a.SetPeer(2, b.Addr().String()); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "queued frames delivered both ways", func() bool { return b.in.count(1) == 20 && a.in.count(2) == 20 })
	sendAll(t, a, 2, 20, 30)
	sendAll(t, b, 1, 20, 30)
	waitFor(t, "later frames", func() bool { return b.in.count(1) == 30 && a.in.count(2) == 30 })
	a.in.check(t)
	b.in.check(t)
	if st := b.Stats(); st.UnknownNodes != 0 || st.HandshakeFailures != 0 {
		t.Fatalf("node 2 refused node 1 although it was added: %+v", st)
	}
}

// TestSetPeerMoved: the peer is replaced by a new process on a new address
// while the connection to the old one is still up (the old host is
// unreachable rather than closed, say). SetPeer with the new address drops
// the old connection at once and connects to the new address, without
// waiting for the old connection to be declared dead.
func TestSetPeerMoved(t *testing.T) {
	a := newNode(t, 1, testKey, func(c *Config) { c.PeerTimeout = time.Hour })
	old := newNode(t, 2, testKey, nil)
	if err := a.SetPeer(2, old.Addr().String()); err != nil {
		t.Fatal(err)
	}
	if err := old.SetPeer(1, ""); err != nil {
		t.Fatal(err)
	}
	sendAll(t, a, 2, 0, 10)
	waitFor(t, "frames to the old address", func() bool { return old.in.count(1) == 10 })

	moved := newNode(t, 2, testKey, nil)
	if err := moved.SetPeer(1, ""); err != nil {
		t.Fatal(err)
	}
	if err := a.SetPeer(2, moved.Addr().String()); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "a connection to the new address", func() bool {
		ps, _ := a.PeerStatus(2)
		return ps.Connected && ps.Incarnation == moved.Incarnation()
	})
	sendAll(t, a, 2, 0, 10) // a new incarnation: a new stream, from message 0
	waitFor(t, "frames to the new address", func() bool { return moved.in.count(1) == 10 })
	if ps, _ := a.PeerStatus(2); ps.Addr != moved.Addr().String() {
		t.Fatalf("peer 2's address %q, want %q", ps.Addr, moved.Addr())
	}
	if old.in.count(1) != 10 {
		t.Fatalf("the old process got %d frames, want only the first 10", old.in.count(1))
	}
	if !a.logs.contains("peer address changed") {
		t.Fatal("the address change was not logged")
	}
	moved.in.check(t)
	old.in.check(t)
}

// TestSetPeerAbandonsDialToOldAddress: a dial whose handshake hangs (the old
// address accepts and never answers) is abandoned when the address
// changes, instead of running into HandshakeTimeout, and the abandoned
// attempt is not counted as a failed handshake.
func TestSetPeerAbandonsDialToOldAddress(t *testing.T) {
	silent, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	accepted := make(chan net.Conn, 16)
	go func() {
		for {
			c, err := silent.Accept()
			if err != nil {
				return
			}
			accepted <- c
		}
	}()
	defer func() {
		for {
			select {
			case c := <-accepted:
				c.Close()
			default:
				return
			}
		}
	}()
	// Longer than the test's guard: only abandoning the dial lets it pass.
	a := newNode(t, 1, testKey, func(c *Config) { c.HandshakeTimeout = 10 * time.Minute })
	b := newNode(t, 2, testKey, nil)
	if err := b.SetPeer(1, ""); err != nil {
		t.Fatal(err)
	}
	if err := a.SetPeer(2, silent.Addr().String()); err != nil {
		t.Fatal(err)
	}
	var c net.Conn
	select {
	case c = <-accepted:
	case <-time.After(waitTimeout):
		t.Fatal("node 1 never dialled the first address")
	}
	defer c.Close()
	if err := a.SetPeer(2, b.Addr().String()); err != nil {
		t.Fatal(err)
	}
	sendAll(t, a, 2, 0, 5)
	waitFor(t, "frames at the new address", func() bool { return b.in.count(1) == 5 })
	if st := a.Stats(); st.HandshakeFailures != 0 {
		t.Fatalf("the abandoned dial counted as %d handshake failures", st.HandshakeFailures)
	}
}

// TestSetPeerRefusesBadInput: invalid IDs and addresses are refused with an
// error that says why, and change nothing.
func TestSetPeerRefusesBadInput(t *testing.T) {
	a := newNode(t, 1, testKey, nil)
	if err := a.SetPeer(2, "127.0.0.1:7410"); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		id   NodeID
		addr string
		want string
	}{
		{0, "127.0.0.1:1", "invalid peer ID 0"},
		{1, "127.0.0.1:1", "invalid peer ID 1"},
		{2, "no-port", "missing port"},
		{2, ":7410", "no host"},
		{2, "10.0.0.1:0", "port must be"},
		{2, "10.0.0.1:70000", "port must be"},
		{2, "10.0.0.1:http", "port must be"},
	} {
		err := a.SetPeer(tc.id, tc.addr)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("SetPeer(%d, %q): %v, want an error mentioning %q", tc.id, tc.addr, err, tc.want)
		}
	}
	if ps, ok := a.PeerStatus(2); !ok || ps.Addr != "127.0.0.1:7410" {
		t.Fatalf("peer 2 after refused updates: %+v (known %v)", ps, ok)
	}
	if _, ok := a.PeerStatus(0); ok {
		t.Fatal("a refused peer was added")
	}
	a.Close()
	if err := a.SetPeer(3, "127.0.0.1:1"); !errors.Is(err, ErrClosed) {
		t.Fatalf("SetPeer after Close: %v", err)
	}
}

// TestUnaddressedQueueBounded: frames for a peer without an address are
// queued only up to MaxUnaddressedQueue; beyond it Send refuses with
// ErrQueueFull and counts it. The frames accepted are delivered in order
// once the address is known, and the bound no longer applies then.
func TestUnaddressedQueueBounded(t *testing.T) {
	const limit = 10 * (HeaderSize + 32)
	a := newNode(t, 1, testKey, func(c *Config) { c.MaxUnaddressedQueue = limit })
	b := newNode(t, 2, testKey, nil)
	if err := b.SetPeer(1, ""); err != nil {
		t.Fatal(err)
	}
	if err := a.SetPeer(2, ""); err != nil {
		t.Fatal(err)
	}
	sendAll(t, a, 2, 0, 10)
	for range 3 {
		if err := a.Send(2, 1, 1, message(10, 32)); !errors.Is(err, ErrQueueFull) {
			t.Fatalf("send past the bound: %v, want ErrQueueFull", err)
		}
	}
	if st := a.Stats(); st.Dropped.QueueFull != 3 {
		t.Fatalf("Dropped.QueueFull = %d, want 3", st.Dropped.QueueFull)
	}
	if ps, _ := a.PeerStatus(2); ps.Unacked != 10 {
		t.Fatalf("%d frames queued, want the 10 accepted", ps.Unacked)
	}
	if !a.logs.contains("queue is full") {
		t.Fatal("the refusal was not logged")
	}
	if err := a.SetPeer(2, b.Addr().String()); err != nil {
		t.Fatal(err)
	}
	sendAll(t, a, 2, 10, 40) // addressed now: no bound beyond the lock manager's
	waitFor(t, "every accepted frame", func() bool { return b.in.count(1) == 40 })
	b.in.check(t)
}

// TestRemovePeer: a removed peer's queue is dropped, sends to it fail, and
// its connection attempts are refused.
func TestRemovePeer(t *testing.T) {
	a := newNode(t, 1, testKey, nil)
	b := newNode(t, 2, testKey, nil)
	connect(a, b)
	sendAll(t, a, 2, 0, 5)
	waitFor(t, "frames before the removal", func() bool { return b.in.count(1) == 5 })
	if !b.RemovePeer(1) {
		t.Fatal("RemovePeer(1) reported no such peer")
	}
	if b.RemovePeer(1) {
		t.Fatal("a second RemovePeer(1) reported a peer")
	}
	if err := b.Send(1, 1, 1, message(0, 8)); !errors.Is(err, ErrUnknownPeer) {
		t.Fatalf("send to a removed peer: %v", err)
	}
	if _, ok := b.PeerStatus(1); ok {
		t.Fatal("the removed peer still has a status")
	}
	waitFor(t, "node 1's reconnection refused", func() bool { return b.Stats().UnknownNodes >= 1 })
}
