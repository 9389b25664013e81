package broadcast

import (
	"context"
	"fmt"
	"io"
	"sync"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/dlm"
)

// This file measures a lock choreography, not the Broadcaster: the
// "mailbox" design of docs/broadcast.md ("What a one-round-trip broadcast
// needs"), reduced to its warm path, so that its cost can be compared with
// the protocol's before anyone rebuilds the protocol on it. It has none of
// the protocol's failure handling (sender death, the token moving, joins,
// leaves, catch-up).
//
// Each receiver R has one mailbox lock, which R masters (it takes it first,
// in NL, and keeps that handle). The sender S holds the mailbox in EX while
// idle; R keeps a *new* request for EX queued behind it (its listener).
// One broadcast, per receiver:
//
//  1. S writes the envelope into the mailbox and converts EX -> NL with
//     VALBLK (a down-conversion: deferred), then NL -> EX with VALBLK (a
//     conversion: sent at once, carrying the deferred one). One frame.
//  2. At R (the master), the down-conversion grants R's listener, with the
//     envelope: notification and message in one go, no frame. S's EX
//     conversion queues behind it.
//  3. R queues its next listener (a new request: it waits behind S's
//     conversion, since conversions are served first), acts, and unlocks
//     the granted listener with its reply as the value (VALBLK from EX).
//  4. S's conversion is granted with the reply, and S is back in EX: the
//     grant and the blocking callback for R's next listener go to S in one
//     frame.
//
// Two frames per receiver and one round trip on the critical path, against
// four frames and two round trips for the ack-lock protocol. The sender
// also writes the canonical message lock (which it masters here), as the
// protocol would keep doing for joins, finishes and catch-up.

// mbReceiver is one receiver's side of the choreography.
type mbReceiver struct {
	ls     *dlm.Lockspace
	name   string
	anchor *dlm.Lock // NL, taken first: R masters the mailbox
	mu     sync.Mutex
	// granted lists the listeners granted, in order, for the receive loop;
	// blocked the granted ones another request waits behind.
	granted []*dlm.Lock
	blocked map[*dlm.Lock]bool
	held    *dlm.Lock // granted without a new envelope: kept until blocked
	seen    uint64
	sig     chan struct{}
	err     error
	// spurious counts listeners granted without a new envelope: the
	// sender's down-conversion reached the master on its own (its deferral
	// timer fired before the conversion that carries it was made), so the
	// listener queued behind the previous answer was granted first.
	spurious int
}

func (r *mbReceiver) wake() {
	select {
	case r.sig <- struct{}{}:
	default:
	}
}

// listen queues a new listener (EX, VALBLK) on the mailbox.
func (r *mbReceiver) listen(ctx context.Context) error {
	_, err := r.ls.LockAsync(ctx, dlm.LockRequest{Resource: r.name, Mode: dlm.EX, Flags: dlm.ValBlk,
		OnBlock: func(l *dlm.Lock, _ dlm.Mode) {
			r.mu.Lock()
			r.blocked[l] = true
			r.mu.Unlock()
			r.wake()
		}},
		func(l *dlm.Lock, err error) {
			r.mu.Lock()
			if err != nil {
				r.err = err
			} else {
				r.granted = append(r.granted, l)
			}
			r.mu.Unlock()
			r.wake()
		})
	return err
}

// loop is the receive loop: for every granted listener holding a new
// envelope, queue the next listener, act, and reply through the granted
// one. A listener granted without one is kept until the sender's request
// blocks on it, then exchanged for a new one without touching the value.
func (r *mbReceiver) loop(ctx context.Context, self dlm.NodeID) error {
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-r.sig:
		}
		for {
			r.mu.Lock()
			if r.err != nil {
				err := r.err
				r.mu.Unlock()
				return err
			}
			if h := r.held; h != nil && r.blocked[h] {
				r.held = nil
				delete(r.blocked, h)
				r.mu.Unlock()
				if err := r.listen(ctx); err != nil {
					return err
				}
				if err := h.Unlock(ctx, 0); err != nil {
					return err
				}
				continue
			}
			if len(r.granted) == 0 || r.held != nil {
				r.mu.Unlock()
				break
			}
			l := r.granted[0]
			r.granted = r.granted[1:]
			r.mu.Unlock()
			e, err := DecodeEnvelope(l.LVB())
			if err != nil || e.Seq <= r.seen {
				r.mu.Lock()
				r.held = l
				r.spurious++
				r.mu.Unlock()
				continue
			}
			r.seen = e.Seq
			if err := r.listen(ctx); err != nil {
				return err
			}
			reply := Reply{Seq: e.Seq, Node: self, Status: StatusActed}
			if err := l.SetLVB(reply.Encode(LVBSize)); err != nil {
				return err
			}
			r.mu.Lock()
			delete(r.blocked, l)
			r.mu.Unlock()
			if err := l.Unlock(ctx, dlm.ValBlk); err != nil {
				return err
			}
		}
	}
}

// BenchmarkMailbox3 is BenchmarkBroadcast3's measurement (three nodes, node
// 1 sends, blocks alternating with raw TCP round trips, frames and CPU per
// broadcast) applied to the mailbox choreography described above.
func BenchmarkMailbox3(b *testing.B) { benchMailbox(b, 3) }

