package dlm

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"testing"
	"time"
)

// TestRepliesToABurstLeaveTogether checks that a master answering a burst
// of requests that reached it together sends its replies in a few frames,
// not one frame per request: the replies made while the transport's
// reader handles the frames it holds are parked until its batch ends
// (stepParked, Node.batchDone). It also checks that every request is
// answered, so a reply parked and never sent fails it too.
func TestRepliesToABurstLeaveTogether(t *testing.T) {
	key := []byte("mdcluster-test-cluster-key-0123456789")
	var lns [2]net.Listener
	for i := range lns {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		lns[i] = ln
	}
	var nodes [2]*Node
	for i := range nodes {
		other := 1 - i
		n, err := NewNode(Config{ID: NodeID(i + 1), Listener: lns[i], ClusterKey: key,
			Peers:  map[NodeID]string{NodeID(other + 1): lns[other].Addr().String()},
			Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { n.Close() })
		nodes[i] = n
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var ls [2]*Lockspace
	for i, n := range nodes {
		l, err := n.Open("burst", OpenOptions{})
		if err != nil {
			t.Fatal(err)
		}
		ls[i] = l
	}
	// Node 2 masters every resource; node 1 holds NL on each so that it
	// knows the master and its EX requests go straight there.
	const burst = 32
	for r := range burst {
		name := fmt.Sprintf("r%02d", r)
		if _, err := ls[1].Lock(ctx, name, NL, 0); err != nil {
			t.Fatal(err)
		}
		if _, err := ls[0].Lock(ctx, name, NL, 0); err != nil {
			t.Fatal(err)
		}
	}
	// Stall node 2's reader on its lockspace lock while the burst piles up
	// in its socket.
	sp := nodes[1].spaces["burst"]
	sp.mu.Lock()
	tr1, _ := nodes[0].TransportStats()
	tr2, _ := nodes[1].TransportStats()
	var wg sync.WaitGroup
	errs := make(chan error, burst)
	for r := range burst {
		wg.Add(1)
		_, err := ls[0].LockAsync(ctx, LockRequest{Resource: fmt.Sprintf("r%02d", r), Mode: EX},
			func(_ *Lock, err error) {
				if err != nil {
					errs <- err
				}
				wg.Done()
			})
		if err != nil {
			sp.mu.Unlock()
			t.Fatal(err)
		}
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		s, _ := nodes[0].TransportStats()
		if s.FramesSent-tr1.FramesSent >= burst {
			break
		}
		if time.Now().After(deadline) {
			sp.mu.Unlock()
			t.Fatalf("node 1 sent %d frames of its %d requests", s.FramesSent-tr1.FramesSent, burst)
		}
		time.Sleep(time.Millisecond)
	}
	time.Sleep(50 * time.Millisecond) // let them reach node 2's socket
	sp.mu.Unlock()
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	s2, _ := nodes[1].TransportStats()
	frames := s2.FramesSent - tr2.FramesSent
	t.Logf("node 2 answered %d requests in %d frames, %d writes", burst, frames, s2.Writes-tr2.Writes)
	if frames > 4 {
		t.Fatalf("node 2 answered %d requests that arrived together in %d frames: replies not batched", burst, frames)
	}
}
