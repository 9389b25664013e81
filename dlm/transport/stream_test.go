package transport

import (
	"context"
	"math/rand/v2"
	"os"
	"strconv"
	"testing"
	"time"
)

// echoPair starts node 1 and node 2; node 2 answers every payload starting
// with 'Q' with the same payload, node 1 hands every 'Q' reply to onReply
// (when set) and records every other payload in its inbox.
func echoPair(t *testing.T, onReply func([]byte)) (*node, *node) {
	t.Helper()
	var n2 *node
	in1 := newInbox()
	n1 := newNode(t, 1, testKey, func(c *Config) {
		c.Handler = func(from NodeID, ls LockspaceID, gen uint64, p []byte) {
			if len(p) > 0 && p[0] == 'Q' {
				if onReply != nil {
					onReply(p)
				}
				return
			}
			in1.handle(from, ls, gen, p)
		}
	})
	n1.in = in1
	n2 = newNode(t, 2, testKey, func(c *Config) {
		c.Handler = func(from NodeID, ls LockspaceID, gen uint64, p []byte) {
			if len(p) > 0 && p[0] == 'Q' {
				n2.Send(from, ls, gen, p)
				return
			}
			n2.in.handle(from, ls, gen, p)
		}
	})
	connect(n1, n2)
	return n1, n2
}

// roundTrip sends a 'Q' frame from n1 to node 2 and waits for the reply on
// replies, as a synchronous lock request waits for its grant.
func roundTrip(t *testing.T, n1 *node, replies <-chan struct{}) {
	t.Helper()
	if err := n1.Send(2, 1, 1, []byte("Q-ping")); err != nil {
		t.Fatal(err)
	}
	select {
	case <-replies:
	case <-time.After(waitTimeout):
		t.Fatal("no reply")
	}
}

// TestStreamEverySize streams frames of every size (many larger than the
// read buffer) from node 2 while node 1 keeps doing round trips of its own:
// every frame must be delivered exactly once and in order, and no
// connection lost. Replay with TRANSPORT_SEED=n.
func TestStreamEverySize(t *testing.T) {
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("TRANSPORT_SEED"); s != "" {
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("TRANSPORT_SEED: %v", err)
		}
		seed = v
	}
	t.Logf("seed %d (replay: TRANSPORT_SEED=%d go test -run TestStreamEverySize ./dlm/transport/)", seed, seed)
	const msgs = 3000
	replies := make(chan struct{}, 1)
	n1, n2 := echoPair(t, func([]byte) { replies <- struct{}{} })
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		for ctx.Err() == nil {
			if err := n1.Send(2, 1, 1, []byte("Q")); err != nil {
				return
			}
			select {
			case <-replies:
			case <-ctx.Done():
				return
			}
		}
	}()
	rng := rand.New(rand.NewPCG(seed, 99))
	for i := range uint64(msgs) {
		size := 8 + rng.IntN(200)
		if rng.IntN(4) == 0 {
			size = 8 + rng.IntN(3*64<<10) // past the default 64 KiB read buffer
		}
		if err := n2.Send(1, 1, 1, message(i, size)); err != nil {
			t.Fatal(err)
		}
		if i%64 == 0 {
			time.Sleep(time.Duration(rng.IntN(200)) * time.Microsecond)
		}
	}
	waitFor(t, "every frame delivered", func() bool { return n1.in.count(2) >= msgs })
	cancel()
	<-done
	n1.in.check(t)
	st := n1.Stats()
	if st.ConnectionsLost != 0 || st.MalformedFrames != 0 || st.ProtocolErrors != 0 {
		t.Errorf("the stream broke: %d connections lost, %d malformed, %d protocol errors",
			st.ConnectionsLost, st.MalformedFrames, st.ProtocolErrors)
	}
}

// Connections that die and transports that close give their descriptors
// back.
func TestReconnectsLeakNoDescriptors(t *testing.T) {
	count := func() int {
		es, err := os.ReadDir("/proc/self/fd")
		if err != nil {
			t.Skipf("cannot count descriptors here: %v", err)
		}
		return len(es)
	}
	base := count()
	func() {
		replies := make(chan struct{}, 1)
		n1, n2 := echoPair(t, func([]byte) { replies <- struct{}{} })
		for range 5 {
			roundTrip(t, n1, replies)
		}
		for k := range 10 {
			killConn(t, n1, 2)
			waitFor(t, "a new connection", func() bool { return n1.Stats().ConnectionsEstablished >= uint64(k+2) })
			roundTrip(t, n1, replies)
		}
		n1.Close()
		n2.Close()
	}()
	deadline := time.Now().Add(waitTimeout)
	for count() > base {
		if time.Now().After(deadline) {
			t.Fatalf("%d descriptors before, %d after the transports closed", base, count())
		}
		time.Sleep(5 * time.Millisecond)
	}
}
