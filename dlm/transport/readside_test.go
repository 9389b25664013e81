package transport

import (
	"context"
	"math/rand/v2"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// echoPair starts node 1 and node 2; node 2 answers every payload starting
// with 'Q' with the same payload, node 1 hands every received payload to
// onReply (when set) after recording it in its inbox.
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

// roundTrip sends a 'Q' frame from n1 to node 2 and awaits the reply,
// claiming the connection first as a lock request does.
func roundTrip(t *testing.T, n1 *node, w *Waiter) {
	t.Helper()
	q := []byte("Q-ping")
	n1.Claim(2, w)
	if err := n1.Send(2, 1, 1, q); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	if !n1.Await(ctx, 2, w) {
		t.Fatal("no reply")
	}
	w.Reset()
}

// A caller waiting for a peer's reply reads the connection itself once the
// watcher has stepped aside: after the first round trip every wait is
// inline.
func TestAwaitReadsInline(t *testing.T) {
	w := NewWaiter()
	n1, _ := echoPair(t, func([]byte) { w.Wake() })
	for range 5 { // the watcher steps aside after the first wait
		roundTrip(t, n1, w)
	}
	before := n1.Stats().InlineWaits
	const trips = 200
	for range trips {
		roundTrip(t, n1, w)
	}
	st := n1.Stats()
	if got := st.InlineWaits - before; got != trips {
		t.Fatalf("only %d of %d waits read the connection themselves: %+v", got, trips, st)
	}
	t.Logf("%+v", st)
}

// A caller blocked reading the connection is interrupted when another
// goroutine wakes it, even though nothing arrives.
func TestAwaitWokenElsewhere(t *testing.T) {
	w := NewWaiter()
	n1, _ := echoPair(t, func([]byte) { w.Wake() })
	for range 20 {
		roundTrip(t, n1, w)
	}
	before := n1.Stats().InlineWaits
	timer := time.AfterFunc(20*time.Millisecond, w.Wake)
	defer timer.Stop()
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	if !n1.Await(ctx, 2, w) {
		t.Fatal("Await ended by its context, not by the wake-up")
	}
	if n1.Stats().InlineWaits != before+1 {
		t.Fatal("the wait did not read the connection: nothing was interrupted")
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("woken after %v", d)
	}
	w.Reset()
	roundTrip(t, n1, w) // the connection still works
}

// When a waiting caller gives up (its context ends) the connection goes
// back to the watcher: frames nobody waits for are still handled.
func TestAwaitContextEndsThenWatcherReads(t *testing.T) {
	w := NewWaiter()
	n1, n2 := echoPair(t, func([]byte) { w.Wake() })
	for range 20 {
		roundTrip(t, n1, w)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if n1.Await(ctx, 2, w) {
		t.Fatal("woken with nothing to wake it")
	}
	// Unsolicited frames from node 2, and replies nobody awaits.
	for i := range uint64(100) {
		if err := n2.Send(1, 1, 1, message(i, 16+int(i)*300)); err != nil {
			t.Fatal(err)
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for n1.in.count(2) < 100 {
		if time.Now().After(deadline) {
			t.Fatalf("after 5s only %d of 100 unsolicited frames were delivered", n1.in.count(2))
		}
		time.Sleep(time.Millisecond)
	}
	n1.in.check(t)
	st := n1.Stats()
	if st.IdleWakes == 0 {
		t.Error("the watcher was not woken from its idle poller")
	}
	if st.ConnectionsLost != 0 {
		t.Errorf("%d connections lost", st.ConnectionsLost)
	}
}

// awaitInline warms n1's connection to node 2 up (the watcher steps aside),
// then starts an Await on w in the background and returns once that caller
// is reading the connection itself; the channel receives Await's result.
func awaitInline(t *testing.T, n1 *node, w *Waiter) <-chan bool {
	t.Helper()
	for range 20 {
		roundTrip(t, n1, w)
	}
	before := n1.Stats().InlineWaits
	done := make(chan bool, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
		defer cancel()
		done <- n1.Await(ctx, 2, w)
	}()
	waitFor(t, "the caller to read inline", func() bool { return n1.Stats().InlineWaits > before })
	return done
}

// A caller reading a connection that dies falls back to waiting on its
// waiter; the transport reconnects and carries on.
func TestAwaitConnectionDies(t *testing.T) {
	w := NewWaiter()
	n1, _ := echoPair(t, func([]byte) { w.Wake() })
	done := awaitInline(t, n1, w)
	killConn(t, n1, 2) // the socket dies under the reading caller
	waitFor(t, "a new connection", func() bool { return n1.Stats().ConnectionsEstablished >= 2 })
	w.Wake()
	if !<-done {
		t.Fatal("Await did not return the wake-up")
	}
	w.Reset()
	roundTrip(t, n1, w)
}

// Close waits for a caller reading inline and makes it stop reading.
func TestCloseWhileAwaitReads(t *testing.T) {
	w := NewWaiter()
	n1, _ := echoPair(t, func([]byte) { w.Wake() })
	done := awaitInline(t, n1, w)
	closed := make(chan struct{})
	go func() {
		n1.Close()
		close(closed)
	}()
	select {
	case <-closed:
	case <-time.After(waitTimeout):
		t.Fatal("Close hangs while a caller reads inline")
	}
	w.Wake()
	if !<-done {
		t.Fatal("Await did not return the wake-up after Close")
	}
}

// TestAwaitStress streams frames of every size (many larger than the read
// buffer) from node 2 while goroutines on node 1 keep taking and giving up
// the connection: Awaits ended by short contexts, by wake-ups from other
// goroutines, or by replies they read themselves. Every frame must be
// delivered exactly once and in order whoever reads it, including frames
// whose reading was interrupted part-way. Replay with TRANSPORT_SEED=n.
func TestAwaitStress(t *testing.T) {
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("TRANSPORT_SEED"); s != "" {
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("TRANSPORT_SEED: %v", err)
		}
		seed = v
	}
	t.Logf("seed %d (replay: TRANSPORT_SEED=%d go test -run TestAwaitStress ./dlm/transport/)", seed, seed)
	const msgs = 3000
	const callers = 4
	waiters := make([]*Waiter, callers)
	for i := range waiters {
		waiters[i] = NewWaiter()
	}
	var replyTo atomic.Int64 // which caller the next 'Q' reply wakes
	n1, n2 := echoPair(t, func([]byte) { waiters[replyTo.Load()].Wake() })
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var qmu sync.Mutex // one 'Q' round trip at a time, so a reply wakes its sender
	for i := range callers {
		rng := rand.New(rand.NewPCG(seed, uint64(i)))
		wg.Add(1)
		go func() {
			defer wg.Done()
			w := waiters[i]
			for {
				select {
				case <-stop:
					return
				default:
				}
				switch rng.IntN(4) {
				case 0: // a round trip of our own, the connection claimed first or not
					qmu.Lock()
					replyTo.Store(int64(i))
					if rng.IntN(2) == 0 {
						n1.Claim(2, w)
					}
					if err := n1.Send(2, 1, 1, []byte("Q")); err != nil {
						qmu.Unlock()
						return
					}
					ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
					ok := n1.Await(ctx, 2, w)
					cancel()
					qmu.Unlock()
					if !ok {
						t.Error("no reply to a round trip")
						return
					}
				case 1: // give up after a short while
					ctx, cancel := context.WithTimeout(context.Background(), time.Duration(rng.IntN(300))*time.Microsecond)
					woken := n1.Await(ctx, 2, w)
					cancel()
					if woken {
						t.Error("woken with nothing to wake it")
						return
					}
					continue
				case 2: // woken by another goroutine
					timer := time.AfterFunc(time.Duration(rng.IntN(300))*time.Microsecond, w.Wake)
					n1.Await(context.Background(), 2, w)
					timer.Stop()
				case 3: // a claim given up without waiting
					n1.Claim(2, w)
					time.Sleep(time.Duration(rng.IntN(100)) * time.Microsecond)
					n1.Unclaim(w)
					continue
				}
				w.Reset()
			}
		}()
	}
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
	close(stop)
	wg.Wait()
	n1.in.check(t)
	st := n1.Stats()
	t.Logf("%+v", st)
	if st.ConnectionsLost != 0 || st.MalformedFrames != 0 || st.ProtocolErrors != 0 {
		t.Errorf("the stream broke: %d connections lost, %d malformed, %d protocol errors (a frame resumed wrongly?)",
			st.ConnectionsLost, st.MalformedFrames, st.ProtocolErrors)
	}
	if st.InlineWaits == 0 {
		t.Error("no caller ever read the connection")
	}
}

// Every connection has an idle poller (an epoll instance and an eventfd):
// connections that die and transports that close must give them back.
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
		w := NewWaiter()
		n1, n2 := echoPair(t, func([]byte) { w.Wake() })
		for range 5 {
			roundTrip(t, n1, w)
		}
		for k := range 10 {
			killConn(t, n1, 2)
			waitFor(t, "a new connection", func() bool { return n1.Stats().ConnectionsEstablished >= uint64(k+2) })
			roundTrip(t, n1, w)
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