func benchMailbox(b *testing.B, nodes int) {
	c := startCluster(b, nodes, nil) // the broadcasters stay unjoined
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	sender := c.nodes[0]
	msgLock, err := sender.ls.Acquire(ctx, dlm.LockRequest{Resource: "mb-message", Mode: dlm.EX, Flags: dlm.ValBlk})
	if err != nil {
		b.Fatal(err)
	}
	type box struct {
		node dlm.NodeID
		lk   *dlm.Lock
	}
	var boxes []box
	var recvs []*mbReceiver
	var wg sync.WaitGroup
	errs := make(chan error, nodes)
	for _, n := range c.nodes[1:] {
		r := &mbReceiver{ls: n.ls, name: fmt.Sprintf("mbox%04d", n.id-1), sig: make(chan struct{}, 1), blocked: map[*dlm.Lock]bool{}}
		recvs = append(recvs, r)
		if r.anchor, err = n.ls.Acquire(ctx, dlm.LockRequest{Resource: r.name, Mode: dlm.NL}); err != nil {
			b.Fatal(err)
		}
		lk, err := sender.ls.Acquire(ctx, dlm.LockRequest{Resource: r.name, Mode: dlm.EX, Flags: dlm.ValBlk})
		if err != nil {
			b.Fatal(err)
		}
		boxes = append(boxes, box{node: n.id, lk: lk})
		if err := r.listen(ctx); err != nil {
			b.Fatal(err)
		}
		wg.Add(1)
		go func(id dlm.NodeID) {
			defer wg.Done()
			if err := r.loop(ctx, id); err != nil {
				errs <- err
			}
		}(n.id)
	}
	defer wg.Wait()
	defer cancel()
	var seq uint64
	n := LVBSize
	bcast := func() {
		seq++
		e := Envelope{Msg: Message{Type: MetadataUpdated, RaidSlot: 1}, Seq: seq, Sender: 1}
		val := e.Encode(n)
		// The canonical copy, as the protocol keeps it (local master).
		if err := msgLock.SetLVB(val); err != nil {
			b.Fatal(err)
		}
		if err := msgLock.Convert(ctx, dlm.CW, dlm.ValBlk); err != nil {
			b.Fatal(err)
		}
		var failed error
		var fmu sync.Mutex
		goroutines(len(boxes), func(i int) {
			bx := boxes[i]
			err := bx.lk.SetLVB(val)
			if err == nil {
				err = bx.lk.Convert(ctx, dlm.NL, dlm.ValBlk)
			}
			if err == nil {
				cctx, cc := context.WithTimeout(ctx, guard)
				err = bx.lk.Convert(cctx, dlm.EX, dlm.ValBlk)
				cc()
			}
			if err == nil && !Matches(seq, bx.node, bx.lk.LVB()) {
				err = fmt.Errorf("node %d: no reply to %d in the mailbox", bx.node, seq)
			}
			if err != nil {
				fmu.Lock()
				failed = err
				fmu.Unlock()
			}
		})
		if failed != nil {
			b.Fatal(failed)
		}
		if err := msgLock.Convert(ctx, dlm.EX, dlm.ValBlk); err != nil {
			b.Fatal(err)
		}
		select {
		case err := <-errs:
			b.Fatal(err)
		default:
		}
	}
	conn := echoConn(b)
	buf := make([]byte, 64)
	ping := func() {
		if _, err := conn.Write(buf); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(conn, buf); err != nil {
			b.Fatal(err)
		}
	}
	for range 200 {
		bcast()
		ping()
	}
	const block = 64
	var tBcast, tPing, cBcast, cPing time.Duration
	frames := func() (n uint64) {
		for _, nd := range c.nodes {
			n += nd.dn.Controller().Transport().Stats().FramesSent
		}
		return n
	}
	f0 := frames()
	b.ReportAllocs()
	b.ResetTimer()
	for done := 0; done < b.N; {
		k := min(block, b.N-done)
		c0, t0 := cpuTime(), time.Now()
		for range k {
			bcast()
		}
		c1, t1 := cpuTime(), time.Now()
		for range k {
			ping()
		}
		tPing += time.Since(t1)
		cPing += cpuTime() - c1
		tBcast += t1.Sub(t0)
		cBcast += c1 - c0
		done += k
	}
	b.StopTimer()
	spurious := 0
	for _, r := range recvs {
		r.mu.Lock()
		spurious += r.spurious
		r.mu.Unlock()
	}
	b.ReportMetric(float64(spurious)/float64(b.N), "spurious/bcast")
	b.ReportMetric(float64(frames()-f0)/float64(b.N), "frames/bcast")
	b.ReportMetric(float64(tBcast.Nanoseconds())/float64(b.N), "bcast-ns")
	b.ReportMetric(float64(tPing.Nanoseconds())/float64(b.N), "rtt-ns")
	b.ReportMetric(float64(tBcast)/float64(tPing), "bcast/rtt")
	if cBcast > 0 && cPing > 0 {
		b.ReportMetric(float64(cBcast.Nanoseconds())/float64(b.N), "bcast-cpu-ns")
		b.ReportMetric(float64(cPing.Nanoseconds())/float64(b.N), "rtt-cpu-ns")
	}
}
