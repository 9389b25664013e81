package dlm_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"time"

	"github.com/mdcluster/mdcluster/dlm"
)

// A cluster of one: take a lock with a value to publish, publish it by
// down-converting with ValBlk, read it from another lock, and release.
func Example() {
	node, err := dlm.NewNode(dlm.DefaultConfig())
	if err != nil {
		log.Fatal(err)
	}
	defer node.Close()
	ls, err := node.Open("md0", dlm.OpenOptions{LVBLen: 8})
	if err != nil {
		log.Fatal(err)
	}
	ctx := context.Background()

	// The request's LVB (without ValBlk) is the value a later ValBlk
	// down-conversion or unlock from PW/EX writes.
	w, err := ls.Acquire(ctx, dlm.LockRequest{Resource: "config", Mode: dlm.EX, LVB: []byte("version1")})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("writer holds", w.Mode())
	if err := w.Convert(ctx, dlm.NL, dlm.ValBlk); err != nil {
		log.Fatal(err)
	}
	fmt.Println("writer converted to", w.Mode())

	// A grant with ValBlk reads the resource's value.
	r, err := ls.Lock(ctx, "config", dlm.PR, dlm.ValBlk)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("reader holds %v and reads %q (write #%d)\n", r.Mode(), r.LVB(), r.LVBSeq())

	for _, lk := range []*dlm.Lock{r, w} {
		if err := lk.Unlock(ctx, 0); err != nil {
			log.Fatal(err)
		}
	}
	fmt.Println("after unlock:", w.Mode())
	// Output:
	// writer holds EX
	// writer converted to NL
	// reader holds PR and reads "version1" (write #1)
	// after unlock: IV
}

// NoQueue refuses at once, with ErrAgain, a request that cannot be
// granted now; the failed request leaves no lock.
func ExampleLockspace_Lock_noQueue() {
	node, err := dlm.NewNode(dlm.DefaultConfig())
	if err != nil {
		log.Fatal(err)
	}
	defer node.Close()
	ls, err := node.Open("md0", dlm.OpenOptions{})
	if err != nil {
		log.Fatal(err)
	}
	ctx := context.Background()
	if _, err := ls.Lock(ctx, "bitmap0001", dlm.PW, 0); err != nil {
		log.Fatal(err)
	}
	lk, err := ls.Lock(ctx, "bitmap0001", dlm.PW, dlm.NoQueue)
	fmt.Println(errors.Is(err, dlm.ErrAgain), lk == nil)
	// Output:
	// true true
}

// A holder with a blocking callback hears of a request it blocks and gives
// way; the waiting request is then granted.
func ExampleLockRequest_onBlock() {
	node, err := dlm.NewNode(dlm.DefaultConfig())
	if err != nil {
		log.Fatal(err)
	}
	defer node.Close()
	ls, err := node.Open("md0", dlm.OpenOptions{})
	if err != nil {
		log.Fatal(err)
	}
	ctx := context.Background()
	_, err = ls.Acquire(ctx, dlm.LockRequest{Resource: "token", Mode: dlm.EX,
		OnBlock: func(l *dlm.Lock, blocked dlm.Mode) {
			// On the lockspace's callback goroutine: give way without
			// waiting here.
			fmt.Println("holder blocks a request for", blocked)
			if err := l.UnlockAsync(ctx, 0, func(*dlm.Lock, error) {}); err != nil {
				log.Fatal(err)
			}
		}})
	if err != nil {
		log.Fatal(err)
	}
	lk, err := ls.Lock(ctx, "token", dlm.EX, 0) // waits until the holder gives way
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("waiter granted", lk.Mode())
	// Output:
	// holder blocks a request for EX
	// waiter granted EX
}

// A request still waiting when its context's deadline passes is cancelled;
// the error matches both the DLM status and the context's error.
func ExampleLockspace_Lock_deadline() {
	node, err := dlm.NewNode(dlm.DefaultConfig())
	if err != nil {
		log.Fatal(err)
	}
	defer node.Close()
	ls, err := node.Open("md0", dlm.OpenOptions{})
	if err != nil {
		log.Fatal(err)
	}
	if _, err := ls.Lock(context.Background(), "resync", dlm.EX, 0); err != nil {
		log.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Millisecond)
	defer cancel()
	_, err = ls.Lock(ctx, "resync", dlm.EX, 0)
	fmt.Println(errors.Is(err, context.DeadlineExceeded), errors.Is(err, dlm.ErrTimeout))
	// Output:
	// true true
}

// printRecovery prints a lockspace's recovery events.
type printRecovery struct{ done chan struct{} }

func (p printRecovery) RecoverPrepare(gen uint64) { fmt.Println("prepare, leaving generation", gen) }
func (p printRecovery) RecoverDeparted(gen uint64, nodes []dlm.NodeID) {
	fmt.Println("departed in generation", gen, nodes)
}
func (p printRecovery) RecoverDone(gen uint64, members []dlm.NodeID, self dlm.NodeID) {
	fmt.Println("done: generation", gen, "members", members, "self", self)
	close(p.done)
}

// A membership layer drives view changes through the Controller; a
// lockspace handle with a RecoveryHandler hears of them in order.
func ExampleController_Recover() {
	node, err := dlm.NewNode(dlm.DefaultConfig())
	if err != nil {
		log.Fatal(err)
	}
	defer node.Close()
	h := printRecovery{done: make(chan struct{})}
	if _, err := node.Open("md0", dlm.OpenOptions{Recovery: h}); err != nil {
		log.Fatal(err)
	}
	ctl := node.Controller()
	ctl.Stop()
	// Node 2 failed and was fenced (here it never existed).
	if err := ctl.Recover(2, []dlm.NodeID{1}, []dlm.NodeID{2}, false); err != nil {
		log.Fatal(err)
	}
	<-h.done
	// Output:
	// prepare, leaving generation 1
	// departed in generation 2 [2]
	// done: generation 2 members [1] self 1
}
