package wake

import (
	"context"
	"syscall"
	"testing"
	"time"
)

// TestNewPollFD makes and checks many eventfds: the pollability check in
// newPollFD must never miss the event it signals itself.
func TestNewPollFD(t *testing.T) {
	deadline := time.AfterFunc(60*time.Second, func() { panic("newPollFD hung") })
	defer deadline.Stop()
	for range 2000 {
		p, err := newPollFD()
		if err != nil {
			t.Fatal(err)
		}
		p.f.Close()
	}
}

// TestIdleWaitersUseNoCPU: goroutines parked on Waiters (eventfd-backed and,
// past Limit, channel-backed) cost no CPU while they wait: nothing spins.
func TestIdleWaitersUseNoCPU(t *testing.T) {
	const n = Limit + 8
	ws := make([]*Waiter, n)
	done := make(chan struct{}, n)
	for i := range ws {
		ws[i] = Get()
		go func() { ws[i].Wait(context.Background()); done <- struct{}{} }()
	}
	time.Sleep(50 * time.Millisecond) // let them park
	before := cpuTime(t)
	time.Sleep(500 * time.Millisecond)
	used := cpuTime(t) - before
	for _, w := range ws {
		w.Wake()
	}
	for range n {
		<-done
	}
	for _, w := range ws {
		Put(w)
	}
	// A spinning waiter would use about 500 ms here.
	if used > 50*time.Millisecond {
		t.Fatalf("process used %v of CPU in 500 ms with %d idle waiters", used, n)
	}
	t.Logf("process CPU over 500 ms with %d idle waiters: %v", n, used)
}

func cpuTime(t *testing.T) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		t.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
